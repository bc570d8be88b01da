"""Markdown bodies: CommonMark to a sanitized HTML part and a plain-text part made from it.

An operator writes a body in Markdown; each recipient's rendered template is turned into the
two parts of the email. The input is a sender's text with recipients' fields in it, so the
HTML is safe twice over: markdown-it renders with raw HTML off (``<b>`` comes out as text) and
refuses ``javascript:``, ``vbscript:``, ``file:`` and ``data:`` links, then nh3 (the Ammonia
sanitizer) keeps only a fixed list of tags and attributes and http(s)/mailto link targets.
Bare URLs become links in the HTML; in the text part every link the HTML keeps is written out
after its text (one it dropped, ``ftp:`` say, shows as its text alone), so both parts have the
same clickable links.

Rendering is linear in the size of the body, and nesting is capped (markdown-it's
``maxNesting``), so a body's size limit bounds its cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token

_ALLOWED_TAGS = {
    "a", "blockquote", "br", "code", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "img",
    "li", "ol", "p", "pre", "strong", "ul",
}  # fmt: skip
_ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title"}, "ol": {"start"}}
_URL_SCHEMES = {"http", "https", "mailto"}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986 3.1


def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "linkify": True, "typographer": False}).enable(
        "linkify"
    )


_MARKDOWN = _parser()


@dataclass(frozen=True)
class RenderedBody:
    html: str  # the inside of <body>: sanitized, no script, no style, no event handler
    text: str


def render_markdown(source: str) -> RenderedBody:
    """The HTML and the plain-text parts of a Markdown body."""
    tokens = _MARKDOWN.parse(source)
    html = nh3.clean(
        _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {}),
        tags=_ALLOWED_TAGS,
        attributes=_ALLOWED_ATTRIBUTES,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer",
    )
    return RenderedBody(html=html, text=_PlainText().render(tokens))


_BLOCK_ENDS = ("paragraph_close", "heading_close", "bullet_list_close", "ordered_list_close")


class _PlainText:
    """Markdown tokens as readable plain text: the words, with each link's target after it."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._prefixes: list[str] = []  # "> " for quotes, list markers for items
        self._ordinals: list[int | None] = []  # per open list: the next number, None if bullets

    def render(self, tokens: list[Token]) -> str:
        for token in tokens:
            self._block(token)
        text = "\n".join(self._lines)
        while "\n\n\n" in text:
            text = text.replace("\n\n\n", "\n\n")
        return text.strip() + "\n"

    def _emit(self, text: str) -> None:
        prefix = "".join(self._prefixes)
        for line in text.split("\n"):
            self._lines.append((prefix + line).rstrip())
            # A list marker is written once; the item's next lines are indented under it.
            if self._prefixes and self._prefixes[-1].strip() not in ("", ">"):
                self._prefixes[-1] = " " * len(self._prefixes[-1])
                prefix = "".join(self._prefixes)

    def _block(self, token: Token) -> None:
        kind = token.type
        if kind == "inline":
            self._emit(_inline_text(token.children or []))
        elif kind in _BLOCK_ENDS:
            if kind.endswith("list_close"):
                self._ordinals.pop()
            if not self._in_tight_item(token):
                self._lines.append("")
        elif kind == "blockquote_open":
            self._prefixes.append("> ")
        elif kind == "blockquote_close":
            self._prefixes.pop()
            self._lines.append("")
        elif kind == "bullet_list_open":
            self._ordinals.append(None)
        elif kind == "ordered_list_open":
            self._ordinals.append(int(token.attrGet("start") or 1))
        elif kind == "list_item_open":
            number = self._ordinals[-1] if self._ordinals else None
            if number is None:
                self._prefixes.append("- ")
            else:
                self._prefixes.append(f"{number}. ")
                self._ordinals[-1] = number + 1
        elif kind == "list_item_close":
            self._prefixes.pop()
        elif kind in ("fence", "code_block"):
            self._emit("\n".join("    " + line for line in token.content.rstrip("\n").split("\n")))
            self._lines.append("")
        elif kind == "hr":
            self._emit("----")
            self._lines.append("")

    @staticmethod
    def _in_tight_item(token: Token) -> bool:
        return token.type == "paragraph_close" and token.hidden


def _kept_in_html(href: str) -> bool:
    """Whether the sanitizer keeps this target: the text part shows no link the HTML dropped
    (``ftp:``, ``tel:`` …); a target without a scheme is kept by both."""
    scheme = _SCHEME.match(href)
    return scheme is None or scheme.group(1).lower() in _URL_SCHEMES


def _inline_text(children: list[Token]) -> str:
    out: list[str] = []
    link: dict[str, Any] | None = None
    for child in children:
        kind = child.type
        if kind in ("text", "code_inline"):
            out.append(child.content)
            if link is not None:
                link["text"].append(child.content)
        elif kind in ("softbreak", "hardbreak"):
            out.append("\n")
        elif kind == "link_open":
            link = {"href": str(child.attrGet("href") or ""), "text": []}
        elif kind == "link_close" and link is not None:
            label = "".join(link["text"]).strip()
            href = link["href"]
            shown = href.removeprefix("mailto:")
            if href and label not in (href, shown) and _kept_in_html(href):
                out.append(f" ({href})")
            link = None
        elif kind == "image":
            alt = child.content or "image"
            out.append(f"{alt} ({child.attrGet('src') or ''})")
    return "".join(out)

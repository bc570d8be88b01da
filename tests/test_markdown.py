"""Markdown bodies: CommonMark in, a sanitized HTML part and a readable text part out."""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.markdown import render_markdown


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def test_commonmark_becomes_html_and_readable_text_with_links_in_both() -> None:
    body = render_markdown(
        "# Spring news\n\nDear **Ann**, read [the report](https://example.org/r) or"
        " https://example.org/bare.\n\n- one\n- two\n\n1. first\n2. second\n\n> a quote\n"
    )
    assert "<h1>Spring news</h1>" in body.html
    assert "<strong>Ann</strong>" in body.html
    hrefs = [a.get("href") for tag, a in _tags(body.html) if tag == "a"]
    assert hrefs == ["https://example.org/r", "https://example.org/bare"]
    assert body.text == (
        "Spring news\n\nDear Ann, read the report (https://example.org/r) or"
        " https://example.org/bare.\n\n- one\n- two\n\n1. first\n2. second\n\n> a quote\n"
    )


def test_raw_html_and_script_links_come_out_as_text_never_as_markup() -> None:
    body = render_markdown(
        "<script>alert(1)</script> <img src=x onerror=alert(1)> <a href='javascript:x'>a</a>\n\n"
        "[click](javascript:alert(1)) [data](data:text/html;base64,PHNjcmlwdD4=)"
        " [vb](vbscript:msgbox) [file](file:///etc/passwd) <https://ok.example/>"
    )
    tags = _tags(body.html)
    assert {tag for tag, _ in tags} <= {"p", "a"}
    assert [a["href"] for tag, a in tags if tag == "a"] == ["https://ok.example/"]
    assert "&lt;script&gt;" in body.html  # shown, not run


def test_the_text_part_shows_only_the_links_the_html_keeps() -> None:
    body = render_markdown(
        "[files](ftp://files.example/x) [call](tel:+1555) [mail](mailto:ann@example.org)"
        " [site](HTTPS://example.org/) [here](/relative?a=b:c)"
    )
    hrefs = [a.get("href") for tag, a in _tags(body.html) if tag == "a"]
    assert hrefs == [
        None,
        None,
        "mailto:ann@example.org",
        "HTTPS://example.org/",
        "/relative?a=b:c",
    ]
    assert body.text == (
        "files call mail (mailto:ann@example.org) site (HTTPS://example.org/)"
        " here (/relative?a=b:c)\n"
    )


# Text that leans on every construct that could smuggle markup: brackets, angle brackets,
# quotes, backticks, entity-looking text and URL schemes.
_PIECES = [*"<>\"'`&;:=()[]!*_#-\n /\\", "javascript", "on", "data", "img", "script", "href", "src"]
_HOSTILE = st.lists(st.sampled_from(_PIECES), max_size=120).map("".join)


@given(_HOSTILE)
@settings(max_examples=300, deadline=None)
def test_whatever_the_source_the_html_has_only_safe_tags_and_links(source: str) -> None:
    for tag, attrs in _tags(render_markdown(source).html):
        assert tag in {
            "a",
            "blockquote",
            "br",
            "code",
            "em",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "hr",
            "img",
            "li",
            "ol",
            "p",
            "pre",
            "strong",
            "ul",
        }
        assert not any(name.startswith("on") for name in attrs)
        for name in ("href", "src"):
            value = attrs.get(name)
            if value is not None:
                assert re.match(r"(https?:|mailto:)", value, re.IGNORECASE), value


def test_deep_nesting_and_a_large_body_stay_cheap() -> None:
    started = time.process_time()
    render_markdown(">" * 50_000 + " deep\n\n" + "- " * 20_000 + "x\n\n" + "[a](" * 20_000)
    render_markdown(("word **bold** [l](https://e.example/) " * 5_000 + "\n") * 4)
    # Linear work: a few hundred kilobytes render in well under the job's time limit.
    assert time.process_time() - started < 10

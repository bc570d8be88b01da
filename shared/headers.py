"""Which characters may not reach an email header: one definition for the web tier and worker.

Recipient fields come from public web forms, so any of them can carry characters that end a
header line somewhere down the line (CR and LF, but also VT, FF, the file, group and record
separators, NEL, U+2028 and U+2029: ``str.splitlines()`` breaks at all of them, and so do some
mail parsers), other control characters, or lone surrogates (not encodable as UTF-8). None of
them belongs in a header. Every boundary that lets text through to a header checks it with
:func:`find_unsafe` and refuses the value with :func:`unsafe_message`; ``worker.smtp`` checks
again when it writes the message, as a last line of defence.

Refused: every C0 control (U+0000 to U+001F) and DEL (U+007F), every C1 control (U+0080 to
U+009F), U+2028 and U+2029, and lone surrogates (U+D800 to U+DFFF). A tab is legal whitespace
in an unstructured header (RFC 5322), so a subject may carry one (``allow_tab=True``); no other
value Mailroom writes into a header (an address, a URL, a Message-ID) may.

A display name (the sender's, ``"Name" <address>``) also refuses Unicode's bidirectional
controls (:func:`display_name_message`): an override or isolate inside a name can make it read
as something else, an address say, in the recipient's mail program.

Positions in messages count characters from 1.
"""

from __future__ import annotations

import re

_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_IN_TOKEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Unicode's Bidi_Control characters: the marks, embeddings, overrides and isolates.
_BIDI_CONTROL = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
MAX_DISPLAY_NAME_CHARS = 100

_C0_NAMES = (
    "NUL",
    "start of heading",
    "start of text",
    "end of text",
    "end of transmission",
    "enquiry",
    "acknowledge",
    "bell",
    "backspace",
    "tab",
    "line feed",
    "vertical tab",
    "form feed",
    "carriage return",
    "shift out",
    "shift in",
    "data link escape",
    "device control one",
    "device control two",
    "device control three",
    "device control four",
    "negative acknowledge",
    "synchronous idle",
    "end of transmission block",
    "cancel",
    "end of medium",
    "substitute",
    "escape",
    "file separator",
    "group separator",
    "record separator",
    "unit separator",
)
_OTHER_NAMES = {
    "\x7f": "delete",
    "\x85": "next line",
    "\u2028": "line separator",
    "\u2029": "paragraph separator",
    "\u061c": "arabic letter mark",
    "\u200e": "left-to-right mark",
    "\u200f": "right-to-left mark",
    "\u202a": "left-to-right embedding",
    "\u202b": "right-to-left embedding",
    "\u202c": "pop directional formatting",
    "\u202d": "left-to-right override",
    "\u202e": "right-to-left override",
    "\u2066": "left-to-right isolate",
    "\u2067": "right-to-left isolate",
    "\u2068": "first strong isolate",
    "\u2069": "pop directional isolate",
}


def header_pattern(*, allow_tab: bool = False) -> re.Pattern[str]:
    """The compiled character class of what may not appear (for callers that search often)."""
    return _UNSAFE_IN_TEXT if allow_tab else _UNSAFE_IN_TOKEN


def find_unsafe(value: str, *, allow_tab: bool = False) -> tuple[int, str] | None:
    """The first character of ``value`` that may not appear in a header, as (0-based index,
    character), or ``None`` if there is none. ``allow_tab`` for a subject."""
    match = header_pattern(allow_tab=allow_tab).search(value)
    return (match.start(), match.group()) if match else None


def describe_character(char: str) -> str:
    """``U+000C (form feed)``: the code point and a name a reader can recognise."""
    code = ord(char)
    if code < 0x20:
        name = _C0_NAMES[code]
    elif char in _OTHER_NAMES:
        name = _OTHER_NAMES[char]
    elif 0x80 <= code <= 0x9F:
        name = "C1 control"
    elif 0xD800 <= code <= 0xDFFF:
        name = "lone surrogate"
    else:
        name = "not allowed"
    return f"U+{code:04X} ({name})"


def unsafe_message(value: str, *, allow_tab: bool = False) -> str | None:
    """Why ``value`` cannot go into a header, naming the character and its position, or
    ``None`` if it can: ``character U+000C (form feed) at position 7 is not allowed in an
    email header``. Callers put the name of the field in front."""
    found = find_unsafe(value, allow_tab=allow_tab)
    if found is None:
        return None
    index, char = found
    return (
        f"character {describe_character(char)} at position {index + 1} "
        "is not allowed in an email header"
    )


def lone_surrogate_message(value: str) -> str | None:
    """For text that is not header-bound (a body, a context): a lone surrogate cannot be
    stored or sent as UTF-8; say where it is, or ``None``."""
    match = _LONE_SURROGATE.search(value)
    if match is None:
        return None
    return (
        f"character {describe_character(match.group())} at position {match.start() + 1} "
        "is not valid Unicode text"
    )


def display_name_message(value: str) -> str | None:
    """Why ``value`` cannot be a display name in ``From``, or ``None`` if it can: what
    :func:`unsafe_message` refuses (a tab too), a bidirectional control, or more than
    ``MAX_DISPLAY_NAME_CHARS`` characters."""
    not_allowed = unsafe_message(value)
    if not_allowed is not None:
        return not_allowed
    match = _BIDI_CONTROL.search(value)
    if match is not None:
        return (
            f"character {describe_character(match.group())} at position {match.start() + 1} "
            "is not allowed in a display name"
        )
    if len(value) > MAX_DISPLAY_NAME_CHARS:
        return f"at most {MAX_DISPLAY_NAME_CHARS} characters (got {len(value)})"
    return None

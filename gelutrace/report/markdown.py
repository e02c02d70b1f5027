"""Markdown written from corpus, tokenizer or user text: one escaping rule for every cell, token and name."""

import re
import unicodedata
from urllib.parse import quote

# Markdown's table, emphasis, code, link and heading characters, backslash-escaped; `<`, `>` and `&` become HTML
# entities, so no text can open a tag, a comment or an entity of its own
_PUNCT = set("\\|*_`[]#~")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_RUN = re.compile("`+")


def escape(text) -> str:
    """`text` as literal Markdown inline text (also inside a table cell); renders as exactly `text`."""
    return "".join(_ENTITIES.get(c) or ("\\" + c if c in _PUNCT else c) for c in str(text))


def url(path: str) -> str:
    """A relative file path as a link or image target: percent-encoded, so a space or a parenthesis in a model's
    or a directory's name cannot end it."""
    return quote(str(path), safe="/")


def fence(lines: list[str]) -> str:
    """A code fence longer than any run of backticks in `lines`, so none of them can close it."""
    return "`" * max([3] + [len(r) + 1 for line in lines for r in _RUN.findall(line)])


def token_cell(s: str) -> str:
    """A token for a table cell: visible(s) with its leading and trailing spaces shown as ␣, which the table
    would otherwise trim (a token " " would be an empty cell, " the" the same as "the")."""
    s = visible(s)
    core = s.strip(" ")
    if not core:
        return "␣" * len(s)
    lead = len(s) - len(s.lstrip(" "))
    trail = len(s) - len(s.rstrip(" "))
    return "␣" * lead + core + "␣" * trail


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def visible(s: str, newline: str = "⏎") -> str:
    """Token text with its newlines shown as `newline` and other control, line-separator and bidirectional-override
    characters escaped (an override would reverse the text shown after it)."""
    return "".join(newline if c == "\n" else f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Zl", "Zp")
                   else f"\\u{ord(c):04x}" if c in BIDI_CONTROLS else c for c in s)

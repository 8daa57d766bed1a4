"""The one exception type users see: a clear, one-line message about bad input."""

from __future__ import annotations

import re


class VlmError(Exception):
    """Bad input or an unusable model file. The message is a single line meant for the user."""


# C0/C1 controls, lone surrogates (unprintable), and bidi overrides that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def shown(value: object, limit: int = 80) -> str:
    """A string from a file made safe to print in one line: control characters escaped (a
    metadata key holding escape sequences must not drive the terminal) and cut to `limit`."""
    text = _UNSAFE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."

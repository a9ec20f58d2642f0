"""Labels (who a deposit address or payout is for) as apps send them: normalised to NFC, so
one name is one label whatever the keyboard composed, and refused when they hold what a
person cannot see or would read differently: control and format characters (bidi overrides
such as U+202E, zero-width joiners and spaces, BOMs), line and paragraph separators,
surrogates, private-use and unassigned code points, and spaces at either end."""

from __future__ import annotations

import unicodedata

MAX_LABEL = 128
_REFUSED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def label_problem(label: object) -> str | None:
    """Why ``label`` is not acceptable (None if it is); checks the NFC form."""
    if not isinstance(label, str):
        return "must be a string"
    text = unicodedata.normalize("NFC", label)
    if not 1 <= len(text) <= MAX_LABEL:
        return f"must be 1-{MAX_LABEL} characters"
    if text != text.strip():
        return "must not begin or end with a space"
    for c in text:
        if unicodedata.category(c) in _REFUSED:
            return f"must not contain invisible or control characters (U+{ord(c):04X})"
    return None


def normalize_label(label: str) -> str:
    """The label as stored: NFC. Call :func:`label_problem` first."""
    return unicodedata.normalize("NFC", label)

"""Reading an 'A' or 'B' verdict out of a judge's free-text reply."""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# Parsing and caching
# ---------------------------------------------------------------------------

_WORDS = r"(?i:response|answer|output|option|verdict|choice)"


_DECOR = r"[\s\*\"'`\[\(]*"


# The letter itself is matched case-sensitively: a lone "a" is an article, not a verdict.
_LEAD = re.compile(rf"^{_DECOR}(?:{_WORDS}\s*[:\-]?{_DECOR})?([AB])(?=$|[^\w\s]|\s*\n|\s+(?i:is)\b|\s+$)")


_NAMED = re.compile(rf"\b{_WORDS}\s*(?i:is\s*)?[:\-]?{_DECOR}([AB])\b")


def parse_verdict(reply):
    """Return ``"A"``, ``"B"`` or ``None`` when the reply names neither (or both).

    Examples
    --------
    >>> parse_verdict("B"), parse_verdict("**A**."), parse_verdict("Response B is better")
    ('B', 'A', 'B')
    >>> parse_verdict("Both are fine."), parse_verdict("Response A or Response B") is None
    (None, True)
    """
    if not isinstance(reply, str):
        return None
    m = _LEAD.match(reply)
    if m:
        return m.group(1)
    found = set(_NAMED.findall(reply))
    return found.pop() if len(found) == 1 else None

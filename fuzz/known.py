"""Invariant breaches already known and reported, by the message they raise.

A long campaign skips these so that it explores past them (each has a strict xfail
regression test in tests/test_properties.py); ``python -m fuzz TARGET --all`` stops at
them too. A message is a symptom, not a cause: another bug with the same symptom is
skipped as well, so a campaign is run with ``--all`` again once these are fixed. Remove an
entry when its bug is fixed.
"""

from __future__ import annotations

import re

#: None open: the four the first campaign found are fixed (their regression tests are in
#: tests/test_properties.py).
KNOWN: dict[str, re.Pattern[str]] = {}


def known(error: BaseException) -> str | None:
    """The known bug ``error`` shows, if any."""
    for name, pattern in KNOWN.items():
        if pattern.search(str(error)):
            return name
    return None

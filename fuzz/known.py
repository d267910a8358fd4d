"""Invariant breaches already known and reported, by the message they raise.

A long campaign skips these so that it explores past them (each has a strict xfail
regression test in tests/test_properties.py); ``python -m fuzz TARGET --all`` stops at
them too. A message is a symptom, not a cause: another bug with the same symptom is
skipped as well, so a campaign is run with ``--all`` again once these are fixed. Remove an
entry when its bug is fixed.
"""

from __future__ import annotations

import re

KNOWN = {
    # test_a_held_stats_buffer_survives_a_memory_table_change
    "held stats buffer lost when the memory table changes": re.compile(
        r"raised RuntimeError: (un-popping|pushing) descriptor \d+, which the device does not"
    ),
    # test_a_stop_after_a_malformed_stats_chain_returns_each_chain_once
    "stats buffer un-popped over a chain popped after it": re.compile(
        r"ring \d+ stopped at \d+: chains \[.*\] were popped, \[\d.*\] came back"
    ),
    # test_new_features_under_a_held_stats_buffer_return_it
    "held stats buffer stranded by features that change the queue roles": re.compile(
        r"ring \d+ stopped at \d+: chains \[\d+\] were popped, \[\] came back"
    ),
}


def known(error: BaseException) -> str | None:
    """The known bug ``error`` shows, if any."""
    for name, pattern in KNOWN.items():
        if pattern.search(str(error)):
            return name
    return None

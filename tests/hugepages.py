"""Host huge pages for tests: reserve some 2 MiB pages, and read the kernel's counts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HUGE = 2 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def meminfo(field: str) -> int:
    """A /proc/meminfo field (kB for sizes, a count for HugePages_*)."""
    match = re.search(rf"^{field}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    assert match, field
    return int(match.group(1))


def available() -> int:
    """Free 2 MiB huge pages no mapping has reserved yet."""
    return meminfo("HugePages_Free") - meminfo("HugePages_Rsvd")


class Unavailable(Exception):
    """The huge pages asked for cannot be had here; the message says why."""


@contextmanager
def reserve(count: int) -> Iterator[None]:
    """Make sure ``count`` free 2 MiB huge pages exist; give back what was added. Raises
    :class:`Unavailable` before anything is changed if they cannot be had.

    What was added is taken off the pool's size as it is at the end, not by writing back the
    size found at the start: another test run on the host may have grown or shrunk the pool
    meanwhile, and its pages are its own.
    """
    if meminfo("Hugepagesize") != HUGE // 1024:
        raise Unavailable(f"default huge page size is {meminfo('Hugepagesize')} KiB, not 2048")
    original = int(NR_HUGEPAGES.read_text())
    missing = max(0, count - available())
    added = 0
    if missing:
        try:
            NR_HUGEPAGES.write_text(str(original + missing))
        except OSError as exc:
            # Only root may raise the pool; a pool with enough free pages is used as it is.
            raise Unavailable(
                f"needs {count} free 2 MiB huge pages, the host has {available()} and this "
                f"user cannot add any ({exc.strerror}); reserve them first: "
                f"sudo sysctl vm.nr_hugepages={original + missing}"
            ) from None
        # The kernel may have found memory for fewer.
        added = min(missing, max(0, int(NR_HUGEPAGES.read_text()) - original))
    try:
        if available() < count:
            raise Unavailable(f"the kernel could not find memory for {count} 2 MiB huge pages")
        yield
    finally:
        if added:
            NR_HUGEPAGES.write_text(str(max(0, int(NR_HUGEPAGES.read_text()) - added)))


@contextmanager
def reserved(count: int) -> Iterator[None]:
    """:func:`reserve` for a test: skipped, saying why, if the pages cannot be had."""
    try:
        with reserve(count):
            yield
    except Unavailable as why:
        pytest.skip(str(why))

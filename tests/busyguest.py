"""A guest vCPU running in parallel with the daemon: a separate process over the same
guest memory (a thread would share the daemon's GIL and could never keep pace with it).

    python -m tests.busyguest watch MEMFD USED_GPA SECONDS
        reads the used index as fast as it can; prints how often it saw it go backwards
    python -m tests.busyguest recycle MEMFD KICKFD AVAIL_GPA USED_GPA SIZE AVAIL_IDX SECONDS
        makes every chain the device returns available again at once, and kicks

Both read and write ring indices with single 16-bit accesses (balloond.barriers), as a
driver does, so that what they see is what the daemon published.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time

from balloond import barriers


def _map(fd: int) -> tuple[mmap.mmap, int]:
    mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED)
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor
    return mapping, address


def watch(fd: int, used: int, seconds: float) -> None:
    """Count the times the used index moved backwards (or was seen torn)."""
    _mapping, base = _map(fd)
    address = base + used + 2
    last = barriers.load_u16_acquire(address)
    reads = backwards = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            value = barriers.load_u16_acquire(address)
            if (value - last) & 0xFFFF > 0x8000:
                backwards += 1
            last = value
        reads += 1000
    print(f"reads={reads} backwards={backwards} last={last}", flush=True)


def recycle(
    fd: int, kick: int, avail: int, used: int, size: int, avail_idx: int, seconds: float
) -> None:
    """Offer each returned chain again at once, until ``seconds`` have passed."""
    mapping, base = _map(fd)
    seen = barriers.load_u16_acquire(base + used + 2)
    cycles = 0
    end = time.monotonic() + seconds
    print("started", flush=True)
    while time.monotonic() < end:
        now = barriers.load_u16_acquire(base + used + 2)
        if now == seen:
            continue
        while seen != now:
            element = used + 4 + 8 * (seen % size)
            head = mapping[element : element + 2]  # the low half of the le32 id
            slot = avail + 4 + 2 * (avail_idx % size)
            mapping[slot : slot + 2] = head
            avail_idx = (avail_idx + 1) & 0xFFFF
            seen = (seen + 1) & 0xFFFF
            cycles += 1
        barriers.store_u16_release(base + avail + 2, avail_idx)
        os.eventfd_write(kick, 1)
    print(f"cycles={cycles}", flush=True)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "watch":
        watch(int(args[0]), int(args[1]), float(args[2]))
    elif command == "recycle":
        numbers = [int(a) for a in args[:6]]
        recycle(*numbers, float(args[6]))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])

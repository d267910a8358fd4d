"""The SIGBUS guard (native/ring.c, balloond.barriers): guest memory whose file shrank under
the mapping makes every guarded access fail with BusError, as often as it happens, and leaves
the thread's signal mask as it was (the guard restores no mask: it must have none to restore).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import ctypes, mmap, os, signal
from balloond import barriers

barriers.guard_sigbus()
fd = os.memfd_create("guest")
os.ftruncate(fd, 1 << 20)
area = mmap.mmap(fd, 1 << 20)
address = ctypes.addressof(ctypes.c_char.from_buffer(area))
barriers.store_u16_release(address + 2, 7)
assert barriers.load_u16_acquire(address + 2) == 7
os.ftruncate(fd, 0)  # the frontend shrinks guest memory under the mapping
faults = 0
for round in range(200):
    for access in (
        lambda: barriers.load_u16_acquire(address + 2),
        lambda: barriers.store_u16_release(address + 4, round),
        lambda: barriers.read(address, 64),
        lambda: barriers.write(address + 4096, b"x" * 64),
    ):
        try:
            access()
        except barriers.BusError:
            faults += 1
blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
os.ftruncate(fd, 1 << 20)  # memory back: accesses work again
barriers.store_u16_release(address + 2, 9)
print(faults, signal.SIGBUS in blocked, barriers.load_u16_acquire(address + 2))
"""


def test_every_access_to_shrunk_memory_fails_alone_and_the_mask_is_untouched() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["800", "False", "9"]

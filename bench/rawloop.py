"""The kernel's limit: a plain C loop of ``fallocate(PUNCH_HOLE)``, compiled at bench time.

gcc builds a tiny shared object in a temporary directory; ctypes calls it once per batch,
so the loop itself runs without Python between two ranges.
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>

/* Punch n holes of `length` bytes at offsets[i] of fd; returns how many failed. */
int punch_loop(int fd, const uint64_t *offsets, size_t n, uint64_t length)
{
    int failed = 0;

    for (size_t i = 0; i < n; i++)
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)offsets[i], (off_t)length) < 0)
            failed++;
    return failed;
}
"""


class RawLoop:
    """``punch_loop(fd, offsets, length)``: one C call per batch of ranges."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="balloond-bench-")
        source = Path(self._dir.name) / "rawloop.c"
        library = Path(self._dir.name) / "rawloop.so"
        source.write_text(SOURCE)
        subprocess.run(
            ["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True
        )
        self._lib = ctypes.CDLL(str(library))
        self._lib.punch_loop.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_size_t,
            ctypes.c_uint64,
        ]
        self._lib.punch_loop.restype = ctypes.c_int

    def prepare(self, offsets: Sequence[int]) -> ctypes.Array[ctypes.c_uint64]:
        """The offsets as a C array (built before the clock starts)."""
        return (ctypes.c_uint64 * len(offsets))(*offsets)

    def punch(self, fd: int, offsets: ctypes.Array[ctypes.c_uint64], length: int) -> None:
        failed = self._lib.punch_loop(fd, offsets, len(offsets), length)
        if failed:
            raise OSError(f"fallocate failed on {failed} of {len(offsets)} ranges")

    def close(self) -> None:
        self._dir.cleanup()

"""Keeping state records where they outlive the process: memfds.

A :class:`StateFile` is one device's latest record, committed in place as it changes: the
keeper (a supervisor, or systemd's fd store) holds the memfd once, and a commit is one
``pwrite``, with no message to anyone. :func:`seal` makes a one-off copy that nobody can
change afterwards, for a hand-off (the whole daemon's record across execve).

Records are bytes here (see :mod:`balloond.record` for what is in them); this module only
guarantees that a reader gets a whole record, the latest whole one, whatever instant a
SIGKILL lands at.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import struct
import zlib
from collections.abc import Iterator

from balloond.schema import MAX_DOCUMENT_BYTES, RecordError


def seal(data: bytes, name: str = "balloond-state") -> int:
    """A new memfd holding ``data``, sealed against every change (a one-off hand-off, e.g.
    across execve): its holder reads what was written, whatever the writer does next."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write_all(fd, data, 0)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_sealed(fd: int) -> bytes:
    """The contents of a memfd :func:`seal` made; RecordError unless it is sealed."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as error:
        raise RecordError(f"state record fd {fd}: not a memfd ({error.strerror})") from None
    if not seals & fcntl.F_SEAL_WRITE:
        raise RecordError(f"state record fd {fd}: not sealed against writes")
    size = os.fstat(fd).st_size
    if size > MAX_DOCUMENT_BYTES:
        raise RecordError(f"state record fd {fd}: {size} bytes, more than a record can be")
    return os.pread(fd, size, 0)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class StateFile:
    """A device's latest record, committed in place to a memfd that outlives the process.

    Two slots, each a 32-byte header (magic, sequence number, length, CRC-32 of those and the
    record) and the record. A commit writes the slot that does not hold the latest record, so
    a write cut short (a SIGKILL inside ``pwrite``) fails its CRC and a reader takes the
    previous record: the right one, as long as nothing the guest or the frontend can see
    happens before :meth:`commit` returns. Slots sit at offset 0 and at a power of two of at
    least 64 KiB; a reader tries each, so a record may outgrow its slot (it then goes past
    the latest one).

    Not thread-safe: one writer, on the event loop thread.
    """

    MAGIC = b"\x89BLNREC\n"
    HEADER = struct.Struct("<8sQQI4x")
    MIN_SLOT = 64 << 10

    def __init__(self, fd: int) -> None:
        """Adopt ``fd``: an empty memfd, or one a previous process committed to."""
        self.fd = fd
        latest = max(_scan(fd), default=None)
        self._seq = latest[0] if latest else 0
        #: Where the latest record is, and the bytes it takes.
        self._latest = (latest[1], latest[2]) if latest else None

    @classmethod
    def create(cls, name: str = "balloond-state") -> StateFile:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # no successor can cut it
        return cls(fd)

    def commit(self, data: bytes) -> None:
        """Make ``data`` the latest record: a reader gets it once this returns."""
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"a record of {len(data)} bytes")
        need = self.HEADER.size + len(data)
        offset = self._next_offset(need)
        seq = self._seq + 1
        crc = zlib.crc32(data, zlib.crc32(struct.pack("<QQ", seq, len(data))))
        _write_all(self.fd, self.HEADER.pack(self.MAGIC, seq, len(data), crc) + data, offset)
        self._seq, self._latest = seq, (offset, need)

    @property
    def sequence(self) -> int:
        """The sequence number of the latest record (0 before the first)."""
        return self._seq

    @property
    def latest(self) -> tuple[int, int] | None:
        """Where the latest record this writer committed lies: (offset, bytes with header)."""
        return self._latest

    def _next_offset(self, need: int) -> int:
        """A slot that does not overlap the latest record."""
        if self._latest is None:
            return 0
        offset, taken = self._latest
        if offset == 0:
            return _pow2(max(self.MIN_SLOT, taken))
        return 0 if need <= offset else _pow2(offset + taken)

    def read(self) -> bytes:
        """The latest record committed; RecordError if there is none."""
        latest = max(_scan(self.fd), default=None)
        if latest is None:
            raise RecordError(f"state file fd {self.fd}: no whole record in it")
        _, offset, taken = latest
        return os.pread(self.fd, taken - self.HEADER.size, offset + self.HEADER.size)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _scan(fd: int) -> list[tuple[int, int, int]]:
    """Every slot holding a whole record: (sequence number, offset, bytes taken)."""
    header = StateFile.HEADER
    size = os.fstat(fd).st_size
    offsets = [0, *itertools.takewhile(lambda o: o < size, _powers(StateFile.MIN_SLOT))]
    found = []
    for offset in offsets:
        raw = os.pread(fd, header.size, offset)
        if len(raw) < header.size:
            continue
        magic, seq, length, crc = header.unpack(raw)
        if magic != StateFile.MAGIC or length > min(
            MAX_DOCUMENT_BYTES, size - offset - header.size
        ):
            continue
        data = os.pread(fd, length, offset + header.size)
        if zlib.crc32(data, zlib.crc32(struct.pack("<QQ", seq, length))) == crc:
            found.append((seq, offset, header.size + length))
    return found


def _powers(start: int) -> Iterator[int]:
    value = start
    while True:
        yield value
        value *= 2

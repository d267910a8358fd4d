"""A writer for the ``newc`` cpio format, the format the Linux kernel unpacks as initramfs.

The kit writes the guest's initramfs itself so that the host needs no cpio tool and no
root privileges to create device nodes: entries are plain data here.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``name`` is relative to the archive root, without a leading slash."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> Entry:
        return Entry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
        return Entry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> Entry:
        return Entry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(name, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: Entry, name_size: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        1,  # nlink
        0,  # mtime: fixed, so equal inputs give equal archives
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        name_size,
        0,  # check
    )
    return _MAGIC + b"".join(b"%08X" % value for value in fields)


def encode(entries: list[Entry]) -> bytes:
    """Return the uncompressed newc archive holding ``entries`` in order, plus the trailer."""
    chunks: list[bytes] = []
    offset = 0
    seen: set[str] = set()
    for ino, entry in enumerate([*entries, Entry(_TRAILER, 0)], start=1):
        if entry.name.startswith("/") or not entry.name:
            raise ValueError(f"cpio entry name must be relative and non-empty: {entry.name!r}")
        if entry.name in seen:
            raise ValueError(f"duplicate cpio entry: {entry.name!r}")
        seen.add(entry.name)
        name = entry.name.encode() + b"\0"
        head = _header(ino, entry, len(name)) + name
        head += _pad4(offset + len(head))
        offset += len(head)
        body = entry.data + _pad4(offset + len(entry.data))
        offset += len(body)
        chunks += (head, body)
    return b"".join(chunks)


def write_gzip(path: Path, entries: list[Entry]) -> None:
    """Write ``entries`` as a gzip-compressed newc archive, atomically replacing ``path``."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(gzip.compress(encode(entries), compresslevel=6, mtime=0))
    partial.replace(path)

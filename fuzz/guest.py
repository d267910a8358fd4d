"""The guest's side of the world: its RAM (memfds) and its driver's split rings.

Guest RAM is laid out as QEMU does on x86 (low memory at 0, the rest above 4 GiB), as
memfds the world maps itself. :class:`GuestRing` is what a virtio driver keeps of one ring:
where it lies, the available index it published, the chains it made available and not yet
got back (``outstanding``), the descriptors it may use, and what came back in the current
session (from the ring's start to its stop). :class:`GuestDriver` is what the driver does
to them (well-formed chains, garbage, a jumping index), a mixin of ``World``; the helpers
every target shares (``require``, ``open_fds``, ``roles``) live here too, at the bottom.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from balloond import wire

if TYPE_CHECKING:
    from fuzz.world import World

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

#: Guest RAM as QEMU lays it out on x86: low memory at 0, the rest above 4 GiB; and a third
#: memfd that only a lying frontend names.
LOW_SIZE, HIGH_GPA, HIGH_SIZE, EXTRA_SIZE = 8 * MiB, 4 * GiB, 2 * MiB, 1 * MiB
UADDR_BASE = 0x7F00_0000_0000
#: Where the driver keeps each ring (in low memory): its parts, its indirect tables and the
#: buffers its chains carry (frame lists, statistics), one slot per descriptor head.
RINGS, MAX_RING = 6, 64
RING_AREA, RING_STRIDE = 1 * MiB, 256 * KiB
AVAIL_AT, USED_AT, TABLES_AT, BUFFERS_AT, SLOT = 0x800, 0x1000, 0x4000, 0x20000, 0x400


def roles(features: int | None) -> dict[int, str]:
    """Queue index to role for negotiated ``features`` (virtio 1.2, 5.5.2: compact)."""
    names = ["inflate", "deflate"]
    for bit, name in ((1, "stats"), (3, "free_page"), (5, "reporting")):
        if features is not None and features & (1 << bit):
            names.append(name)
    return dict(enumerate(names))


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


class Violation(AssertionError):
    """An invariant broke."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Violation(message)


class Memfd:
    """One guest memory file and the world's own mapping of it."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self.fd = os.memfd_create(f"guest-{name}")
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        self.ino = os.fstat(self.fd).st_ino

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass
class Chain:
    """What the driver made available under one head."""

    kind: str  # report, inflate, deflate, stats, garbage
    slots: tuple[int, ...] = ()  # descriptors it owns (garbage owns none)


@dataclass
class Session:
    """One ring from its start (kick) to its stop (GET_VRING_BASE), seen by the driver."""

    start: int  # the available index the device starts at
    coherent: bool  # the device's size, addresses, base and memory are the driver's
    returned: Counter[int] = field(default_factory=Counter)
    given_up: bool = False
    hostile: bool = False  # the driver broke the rules on this ring


class GuestRing:
    """The driver's side of one split ring, in the low memfd."""

    def __init__(self, world: World, index: int) -> None:
        self.world, self.index = world, index
        self.gpa = RING_AREA + index * RING_STRIDE
        self.size = 0  # 0: not set up by the driver
        self.reset(0)

    @property
    def desc(self) -> int:
        return self.gpa

    @property
    def avail(self) -> int:
        return self.gpa + AVAIL_AT

    @property
    def used(self) -> int:
        return self.gpa + USED_AT

    def reset(self, size: int) -> None:
        """The driver (re)initialises the ring: zeroes it, owns every descriptor."""
        self.size = size
        self.world.guest_write(self.gpa, bytes(TABLES_AT))
        self.avail_idx = 0
        self.used_seen = 0
        self.pos_base = 0  # the available index of ``entries[0]``
        self.entries: list[int] = []  # heads made available from ``pos_base`` on
        self.outstanding: Counter[int] = Counter()
        self.chains: dict[int, deque[Chain]] = {}
        self.free: list[int] = list(range(size))
        self.session: Session | None = None

    def uaddr(self) -> wire.VringAddr:
        return wire.VringAddr(
            self.index, 0, UADDR_BASE + self.desc, UADDR_BASE + self.used,
            UADDR_BASE + self.avail, 0,
        )  # fmt: skip

    def write_desc(self, table: int, slot: int, addr: int, length: int, flags: int, nxt: int):
        self.world.guest_write(table + DESC.size * slot, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int, chain: Chain) -> None:
        """Put ``head`` in the available ring and move its index (the driver's store)."""
        slot = self.avail + 4 + 2 * (self.avail_idx % self.size)
        self.world.guest_write(slot, U16.pack(head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.world.guest_write(self.avail + 2, U16.pack(self.avail_idx))
        self.entries.append(head)
        self.outstanding[head] += 1
        self.chains.setdefault(head, deque()).append(chain)


class GuestDriver:
    """What the guest driver does to its rings: a mixin of :class:`fuzz.world.World`,
    which provides ``rings``, ``guest_write`` and ``guest_read``."""

    rings: list[GuestRing]

    def guest_write(self, gpa: int, data: bytes) -> None:
        raise NotImplementedError

    def guest_read(self, gpa: int, length: int) -> bytes:
        raise NotImplementedError

    def _alloc(self, ring: GuestRing, count: int) -> list[int] | None:
        if ring.size == 0 or len(ring.free) < count:
            return None
        taken, ring.free = ring.free[:count], ring.free[count:]
        return taken

    def add_chain(
        self,
        index: int,
        kind: str,
        buffers: tuple[tuple[int, int], ...],
        *,
        indirect: bool = False,
    ) -> int | None:
        """A well-formed chain of ``kind`` made available on ring ``index``: for "report",
        device-writable ``buffers``; for the others, device-readable ones. Returns its head
        (None when the driver has no free descriptors)."""
        ring = self.rings[index]
        writable = kind == "report"
        slots = self._alloc(ring, 1 if indirect else len(buffers))
        if slots is None or not buffers:
            if slots:
                ring.free[:0] = slots
            return None
        head = slots[0]
        flags = F_WRITE if writable else 0
        if indirect:
            table = ring.gpa + TABLES_AT + SLOT * head
            for i, (addr, length) in enumerate(buffers):
                more = i < len(buffers) - 1
                ring.write_desc(table, i, addr, length, flags | (F_NEXT if more else 0), i + 1)
            ring.write_desc(ring.desc, head, table, DESC.size * len(buffers), F_INDIRECT, 0)
        else:
            for i, (addr, length) in enumerate(buffers):
                more = i < len(buffers) - 1
                nxt = slots[i + 1] if more else 0
                ring.write_desc(ring.desc, slots[i], addr, length, flags | (F_NEXT if more else 0),
                                nxt)  # fmt: skip
        ring.publish(head, Chain(kind, tuple(slots)))
        return head

    def _data_chain(self, index: int, kind: str, data: bytes, cut: int, indirect: bool):
        """A chain carrying ``data`` (frames, statistics) in one or two buffers."""
        ring = self.rings[index]
        if ring.size == 0 or not ring.free:
            return None
        buffer = ring.gpa + BUFFERS_AT + SLOT * ring.free[0]
        self.guest_write(buffer, data[:SLOT])
        length = min(len(data), SLOT)
        cut = min(cut, length)
        parts = (
            ((buffer, cut), (buffer + cut, length - cut))
            if 0 < cut < length
            else ((buffer, length),)
        )
        return self.add_chain(index, kind, parts, indirect=indirect)

    def inflate(self, index: int, frames: tuple[int, ...], cut: int = 0, indirect: bool = False):
        """Balloon ``frames`` (4 KiB frame numbers) through ring ``index``."""
        data = struct.pack(f"<{len(frames)}I", *frames)
        return self._data_chain(index, "inflate", data, cut, indirect)

    def deflate(self, index: int, frames: tuple[int, ...], cut: int = 0, indirect: bool = False):
        data = struct.pack(f"<{len(frames)}I", *frames)
        return self._data_chain(index, "deflate", data, cut, indirect)

    def stats(self, index: int, entries: tuple[tuple[int, int], ...], cut: int = 0):
        data = b"".join(struct.pack("<HQ", tag, value) for tag, value in entries)
        return self._data_chain(index, "stats", data, cut, False)

    def garbage(
        self,
        index: int,
        head: int,
        descriptors: tuple[tuple[int, int, int, int, int], ...],
        table: tuple[tuple[int, int, int, int], ...] = (),
    ) -> None:
        """Whatever a broken or hostile driver writes: ``descriptors`` as ``(slot, addr,
        len, flags, next)`` into the ring's table, ``table`` into head's indirect table
        slot, then ``head`` made available."""
        ring = self.rings[index]
        if ring.size == 0:
            return
        for slot, addr, length, flags, nxt in descriptors:
            ring.write_desc(ring.desc, slot % MAX_RING, addr, length, flags, nxt)
        base = ring.gpa + TABLES_AT + SLOT * (head % MAX_RING)
        for i, (addr, length, flags, nxt) in enumerate(table[: SLOT // DESC.size]):
            ring.write_desc(base, i, addr, length, flags, nxt)
        self._hostile(ring)
        ring.publish(head, Chain("garbage"))

    def jump(self, index: int, count: int) -> None:
        """Move the available index by ``count`` without writing the entries it covers."""
        ring = self.rings[index]
        if ring.size == 0:
            return
        self._hostile(ring)
        for _ in range(count):
            slot = ring.avail + 4 + 2 * (ring.avail_idx % ring.size)
            (head,) = U16.unpack(self.guest_read(slot, 2))
            ring.publish(head, Chain("garbage"))

    def scribble(self, index: int, where: str, value: int) -> None:
        """Write a 16-bit ``value`` over the avail flags, used_event, or avail_event."""
        ring = self.rings[index]
        if ring.size == 0:
            return
        at = {
            "avail_flags": ring.avail,
            "used_event": ring.avail + 4 + 2 * ring.size,
            "avail_event": ring.used + 4 + 8 * ring.size,
        }[where]
        self.guest_write(at, U16.pack(value & 0xFFFF))

    def _hostile(self, ring: GuestRing) -> None:
        if ring.session is not None:
            ring.session.hostile = True
        # What a hostile driver wrote over may be a well-formed chain's: descriptors of
        # garbage chains belong to nobody, so do not hand them out again.
        ring.free = []

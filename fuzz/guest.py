"""The guest's side of the world: its RAM (memfds) and its driver's split rings.

Guest RAM is laid out as QEMU does on x86 (low memory at 0, the rest above 4 GiB), as
memfds the world maps itself. :class:`GuestRing` is what a virtio driver keeps of one ring:
where it lies, the available index it published, the chains it made available and not yet
got back (``outstanding``), the descriptors it may use, and what came back in the current
session (from the ring's start to its stop).
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

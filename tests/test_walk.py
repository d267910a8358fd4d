"""The native chain walk against a reference walk written from the virtio specification in
Python (the one the daemon used before the walk moved to C): for any descriptor table a guest
can write, both find the same buffers, the same error and read as many descriptors; and a
walk that faults on memory that went away ends that chain only."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloond import wire
from balloond.errors import GuestError
from balloond.memory import GuestMemory
from balloond.virtqueue import Buffer, RingState, Virtqueue
from tests.frontend import DESC, F_INDIRECT, F_NEXT, F_WRITE, GiB, GuestRam, MiB

SIZE = 16
DESC_TABLE, AVAIL, USED = 0x1000, 0x2000, 0x3000
#: Where indirect tables may lie: in the low region, in the high one, across its end.
LOW_TABLE, HIGH_TABLE = 0x8000, 4 * GiB + 0x8000


class ReferenceWalk:
    """A descriptor chain walked as virtio 1.2 (2.7.5, 2.7.5.3) describes it, one checked
    read of guest memory per descriptor."""

    def __init__(self, memory: GuestMemory, size: int, *, indirect: bool) -> None:
        self.memory, self.size, self.indirect = memory, size, indirect
        self.read = 0

    def walk(self, head: int) -> tuple[tuple[Buffer, ...], tuple[Buffer, ...]]:
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        table, table_size = DESC_TABLE, self.size
        index, seen, indirect = head, 0, False
        while True:
            seen += 1
            self.read += 1
            if seen > self.size:
                raise GuestError("descriptor chain loops or is longer than the queue")
            addr, length, flags, next_index = DESC.unpack(self.memory.read(table + 16 * index, 16))
            if flags & F_INDIRECT:
                if not self.indirect:
                    raise GuestError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
                if indirect:
                    raise GuestError("indirect descriptor inside an indirect table")
                if flags & F_NEXT:
                    raise GuestError("indirect descriptor with NEXT set")
                if length == 0 or length % 16:
                    raise GuestError(f"indirect table of {length} bytes")
                if length // 16 > self.size:
                    raise GuestError(
                        f"indirect table of {length // 16} descriptors, more than the queue "
                        f"size {self.size}"
                    )
                self.memory.check(addr, length)
                table, table_size, index, indirect = addr, length // 16, 0, True
                seen -= 1
                continue
            if addr + length > 1 << 64:
                raise GuestError(f"descriptor {addr:#x}+{length:#x} overflows")
            if flags & F_WRITE:
                writable.append(Buffer(addr, length))
            elif writable:
                raise GuestError("device-readable descriptor after a device-writable one")
            else:
                readable.append(Buffer(addr, length))
            if not flags & F_NEXT:
                return tuple(readable), tuple(writable)
            if next_index >= table_size:
                raise GuestError(f"next descriptor {next_index} beyond table of {table_size}")
            index = next_index


def outcome(
    walk: Callable[[int], tuple[tuple[Buffer, ...], tuple[Buffer, ...]]], head: int
) -> tuple[object, ...]:
    try:
        readable, writable = walk(head)
    except GuestError as error:
        return ("error", str(error))
    return ("chain", readable, writable)


table_address = st.sampled_from([LOW_TABLE, HIGH_TABLE, 1 * MiB - 32, 4 * GiB + 1 * MiB - 16])
descriptor = st.tuples(
    st.one_of(table_address, st.integers(0, 2 * MiB), st.integers(0, 2**64 - 1)),
    st.one_of(st.sampled_from([16, 32, 48, 256, 512]), st.integers(0, 2**32 - 1)),
    st.integers(0, 7),
    st.integers(0, SIZE + 2),
)


@given(
    table=st.lists(descriptor, min_size=SIZE, max_size=SIZE),
    low=st.lists(descriptor, max_size=20),
    high=st.lists(descriptor, max_size=20),
    head=st.integers(0, SIZE - 1),
    indirect=st.booleans(),
)
@settings(max_examples=1500, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_native_walk_agrees_with_the_reference(
    small_ram: tuple[GuestRam, GuestMemory],
    table: list[tuple[int, int, int, int]],
    low: list[tuple[int, int, int, int]],
    high: list[tuple[int, int, int, int]],
    head: int,
    indirect: bool,
) -> None:
    ram, memory = small_ram
    ram.write(DESC_TABLE, b"".join(DESC.pack(*d) for d in table))
    ram.write(LOW_TABLE, b"".join(DESC.pack(*d) for d in low).ljust(20 * 16, b"\0"))
    ram.write(HIGH_TABLE, b"".join(DESC.pack(*d) for d in high).ljust(20 * 16, b"\0"))
    queue = Virtqueue(memory, RingState(SIZE, DESC_TABLE, AVAIL, USED), event_idx=True,
                      indirect=indirect)  # fmt: skip
    reference = ReferenceWalk(memory, SIZE, indirect=indirect)
    assert outcome(queue._walk, head) == outcome(reference.walk, head)
    assert queue.descriptors_read == reference.read


def test_chains_of_every_shape_come_out_whole(
    small_ram: tuple[GuestRam, GuestMemory],
) -> None:
    """Direct chains of every length up to the queue size, and indirect tables of every
    length, each with readable buffers before writable ones."""
    ram, memory = small_ram
    queue = Virtqueue(memory, RingState(SIZE, DESC_TABLE, AVAIL, USED), event_idx=True,
                      indirect=True)  # fmt: skip
    for count in range(1, SIZE + 1):
        buffers = [Buffer(0x10000 + 0x1000 * i, 0x100 + i) for i in range(count)]
        split = count // 3
        entries = []
        for i, b in enumerate(buffers):
            flags = (F_WRITE if i >= split else 0) | (F_NEXT if i < count - 1 else 0)
            entries.append(DESC.pack(b.addr, b.length, flags, i + 1))
        ram.write(DESC_TABLE, b"".join(entries))
        assert queue._walk(0) == (tuple(buffers[:split]), tuple(buffers[split:]))
        ram.write(HIGH_TABLE, b"".join(entries))
        ram.write(DESC_TABLE + 16 * 3, DESC.pack(HIGH_TABLE, 16 * count, F_INDIRECT, 0))
        assert queue._walk(3) == (tuple(buffers[:split]), tuple(buffers[split:]))


def test_an_indirect_table_in_memory_that_went_away_ends_only_its_chain() -> None:
    ram = GuestRam(low=1 * MiB, high=1 * MiB)  # memfds without seals: the frontend may shrink
    memory = GuestMemory()
    memory.replace([(r.spec, os.dup(r.fd)) for r in ram.regions])
    try:
        queue = Virtqueue(memory, RingState(SIZE, DESC_TABLE, AVAIL, USED), event_idx=True,
                          indirect=True)  # fmt: skip
        ram.write(HIGH_TABLE, DESC.pack(0x10000, 4096, F_WRITE, 0))
        ram.write(DESC_TABLE, DESC.pack(HIGH_TABLE, 16, F_INDIRECT, 0))
        ram.write(DESC_TABLE + 16, DESC.pack(0x20000, 4096, F_WRITE, 0))
        ram.write(AVAIL, struct.pack("<HHHH", 0, 2, 0, 1))
        os.ftruncate(ram.regions[1].fd, 0)  # the high region's memory is gone
        first = queue.pop()
        assert first is not None and first.error is not None and "gone" in first.error
        second = queue.pop()  # the ring itself is untouched: the next chain is fine
        assert second is not None and second.writable == (Buffer(0x20000, 4096),)
    finally:
        memory.close()
        ram.close()


@pytest.mark.parametrize(
    ("addr", "length", "overflows"),
    [(2**64 - 4096, 4096, False), (2**64 - 4095, 4096, True), (0, 2**32 - 1, False),
     (2**64 - 1, 1, False), (2**64 - 1, 2, True), (2**64 - 1, 0, False)],
)  # fmt: skip
def test_a_buffer_may_end_at_the_top_of_the_address_space_and_not_past_it(
    small_ram: tuple[GuestRam, GuestMemory], addr: int, length: int, overflows: bool
) -> None:
    ram, memory = small_ram
    ram.write(DESC_TABLE, DESC.pack(addr, length, F_WRITE, 0))
    queue = Virtqueue(memory, RingState(SIZE, DESC_TABLE, AVAIL, USED), event_idx=True,
                      indirect=True)  # fmt: skip
    reference = ReferenceWalk(memory, SIZE, indirect=True)
    assert outcome(queue._walk, 0) == outcome(reference.walk, 0)
    assert (outcome(queue._walk, 0)[0] == "error") is overflows


def test_a_table_that_leaves_the_available_ring_misaligned_ends_the_ring() -> None:
    """A new memory table may cut a running ring's parts apart (the ring carries on by guest
    address, design.md invariant 12). Cut around the available ring's entries, the region
    holding them at an odd file offset (the indices on either side at even ones), the
    entries lie at odd addresses of the daemon's mapping, where a 16-bit index cannot be
    read in one access: the ring ends as a guest error, before any entry is read."""
    ram = GuestRam(low=1 * MiB, high=0)
    memory = GuestMemory()
    memory.replace([(r.spec, os.dup(r.fd)) for r in ram.regions])
    try:
        queue = Virtqueue(memory, RingState(SIZE, DESC_TABLE, AVAIL, USED), event_idx=True,
                          indirect=False)  # fmt: skip
        assert queue.pending() == 0
        region, cut, end = ram.regions[0], AVAIL + 4, AVAIL + 4 + 2 * SIZE  # the entries
        memory.replace([
            (wire.MemoryRegion(0, cut, region.uaddr, 0), os.dup(region.fd)),
            (wire.MemoryRegion(cut, end - cut, region.uaddr + cut, cut + 1), os.dup(region.fd)),
            (wire.MemoryRegion(end, 64 * 1024, region.uaddr + end, end), os.dup(region.fd)),
        ])  # fmt: skip
        ram.write(AVAIL + 2, struct.pack("<H", 1))  # a chain is available: its entry is read
        with pytest.raises(GuestError, match=r"available ring .* not 2-byte aligned"):
            queue.pop()
    finally:
        memory.close()
        ram.close()

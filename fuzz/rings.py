"""The split-ring walker over arbitrary rings: ``Virtqueue.pop`` against a reference.

A run builds a ring of any size up to 256 in real memfd guest RAM: a descriptor table of
arbitrary descriptors (mostly plausible: chains, loops, indirect tables of arbitrary size
anywhere, also across the end of RAM), an available ring of arbitrary heads, and pops
every chain, holding some and returning the others.

Invariants: ``pop`` raises nothing but ``RingError``, and that only for a corrupt ring
(an available index more than the size ahead, a head out of range, a head the device
holds); every chain it returns is what :func:`reference` (virtio 1.2, 2.7.5) finds:
the same buffers in the same order, or an error when the chain is malformed; a chain has
at most ``size`` buffers; the device holds at most ``size`` chains; every chain popped
is returned exactly once and the used ring holds them in the order they were pushed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from balloond.errors import GuestError
from balloond.memory import GuestMemory
from balloond.virtqueue import Buffer, RingError, RingState, Virtqueue
from balloond.wire import MemoryRegion
from fuzz.guest import DESC, F_INDIRECT, F_NEXT, F_WRITE, U16, USED_ELEM, MiB
from fuzz.source import Source, flag, number
from fuzz.world import require

RAM_SIZE = 2 * MiB
DESC_AT, AVAIL_AT, USED_AT, TABLES_AT = 0x1000, 0x2000, 0x4000, 0x10000
CLEAN = TABLES_AT + 3 * (2 * 256 + 2) * 16

_MEMORY: tuple[int, GuestMemory] | None = None


def memory() -> tuple[int, GuestMemory]:
    """One memfd of guest RAM at gpa 0, mapped once per process (rewritten by each run)."""
    global _MEMORY
    if _MEMORY is None:
        fd = os.memfd_create("ring-ram")
        os.ftruncate(fd, RAM_SIZE)
        mem = GuestMemory()
        mem.replace([(MemoryRegion(0, RAM_SIZE, 0, 0), os.dup(fd))])
        _MEMORY = (fd, mem)
    return _MEMORY


@dataclass(frozen=True)
class Walk:
    """What a chain is: its buffers, or why it is malformed."""

    readable: tuple[Buffer, ...] = ()
    writable: tuple[Buffer, ...] = ()
    error: str | None = None
    used_indirect: bool = False


def reference(
    read: Callable[[int, int], bytes | None], desc: int, size: int, head: int, indirect: bool
) -> Walk:
    """Walk the chain at ``head`` as virtio 1.2 (2.7.5) describes it; ``read`` returns
    None for memory outside guest RAM. A chain is at most ``size`` buffers; the
    descriptor that names an indirect table is not a buffer."""
    readable: list[Buffer] = []
    writable: list[Buffer] = []
    table, table_size, index, nested, used = desc, size, head, False, False
    while True:
        raw = read(table + DESC.size * index, DESC.size)
        if raw is None:
            return Walk(error="descriptor outside guest RAM", used_indirect=used)
        addr, length, flags, nxt = DESC.unpack(raw)
        if flags & F_INDIRECT:
            if not indirect or nested or flags & F_NEXT:
                return Walk(error="indirect descriptor not allowed here", used_indirect=True)
            if length == 0 or length % DESC.size or length // DESC.size > size:
                return Walk(error=f"indirect table of {length} bytes", used_indirect=True)
            if read(addr, length) is None:
                return Walk(error="indirect table outside guest RAM", used_indirect=True)
            table, table_size, index, nested, used = addr, length // DESC.size, 0, True, True
            continue
        if addr + length > 1 << 64:
            return Walk(error="buffer overflows", used_indirect=used)
        if len(readable) + len(writable) == size:
            return Walk(error="longer than the queue (or a loop)", used_indirect=used)
        if flags & F_WRITE:
            writable.append(Buffer(addr, length))
        elif writable:
            return Walk(error="readable after writable", used_indirect=used)
        else:
            readable.append(Buffer(addr, length))
        if not flags & F_NEXT:
            return Walk(tuple(readable), tuple(writable), used_indirect=used)
        if nxt >= table_size:
            return Walk(error=f"next {nxt} beyond a table of {table_size}", used_indirect=used)
        index = nxt


def _descriptor(source: Source, size: int, tables: list[tuple[int, int]], slot: int) -> bytes:
    kind = source.int(0, 5)
    if kind == 0 and tables:  # an indirect descriptor, to one of the tables (or near it)
        addr, count = tables[source.int(0, len(tables) - 1)]
        length = count * DESC.size if source.int(0, 3) else source.int(0, 2**32 - 1)
        flags = F_INDIRECT | (source.int(0, 7) if source.int(0, 4) == 0 else 0)
        return DESC.pack(addr, length, flags, source.int(0, size))
    addr = number(source, (0x100000, 0x1FF000, RAM_SIZE, 2**64 - 4096), 0, 2**64 - 1)
    length = number(source, (4096, 2 * MiB, 0, 2**32 - 1), 0, 2**32 - 1)
    flags = number(source, (F_NEXT, 0, F_WRITE | F_NEXT, F_WRITE), 0, 0xFFFF)
    nxt = number(source, (slot + 1, slot + 1, 0, size - 1, size), 0, 0xFFFF)
    return DESC.pack(addr, length, flags, nxt)


def run(source: Source) -> None:
    fd, mem = memory()
    size = 1 << source.int(0, 8)
    event_idx, indirect = flag(source), flag(source)
    os.pwrite(fd, bytes(CLEAN), 0)  # the ring and the tables of the last run
    os.pwrite(fd, bytes(CLEAN), RAM_SIZE - CLEAN)
    # Indirect tables of arbitrary size: some inside RAM, some across its end.
    tables: list[tuple[int, int]] = []
    cursor = TABLES_AT
    for _ in range(source.int(0, 3)):
        count = number(source, (1, size, size + 1, 2 * size), 0, 2 * size + 2)
        if source.int(0, 5) == 0:
            at = RAM_SIZE - DESC.size * source.int(0, count)  # crosses the end of RAM
        else:
            at = cursor
            cursor += DESC.size * count
        tables.append((at, count))
    for at, count in tables:
        entries = b"".join(_descriptor(source, count, [], i) for i in range(count))
        os.pwrite(fd, entries[: max(0, RAM_SIZE - at)], at)
    table = b"".join(_descriptor(source, size, tables, i) for i in range(size))
    os.pwrite(fd, table, DESC_AT)
    heads = [number(source, (0, 1, size - 1), 0, size + 1) for _ in range(source.int(1, size + 2))]
    os.pwrite(fd, struct.pack("<HH", 0, len(heads)), AVAIL_AT)
    for i, head in enumerate(heads):
        os.pwrite(fd, U16.pack(head), AVAIL_AT + 4 + 2 * (i % size))
    holds = [flag(source) for _ in heads]

    def read(gpa: int, length: int) -> bytes | None:
        if gpa < 0 or gpa + length > RAM_SIZE:
            return None
        return os.pread(fd, length, gpa)

    queue = Virtqueue(
        mem, RingState(size, DESC_AT, AVAIL_AT, USED_AT), event_idx=event_idx, indirect=indirect
    )
    held: list[int] = []
    pushed: list[int] = []
    corrupt = len(heads) > size
    for i, head in enumerate(heads):
        expected = reference(read, DESC_AT, size, head, indirect) if head < size else None
        try:
            chain = queue.pop()
        except RingError as error:
            require(
                corrupt or head >= size or head in held,
                f"pop of head {head} raised {error} though the ring is sound",
            )
            break
        except GuestError as error:
            raise AssertionError(f"pop raised {type(error).__name__}: {error}") from error
        require(not corrupt and head < size and head not in held, f"head {head} popped")
        require(chain is not None and chain.head == head, f"popped {chain}, expected {head}")
        assert chain is not None and expected is not None
        require(len(chain.readable) + len(chain.writable) <= size, "a chain longer than size")
        if chain.error is None:
            require(
                expected.error is None,
                f"head {head} walked to {chain}; the reference finds: {expected.error}",
            )
            require(
                (chain.readable, chain.writable) == (expected.readable, expected.writable),
                f"head {head}: {chain} differs from the reference {expected}",
            )
        elif expected.error is None:
            # Known: the engine counts the descriptor naming an indirect table as one of
            # the chain's ``size`` (tests/test_properties.py,
            # test_an_indirect_table_as_long_as_the_ring_is_walked, xfail).
            full = len(expected.readable) + len(expected.writable) == size
            require(
                expected.used_indirect and full,
                f"head {head} is malformed for the engine ({chain.error}); the reference "
                f"walks it: {expected}",
            )
        if holds[i]:
            held.append(head)
        else:
            queue.push(head, 0)
            pushed.append(head)
        require(queue.held == len(held) <= size, f"holds {queue.held}, expected {len(held)}")
    for head in held:
        queue.push(head, 0)
        pushed.append(head)
    require(queue.held == 0, "chains still held after all were pushed")
    require(queue.unpublished == bool(pushed), "pushes published before publish_used")
    queue.publish_used()
    require(mem.load_u16(USED_AT + 2) == len(pushed), "the used index is not the count pushed")
    for i, head in enumerate(pushed[-size:]):
        k = len(pushed) - min(size, len(pushed)) + i
        elem = USED_ELEM.unpack(os.pread(fd, USED_ELEM.size, USED_AT + 4 + 8 * (k % size)))
        require(elem == (head, 0), f"used element {k} is {elem}, pushed ({head}, 0)")

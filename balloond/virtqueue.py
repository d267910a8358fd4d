"""Split virtqueues over guest memory: popping chains, pushing used elements, notifying.

Everything in a ring is written by the guest and is untrusted. A malformed chain (a loop,
an index past the table, a nested indirect table, a length that overflows, a buffer
outside guest RAM) comes back as a :class:`Chain` with ``error`` set: the device completes
it with length 0 and counts it, and the queue goes on. Corruption of the ring itself (an
avail index that jumps by more than the ring size, a head index out of range) cannot be
completed safely; it raises :class:`RingError` and the device stops using the queue. So
does a driver that makes a chain available again while the device still holds it: the
device holds at most one chain per descriptor, ``size`` in all, whatever the guest does.

Memory ordering (virtio 1.2, 2.7.7 and 2.7.10; vhost does the same): the available index
is read with acquire before the entries it covers; used elements are written before the
used index is published, which is one 16-bit store with release; between publishing an
index (used, or ``avail_event``) and reading the guest's answer to it (``used_event`` or
the flags, or the available index again) there is a full barrier. Indices go through
:mod:`balloond.barriers`' single 16-bit accesses, never ``struct``.

Where the ring's parts lie in the daemon's mapping is worked out once per memory table
(:attr:`GuestMemory.generation`), bounds and alignment checked then, not on every access;
a chain is walked by one native call (:class:`balloond.barriers.ChainWalker`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntFlag
from typing import NamedTuple

from balloond import barriers
from balloond.errors import GuestError
from balloond.memory import GuestMemory, GuestMemoryError

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

#: The largest ring the virtio spec allows for a split queue.
MAX_QUEUE_SIZE = 32768


class DescFlags(IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


VRING_AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class RingError(GuestError):
    """The ring itself is corrupt; the queue cannot be used until it is set up again."""


class Buffer(NamedTuple):
    """One descriptor's guest-physical buffer (a tuple: up to a queue's worth per chain are
    made from the native walk's words, each in a fraction of a frozen dataclass's time)."""

    addr: int
    length: int


class Chain(NamedTuple):
    """A descriptor chain popped from the available ring (a tuple: one is made per chain)."""

    head: int
    readable: tuple[Buffer, ...] = ()
    writable: tuple[Buffer, ...] = ()
    error: str | None = None

    @property
    def readable_length(self) -> int:
        return sum(b.length for b in self.readable)


@dataclass
class RingState:
    """Everything a split ring needs, as plain values (guest-physical addresses)."""

    size: int
    desc: int
    avail: int
    used: int
    next_avail: int = 0
    next_used: int = 0
    #: The used index the guest was last notified of (EVENT_IDX), or None if unknown.
    signalled_used: int | None = field(default=None)
    #: Heads popped and not yet pushed back: chains the device holds. A stopped ring
    #: must hold none (the stats buffer is given back by rewinding ``next_avail``).
    in_flight: set[int] = field(default_factory=set)


class Virtqueue:
    def __init__(
        self, memory: GuestMemory, state: RingState, *, event_idx: bool, indirect: bool
    ) -> None:
        if not 0 < state.size <= MAX_QUEUE_SIZE or state.size & (state.size - 1):
            raise RingError(f"queue size {state.size} is not a power of two up to 32768")
        self.memory = memory
        self.state = state
        #: Descriptors read so far (a measure of the work a guest has caused).
        self.descriptors_read = 0
        self.event_idx = event_idx
        self.indirect = indirect
        #: The used index last stored in guest memory by this object: a ring is set up
        #: (or carried on) with every push published, and :meth:`publish_used` stores the
        #: pushes since.
        self._published = state.next_used
        self._walker = barriers.ChainWalker(state.size)
        self._generation = -1
        self._at = _Places(0, 0, 0, 0, 0, 0, 0, 0)
        size = state.size
        # The whole ring must be inside guest RAM before we touch any of it.
        memory.check(state.desc, _DESC.size * size)
        memory.check(state.avail, 4 + 2 * size + 2)
        memory.check(state.used, 4 + _USED_ELEM.size * size + 2)
        # The alignment the split ring layout requires; the index accesses rely on it.
        for name, address, alignment in (
            ("descriptor table", state.desc, 16),
            ("available ring", state.avail, 2),
            ("used ring", state.used, 4),
        ):
            if address % alignment:
                raise RingError(f"{name} at {address:#x} is not {alignment}-byte aligned")
        self._places()

    def _places(self) -> _Places:
        """Where the ring's parts are in the daemon's mapping, for the current memory table
        (each part checked to lie in one region; the indices and the available ring's
        entries checked for a 16-bit access, which `_load_u16` and `_store_u16` rely on)."""
        if self._generation == self.memory.generation:
            return self._at
        state, memory, size = self.state, self.memory, self.state.size
        self._at = _Places(
            desc=memory.host_address(state.desc, _DESC.size * size),
            avail_flags=memory.u16_host_address(state.avail),
            avail_idx=memory.u16_host_address(state.avail + 2),
            avail_ring=memory.host_address(state.avail + 4, 2 * size),
            used_event=memory.u16_host_address(state.avail + 4 + 2 * size),
            used_idx=memory.u16_host_address(state.used + 2),
            used_ring=memory.host_address(state.used + 4, _USED_ELEM.size * size),
            avail_event=memory.u16_host_address(state.used + 4 + _USED_ELEM.size * size),
        )
        if self._at.avail_ring % 2:  # the entries are read as 16-bit indices too
            raise GuestMemoryError(f"available ring at {state.avail + 4:#x} is not 2-byte aligned")
        self._generation = memory.generation
        return self._at

    # --- the available ring ------------------------------------------------------------

    def _avail_idx(self) -> int:
        return _load_u16(self._places().avail_idx)

    def pending(self) -> int:
        """How many chains the guest has made available that we have not popped."""
        count = (self._avail_idx() - self.state.next_avail) & 0xFFFF
        if count > self.state.size:
            raise RingError(
                f"available index moved by {count}, more than the queue size {self.state.size}"
            )
        return count

    def pop(self) -> Chain | None:
        if not self.pending():
            return None
        state = self.state
        head = _load_u16(self._places().avail_ring + 2 * (state.next_avail % state.size))
        if head >= state.size:
            raise RingError(f"available ring names descriptor {head} of {state.size}")
        if head in state.in_flight:
            raise RingError(f"descriptor {head} made available again while the device holds it")
        state.next_avail = (state.next_avail + 1) & 0xFFFF
        state.in_flight.add(head)
        try:
            readable, writable = self._walk(head)
        except GuestError as error:
            return Chain(head, error=str(error))
        return Chain(head, readable, writable)

    def _walk(self, head: int) -> tuple[tuple[Buffer, ...], tuple[Buffer, ...]]:
        """The chain's buffers. A chain has at most the queue size of descriptors, direct
        and indirect ones together (virtio 1.2, 2.7.5.3.1), so walking one costs at most
        ``size`` reads, whatever the guest wrote: a loop, or a huge indirect table."""
        walker = self._walker
        code = walker.walk(self.memory.native_table, self._places().desc, head, self.indirect)
        self.descriptors_read += walker.read
        if code != barriers.CHAIN_OK:
            raise GuestError(_chain_error(code, walker, self.state.size))
        words, count, readable = walker.words, walker.count, walker.readable
        if count == 1:  # the common chain: one buffer
            buffer = Buffer(words[0], words[1])
            return ((buffer,), ()) if readable else ((), (buffer,))
        pairs = words[: 2 * count]
        buffers = tuple(map(Buffer._make, zip(pairs[0::2], pairs[1::2], strict=True)))
        return buffers[:readable], buffers[readable:]

    # --- the used ring -----------------------------------------------------------------

    @property
    def held(self) -> int:
        """How many chains the device holds (popped, not yet pushed)."""
        return len(self.state.in_flight)

    def push(self, head: int, length: int) -> None:
        """Return a popped chain to the guest: write its used element. The guest sees it
        once :meth:`publish_used` stores the used index (design.md, invariant 8)."""
        state = self.state
        if head not in state.in_flight:
            raise RuntimeError(f"pushing descriptor {head}, which the device does not hold")
        slot = self._places().used_ring + _USED_ELEM.size * (state.next_used % state.size)
        _write(slot, _USED_ELEM.pack(head, length))
        state.in_flight.discard(head)
        state.next_used = (state.next_used + 1) & 0xFFFF

    @property
    def unpublished(self) -> bool:
        """Whether chains were pushed that the guest cannot see yet."""
        return self._published != self.state.next_used

    def publish_used(self) -> bool:
        """Store the used index (a release store: the elements written by :meth:`push`
        before it); True if it moved."""
        if self._published == self.state.next_used:
            return False
        _store_u16(self._places().used_idx, self.state.next_used)
        self._published = self.state.next_used
        return True

    def chain(self, head: int) -> Chain:
        """Walk again a chain the device holds (a successor carrying on from a record: the
        guest does not touch a chain it made available until it is used)."""
        if head not in self.state.in_flight:
            raise RuntimeError(f"walking descriptor {head}, which the device does not hold")
        try:
            readable, writable = self._walk(head)
        except GuestError as error:
            return Chain(head, error=str(error))
        return Chain(head, readable, writable)

    def resume(self) -> None:
        """Carry on from a state record: guest memory's used index must be the recorded one
        or an earlier one; the recorded one is published (again), and the next push
        notifies whatever the guest last heard."""
        state = self.state
        used_idx = self._places().used_idx
        behind = (state.next_used - _load_u16(used_idx)) & 0xFFFF
        if behind > state.size:
            raise RingError(f"the used index in guest memory is {behind} behind the record")
        _store_u16(used_idx, state.next_used)
        self._published = state.next_used
        state.signalled_used = None

    def unpop(self, head: int) -> None:
        """Give back the chain popped last without using it (the ring is stopping): the
        next available index handed to the frontend points at it again."""
        state = self.state
        if head not in state.in_flight:
            raise RuntimeError(f"un-popping descriptor {head}, which the device does not hold")
        state.in_flight.discard(head)
        state.next_avail = (state.next_avail - 1) & 0xFFFF

    def publish_avail_event(self) -> bool:
        """Ask to be kicked for the next chain; True if more arrived meanwhile.

        With EVENT_IDX the guest kicks only when it passes ``avail_event``; after writing
        it, the available index is checked again so a chain added in between is not lost.
        """
        if self.event_idx:
            _store_u16(self._places().avail_event, self.state.next_avail)
            barriers.full_barrier()  # the store above, before the index is read again
        return self.pending() > 0

    def needs_notification(self) -> bool:
        """Whether the guest wants an interrupt for what was pushed since the last one."""
        state = self.state
        barriers.full_barrier()  # the used index published, before the guest's wish is read
        if not self.event_idx:
            flags = _load_u16(self._places().avail_flags)
            return not flags & VRING_AVAIL_F_NO_INTERRUPT
        used_event = _load_u16(self._places().used_event)
        old, new = state.signalled_used, state.next_used
        state.signalled_used = new
        if old is None:
            return True
        # Notify if used_event lies in [old, new): the virtio spec's vring_need_event.
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF


class _Places(NamedTuple):
    """The daemon's addresses of a ring's parts (see :meth:`Virtqueue._places`)."""

    desc: int
    avail_flags: int
    avail_idx: int
    avail_ring: int
    used_event: int
    used_idx: int
    used_ring: int
    avail_event: int


def _load_u16(address: int) -> int:
    """A ring index at one of the ring's places (checked when they were located)."""
    value = barriers.raw_load_u16_acquire(address)
    if value < 0:
        raise GuestMemoryError(str(barriers.gone(value, address)))
    return value


def _store_u16(address: int, value: int) -> None:
    """Publish a ring index at one of the ring's places (``value`` a 16-bit one)."""
    rc = barriers.raw_store_u16_release(address, value)
    if rc < 0:
        raise GuestMemoryError(str(barriers.gone(rc, address)))


def _write(address: int, data: bytes) -> None:
    try:
        barriers.write(address, data)
    except barriers.BusError as error:
        raise GuestMemoryError(str(error)) from None


def _chain_error(code: int, walker: barriers.ChainWalker, size: int) -> str:
    """The message for a walk's error ``code``."""
    first, second = walker.detail(0), walker.detail(1)
    if code == barriers.CHAIN_LOOP:
        return "descriptor chain loops or is longer than the queue"
    if code == barriers.CHAIN_INDIRECT_OFF:
        return "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"
    if code == barriers.CHAIN_INDIRECT_NESTED:
        return "indirect descriptor inside an indirect table"
    if code == barriers.CHAIN_INDIRECT_NEXT:
        return "indirect descriptor with NEXT set"
    if code == barriers.CHAIN_INDIRECT_LENGTH:
        return f"indirect table of {first} bytes"
    if code == barriers.CHAIN_INDIRECT_LONG:
        return (
            f"indirect table of {first // _DESC.size} descriptors, more than the queue size {size}"
        )
    if code == barriers.CHAIN_OUTSIDE:
        return f"guest address {first:#x}+{second:#x} is not inside one region"
    if code == barriers.CHAIN_OVERFLOW:
        return f"descriptor {first:#x}+{second:#x} overflows"
    if code == barriers.CHAIN_ORDER:
        return "device-readable descriptor after a device-writable one"
    if code == barriers.CHAIN_NEXT:
        return f"next descriptor {first} beyond table of {second}"
    if code == barriers.CHAIN_FAULT:
        return "guest memory is gone (its file was shrunk) under the descriptor table"
    return f"descriptor chain walk failed (code {code})"

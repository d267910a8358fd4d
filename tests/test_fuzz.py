"""Property tests: arbitrary frontend bytes and arbitrary guest rings never crash the
daemon's decoders, and a ring walk never names memory outside guest RAM."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloond import wire
from balloond.errors import FrontendError, GuestError
from balloond.memory import GuestMemory
from balloond.virtqueue import RingError, RingState, Virtqueue
from tests.frontend import DESC, GuestRam, MiB

REQUESTS = [int(r) for r in wire.Request]


@given(
    request=st.sampled_from(REQUESTS) | st.integers(0, 2**32 - 1),
    flags=st.sampled_from([0x1, 0x9]) | st.integers(0, 2**32 - 1),
    body=st.binary(max_size=300),
    fds=st.integers(0, 9),
)
@settings(max_examples=2000)
def test_decoding_any_message_either_works_or_is_a_frontend_error(
    request: int, flags: int, body: bytes, fds: int
) -> None:
    header_bytes = struct.pack("=III", request, flags, len(body))
    try:
        header = wire.decode_header(header_bytes)
        message = wire.decode_message(header, body, tuple(range(100, 100 + fds)))
    except FrontendError:
        return
    # What decodes re-encodes to an equal message (padding aside).
    again = wire.encode_payload(message.payload)
    assert len(again) == len(body)
    assert wire.decode_message(header, again, message.fds) == message


DESC_TABLE, AVAIL, USED, SIZE = 0x1000, 0x2000, 0x3000, 16

descriptor = st.tuples(
    st.one_of(st.integers(0, 2 * MiB), st.integers(0, 2**64 - 1), st.just(4 << 30)),
    st.one_of(st.integers(0, 64 * 1024), st.integers(0, 2**32 - 1)),
    st.integers(0, 7),
    st.integers(0, SIZE + 2),
)


@given(
    table=st.lists(descriptor, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptor, min_size=0, max_size=8),
    heads=st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=SIZE),
)
@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_ring_contents_yield_chains_inside_guest_ram_or_errors(
    small_ram: tuple[GuestRam, GuestMemory],
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    heads: list[int],
) -> None:
    ram, memory = small_ram
    ram.write(DESC_TABLE, b"".join(DESC.pack(*d) for d in table))
    ram.write(0x8000, b"".join(DESC.pack(*d) for d in indirect))  # a table some may point at
    ram.write(AVAIL, struct.pack("<HH", 0, len(heads)))
    ram.write(AVAIL + 4, struct.pack(f"<{len(heads)}H", *heads))
    state = RingState(SIZE, DESC_TABLE, AVAIL, USED)
    queue = Virtqueue(memory, state, event_idx=True, indirect=True)
    popped = 0
    while (chain := queue.pop()) is not None:
        popped += 1
        for buffer in chain.readable + chain.writable:
            assert buffer.addr + buffer.length <= 2**64
        queue.push(chain.head, 0)
    assert popped == len(heads)
    assert queue.pending() == 0


def test_a_corrupt_avail_index_is_a_guest_error(small_ram: tuple[GuestRam, GuestMemory]) -> None:
    ram, memory = small_ram
    ram.write(AVAIL, struct.pack("<HH", 0, SIZE + 1))
    queue = Virtqueue(
        memory, RingState(SIZE, DESC_TABLE, AVAIL, USED), event_idx=False, indirect=False
    )
    with pytest.raises(GuestError):
        queue.pop()


@given(
    heads=st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=SIZE),
    returns=st.lists(st.booleans(), min_size=SIZE, max_size=SIZE),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_chain_is_held_at_most_once_and_returned_exactly_once(
    small_ram: tuple[GuestRam, GuestMemory], heads: list[int], returns: list[bool]
) -> None:
    ram, memory = small_ram
    ram.write(DESC_TABLE, DESC.pack(0x8000, 64, 0, 0) * SIZE)
    ram.write(USED, bytes(4 + 8 * SIZE + 2))
    ram.write(AVAIL, struct.pack("<HH", 0, len(heads)))
    ram.write(AVAIL + 4, struct.pack(f"<{len(heads)}H", *heads))
    queue = Virtqueue(
        memory, RingState(SIZE, DESC_TABLE, AVAIL, USED), event_idx=False, indirect=False
    )
    held: list[int] = []
    pushed = 0
    for index, head in enumerate(heads):
        if head in held:  # the driver offers a chain the device still holds: a broken ring
            with pytest.raises(RingError):
                queue.pop()
            break
        chain = queue.pop()
        assert chain is not None and chain.head == head
        held.append(head)
        if returns[index]:  # the device returns the oldest chain it holds
            queue.push(held.pop(0), 0)
            pushed += 1
        assert queue.held == len(held) <= SIZE
    for head in held:
        queue.push(head, 0)
        pushed += 1
    assert queue.held == 0
    assert memory.load_u16(USED + 2) == 0, "the guest sees no push before publication"
    queue.publish_used()
    assert memory.load_u16(USED + 2) == pushed
    with pytest.raises(RuntimeError, match="does not hold"):
        queue.push(heads[0], 0)  # returning a chain twice is a bug of ours, never done

"""A guest that writes garbage into its rings: each bad chain is completed and counted,
memory outside guest RAM is never touched, and the device keeps serving."""

from __future__ import annotations

import os
import select
from collections.abc import Callable

import pytest

from tests.conftest import Daemon
from tests.frontend import DESC, F_INDIRECT, F_NEXT, F_WRITE, U16, Guest, GuestRam, MiB, Ring

HUGE = 2 * MiB
DATA = 32 * MiB  # report targets live here, far from the rings


def _loop(ring: Ring) -> int:
    ring.write_desc(0, DATA, HUGE, F_WRITE | F_NEXT, 0)
    return 0


def _next_out_of_range(ring: Ring) -> int:
    ring.write_desc(0, DATA, HUGE, F_WRITE | F_NEXT, ring.size + 5)
    return 0


def _indirect_in_indirect(ring: Ring) -> int:
    table = ring.ram.alloc(32, 16)
    ring.ram.write(table, DESC.pack(table, 32, F_INDIRECT, 0) + DESC.pack(DATA, HUGE, F_WRITE, 0))
    ring.write_desc(0, table, 32, F_INDIRECT)
    return 0


def _indirect_with_next(ring: Ring) -> int:
    table = ring.ram.alloc(16, 16)
    ring.ram.write(table, DESC.pack(DATA, HUGE, F_WRITE, 0))
    ring.write_desc(0, table, 16, F_INDIRECT | F_NEXT, 1)
    ring.write_desc(1, DATA, HUGE, F_WRITE)
    return 0


def _indirect_bad_length(ring: Ring) -> int:
    table = ring.ram.alloc(16, 16)
    ring.write_desc(0, table, 17, F_INDIRECT)
    return 0


def _indirect_empty(ring: Ring) -> int:
    ring.write_desc(0, DATA, 0, F_INDIRECT)
    return 0


def _indirect_table_outside_ram(ring: Ring) -> int:
    ring.write_desc(0, 1 << 40, 16 * 4, F_INDIRECT)
    return 0


def _indirect_loop(ring: Ring) -> int:
    table = ring.ram.alloc(32, 16)
    entries = DESC.pack(DATA, HUGE, F_WRITE | F_NEXT, 1) + DESC.pack(
        DATA, HUGE, F_WRITE | F_NEXT, 0
    )
    ring.ram.write(table, entries)
    ring.write_desc(0, table, 32, F_INDIRECT)
    return 0


def _length_overflows(ring: Ring) -> int:
    ring.write_desc(0, (1 << 64) - 4096, 0xFFFF_F000, F_WRITE)
    return 0


def _readable_in_report(ring: Ring) -> int:
    ring.write_desc(0, DATA, HUGE, 0)
    return 0


def _readable_after_writable(ring: Ring) -> int:
    ring.write_desc(0, DATA, HUGE, F_WRITE | F_NEXT, 1)
    ring.write_desc(1, DATA + HUGE, HUGE, 0)
    return 0


MALFORMED: dict[str, Callable[[Ring], int]] = {
    "descriptor loop": _loop,
    "next index out of range": _next_out_of_range,
    "indirect table inside an indirect table": _indirect_in_indirect,
    "indirect descriptor with NEXT": _indirect_with_next,
    "indirect table length not a multiple of 16": _indirect_bad_length,
    "empty indirect table": _indirect_empty,
    "indirect table outside guest RAM": _indirect_table_outside_ram,
    "loop inside an indirect table": _indirect_loop,
    "buffer address + length overflows": _length_overflows,
    "device-readable buffer in a report": _readable_in_report,
    "readable after writable": _readable_after_writable,
}


def _fill(ram: GuestRam, value: int) -> bytes:
    data = bytes([value]) * (4 * HUGE)
    ram.write(DATA, data)
    return data


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_chain_is_completed_and_counted(
    case: str, guest: Guest, ram: GuestRam, daemon: Daemon
) -> None:
    data = _fill(ram, 0x5A)
    ring = guest.rings["reporting"]
    before = ram.blocks()

    head = MALFORMED[case](ring)
    ring.free_desc = 2
    ring.publish(head)
    ring.notify()
    [(used_head, used_len)] = ring.wait_used(1)

    assert (used_head, used_len) == (head, 0)
    assert ram.read(DATA, len(data)) == data, "a malformed chain must not free anything"
    assert ram.blocks() == before
    assert daemon.device.state.counters.bad_chains == 1
    # The queue still works: a good report right after is freed.
    guest.report([(DATA, HUGE)])
    assert ram.read(DATA, HUGE) == bytes(HUGE)


def test_inflate_with_a_partial_frame_number(guest: Guest, ram: GuestRam, daemon: Daemon) -> None:
    ring = guest.rings["inflate"]
    frames = ram.alloc(8)
    ram.write(frames, b"\x01\x02\x03\x04\x05\x06")  # 6 bytes: not a whole number of le32
    head = ring.add_chain([(frames, 6)], writable=False)
    ring.notify()
    assert ring.wait_used(1) == [(head, 0)]
    assert daemon.device.state.counters.bad_chains == 1


def test_corrupt_avail_index_gives_up_that_ring_only(
    guest: Guest, ram: GuestRam, daemon: Daemon
) -> None:
    ring = guest.rings["deflate"]
    err = os.eventfd(0, os.EFD_NONBLOCK)
    from balloond import wire
    from balloond.wire import Request

    guest.frontend.call(Request.SET_VRING_ERR, wire.VringFile(ring.index, False), [err])
    ram.write(ring.avail + 2, U16.pack(ring.size + 7))  # claims more chains than the ring holds
    ring.notify()
    ready, _, _ = select.select([err], [], [], 5)
    assert ready, "the backend signals the ring's error eventfd"
    os.close(err)
    # Reporting, on another ring, is unaffected.
    ram.write(DATA, b"\x01" * HUGE)
    guest.report([(DATA, HUGE)])
    assert ram.read(DATA, HUGE) == bytes(HUGE)


def test_head_index_out_of_range_gives_up_the_ring(guest: Guest, daemon: Daemon) -> None:
    ring = guest.rings["inflate"]
    ring.publish(ring.size + 1)
    ring.notify()
    ram = guest.ram
    ram.write(DATA, b"\x01" * HUGE)
    guest.report([(DATA, HUGE)])  # the daemon is still up and serving other rings
    assert ring.used_idx() == 0


def test_an_indirect_table_longer_than_the_queue_is_not_walked(
    guest: Guest, ram: GuestRam, daemon: Daemon
) -> None:
    # 16 MiB of descriptors, each naming the next: a million reads if it were walked.
    table, count = 40 * MiB, 1 << 20
    ram.write(
        table,
        b"".join(DESC.pack(DATA, HUGE, F_WRITE | F_NEXT, (i + 1) & 0xFFFF) for i in range(count)),
    )
    ring = guest.rings["reporting"]
    ring.write_desc(0, table, 16 * count, F_INDIRECT)
    ring.free_desc = 1
    ring.publish(0)
    ring.notify()
    # Refused at once: a chain is at most the queue size long (the walk took seconds before).
    assert ring.wait_used(1, timeout=3) == [(0, 0)]
    assert daemon.device.state.counters.bad_chains == 1

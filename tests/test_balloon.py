"""The classic balloon through the real daemon: target, inflate/deflate (also on huge
pages, across buffers), statistics held and returned, and the control interface."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloond import wire
from balloond.balloon import STAT_ENTRY, STAT_NAMES, coalesce
from balloond.control import BalloonControl
from balloond.errors import OperatorError
from balloond.wire import BackendRequest, Request
from tests.conftest import Daemon
from tests.frontend import Frontend, GiB, Guest, GuestRam, MiB, Ring
from tests.hugepages import HUGE, reserved

PAGE = 4096
PROTOCOL_FEATURES = 1 << 30


def inflate(guest: Guest, frames: Sequence[int], ring_name: str = "inflate") -> None:
    """Send one buffer of le32 frame numbers and wait for it to come back."""
    ring = guest.rings[ring_name]
    buffer = guest.ram.alloc(4 * len(frames), 8)
    guest.ram.write(buffer, struct.pack(f"<{len(frames)}I", *frames))
    head = ring.add_chain([(buffer, 4 * len(frames))], writable=False)
    ring.notify()
    assert ring.wait_used(1) == [(head, 0)]


def frames_of(gpa: int, length: int) -> list[int]:
    return list(range(gpa // PAGE, (gpa + length) // PAGE))


def control(daemon: Daemon) -> BalloonControl:
    return BalloonControl(daemon.server)


# --- target ------------------------------------------------------------------------------


def test_target_reaches_the_guest_through_the_backend_channel(
    guest: Guest, daemon: Daemon, frontend: Frontend
) -> None:
    ram_size = sum(r.size for r in guest.ram.regions)
    result = daemon.run(lambda: control(daemon).set_target(ram_size - 32 * MiB))
    assert result == {"target_bytes": ram_size - 32 * MiB, "guest_notified": True}
    # The frontend gets BACKEND_CONFIG_CHANGE_MSG, and the config now asks for 32 MiB.
    assert frontend.backend_channel is not None
    frontend.backend_channel.settimeout(5)
    header = wire.decode_header(frontend.backend_channel.recv(wire.HEADER_SIZE))
    assert header.request == BackendRequest.CONFIG_CHANGE_MSG
    num_pages, actual, _, _ = struct.unpack("<IIII", frontend.get_config())
    assert (num_pages, actual) == (32 * MiB // PAGE, 0)
    # The guest reports progress in `actual`; status shows it.
    frontend.set_config(struct.pack("<IIII", num_pages, 4096, 0, 0))
    status = daemon.run(lambda: control(daemon).status())
    assert isinstance(status, dict)
    assert status["target_bytes"] == ram_size - 32 * MiB
    assert status["actual_bytes"] == 16 * MiB


@pytest.mark.parametrize("target", [-1, 129 * MiB, 10 * GiB])
def test_impossible_targets_are_refused(guest: Guest, daemon: Daemon, target: int) -> None:
    with pytest.raises(OperatorError, match="outside"):
        daemon.run(lambda: control(daemon).set_target(target))
    assert struct.unpack("<IIII", guest.frontend.get_config())[0] == 0


def test_target_needs_a_connected_vm(daemon: Daemon) -> None:
    with pytest.raises(OperatorError, match="no VM"):
        daemon.run(lambda: control(daemon).set_target(GiB))


def test_target_and_actual_survive_pause_and_resume(guest: Guest, daemon: Daemon) -> None:
    frontend = guest.frontend
    daemon.run(lambda: control(daemon).set_target(64 * MiB))
    frontend.set_config(struct.pack("<IIII", 0, 1000, 0, 0))
    bases = {name: frontend.stop_ring(r) for name, r in guest.rings.items()}
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)
    for name, ring in guest.rings.items():
        frontend.start_ring(ring, base=bases[name])
    assert struct.unpack("<IIII", frontend.get_config())[:2] == (64 * MiB // PAGE, 1000)
    # A device reset (which a pause cannot be told from) keeps them too.
    frontend.call(Request.RESET_DEVICE)
    assert struct.unpack("<IIII", frontend.get_config())[:2] == (64 * MiB // PAGE, 1000)


# --- inflate and deflate on 4 KiB memory -----------------------------------------------------


def test_inflated_frames_are_freed_coalesced(guest: Guest, ram: GuestRam, daemon: Daemon) -> None:
    base = 16 * MiB
    ram.write(base, b"\x11" * (4 * MiB))
    before = ram.blocks()
    # 256 frames (Linux's most per buffer), out of order, with a gap and a duplicate.
    frames = frames_of(base, MiB)[::-1] + frames_of(base + 2 * MiB, MiB - PAGE) + [base // PAGE]
    inflate(guest, frames)
    assert before - ram.blocks() == 2 * MiB - PAGE
    assert ram.read(base, MiB) == bytes(MiB)
    assert ram.read(base + MiB, MiB) == b"\x11" * MiB  # the gap keeps its bytes
    assert ram.read(base + 3 * MiB - PAGE, PAGE) == b"\x11" * PAGE
    counters = daemon.device.state.counters
    assert counters.balloon_discarded_bytes == 2 * MiB - PAGE


def test_inflated_frames_in_random_order_free_exactly_those_pages(
    guest: Guest, ram: GuestRam, daemon: Daemon
) -> None:
    base = 16 * MiB
    ram.write(base, b"\x22" * (4 * MiB))
    before = ram.blocks()
    every = frames_of(base, 4 * MiB)
    chosen = sorted(random.Random(7).sample(every, 256))
    shuffled = random.Random(8).sample(chosen, len(chosen))
    inflate(guest, shuffled)
    assert before - ram.blocks() == 256 * PAGE
    for pfn in every:
        page = ram.read(pfn * PAGE, PAGE)
        assert page == (bytes(PAGE) if pfn in chosen else b"\x22" * PAGE), hex(pfn)
    assert daemon.device.state.counters.balloon_discarded_bytes == 256 * PAGE


def test_coalesce_merges_adjacent_frames() -> None:
    assert coalesce([5, 3, 4, 9, 4]) == [(3 * PAGE, 3 * PAGE), (9 * PAGE, PAGE)]
    assert coalesce([]) == []
    assert coalesce([0, 1, 0xFFFFFFFF]) == [(0, 2 * PAGE), (0xFFFFFFFF * PAGE, PAGE)]


@given(st.lists(st.integers(0, 0xFFFFFFFF) | st.integers(0, 600), max_size=300))
def test_coalesce_covers_exactly_the_frames_in_sorted_separate_spans(frames: list[int]) -> None:
    spans = coalesce(frames)
    covered = {gpa // PAGE + i for gpa, length in spans for i in range(length // PAGE)}
    assert covered == set(frames)
    for (a, alen), (b, _) in itertools.pairwise(spans):
        assert a + alen < b, "sorted, neither overlapping nor touching"


def test_deflate_is_acknowledged_at_once(guest: Guest, daemon: Daemon) -> None:
    inflate(guest, frames_of(16 * MiB, MiB), "deflate")
    assert daemon.device.state.counters.deflated_bytes == MiB


@pytest.mark.parametrize(
    ("where", "length"), [(2 * GiB, 1024), (64 * MiB - 512, 1024), (16 * MiB, 1022)]
)
def test_a_deflate_list_outside_ram_or_of_odd_length_is_a_bad_chain(
    guest: Guest, daemon: Daemon, where: int, length: int
) -> None:
    ring = guest.rings["deflate"]
    head = ring.add_chain([(where, length)], writable=False)
    ring.notify()
    assert ring.wait_used(1) == [(head, 0)]
    counters = daemon.device.state.counters
    assert (counters.bad_chains, counters.deflated_bytes) == (1, 0)


# --- huge pages ------------------------------------------------------------------------------


@pytest.fixture
def huge_ram() -> Iterator[GuestRam]:
    with reserved(20):
        memory = GuestRam(low=16 * MiB, high=16 * MiB, hugetlb=True)
        yield memory
        memory.close()


@pytest.fixture
def huge_guest(frontend: Frontend, huge_ram: GuestRam) -> Iterator[Guest]:
    driver = Guest(frontend, huge_ram)
    driver.start()
    yield driver
    driver.close()


def test_huge_page_freed_once_all_pieces_arrive_across_buffers(
    huge_guest: Guest, huge_ram: GuestRam, daemon: Daemon
) -> None:
    page = 8 * MiB  # a 2 MiB backing page in the low region
    huge_ram.write(page, b"\x22" * HUGE)
    huge_ram.write(page + HUGE, b"\x33" * HUGE)
    held_before = huge_ram.blocks()
    pieces = frames_of(page, HUGE)
    inflate(huge_guest, pieces[:256])  # Linux's buffers hold 256 frames: half a huge page
    assert huge_ram.blocks() == held_before, "half a huge page cannot be freed"
    assert huge_ram.read(page, HUGE) == b"\x22" * HUGE
    inflate(huge_guest, pieces[256:])
    assert huge_ram.blocks() == held_before - 1 * HUGE
    assert huge_ram.read(page, HUGE) == bytes(HUGE)
    assert huge_ram.read(page + HUGE, HUGE) == b"\x33" * HUGE
    assert daemon.device.state.partial_pages == {}


def test_deflate_forgets_pieces_of_a_huge_page(
    huge_guest: Guest, huge_ram: GuestRam, daemon: Daemon
) -> None:
    page = 10 * MiB
    huge_ram.write(page, b"\x44" * HUGE)
    held_before = huge_ram.blocks()
    pieces = frames_of(page, HUGE)
    inflate(huge_guest, pieces[:256])
    inflate(huge_guest, pieces[:1], "deflate")  # the guest took one piece back
    inflate(huge_guest, pieces[256:])
    assert huge_ram.blocks() == held_before, "a page with a piece in use stays"
    assert huge_ram.read(page, HUGE) == b"\x44" * HUGE
    inflate(huge_guest, pieces[:1])
    assert huge_ram.blocks() == held_before - 1 * HUGE


def reboot(guest: Guest) -> None:
    """What QEMU sends when the VM resets (or pauses): every ring stopped; then a new
    driver's start on fresh rings (the memory table is unchanged, so QEMU sends none)."""
    frontend = guest.frontend
    for ring in guest.rings.values():
        frontend.stop_ring(ring)
    frontend.call(Request.SET_STATUS, 0)
    old, guest.rings = guest.rings, {n: Ring(guest.ram, r.index) for n, r in guest.rings.items()}
    for ring in old.values():
        ring.close()
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)
    for ring in guest.rings.values():
        frontend.start_ring(ring)


def test_a_reset_forgets_the_pieces_the_old_driver_ballooned(
    huge_guest: Guest, huge_ram: GuestRam, daemon: Daemon
) -> None:
    page = 12 * MiB
    pieces = frames_of(page, HUGE)
    inflate(huge_guest, pieces[:256])  # the old kernel balloons half of a huge page...
    reboot(huge_guest)  # ...and the VM resets without deflating
    # The new kernel owns that half again and keeps live data in it; later it balloons
    # the other half. The huge page must not be freed: half of it is in use.
    live = bytes(range(256)) * (HUGE // 2 // 256)
    huge_ram.write(page, live)
    held_before = huge_ram.blocks()
    inflate(huge_guest, pieces[256:])
    assert huge_ram.read(page, HUGE // 2) == live, "the new kernel's data was freed"
    assert huge_ram.blocks() == held_before


def test_a_new_memory_table_forgets_ballooned_pieces(
    huge_guest: Guest, huge_ram: GuestRam, daemon: Daemon
) -> None:
    page = 14 * MiB
    huge_ram.write(page, b"\x45" * HUGE)
    pieces = frames_of(page, HUGE)
    inflate(huge_guest, pieces[:256])
    # Pieces are remembered by guest address, which a new table may map elsewhere.
    huge_guest.frontend.set_mem_table(huge_ram)
    held_before = huge_ram.blocks()
    inflate(huge_guest, pieces[256:])
    assert huge_ram.blocks() == held_before
    assert huge_ram.read(page + HUGE // 2, HUGE // 2) == b"\x45" * (HUGE // 2)


def test_reports_on_huge_pages_free_them(huge_guest: Guest, huge_ram: GuestRam) -> None:
    huge_ram.write(4 * GiB, b"\x55" * (2 * HUGE))
    held_before = huge_ram.blocks()
    huge_guest.report([(4 * GiB, HUGE), (4 * GiB + HUGE, HUGE)])
    assert huge_ram.blocks() == held_before - 2 * HUGE


def test_reports_smaller_than_a_huge_page_are_skipped_with_the_reason(
    huge_guest: Guest, huge_ram: GuestRam, daemon: Daemon
) -> None:
    huge_ram.write(6 * MiB, b"\x66" * HUGE)
    huge_guest.report([(6 * MiB, MiB)])
    assert huge_ram.read(6 * MiB, HUGE) == b"\x66" * HUGE
    skipped = daemon.device.state.counters.skipped_bytes
    assert skipped == {f"not aligned to the {HUGE}-byte backing page": MiB}


# --- statistics ------------------------------------------------------------------------------


def send_stats(guest: Guest, values: dict[int, int]) -> int:
    ring = guest.rings["stats"]
    data = b"".join(STAT_ENTRY.pack(tag, value) for tag, value in values.items())
    buffer = guest.ram.alloc(len(data), 8)
    guest.ram.write(buffer, data)
    head = ring.add_chain([(buffer, len(data))], writable=False)
    ring.notify()
    return head


def wait_for(condition: object, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stats_buffer_is_held_parsed_and_returned_on_request(guest: Guest, daemon: Daemon) -> None:
    ring = guest.rings["stats"]
    head = send_stats(guest, {4: 100 * MiB, 5: 2 * GiB, 6: 1 * GiB, 7: 5 * MiB, 99: 7})
    wait_for(lambda: daemon.device.state.stats_head == head)
    assert ring.used_idx() == 0, "the device holds the buffer"
    stats = daemon.run(lambda: control(daemon).status()["stats"])  # type: ignore[index]
    assert stats == {
        "free_bytes": 100 * MiB,
        "total_bytes": 2 * GiB,
        "available_bytes": GiB,
        "disk_caches_bytes": 5 * MiB,
        "tag_99": 7,
    }
    assert "swap_in_bytes" not in stats, "a tag the guest did not send is not reported as 0"
    # A refresh gives the buffer back; the "guest" answers with new values.
    ctl = control(daemon)
    refreshed = asyncio.run_coroutine_threadsafe(ctl.stats(refresh=True, timeout=5), daemon.loop)
    assert ring.wait_used(1) == [(head, 0)]
    send_stats(guest, {4: 50 * MiB})
    assert refreshed.result(timeout=5)["stats"] == {"free_bytes": 50 * MiB}


def test_stats_refresh_times_out_on_a_frozen_guest(guest: Guest, daemon: Daemon) -> None:
    head = send_stats(guest, {4: 1})
    wait_for(lambda: daemon.device.state.stats_head == head)
    ctl = control(daemon)
    future = asyncio.run_coroutine_threadsafe(ctl.stats(refresh=True, timeout=0.3), daemon.loop)
    with pytest.raises(OperatorError, match="did not answer"):
        future.result(timeout=5)


def test_held_stats_buffer_survives_pause_and_resume(guest: Guest, daemon: Daemon) -> None:
    frontend = guest.frontend
    ring = guest.rings["stats"]
    head = send_stats(guest, {5: 2 * GiB})
    wait_for(lambda: daemon.device.state.stats_head == head)
    base = frontend.stop_ring(ring)
    assert base == 0, "the held buffer is handed back: the next start pops it again"
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)
    frontend.start_ring(ring, base=base)
    wait_for(lambda: daemon.device.state.stats_head == head)
    assert daemon.run(lambda: control(daemon).request_stats()) is True
    assert ring.wait_used(1) == [(head, 0)]


def test_all_standard_tags_have_names() -> None:
    assert sorted(STAT_NAMES) == list(range(16))
    assert len(set(STAT_NAMES.values())) == 16


def test_eventfds_are_not_leaked_across_connections(daemon: Daemon, ram: GuestRam) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    for _ in range(2):  # warm up: the first connection creates the worker thread
        frontend = Frontend(daemon.path)
        guest = Guest(frontend, ram)
        guest.start()
        guest.close()
        frontend.close()
    before = open_fds()
    for _ in range(5):
        frontend = Frontend(daemon.path)
        guest = Guest(frontend, ram)
        guest.start()
        guest.report([(16 * MiB, HUGE)])
        guest.close()
        frontend.close()
    wait_for(lambda: open_fds() <= before)


def test_a_refresh_while_one_is_out_waits_for_the_same_answer(guest: Guest, daemon: Daemon) -> None:
    ring = guest.rings["stats"]
    head = send_stats(guest, {4: 1})
    wait_for(lambda: daemon.device.state.stats_head == head)
    assert daemon.run(lambda: control(daemon).request_stats()) is True  # e.g. the poller
    assert ring.wait_used(1) == [(head, 0)]
    ctl = control(daemon)
    refreshed = asyncio.run_coroutine_threadsafe(ctl.stats(refresh=True, timeout=5), daemon.loop)
    # The guest must answer after the refresh began, not merely after it was submitted:
    # an answer that arrives first is old news to the refresh, which then asks again.
    # The loop runs callbacks in order, so once a later call has run, the refresh has
    # taken its first step and waits.
    daemon.run(lambda: None)
    send_stats(guest, {4: 2})
    assert refreshed.result(timeout=5)["stats"] == {"free_bytes": 2}


def test_refresh_without_a_running_stats_queue_says_so(guest: Guest, daemon: Daemon) -> None:
    guest.frontend.stop_ring(guest.rings["stats"])
    ctl = control(daemon)
    future = asyncio.run_coroutine_threadsafe(ctl.stats(refresh=True, timeout=1), daemon.loop)
    with pytest.raises(OperatorError, match="not running"):
        future.result(timeout=5)


def test_a_backend_channel_the_frontend_never_reads_cannot_stall_the_daemon(
    guest: Guest, daemon: Daemon, frontend: Frontend
) -> None:
    ram_size = sum(r.size for r in guest.ram.regions)
    told = [
        daemon.run(lambda: control(daemon).set_target(ram_size - MiB))  # each a CONFIG_CHANGE
        for _ in range(3000)
    ]
    assert isinstance(told[0], dict) and told[0]["guest_notified"] is True
    assert {"target_bytes": ram_size - MiB, "guest_notified": False} in told, (
        "the channel never filled up"
    )
    # The daemon still serves the VM: the frontend's requests and the target itself.
    assert frontend.u64(Request.GET_FEATURES) & (1 << 32)
    assert struct.unpack("<IIII", frontend.get_config())[0] == MiB // PAGE


def test_a_target_set_while_the_device_is_stopped_is_announced_when_it_runs(
    guest: Guest, daemon: Daemon, frontend: Frontend
) -> None:
    """QEMU 11.1 crashes on a config change notification while the device is stopped (a
    paused VM, a rebooting guest): it is held until a ring runs again."""
    assert frontend.backend_channel is not None
    frontend.backend_channel.setblocking(False)
    bases = {name: frontend.stop_ring(ring) for name, ring in guest.rings.items()}  # paused
    ram_size = sum(r.size for r in guest.ram.regions)
    told = daemon.run(lambda: control(daemon).set_target(ram_size - 8 * MiB))
    assert told == {"target_bytes": ram_size - 8 * MiB, "guest_notified": False}
    with pytest.raises(BlockingIOError):
        frontend.backend_channel.recv(wire.HEADER_SIZE)  # nothing sent while stopped
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)  # cont
    for name, ring in guest.rings.items():
        frontend.start_ring(ring, base=bases[name])
    frontend.backend_channel.settimeout(5)
    header = wire.decode_header(frontend.backend_channel.recv(wire.HEADER_SIZE))
    assert header.request == BackendRequest.CONFIG_CHANGE_MSG
    assert struct.unpack("<IIII", frontend.get_config())[0] == 8 * MiB // PAGE

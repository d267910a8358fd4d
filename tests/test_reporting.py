"""Free page reporting through the real daemon: memory really comes back, data stays."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from balloond.balloon import LATENCY_BOUNDS, BalloonOptions, Histogram, QueueRole
from balloond.discard import NullDiscarder
from balloond.server import DISCARD_NICE
from tests.conftest import Daemon, InFlight
from tests.frontend import Frontend, GiB, Guest, GuestRam, MiB

HUGE = 2 * MiB


def fill(ram: GuestRam, gpa: int, length: int, seed: int) -> bytes:
    """Write a recognisable pattern; returns it."""
    pattern = (struct.pack("<Q", seed) * (length // 8))[:length]
    ram.write(gpa, pattern)
    return pattern


def test_reported_memory_is_freed_and_the_rest_kept(guest: Guest, ram: GuestRam) -> None:
    # Touch 16 MiB in each region; report 8 MiB of each as free.
    low, high = 16 * MiB, 4 * GiB + 16 * MiB
    kept_low = fill(ram, low + 8 * MiB, 8 * MiB, 0x1111)
    kept_high = fill(ram, high + 8 * MiB, 8 * MiB, 0x2222)
    fill(ram, low, 8 * MiB, 0x3333)
    fill(ram, high, 8 * MiB, 0x4444)
    before = ram.blocks()

    reports = [(low + i * HUGE, HUGE) for i in range(4)] + [
        (high + i * HUGE, HUGE) for i in range(4)
    ]
    _head, used_len = guest.report(reports)

    assert used_len == 0
    assert before - ram.blocks() >= 16 * MiB
    assert ram.read(low, 8 * MiB) == bytes(8 * MiB)
    assert ram.read(low + 8 * MiB, 8 * MiB) == kept_low
    assert ram.read(high + 8 * MiB, 8 * MiB) == kept_high


def test_indirect_reports_are_freed(guest: Guest, ram: GuestRam) -> None:
    base = 20 * MiB
    fill(ram, base, 32 * MiB, 7)
    before = ram.blocks()
    guest.report([(base + i * HUGE, HUGE) for i in range(16)], indirect=True)
    assert before - ram.blocks() >= 32 * MiB


def test_the_discard_thread_yields_to_the_event_loop(guest: Guest, ram: GuestRam) -> None:
    fill(ram, 20 * MiB, 8 * MiB, 9)
    before = ram.blocks()
    guest.report([(20 * MiB + i * HUGE, HUGE) for i in range(4)])  # through the thread
    assert before - ram.blocks() >= 8 * MiB
    threads = [t for t in threading.enumerate() if t.name.startswith("balloon-discard")]
    assert threads, "the report went through the device's discard thread"
    for thread in threads:
        assert thread.native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == DISCARD_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < DISCARD_NICE


def test_many_reports_in_a_row(guest: Guest, ram: GuestRam, daemon: Daemon) -> None:
    base = 8 * MiB
    for round_ in range(40):
        fill(ram, base, 2 * HUGE, round_)
        guest.report([(base, HUGE), (base + HUGE, HUGE)])
    counters = daemon.device.state.counters
    assert counters.reports == 40
    assert counters.discarded_bytes == 40 * 2 * HUGE
    assert sum(counters.report_latency.counts) == 40, "every report's latency is recorded"


def test_unaligned_and_outside_ranges_are_skipped(
    guest: Guest, ram: GuestRam, daemon: Daemon
) -> None:
    base = 24 * MiB
    data = fill(ram, base, 4 * MiB, 9)
    before = ram.blocks()
    outside = 1 * GiB  # between the regions: not guest RAM
    guest.report([(base + 4096 + 1, 8192), (outside, HUGE)])
    assert ram.blocks() == before
    assert ram.read(base, 4 * MiB) == data
    skipped = daemon.device.state.counters.skipped_bytes
    assert skipped == {"not aligned to the 4096-byte backing page": 8192, "outside guest RAM": HUGE}


def test_range_straddling_the_end_of_a_region_is_split(
    guest: Guest, ram: GuestRam, daemon: Daemon
) -> None:
    low_end = ram.regions[0].size
    fill(ram, low_end - HUGE, HUGE, 5)
    before = ram.blocks()
    guest.report([(low_end - HUGE, 2 * HUGE)])
    assert before - ram.blocks() == HUGE
    assert daemon.device.state.counters.skipped_bytes == {"outside guest RAM": HUGE}


def test_poison_value_prevents_discards(frontend: Frontend, ram: GuestRam, daemon: Daemon) -> None:
    guest = Guest(frontend, ram)
    # The driver writes poison_val during probe, before SET_FEATURES.
    frontend.set_config(struct.pack("<IIII", 0, 0, 0, 0xAAAAAAAA))
    guest.start()
    data = fill(ram, 16 * MiB, 4 * MiB, 0xAA)
    before = ram.blocks()
    _head, used_len = guest.report([(16 * MiB, HUGE), (18 * MiB, HUGE)])
    assert used_len == 0
    assert ram.blocks() == before
    assert ram.read(16 * MiB, 4 * MiB) == data
    assert daemon.device.state.counters.kept_bytes == 4 * MiB
    guest.close()


def test_zero_poison_value_still_discards(
    frontend: Frontend, ram: GuestRam, daemon: Daemon
) -> None:
    guest = Guest(frontend, ram)
    frontend.set_config(struct.pack("<IIII", 0, 0, 0, 0))
    guest.start()
    fill(ram, 16 * MiB, HUGE, 1)
    before = ram.blocks()
    guest.report([(16 * MiB, HUGE)])
    assert before - ram.blocks() == HUGE
    guest.close()


def test_no_discard_acknowledges_and_frees_nothing(make_daemon, ram: GuestRam) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon(NullDiscarder())
    frontend = Frontend(daemon.path)
    guest = Guest(frontend, ram)
    guest.start()
    data = fill(ram, 16 * MiB, 4 * MiB, 3)
    before = ram.blocks()
    guest.report([(16 * MiB, HUGE), (18 * MiB, HUGE)])
    assert ram.blocks() == before
    assert ram.read(16 * MiB, 4 * MiB) == data
    assert daemon.device.state.counters.reported_bytes == 4 * MiB
    guest.close()
    frontend.close()


def test_queue_roles_follow_negotiated_features(
    frontend: Frontend, ram: GuestRam, daemon: Daemon
) -> None:
    # Without STATS_VQ, reporting moves from index 3 to index 2.
    guest = Guest(frontend, ram, features=~(1 << 1))
    assert guest.rings["reporting"].index == 2
    guest.start()
    fill(ram, 16 * MiB, HUGE, 1)
    before = ram.blocks()
    guest.report([(16 * MiB, HUGE)])
    assert before - ram.blocks() == HUGE
    assert daemon.device.roles == {
        0: QueueRole.INFLATE,
        1: QueueRole.DEFLATE,
        2: QueueRole.REPORTING,
    }
    guest.close()


def test_deflate_on_oom_is_offered_only_when_asked(make_daemon) -> None:  # type: ignore[no-untyped-def]
    plain = Frontend(make_daemon().path)
    assert not plain.negotiate() & (1 << 2)
    plain.close()
    oom = Frontend(make_daemon(options=BalloonOptions(deflate_on_oom=True)).path)
    assert oom.negotiate() & (1 << 2)
    oom.close()


def test_free_page_reporting_can_be_left_unoffered(make_daemon, ram: GuestRam) -> None:  # type: ignore[no-untyped-def]
    """``--no-free-page-reporting``: the driver is not offered VIRTIO_BALLOON_F_REPORTING, so
    it never sets up a reporting queue."""
    frontend = Frontend(make_daemon(options=BalloonOptions(free_page_reporting=False)).path)
    assert not frontend.negotiate() & (1 << 5)
    frontend.close()


def test_config_is_answered_while_a_discard_runs(report_in_flight: InFlight, ram: GuestRam) -> None:
    frontend, ring = report_in_flight.frontend, report_in_flight.ring
    # The discard is in progress in the worker thread; config requests still get answers.
    frontend.set_config(struct.pack("<IIII", 0, 3, 0, 0))
    assert struct.unpack("<IIII", frontend.get_config())[1] == 3
    with pytest.raises(TimeoutError):
        ring.wait_used(1, timeout=0.2)
    report_in_flight.discarder.gate.set()
    assert ring.wait_used(1) == [(report_in_flight.head, 0)]
    assert ram.read(16 * MiB, HUGE) == bytes(HUGE)


def test_ring_stop_waits_for_the_discard_in_flight(report_in_flight: InFlight) -> None:
    ring = report_in_flight.ring
    threading.Timer(0.3, report_in_flight.discarder.gate.set).start()
    # GET_VRING_BASE is answered only once the report in flight has been returned.
    assert report_in_flight.frontend.stop_ring(ring) == 1
    assert ring.used_idx() == 1
    assert ring.wait_used(1) == [(report_in_flight.head, 0)]


def test_report_latency_runs_from_the_kick_to_the_buffer_s_return(
    report_in_flight: InFlight,
) -> None:
    time.sleep(0.3)  # the discard is held this long
    report_in_flight.discarder.gate.set()
    report_in_flight.ring.wait_used(1)
    daemon = report_in_flight.daemon
    latency = daemon.run(lambda: daemon.device.state.counters.report_latency)
    assert isinstance(latency, Histogram)
    assert sum(latency.counts) == 1
    assert latency.total >= 0.3
    assert latency.counts[LATENCY_BOUNDS.index(0.25)] == 0, "not in a bucket below 0.3 s"


def test_a_latency_lands_in_the_bucket_of_the_first_bound_it_does_not_exceed() -> None:
    """Prometheus's ``le`` buckets: a value equal to a bound counts in that bound's bucket,
    one just above it in the next, one above every bound in the last."""
    histogram = Histogram()
    for value in (0.0, LATENCY_BOUNDS[0], 0.25, 0.2500001, LATENCY_BOUNDS[-1], 1e9):
        histogram.observe(value)
    at = LATENCY_BOUNDS.index
    expected = [0] * (len(LATENCY_BOUNDS) + 1)
    for bucket in (0, 0, at(0.25), at(0.25) + 1, len(LATENCY_BOUNDS) - 1, len(LATENCY_BOUNDS)):
        expected[bucket] += 1
    assert histogram.counts == expected
    assert histogram.total == pytest.approx(0.0 + LATENCY_BOUNDS[0] + 0.5000001 + 5.0 + 1e9)


def test_stopping_the_daemon_returns_the_report_in_flight(report_in_flight: InFlight) -> None:
    # The guest's reporting worker sleeps until its report comes back: a daemon on its way
    # out finishes the discard and returns the buffer first.
    threading.Timer(0.3, report_in_flight.discarder.gate.set).start()
    report_in_flight.daemon.stop()
    assert report_in_flight.ring.used_idx() == 1

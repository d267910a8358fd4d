"""Who may touch a ring or a region, and when (docs/design.md, "Invariants"), through the
real daemon: every chain the guest makes available comes back exactly once, also across
ring stops under load; a stop is answered however busy the guest is; one ring's turn never
holds the event loop; a driver that re-offers a chain the device holds loses that ring;
the used index is published in one store."""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from balloond import wire
from balloond.balloon import TURN_CHAINS
from balloond.discard import Discarder, DiscardRange, DiscardResult
from balloond.wire import Request
from tests.conftest import Daemon, GatedDiscarder
from tests.frontend import Frontend, Guest, GuestRam, MiB, Ring

HUGE = 2 * MiB
DATA = 32 * MiB  # report targets live here, far from the rings


class SlowDiscarder:
    """The real discarder, taking ``delay`` seconds per job: jobs stay in flight a while."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.real = Discarder()

    def discard(self, ranges: Sequence[DiscardRange]) -> DiscardResult:
        time.sleep(self.delay)
        return self.real.discard(ranges)


class BusyReporter:
    """A guest that keeps ``depth`` free page reports outstanding until stopped.

    Runs in a thread; only it touches the driver's side of the ring (the main thread may
    stop and start the ring through the frontend meanwhile, as QEMU does).
    """

    def __init__(self, ring: Ring, depth: int = 2) -> None:
        self.ring = ring
        self.depth = depth
        self.sent = 0
        self.returned = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="busy-reporter", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        ring = self.ring
        try:
            while not self._stop.is_set():
                now = ring.used_idx()
                self.returned += (now - ring.used_seen) & 0xFFFF
                ring.used_seen = now
                while self.sent - self.returned < self.depth:
                    ring.add_chain([(DATA + HUGE * (self.sent % 4), HUGE)], writable=True)
                    ring.notify()
                    self.sent += 1
                time.sleep(0.0002)
        except BaseException as error:  # surfaced by stop()
            self._error = error

    def __enter__(self) -> BusyReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def wait_sent(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        start = self.sent
        while self.sent - start < count:
            assert self._error is None, self._error
            assert time.monotonic() < deadline, f"only {self.sent - start} reports sent"
            time.sleep(0.005)


@pytest.fixture
def slow_guest(make_daemon: Callable[..., Daemon], ram: GuestRam) -> Iterator[Guest]:
    daemon = make_daemon(SlowDiscarder(0.002))
    frontend = Frontend(daemon.path, timeout=10)
    guest = Guest(frontend, ram)
    guest.start()
    yield guest
    guest.close()
    frontend.close()


def wait_all_returned(ring: Ring, timeout: float = 10.0) -> None:
    """Every chain the guest made available is back in the used ring."""
    deadline = time.monotonic() + timeout
    while ring.used_idx() != ring.avail_idx:
        assert time.monotonic() < deadline, (
            f"ring {ring.index}: {(ring.avail_idx - ring.used_idx()) & 0xFFFF} chains never "
            "came back (the guest would wait for them forever)"
        )
        time.sleep(0.01)


def test_a_ring_stop_is_answered_while_the_guest_keeps_reporting(slow_guest: Guest) -> None:
    ring = slow_guest.rings["reporting"]
    with BusyReporter(ring, depth=16) as guest:
        guest.wait_sent(50)
        # QEMU sends these with its big lock held: a VM stop hangs until they are answered.
        # (the guest keeps 16 reports out at all times: it never lets the daemon idle)
        base = slow_guest.frontend.stop_ring(ring)
    assert ring.used_idx() == base, "the stopped ring still holds chains it counted"


def test_stop_and_start_under_load_return_every_chain(slow_guest: Guest) -> None:
    frontend = slow_guest.frontend
    ring = slow_guest.rings["reporting"]
    with BusyReporter(ring, depth=3) as guest:
        for cycle in range(150):
            guest.wait_sent(1)
            base = frontend.stop_ring(ring)
            used = ring.used_idx()
            assert used == base, f"cycle {cycle}: base {base}, but only {used} came back"
            frontend.start_ring(ring, base=base)
    frontend.call(Request.GET_FEATURES)  # the daemon has handled everything sent so far
    wait_all_returned(ring)


def test_a_chain_offered_again_while_held_gives_up_that_ring_only(
    make_daemon: Callable[..., Daemon], ram: GuestRam
) -> None:
    discarder = GatedDiscarder()
    daemon = make_daemon(discarder)
    frontend = Frontend(daemon.path)
    guest = Guest(frontend, ram)
    guest.start()
    ring = guest.rings["reporting"]
    err = os.eventfd(0, os.EFD_NONBLOCK)
    frontend.call(Request.SET_VRING_ERR, wire.VringFile(ring.index, False), [err])
    try:
        head = ring.add_chain([(DATA, HUGE)], writable=True)
        ring.notify()
        assert discarder.entered.wait(5)  # the device holds the chain
        for _ in range(100):  # a broken driver offers it again and again
            ring.publish(head)
        ring.notify()
        ready, _, _ = select.select([err], [], [], 5)
        assert ready, "the ring must be given up and its error eventfd signalled"
        assert daemon.run(lambda: daemon.device.state.counters.reports) == 1
    finally:
        discarder.gate.set()
        os.close(err)
    # The daemon keeps serving the VM: config, requests, and the balloon's other rings.
    assert len(frontend.get_config()) == 16
    frontend.call(Request.GET_FEATURES)
    deflate = guest.rings["deflate"]
    frames = ram.alloc(4, 8)
    deflate.add_chain([(frames, 4)], writable=False)
    deflate.notify()
    deflate.wait_used(1)
    guest.close()
    frontend.close()


def test_chains_past_a_turn_s_budget_come_back_and_the_next_kick_is_heard(
    guest: Guest, ram: GuestRam
) -> None:
    """A kick brings more chains than one turn takes: the daemon comes back for the rest
    by itself, and asks to be kicked for the next chain (a driver with EVENT_IDX, as Linux,
    kicks only past ``avail_event``)."""
    ring = guest.rings["reporting"]
    for count in (4 * TURN_CHAINS + 1, TURN_CHAINS, 1, TURN_CHAINS, 2 * TURN_CHAINS, 1):
        old = ring.avail_idx
        for k in range(count):
            ring.add_chain([(DATA + HUGE * (k % 4), HUGE)], writable=True)
        avail_event = struct.unpack("<H", ram.read(ring.used + 4 + 8 * ring.size, 2))[0]
        new = ring.avail_idx
        if (new - avail_event - 1) & 0xFFFF < (new - old) & 0xFFFF:  # vring_need_event
            ring.notify()
        heads = [head for head, _ in ring.wait_used(count)]
        assert len(set(heads)) == count, "each chain back exactly once"
    assert guest.frontend.u64(Request.GET_FEATURES) & (1 << 32)


def _layout(ring: Ring) -> tuple[int, int]:
    fd = ring.ram.region(ring.avail).fd
    return fd, ring.ram.region(ring.avail).gpa


def test_one_busy_ring_never_holds_the_event_loop(guest: Guest, ram: GuestRam) -> None:
    ring = guest.rings["deflate"]
    frames = ram.alloc(4, 8)
    ram.write(frames, struct.pack("<I", DATA // 4096))
    for _ in range(64):  # chains the guest keeps offering again as they come back
        ring.add_chain([(frames, 4)], writable=False)
    fd, gpa = _layout(ring)
    assert gpa == 0
    recycler = subprocess.Popen(
        [
            sys.executable, "-m", "tests.busyguest", "recycle", str(fd), str(ring.kick),
            str(ring.avail), str(ring.used), str(ring.size), str(ring.avail_idx), "8",
        ],
        stdout=subprocess.PIPE, text=True, pass_fds=(fd, ring.kick),
    )  # fmt: skip
    try:
        assert recycler.stdout is not None
        assert recycler.stdout.readline().strip() == "started"
        ring.notify()
        start = ring.used_idx()
        deadline = time.monotonic() + 5
        while (ring.used_idx() - start) & 0xFFFF < 2000:  # the guest recycles at full speed
            assert time.monotonic() < deadline, "the recycling guest never got going"
            time.sleep(0.01)
        features = guest.frontend.u64(Request.GET_FEATURES)
        assert features & (1 << 32)
        assert recycler.poll() is None, "answered only once the busy guest had stopped"
    finally:
        recycler.kill()
        recycler.wait()


def test_the_used_index_never_goes_back(guest: Guest, ram: GuestRam) -> None:
    ring = guest.rings["deflate"]
    fd, gpa = _layout(ring)
    assert gpa == 0
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tests.busyguest", "watch", str(fd), str(ring.used), "4"],
        stdout=subprocess.PIPE, text=True, pass_fds=(fd,),
    )  # fmt: skip
    frames = ram.alloc(4, 8)
    ram.write(frames, struct.pack("<I", DATA // 4096))
    pushed = 0
    try:
        while watcher.poll() is None and pushed < 60000:
            for _ in range(64):
                ring.add_chain([(frames, 4)], writable=False)
            ring.notify()
            ring.wait_used(64)
            pushed += 64
    finally:
        output, _ = watcher.communicate(timeout=30)
    fields = dict(item.split("=") for item in output.split())
    assert int(fields["reads"]) > 0 and pushed > 0
    assert fields["backwards"] == "0", f"a vCPU saw the used index go back: {output.strip()}"

"""The vhost-user conversation with QEMU: negotiation, ring life cycle, config at any
time, and frontends that break the protocol (dropped, while the daemon lives on)."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

from balloond import wire
from balloond.protocol import SUPPORTED_PROTOCOL_FEATURES
from balloond.wire import HeaderFlags, ProtocolFeature, Request
from tests.conftest import Daemon
from tests.frontend import Frontend, Guest, GuestRam, MiB

HUGE = 2 * MiB
VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30


def test_offers_what_qemu_needs(frontend: Frontend) -> None:
    features = frontend.u64(Request.GET_FEATURES)
    for bit in (32, 30, 28, 29, 1, 4, 5):  # VERSION_1, protocol features, rings, balloon
        assert features & (1 << bit), bit
    assert not features & (1 << 3), "free page hinting is not offered"
    protocol = frontend.u64(Request.GET_PROTOCOL_FEATURES)
    assert protocol == SUPPORTED_PROTOCOL_FEATURES
    for feature in ("LOG_SHMFD", "PAGEFAULT", "INFLIGHT_SHMFD", "HOST_NOTIFIER", "SHMEM"):
        if hasattr(ProtocolFeature, feature):
            assert not protocol & (1 << ProtocolFeature[feature])
    frontend.call(Request.SET_PROTOCOL_FEATURES, protocol)
    assert frontend.u64(Request.GET_QUEUE_NUM) == 5
    assert frontend.u64(Request.GET_MAX_MEM_SLOTS) >= 8


def test_reply_ack_answers_exactly_when_asked(frontend: Frontend) -> None:
    frontend.call(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.REPLY_ACK)
    frontend.send(Request.SET_OWNER, need_reply=True)
    reply = frontend.sock.recv(64)
    assert reply == wire.encode_header(Request.SET_OWNER, 0x5, 8) + wire.encode_u64(0)
    frontend.send(Request.SET_OWNER, need_reply=False)
    frontend.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        frontend.sock.recv(64)


def test_config_is_answered_before_features_and_keeps_host_fields(frontend: Frontend) -> None:
    frontend.negotiate()
    assert frontend.get_config() == bytes(16)
    # A whole-config write (QEMU's way) with a stale num_pages: only actual and
    # poison_val are taken from it.
    frontend.set_config(struct.pack("<IIII", 999, 12, 7, 0xDEAD))
    assert frontend.get_config() == struct.pack("<IIII", 0, 12, 0, 0xDEAD)
    # A window reaching past the config reads as zeros there.
    reply = frontend.call(Request.GET_CONFIG, wire.ConfigSpace(12, 8, 0, bytes(8)))
    assert reply is not None and reply[12:] == struct.pack("<I", 0xDEAD) + bytes(4)


def test_status_round_trips(frontend: Frontend) -> None:
    frontend.negotiate()
    frontend.call(Request.SET_STATUS, 0xF)
    assert frontend.u64(Request.GET_STATUS) == 0xF


def test_rings_wait_for_enable_then_work(frontend: Frontend, ram: GuestRam) -> None:
    guest = Guest(frontend, ram)
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)
    frontend.set_mem_table(ram)
    ring = guest.rings["reporting"]
    frontend.start_ring(ring, enable=False)
    ram.write(16 * MiB, b"\x07" * HUGE)
    head = ring.add_chain([(16 * MiB, HUGE)], writable=True)
    ring.notify()
    with pytest.raises(TimeoutError):
        ring.wait_used(1, timeout=0.5)  # started but disabled: not processed
    frontend.call(Request.SET_VRING_ENABLE, wire.VringState(ring.index, 1))
    assert ring.wait_used(1) == [(head, 0)]
    assert ram.read(16 * MiB, HUGE) == bytes(HUGE)
    guest.close()


def test_pause_and_resume_continue_where_they_stopped(guest: Guest, ram: GuestRam) -> None:
    """A VM stop (ENABLE 0 + GET_VRING_BASE) and cont (the whole start sequence again)."""
    frontend = guest.frontend
    for _ in range(3):
        ram.write(16 * MiB, b"\x01" * HUGE)
        guest.report([(16 * MiB, HUGE)])
    ring = guest.rings["reporting"]
    bases = {name: frontend.stop_ring(r) for name, r in guest.rings.items()}
    assert bases["reporting"] == 3
    # While paused, the guest's next report is not processed.
    ram.write(16 * MiB, b"\x02" * HUGE)
    head = ring.add_chain([(16 * MiB, HUGE)], writable=True)
    ring.notify()
    with pytest.raises(TimeoutError):
        ring.wait_used(1, timeout=0.5)
    # cont: SET_FEATURES, then every ring set up again from its base, with no memory table.
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)
    for name, r in guest.rings.items():
        frontend.start_ring(r, base=bases[name])
    assert ring.wait_used(1) == [(head, 0)]
    assert ram.read(16 * MiB, HUGE) == bytes(HUGE)


def test_call_err_and_enable_for_rings_never_set_up(frontend: Frontend, ram: GuestRam) -> None:
    """QEMU sends these for every one of num_vqs, including queues the guest never uses."""
    frontend.negotiate()
    fds = [os.eventfd(0) for _ in range(4)]
    for index in range(8):
        frontend.call(Request.SET_VRING_CALL, wire.VringFile(index, False), [fds[0]])
        frontend.call(Request.SET_VRING_ERR, wire.VringFile(index, False), [fds[1]])
        frontend.call(Request.SET_VRING_CALL, wire.VringFile(index, True))
        frontend.call(Request.SET_VRING_ENABLE, wire.VringState(index, 1))
        frontend.call(Request.SET_VRING_ENABLE, wire.VringState(index, 0))
    for fd in fds:
        os.close(fd)
    assert frontend.u64(Request.GET_FEATURES)  # still connected and answering


def test_memory_regions_added_and_removed(frontend: Frontend) -> None:
    ram = GuestRam(low=16 * MiB, high=16 * MiB)
    guest = Guest(frontend, ram)
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)
    low, high = ram.regions
    frontend.call(Request.ADD_MEM_REG, low.spec, [low.fd])
    frontend.call(Request.ADD_MEM_REG, high.spec, [high.fd])
    for ring in guest.rings.values():
        frontend.start_ring(ring)
    ram.write(high.gpa, b"\x03" * HUGE)
    guest.report([(high.gpa, HUGE)])
    assert ram.read(high.gpa, HUGE) == bytes(HUGE)
    frontend.call(Request.REM_MEM_REG, high.spec)
    ram.write(high.gpa, b"\x04" * HUGE)
    guest.report([(high.gpa, HUGE)])  # no longer guest RAM: acknowledged, not touched
    assert ram.read(high.gpa, HUGE) == b"\x04" * HUGE
    guest.close()
    ram.close()


def test_rings_follow_a_new_memory_table_while_they_run(frontend: Frontend) -> None:
    """design.md, invariant 12: the daemon keeps where each ring lies in its own mapping of
    guest memory; a new table maps the memory anew and unmaps the old mappings, so a ring
    that went on using addresses from before would touch unmapped memory (the daemon
    would die of SIGSEGV, here with the test). Twice: the same table again (the rings are
    set up anew from it), and a table that moves QEMU's addresses (the rings' frontend
    addresses no longer translate: they carry on by guest address until set up again)."""
    ram = GuestRam(low=16 * MiB, high=16 * MiB)
    guest = Guest(frontend, ram)
    guest.start()
    high = ram.regions[1]
    moved = wire.MemoryTable(
        tuple(wire.MemoryRegion(r.gpa, r.size, r.uaddr + (1 << 40), 0) for r in ram.regions)
    )
    tables = [
        lambda: frontend.set_mem_table(ram),  # the same memory again: new fds and mappings
        lambda: frontend.call(Request.SET_MEM_TABLE, moved, [r.fd for r in ram.regions]),
    ]
    for fill, new_table in enumerate(tables, start=1):
        ram.write(high.gpa, bytes([fill]) * HUGE)
        guest.report([(high.gpa, HUGE)], indirect=fill % 2 == 0)
        assert ram.read(high.gpa, HUGE) == bytes(HUGE)
        new_table()
    ram.write(high.gpa, b"\x09" * HUGE)
    guest.report([(high.gpa, HUGE)])
    assert ram.read(high.gpa, HUGE) == bytes(HUGE)
    guest.close()
    ram.close()


def test_a_region_added_again_replaces_itself(frontend: Frontend) -> None:
    """QEMU re-sends every region when the device is plugged back on the same connection
    (after a device_del): the same region again is not an overlap."""
    ram = GuestRam(low=16 * MiB, high=16 * MiB)
    guest = Guest(frontend, ram)
    frontend.call(Request.SET_FEATURES, guest.features | PROTOCOL_FEATURES)
    low, high = ram.regions
    for _ in range(2):
        frontend.call(Request.ADD_MEM_REG, low.spec, [low.fd])
        frontend.call(Request.ADD_MEM_REG, high.spec, [high.fd])
    for ring in guest.rings.values():
        frontend.start_ring(ring)
    ram.write(high.gpa, b"\x03" * HUGE)
    guest.report([(high.gpa, HUGE)])
    assert ram.read(high.gpa, HUGE) == bytes(HUGE)
    # A region that only overlaps is still refused.
    moved = wire.MemoryRegion(high.gpa + HUGE, high.size, high.uaddr + HUGE, 0)
    frontend.send(Request.ADD_MEM_REG, moved, [high.fd])
    assert frontend.closed_by_backend()
    guest.close()
    ram.close()


# --- frontends that break the protocol ------------------------------------------------------


def _raw(request: int, flags: int, body: bytes) -> bytes:
    return struct.pack("=III", request, flags, len(body)) + body


def _mem_table_without_fds(f: Frontend, ram: GuestRam) -> None:
    f.send(Request.SET_MEM_TABLE, wire.MemoryTable(tuple(r.spec for r in ram.regions)))


def _overlapping_regions(f: Frontend, ram: GuestRam) -> None:
    spec = ram.regions[0].spec
    f.send(Request.SET_MEM_TABLE, wire.MemoryTable((spec, spec)), [ram.regions[0].fd] * 2)


def _ring_outside_memory(f: Frontend, ram: GuestRam) -> None:
    f.call(Request.SET_FEATURES, f.u64(Request.GET_FEATURES))
    f.set_mem_table(ram)
    f.call(Request.SET_VRING_NUM, wire.VringState(0, 64))
    f.call(Request.SET_VRING_ADDR, wire.VringAddr(0, 0, 1 << 47, 1 << 47, 1 << 47, 0))
    kick = os.eventfd(0)
    f.send(Request.SET_VRING_KICK, wire.VringFile(0, False), [kick])
    os.close(kick)


def _region_beyond_its_file(f: Frontend, ram: GuestRam) -> None:
    region = ram.regions[0]
    spec = wire.MemoryRegion(0, region.size * 4, region.uaddr, 0)
    f.send(Request.SET_MEM_TABLE, wire.MemoryTable((spec,)), [region.fd])


def _vring_fd(request: Request, make: Callable[[], tuple[int, ...]]) -> Callable[..., None]:
    """Send ``request`` for ring 0 with the first of the fds ``make`` opens."""

    def send(f: Frontend, ram: GuestRam) -> None:
        fds = make()
        f.send(request, wire.VringFile(0, False), [fds[0]])
        for fd in fds:
            os.close(fd)

    return send


BROKEN: dict[str, Callable[[Frontend, GuestRam], None]] = {
    # A kick fd the loop would spin on, a call fd a write could block on, a file as channel.
    "semaphore eventfd as kick fd": _vring_fd(
        Request.SET_VRING_KICK, lambda: (os.eventfd(0, os.EFD_SEMAPHORE),)
    ),
    "pipe as kick fd": _vring_fd(Request.SET_VRING_KICK, os.pipe),
    "pipe as call fd": _vring_fd(Request.SET_VRING_CALL, lambda: os.pipe()[::-1]),
    "pipe as error fd": _vring_fd(Request.SET_VRING_ERR, lambda: os.pipe()[::-1]),
    "a file as backend channel": lambda f, r: f.send(
        Request.SET_BACKEND_REQ_FD, None, [r.regions[0].fd]
    ),
    "wrong version bits": lambda f, r: f.send_raw(_raw(1, 0x2, b"")),
    "unknown flag bits": lambda f, r: f.send_raw(_raw(1, 0x1 | 0x40, b"")),
    "unknown request code": lambda f, r: f.send_raw(_raw(99, 0x1, b"")),
    "request for a feature never offered": lambda f, r: f.send_raw(_raw(6, 0x1, bytes(8))),
    "payload larger than any message": lambda f, r: f.send_raw(_raw(1, 0x1, bytes(5000))),
    "payload of the wrong size": lambda f, r: f.send_raw(_raw(2, 0x1, bytes(4))),
    "SET_FEATURES with bits never offered": lambda f, r: f.send(Request.SET_FEATURES, 1 << 63),
    "SET_FEATURES without VERSION_1": lambda f, r: f.send(Request.SET_FEATURES, 1 << 5),
    "SET_PROTOCOL_FEATURES never offered": lambda f, r: f.send(
        Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.PAGEFAULT
    ),
    "SET_MEM_TABLE with no regions": lambda f, r: f.send_raw(
        _raw(5, 0x1, struct.pack("=II", 0, 0))
    ),
    "SET_MEM_TABLE with 9 regions": lambda f, r: f.send_raw(
        _raw(5, 0x1, struct.pack("=II", 9, 0) + bytes(32 * 9))
    ),
    "SET_MEM_TABLE without its fds": _mem_table_without_fds,
    "overlapping memory regions": _overlapping_regions,
    "region larger than its file": _region_beyond_its_file,
    "SET_VRING_KICK without an fd": lambda f, r: f.send(
        Request.SET_VRING_KICK, wire.VringFile(0, False)
    ),
    "SET_VRING_CALL with reserved bits": lambda f, r: f.send_raw(
        _raw(13, 0x1, struct.pack("=Q", 1 << 20))
    ),
    "SET_VRING_NUM not a power of two": lambda f, r: f.send(
        Request.SET_VRING_NUM, wire.VringState(0, 100)
    ),
    "ring index out of range": lambda f, r: f.send(
        Request.SET_VRING_NUM, wire.VringState(1000, 64)
    ),
    "GET_CONFIG larger than any config": lambda f, r: f.send_raw(
        _raw(24, 0x1, struct.pack("=III", 0, 300, 0) + bytes(300))
    ),
    "ring addresses outside guest memory": _ring_outside_memory,
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_protocol_breach_drops_the_frontend_and_serves_the_next(
    case: str, daemon: Daemon, ram: GuestRam
) -> None:
    bad = Frontend(daemon.path)
    BROKEN[case](bad, ram)
    assert bad.closed_by_backend(), "the backend hangs up on a frontend that breaks the protocol"
    bad.close()

    good = Frontend(daemon.path)
    guest = Guest(good, ram)
    guest.start()
    ram.write(16 * MiB, b"\x09" * HUGE)
    guest.report([(16 * MiB, HUGE)])
    assert ram.read(16 * MiB, HUGE) == bytes(HUGE)
    guest.close()
    good.close()


def test_truncated_message_then_hang_up(daemon: Daemon, ram: GuestRam) -> None:
    bad = Frontend(daemon.path)
    bad.send_raw(_raw(1, 0x1, b"")[:7])
    bad.close()
    good = Frontend(daemon.path)
    assert good.u64(Request.GET_FEATURES) & VERSION_1
    good.close()


def test_a_second_frontend_waits_for_the_first(daemon: Daemon) -> None:
    first = Frontend(daemon.path)
    assert first.u64(Request.GET_FEATURES)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.settimeout(0.5)
    second.connect(daemon.path)  # queued in the backlog, not served yet
    second.sendall(wire.encode_request(Request.GET_FEATURES))
    with pytest.raises(TimeoutError):
        second.recv(64)
    first.close()
    second.settimeout(5)
    header = wire.decode_header(second.recv(wire.HEADER_SIZE), reply=True)
    assert header.request == Request.GET_FEATURES
    assert HeaderFlags.REPLY in header.flags
    second.close()


def test_a_frontend_gone_before_its_reply_is_no_fault(daemon: Daemon) -> None:
    """QEMU asks and dies before the answer: the reply meets a closed socket. That is the
    frontend going away (no error counted, the next one served), not an internal error."""
    frontend = Frontend(daemon.path)
    frontend.send(Request.GET_FEATURES)
    frontend.close()
    deadline = time.monotonic() + 10
    while daemon.run(lambda: daemon.server.connections != 1 or daemon.server.connection):
        assert time.monotonic() < deadline, "the daemon never let go of the frontend"
        time.sleep(0.01)
    survivor = Frontend(daemon.path)
    assert survivor.u64(Request.GET_FEATURES)
    survivor.close()
    assert daemon.run(lambda: dict(daemon.server.errors)) == {}

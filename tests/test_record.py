"""The state record: it survives encoding, its fds come back by role, a record this version
cannot read is refused with one line, and a memfd holds the latest whole record whatever
instant a write is cut short at."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import itertools
import json
import math
import operator
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloond import wire
from balloond.balloon import (
    LATENCY_BOUNDS,
    STAT_ENTRY,
    Balloon,
    BalloonOptions,
    BalloonState,
    Counters,
    Histogram,
    QueueRole,
    queue_roles,
)
from balloond.discard import Discarder
from balloond.protocol import BackendState, VhostUserBackend
from balloond.record import (
    AddrRecord,
    BackendRecord,
    BalloonRecord,
    ConnectionRecord,
    CountersRecord,
    DaemonRecord,
    DeviceRecord,
    DeviceSettings,
    HistogramRecord,
    RecordError,
    RegionRecord,
    RequestDigest,
    RingRecord,
    VringRecord,
    apply_progress,
    capture,
    capture_connection,
    current_boot_id,
    decode,
    decode_daemon,
    encode,
    encode_progress,
    fd_slots,
    progress_base,
    restore_state,
)
from balloond.schema import dump_part
from balloond.statefile import StateFile, read_sealed, seal
from balloond.wire import Request
from tests.frontend import Frontend, GuestRam, MiB, Ring

# --- the record's value space --------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
texts = st.text(max_size=30)
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
names = st.builds(operator.add, st.sampled_from(ALNUM), st.text(ALNUM + "_.-", max_size=63))
#: A huge page's mask of ballooned pieces (512 bits for a 2 MiB page).
masks = st.integers(1, (1 << 512) - 1)
bounds = st.lists(st.floats(1e-9, 1e9), min_size=0, max_size=6, unique=True).map(
    lambda b: tuple(sorted(b))
)


def sorted_pairs(keys: st.SearchStrategy[Any], values: st.SearchStrategy[Any]) -> Any:
    return st.dictionaries(keys, values, max_size=5).map(lambda d: tuple(sorted(d.items())))


@st.composite
def connection_records(
    draw: st.DrawFn, fds: Iterator[int], latency_bounds: st.SearchStrategy[Any] = bounds
) -> ConnectionRecord:
    """Any connection's record the engine could produce; fds numbered from ``fds``."""

    def fd() -> int | None:
        return next(fds) if draw(st.booleans()) else None

    features = draw(st.none() | u64)
    vrings = []
    for index in sorted(draw(st.sets(st.integers(0, 255), max_size=5))):
        num = draw(st.sampled_from([0, 1, 2, 64, 256, 32768]))
        heads = st.sets(st.integers(0, max(num - 1, 0)), max_size=min(num, 6)).map(sorted)
        rings = st.builds(RingRecord, st.just(num), u64, u64, u64, u16, u16, st.none() | u16,
                          heads.map(tuple))  # fmt: skip
        ring = draw(rings) if num and draw(st.booleans()) else None
        addr = draw(st.none() | st.builds(AddrRecord, st.integers(0, 1), u64, u64, u64, u64))
        broken = draw(st.none() | texts)
        vring = VringRecord(index, num, draw(u16), addr, fd(), fd(), fd(), draw(st.booleans()),
                            broken, draw(u16), ring)  # fmt: skip
        vrings.append(vring)
    regions = []
    for i in range(draw(st.integers(0, 4))):
        gpa, uaddr = (i << 40) + draw(st.integers(0, 1 << 39)), (i << 41) + draw(u32)
        size, offset = draw(st.integers(1, 1 << 39)), draw(st.integers(0, 1 << 62))
        regions.append(RegionRecord(gpa, size, uaddr, offset, next(fds)))
    balloon_features = None if features is None else features & ~(1 << 30)
    roles = queue_roles(balloon_features or 0).items()
    stats_index = next((i for i, role in roles if role is QueueRole.STATS), None)
    held = next((v.ring.in_flight for v in vrings if v.index == stats_index and v.ring), ())
    stats_head = draw(st.sampled_from(held)) if held and draw(st.booleans()) else None
    latency = draw(latency_bounds)
    counts = tuple(draw(u64) for _ in range(len(latency) + 1))
    histogram = HistogramRecord(latency, counts, draw(st.floats(0, 1e12)))
    counters = CountersRecord(*(draw(u64) for _ in range(6)), draw(sorted_pairs(texts, u64)),
                              *(draw(u64) for _ in range(4)), histogram)  # fmt: skip
    balloon = BalloonRecord(
        draw(u64), draw(u32), draw(u32), draw(u32), balloon_features, stats_head,
        draw(sorted_pairs(u16, u64)), draw(st.none() | st.integers(0, 10**15)),
        draw(sorted_pairs(u64, masks)), counters,
    )  # fmt: skip
    digests = st.text("0123456789abcdef", min_size=64, max_size=64)
    last = draw(st.none() | st.builds(RequestDigest, st.sampled_from(Request), digests))
    pipe = (next(fds), next(fds)) if draw(st.booleans()) else None
    backend = BackendRecord(features, draw(u64), draw(st.booleans()), draw(st.integers(0, 255)),
                            fd(), tuple(vrings))  # fmt: skip
    return ConnectionRecord(next(fds), backend, tuple(regions), balloon, last, pipe)


@st.composite
def device_records(
    draw: st.DrawFn, connected: bool | None = None, latency_bounds: Any = bounds
) -> DeviceRecord:
    fds = itertools.count(draw(st.integers(0, 1000)))
    paths = st.none() | texts
    settings_ = draw(
        st.builds(
            DeviceSettings, st.booleans(), st.booleans(), st.booleans(), paths, paths, st.booleans()
        )
    )
    listener = next(fds) if draw(st.booleans()) else None
    has_connection = draw(st.booleans()) if connected is None else connected
    connection = draw(connection_records(fds, latency_bounds)) if has_connection else None
    boot_id = draw(st.text(min_size=1, max_size=64))
    return DeviceRecord(draw(names), boot_id, settings_, listener, connection, draw(u64),
                        draw(sorted_pairs(names, u64)))  # fmt: skip


def fd_fields(value: object) -> int:
    """How many fds a record holds (counted by walking it, not through the encoder)."""
    if isinstance(value, tuple):
        return sum(fd_fields(item) for item in value)
    if not dataclasses.is_dataclass(value):
        return 0
    count = 0
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if f.name in ("kick", "call", "err", "backend_req", "listener", "socket", "fd"):
            count += item is not None
        elif f.name == "reply_pipe":
            count += 0 if item is None else 2
        else:
            count += fd_fields(item)
    return count


RECORD_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@RECORD_SETTINGS
@given(device_records())
def test_a_device_record_survives_encoding(record: DeviceRecord) -> None:
    data, fds = encode(record)
    assert len(fds) == fd_fields(record)
    assert decode(data, fds) == record


@settings(RECORD_SETTINGS, max_examples=30)
@given(st.lists(device_records(), max_size=3, unique_by=lambda r: r.name))
def test_a_daemon_record_survives_encoding(devices: list[DeviceRecord]) -> None:
    record = DaemonRecord(tuple(devices))
    data, fds = encode(record)
    assert len(fds) == sum(fd_fields(d) for d in devices)
    assert decode_daemon(data, fds) == record


@RECORD_SETTINGS
@given(device_records(connected=True, latency_bounds=st.just(LATENCY_BOUNDS)))
def test_restoring_and_capturing_again_gives_the_same_record(record: DeviceRecord) -> None:
    """restore_state and capture_connection are inverses; restoring touches no fd at all
    (these fd numbers are not open)."""
    clock, monotonic_ns = (lambda: 1e6), (lambda: 10**15)
    restored = restore_state(record, clock=clock, monotonic_ns=monotonic_ns, boot_id=record.boot_id)
    connection = record.connection
    assert connection is not None
    again = capture_connection(
        restored.backend,
        restored.regions,
        restored.balloon,
        connection.socket,
        clock=clock,
        monotonic_ns=monotonic_ns,
        last_request=connection.last_request,
        reply_pipe=connection.reply_pipe,
    )
    assert again == connection


def test_a_1_gib_page_mask_survives_encoding() -> None:
    """262,144 pieces: past what int-to-decimal conversion (and JSON as decimal) allows."""
    record = small_record()
    connection = record.connection
    assert connection is not None
    balloon = dataclasses.replace(
        connection.balloon, partial_pages=((1 << 30, (1 << 262_144) - 2),)
    )
    record = dataclasses.replace(
        record, connection=dataclasses.replace(connection, balloon=balloon)
    )
    data, fds = encode(record)
    assert decode(data, fds) == record


def test_keys_name_fds_for_a_keeper_in_the_table() -> None:
    record = small_record(listener=7, socket_fd=9)
    data, fds = encode(record, keys={7: "vm0.listener.1", 9: "vm0.conn.4"})
    assert fds == [7, 9]
    assert [(s.role, s.key) for s in fd_slots(data)] == [
        ("listener", "vm0.listener.1"),
        ("connection.socket", "vm0.conn.4"),
    ]
    assert decode(data, fds) == record


# --- a record of a real engine, driven like QEMU drives it -----------------------------------

FEATURES = 1 << 32 | 1 << 30 | 1 << 29 | 1 << 28 | 1 << 1 | 1 << 2 | 1 << 4 | 1 << 5


def request(
    backend: VhostUserBackend, code: Request, payload: wire.Payload = None, fds: Sequence[int] = ()
) -> bytes | None:
    data = wire.encode_request(code, payload)
    header = wire.decode_header(data[: wire.HEADER_SIZE])
    message = wire.decode_message(header, data[wire.HEADER_SIZE :], tuple(fds))
    return backend.handle(message).reply


class Engine:
    """A VhostUserBackend set up the way QEMU sets one up, with a guest that used every
    queue: a held stats buffer, an inflate job still out, chains returned and signalled."""

    def __init__(self) -> None:
        self.ram = GuestRam(low=16 * MiB, high=8 * MiB)
        self.rings = [Ring(self.ram, index, size=64) for index in range(4)]
        self.errs = [os.eventfd(0, os.EFD_NONBLOCK) for _ in self.rings]
        self.frontend_channel, channel = socket.socketpair()
        self.conn, self.qemu = socket.socketpair()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.balloon = Balloon(BalloonOptions(deflate_on_oom=True))
        self.backend = b = VhostUserBackend(self.balloon)
        request(b, Request.GET_FEATURES)
        request(b, Request.SET_PROTOCOL_FEATURES, Frontend.PROTOCOL_FEATURES)
        request(b, Request.SET_OWNER)
        request(b, Request.SET_BACKEND_REQ_FD, None, [os.dup(channel.fileno())])
        channel.close()
        request(b, Request.SET_FEATURES, FEATURES)
        request(b, Request.SET_STATUS, 15)
        table = wire.MemoryTable(tuple(r.spec for r in self.ram.regions))
        request(b, Request.SET_MEM_TABLE, table, [os.dup(r.fd) for r in self.ram.regions])
        for ring, err in zip(self.rings, self.errs, strict=True):
            i = ring.index
            request(b, Request.SET_VRING_NUM, wire.VringState(i, ring.size))
            request(b, Request.SET_VRING_BASE, wire.VringState(i, 0))
            request(b, Request.SET_VRING_ADDR, ring.addr())
            for code, fd in (
                (Request.SET_VRING_KICK, ring.kick),
                (Request.SET_VRING_CALL, ring.call),
                (Request.SET_VRING_ERR, err),
            ):
                request(b, code, wire.VringFile(i, False), [os.dup(fd)])
            request(b, Request.SET_VRING_ENABLE, wire.VringState(i, 1))
        config = struct.pack("<IIII", 0, 300, 0, 0)
        request(b, Request.SET_CONFIG, wire.ConfigSpace(0, 16, 0, config))
        self.balloon.set_target(16 * MiB, self.backend.memory.size)
        self.use_every_queue()

    def use_every_queue(self) -> None:
        inflate, deflate, stats, reporting = self.rings
        stats_buffer = self.ram.alloc(STAT_ENTRY.size * 2)
        self.ram.write(stats_buffer, STAT_ENTRY.pack(4, 5 * MiB) + STAT_ENTRY.pack(5, 24 * MiB))
        stats.add_chain([(stats_buffer, STAT_ENTRY.size * 2)], writable=False)
        assert self.backend.kicked(stats.index).jobs == ()  # held, not returned
        frames = self.ram.alloc(8)
        self.ram.write(frames, struct.pack("<II", 0x900, 0x901))  # pages at 9 MiB
        for _ in range(2):
            inflate.add_chain([(frames, 8)], writable=False)
        first, self.out = self.backend.kicked(inflate.index).jobs
        self.backend.complete(first, Discarder().discard(first.ranges))
        deflate.add_chain([(frames, 4)], writable=False)
        self.backend.kicked(deflate.index)
        reporting.add_chain([(12 * MiB, 2 * MiB)], writable=True)
        [report] = self.backend.kicked(reporting.index).jobs
        self.backend.complete(report, Discarder().discard(report.ranges))
        self.backend.signals()

    def close(self) -> None:
        self.backend.close()
        for ring in self.rings:
            ring.close()
        for fd in self.errs:
            os.close(fd)
        for sock in (self.frontend_channel, self.conn, self.qemu, self.listener):
            sock.close()
        self.ram.close()


@pytest.fixture
def engine() -> Iterator[Engine]:
    live = Engine()
    yield live
    live.close()


def pass_fds(fds: Sequence[int]) -> list[int]:
    """New fds for the same open files, as a successor gets them: through SCM_RIGHTS."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        ours.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        _, ancillary, _, _ = theirs.recvmsg(1, socket.CMSG_SPACE(len(fds) * 4))
    received = array.array("i")
    for _, _, payload in ancillary:
        received.frombytes(payload)
    return list(received)


def is_eventfd(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        return "eventfd-count" in info.read()


def drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while True:
            os.eventfd_read(fd)


def assert_same_file(live: int | None, restored: int | None, others: Sequence[int] = ()) -> None:
    """``restored`` refers to ``live``'s open file: the same inode, and for an eventfd (all
    eventfds share one inode) a count written on one is read on the other, and on none of
    ``others``."""
    assert (live is None) == (restored is None)
    if live is None or restored is None:
        return
    assert live != restored, "a real hand-off gives new fd numbers"
    a, b = os.fstat(live), os.fstat(restored)
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    if is_eventfd(live):
        for fd in (live, *others):
            drain(fd)
        os.eventfd_write(live, 7)
        for fd in others:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fd)
        assert os.eventfd_read(restored) == 7


def test_a_captured_engine_is_restored_field_by_field(engine: Engine) -> None:
    live_backend, live_balloon = engine.backend.state, engine.balloon.state
    record = capture(
        engine.backend,
        engine.balloon,
        "vm0",
        socket=engine.conn.fileno(),
        settings=DeviceSettings(deflate_on_oom=True, socket_path="/run/balloond/vm0.sock"),
        listener=engine.listener.fileno(),
        connections=2,
        errors={"protocol": 1},
    )
    # What the guest left in flight is in the record as held.
    assert live_balloon.stats_head is not None and engine.out.head is not None
    vrings = {v.index: v for v in live_backend.vrings.values()}
    assert vrings[0].ring is not None and engine.out.head in vrings[0].ring.in_flight
    assert vrings[2].ring is not None and live_balloon.stats_head in vrings[2].ring.in_flight
    data, fds = encode(record)
    received = pass_fds(fds)
    try:
        decoded = decode(data, received)
        restored = restore_state(decoded)
        assert decoded.name == "vm0" and decoded.connections == 2
        assert decoded.errors == (("protocol", 1),)
        assert decoded.settings.socket_path == "/run/balloond/vm0.sock"
        assert decoded.connection is not None
        assert_same_file(engine.conn.fileno(), decoded.connection.socket)
        assert_same_file(engine.listener.fileno(), decoded.listener)
        # The vhost-user state, every field; fds by file.
        state = restored.backend
        assert dataclasses.replace(state, backend_req_fd=None, vrings={}) == dataclasses.replace(
            live_backend, backend_req_fd=None, vrings={}
        )
        assert_same_file(live_backend.backend_req_fd, state.backend_req_fd)
        assert state.vrings.keys() == live_backend.vrings.keys()
        all_eventfds = [
            fd
            for v in state.vrings.values()
            for fd in (v.kick_fd, v.call_fd, v.err_fd)
            if fd is not None
        ]
        for index, live in live_backend.vrings.items():
            mine = state.vrings[index]
            no_fds = {"kick_fd": None, "call_fd": None, "err_fd": None}
            assert dataclasses.replace(mine, **no_fds) == dataclasses.replace(live, **no_fds)
            for name in no_fds:
                fd = getattr(mine, name)
                assert_same_file(getattr(live, name), fd, [o for o in all_eventfds if o != fd])
        # The memory table, in order.
        live_regions = engine.backend.memory.snapshot()
        assert [spec for spec, _ in restored.regions] == [spec for spec, _ in live_regions]
        for (_, fd), (_, live_fd) in zip(restored.regions, live_regions, strict=True):
            assert_same_file(live_fd, fd)
        # The balloon, every field; the stats' time to well within a millisecond.
        balloon = restored.balloon
        assert live_balloon.stats_time is not None and balloon.stats_time is not None
        assert math.isclose(balloon.stats_time, live_balloon.stats_time, abs_tol=1e-3)
        assert dataclasses.replace(balloon, stats_time=None) == dataclasses.replace(
            live_balloon, stats_time=None
        )
        assert balloon.stats == {4: 5 * MiB, 5: 24 * MiB} and balloon.actual == 300
        assert balloon.counters.report_latency.counts == live_balloon.counters.report_latency.counts
        assert sum(balloon.counters.report_latency.counts) == 1
    finally:
        for fd in received:
            os.close(fd)


def test_capture_refuses_a_balloon_that_is_not_the_backends(engine: Engine) -> None:
    with pytest.raises(ValueError, match="not the backend's device"):
        capture(engine.backend, Balloon(), "vm0", socket=engine.conn.fileno())


def test_every_fd_comes_back_in_its_role_through_scm_rights() -> None:
    """Each role's fd after a real hand-off is the same open file as before: memfds and
    sockets by inode, eventfds by a count written to one and read from the other only."""
    memfds = [os.memfd_create(f"region{i}") for i in range(2)]
    eventfds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(6)]
    conn, peer = socket.socketpair()
    channel, channel_peer = socket.socketpair()
    read_end, write_end = os.pipe()
    originals = [*memfds, *eventfds, read_end, write_end]
    try:
        record = small_record(socket_fd=conn.fileno(), listener=None)
        connection = record.connection
        assert connection is not None
        vrings = tuple(
            dataclasses.replace(
                v, kick=eventfds[3 * i], call=eventfds[3 * i + 1], err=eventfds[3 * i + 2]
            )
            for i, v in enumerate(connection.backend.vrings)
        )
        regions = (
            RegionRecord(0, 1 << 20, 1 << 40, 0, memfds[0]),
            RegionRecord(1 << 32, 1 << 20, 1 << 41, 0, memfds[1]),
        )
        backend = dataclasses.replace(
            connection.backend, backend_req=channel.fileno(), vrings=vrings
        )
        record = dataclasses.replace(
            record,
            connection=dataclasses.replace(
                connection, backend=backend, memory=regions, reply_pipe=(read_end, write_end)
            ),
        )
        data, fds = encode(record)
        received = pass_fds(fds)
        try:
            back = decode(data, received).connection
            assert back is not None and back.reply_pipe is not None
            assert_same_file(conn.fileno(), back.socket)
            assert_same_file(channel.fileno(), back.backend.backend_req)
            assert_same_file(read_end, back.reply_pipe[0])
            assert_same_file(write_end, back.reply_pipe[1])
            for live, mine in zip(regions, back.memory, strict=True):
                assert_same_file(live.fd, mine.fd)
            restored_eventfds = [
                fd for v in back.backend.vrings for fd in (v.kick, v.call, v.err) if fd is not None
            ]
            assert len(restored_eventfds) == len(eventfds)
            for live_fd, mine in zip(eventfds, restored_eventfds, strict=True):
                assert_same_file(live_fd, mine, [o for o in restored_eventfds if o != mine])
        finally:
            for fd in received:
                os.close(fd)
    finally:
        for fd in originals:
            os.close(fd)
        for sock in (conn, peer, channel, channel_peer):
            sock.close()


# --- refused, never guessed at ---------------------------------------------------------------


def small_record(*, listener: int | None = 3, socket_fd: int = 4) -> DeviceRecord:
    """A connected device with two rings, the stats buffer held; fds as given."""
    rings = tuple(
        VringRecord(
            i,
            64,
            0,
            AddrRecord(0, 0x1000 * i, 0x2000 * i, 0x3000 * i, 0),
            None,
            None,
            None,
            True,
            None,
            2,
            RingRecord(64, 0x10000, 0x11000, 0x12000, 2, 1, 1, (5,) if i == 2 else ()),
        )
        for i in (0, 2)
    )
    features = 1 << 32 | 1 << 30 | 1 << 1
    latency = HistogramRecord(LATENCY_BOUNDS, (0,) * (len(LATENCY_BOUNDS) + 1), 0.0)
    counters = CountersRecord(1, 2, 3, 4, 5, 6, (("outside guest RAM", 4096),), 0, 0, 0, 1, latency)
    balloon = BalloonRecord(
        1 << 30, 1024, 1000, 0, features & ~(1 << 30), 5, ((4, 1 << 20),), None, (), counters
    )
    backend = BackendRecord(features, 1 << 3, True, 15, None, rings)
    connection = ConnectionRecord(socket_fd, backend, (), balloon)
    return DeviceRecord("vm0", current_boot_id(), DeviceSettings(), listener, connection)


def document() -> tuple[dict[str, Any], list[int]]:
    data, fds = encode(small_record())
    parsed: dict[str, Any] = json.loads(data)
    return parsed, fds


def refused(data: bytes | dict[str, Any], fds: Sequence[int], *expected: str) -> str:
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    with pytest.raises(RecordError) as info:
        decode(data, fds)
    message = str(info.value)
    assert "\n" not in message and message.startswith("state record: ")
    for part in expected:
        assert part in message
    return message


def test_the_unchanged_document_is_read() -> None:
    """The baseline of the refusals below: without the change each makes, it reads."""
    doc, fds = document()
    assert decode(json.dumps(doc).encode(), fds) == small_record()


Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for key in parents:
            doc = doc[int(key)] if key.isdigit() else doc[key]  # type: ignore[index]
        doc[int(last) if last.isdigit() else last] = value  # type: ignore[index]

    return edit


def _delete(path: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for key in parents:
            doc = doc[key]
        del doc[last]

    return edit


REFUSALS: list[tuple[str, Edit, tuple[str, ...]]] = [
    (
        "newer major version",
        _set("version", 2),
        ("newer balloond", "version 2.0", "reads version 1"),
    ),
    ("older major version", _set("version", 0), ("version 0.0",)),
    ("another format", _set("format", "qemu-vmstate"), ("not a balloond-device", "qemu-vmstate")),
    ("no version", _delete("minor"), ("no valid version",)),
    (
        "missing field",
        _delete("connection/backend/status"),
        ("connection.backend.status: missing",),
    ),
    ("unknown field, same minor", _set("connection/surprise", 1), ("unknown field 'surprise'",)),
    ("fd out of range", _set("connection/socket", 2), ("connection.socket", "outside 0..1")),
    (
        "fd of another role",
        _set("fds", ["connection.socket", "listener"]),
        ("is 'connection.socket', not 'listener'",),
    ),
    (
        "index past a u16",
        _set("connection/backend/vrings/0/ring/next_avail", 70000),
        ("vrings[0].ring.next_avail", "70000 is outside 0..65535"),
    ),
    (
        "a bool for a number",
        _set("connections", True),
        ("connections: expected an integer, found bool",),
    ),
    ("a string for a number", _set("connection/balloon/actual", "1000"), ("found str",)),
    (
        "head beyond any ring",
        _set("connection/backend/vrings/1/ring/in_flight", [40000]),
        ("in_flight[0]: 40000 is outside 0..32767",),
    ),
    (
        "head beyond the ring size",
        _set("connection/backend/vrings/1/ring/in_flight", [70]),
        ("not below the ring's size 64",),
    ),
    (
        "head held twice",
        _set("connection/backend/vrings/1/ring/in_flight", [5, 5]),
        ("appears twice",),
    ),
    (
        "stats buffer not held",
        _set("connection/balloon/stats_head", 6),
        ("stats buffer 6 is not held",),
    ),
    (
        "features disagree",
        _set("connection/balloon/features", 1 << 32),
        ("are not the frontend's",),
    ),
    (
        "ring size not a power of two",
        _set("connection/backend/vrings/0/num", 48),
        ("not a power of two",),
    ),
    (
        "ring started at another size",
        _set("connection/backend/vrings/0/ring/size", 128),
        ("started with size 128",),
    ),
    ("rings out of order", _set("connection/backend/vrings/0/index", 3), ("in order",)),
    ("bad device name", _set("name", "../vm0"), ("is not a device name",)),
    (
        "histogram of the wrong shape",
        _set("connection/balloon/counters/report_latency/counts", [1]),
        ("1 counts for 15 bounds",),
    ),
    (
        "mask not in hex",
        _set("connection/balloon/partial_pages", [[0, "0x3"]]),
        ("not a number in lower-case hex",),
    ),
    (
        "negative total",
        _set("connection/balloon/counters/report_latency/total", -1.0),
        ("not a finite number >= 0",),
    ),
    (
        "stats tag twice",
        _set("connection/balloon/stats", [[4, 1], [4, 2]]),
        ("key 4 appears twice",),
    ),
    (
        "unknown request",
        _set("connection/last_request", {"request": "SEND_MONEY", "sha256": "0" * 64}),
        ("unknown Request 'SEND_MONEY'",),
    ),
]


@pytest.mark.parametrize(
    ("edit", "expected"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_a_record_this_version_cannot_read_is_refused(
    edit: Edit, expected: tuple[str, ...]
) -> None:
    doc, fds = document()
    edit(doc)
    refused(doc, fds, *expected)


def test_a_truncated_record_is_refused() -> None:
    data, fds = encode(small_record())
    for cut in (1, len(data) // 2, len(data) - 1):
        refused(data[:cut], fds, "not a JSON document")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "not a JSON document"),
        (b"\xff\xfe garbage", "not a JSON document"),
        (b"[1, 2, 3]", "not a balloond-device record (a JSON list)"),
        (
            b'{"format": "balloond-device", "version": 1, "minor": 0, "name": "a", "name": "b"}',
            "appears twice",
        ),
        (b'{"format": "balloond-device", "version": 1, "minor": NaN}', "NaN"),
    ],
)
def test_garbage_is_refused(data: bytes, expected: str) -> None:
    refused(data, [], expected)


def test_the_wrong_number_of_fds_is_refused() -> None:
    data, fds = encode(small_record())
    refused(data, fds[:-1], "names 2 fds, 1 were passed")
    refused(data, [*fds, 9], "names 2 fds, 3 were passed")


def test_a_daemon_record_is_not_a_device_record() -> None:
    data, fds = encode(DaemonRecord((small_record(),)))
    refused(data, fds, "not a balloond-device record (format 'balloond-daemon')")
    data, fds = encode(DaemonRecord((small_record(), small_record(listener=5, socket_fd=6))))
    with pytest.raises(RecordError, match="a device appears twice"):
        decode_daemon(data, fds)


def test_a_newer_minor_version_is_read_leaving_what_it_adds_alone() -> None:
    """A minor version may add fields and fds an older reader can ignore; the fields this
    version knows still have to be right."""
    doc, fds = document()
    doc["minor"] = 1
    doc["connection"]["inflight_region"] = 2
    doc["connection"]["backend"]["vrings"][0]["packed"] = False
    doc["fds"].append("connection.inflight_region")
    assert decode(json.dumps(doc).encode(), [*fds, 99]) == small_record()
    del doc["connection"]["backend"]["status"]
    refused(doc, [*fds, 99], "connection.backend.status: missing")


def test_restoring_refuses_what_cannot_be_this_boots() -> None:
    record = small_record()
    with pytest.raises(RecordError, match=r"written in boot .* this is boot"):
        restore_state(record, boot_id="another-boot")
    with pytest.raises(RecordError, match="no frontend was connected"):
        restore_state(dataclasses.replace(record, connection=None))
    connection = record.connection
    assert connection is not None
    future = dataclasses.replace(connection.balloon, stats_time_ns=10**15 + 1)
    record = dataclasses.replace(record, connection=dataclasses.replace(connection, balloon=future))
    with pytest.raises(RecordError, match="statistics time lies in the future"):
        restore_state(record, monotonic_ns=lambda: 10**15)


def test_a_histogram_of_other_buckets_starts_over_instead_of_refusing_the_vm() -> None:
    record = small_record()
    connection = record.connection
    assert connection is not None
    counters = dataclasses.replace(
        connection.balloon.counters, report_latency=HistogramRecord((1.0,), (3, 4), 9.0)
    )
    balloon = dataclasses.replace(connection.balloon, counters=counters)
    record = dataclasses.replace(
        record, connection=dataclasses.replace(connection, balloon=balloon)
    )
    restored = restore_state(record).balloon.counters
    assert sum(restored.report_latency.counts) == 0 and restored.report_latency.total == 0.0
    assert restored.reports == 1


def test_a_captured_engine_survives_its_state_file(engine: Engine) -> None:
    record = capture(engine.backend, engine.balloon, "vm0", socket=engine.conn.fileno())
    data, fds = encode(record)
    keeper = StateFile.create()
    try:
        keeper.commit(data)
        assert decode(StateFile(keeper.fd).read(), fds) == record
    finally:
        os.close(keeper.fd)
    assert len(data) < 16_384, "a device's record stays small"


def test_a_sealed_record_cannot_change() -> None:
    data, _ = encode(small_record())
    fd = seal(data)
    try:
        assert read_sealed(fd) == data
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert decode(read_sealed(fd), [3, 4]) == small_record()
    finally:
        os.close(fd)


def test_an_unsealed_or_foreign_fd_is_refused() -> None:
    memfd = os.memfd_create("unsealed")
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(RecordError, match="not sealed"):
            read_sealed(memfd)
        with pytest.raises(RecordError, match="not a memfd"):
            read_sealed(read_end)
    finally:
        for fd in (memfd, read_end, write_end):
            os.close(fd)


def test_progress_laid_over_a_record_is_the_record_of_its_instant(engine: Engine) -> None:
    """What the data path changes after a record (a chain returned, a report, ``actual``, the
    counters, the last request), written as progress and laid over that record, reads back as
    the record captured at the progress's instant: the successor of a death gets the same."""
    now_ns = 5_000_000_000_000

    def record_now() -> DeviceRecord:
        return capture(
            engine.backend, engine.balloon, "vm0", socket=engine.conn.fileno(),
            monotonic_ns=lambda: now_ns,
        )  # fmt: skip

    before, fds = encode(record_now())
    inflate, _, _, reporting = engine.rings
    engine.backend.complete(engine.out, Discarder().discard(engine.out.ranges))
    reporting.add_chain([(14 * MiB, 2 * MiB)], writable=True)
    [report] = engine.backend.kicked(reporting.index).jobs
    engine.backend.complete(report, Discarder().discard(report.ranges))
    engine.backend.signals()
    engine.balloon.state.actual = 512
    # Every kind of field the balloon's part holds, filled in.
    engine.balloon.state.partial_pages[1 << 30] = (1 << 300) | 0xFFFF
    engine.balloon.state.counters.skipped_bytes["outside guest RAM"] = 4096
    engine.balloon.state.counters.report_latency.total = 0.125
    last = RequestDigest.of(wire.encode_request(Request.SET_CONFIG, None))
    progress = encode_progress(
        engine.backend.state, engine.balloon.state, last, 7,
        clock=engine.balloon.clock, monotonic_ns=lambda: now_ns,
    )  # fmt: skip
    assert progress_base(progress) == 7
    assert len(progress) < len(before) / 2, "progress is the small part of a record"
    after = decode(apply_progress(before, progress), fds)
    expected = record_now()
    assert expected.connection is not None and after.connection is not None
    # The statistics' time is kept as an age against the clock: equal to a few ms.
    got, want = after.connection.balloon.stats_time_ns, expected.connection.balloon.stats_time_ns
    assert got is not None and want is not None and abs(got - want) < 50_000_000

    def untimed(record: DeviceRecord, last: RequestDigest | None) -> DeviceRecord:
        assert record.connection is not None
        balloon = dataclasses.replace(record.connection.balloon, stats_time_ns=None)
        connection = dataclasses.replace(record.connection, balloon=balloon, last_request=last)
        return dataclasses.replace(record, connection=connection)

    assert untimed(after, last) == untimed(expected, last)
    assert after.connection.last_request == last
    assert after.connection.balloon.actual == 512
    assert after.connection.balloon.counters.reports == 2
    assert after.connection.balloon.partial_pages == ((1 << 30, (1 << 300) | 0xFFFF),)
    assert after.connection.balloon.stats and after.connection.balloon.stats_head is not None
    ring = after.connection.backend.vrings[inflate.index].ring
    assert ring is not None and engine.out.head not in ring.in_flight


def reference_progress(
    state: BackendState,
    balloon: BalloonState,
    last: RequestDigest | None,
    base: int,
    stats_time_ns: int | None,
) -> bytes:
    """A progress document as ``json.dumps`` writes the nested dicts it stands for: what
    :func:`encode_progress` must write, byte for byte (it writes the text itself, for speed)."""
    rings = {}
    for index, v in state.vrings.items():
        r = v.ring
        if r is not None:
            ring = {
                "size": r.size, "desc": r.desc, "avail": r.avail, "used": r.used,
                "next_avail": r.next_avail, "next_used": r.next_used,
                "signalled_used": r.signalled_used, "in_flight": sorted(r.in_flight),
            }  # fmt: skip
            rings[str(index)] = [v.flushed_used, ring]
    c, h = balloon.counters, balloon.counters.report_latency
    counters = {
        "reports": c.reports, "reported_bytes": c.reported_bytes,
        "inflated_bytes": c.inflated_bytes, "deflated_bytes": c.deflated_bytes,
        "discarded_bytes": c.discarded_bytes,
        "balloon_discarded_bytes": c.balloon_discarded_bytes,
        "skipped_bytes": [[k, v] for k, v in sorted(c.skipped_bytes.items())],
        "kept_bytes": c.kept_bytes, "discard_errors": c.discard_errors,
        "bad_chains": c.bad_chains, "stats_updates": c.stats_updates,
        "report_latency": {"bounds": list(LATENCY_BOUNDS), "counts": h.counts, "total": h.total},
    }  # fmt: skip
    b = balloon
    written = {
        "ram_size": b.ram_size, "num_pages": b.num_pages, "actual": b.actual,
        "poison_val": b.poison_val, "features": b.features, "stats_head": b.stats_head,
        "stats": [[k, v] for k, v in sorted(b.stats.items())], "stats_time_ns": stats_time_ns,
        "partial_pages": [[k, f"{v:x}"] for k, v in sorted(b.partial_pages.items())],
        "counters": counters,
    }  # fmt: skip
    document = {
        "format": "balloond-progress", "version": 1, "minor": 0, "base": base, "rings": rings,
        "balloon": written, "last_request": None if last is None else dump_part(last),
    }  # fmt: skip
    return json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


_U64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    balloon=st.builds(
        BalloonState,
        ram_size=_U64, num_pages=_U64, actual=_U64, poison_val=st.integers(0, (1 << 32) - 1),
        features=st.none() | _U64, stats_head=st.none() | st.integers(0, 0xFFFF),
        stats=st.dictionaries(st.integers(0, 0xFFFF), _U64, max_size=12),
        stats_time=st.none() | st.floats(0, 1e6),
        partial_pages=st.dictionaries(_U64, st.integers(1, (1 << 512) - 1), max_size=4),
        counters=st.builds(
            Counters, reports=_U64, discarded_bytes=_U64, bad_chains=_U64,
            skipped_bytes=st.dictionaries(st.text(max_size=40), _U64, max_size=4),
            report_latency=st.builds(
                Histogram,
                counts=st.lists(_U64, min_size=len(LATENCY_BOUNDS) + 1,
                                max_size=len(LATENCY_BOUNDS) + 1),
                total=st.floats(0, 1e12) | st.just(1e-300),
            ),
        ),
    ),
    signalled=st.none() | st.integers(0, 0xFFFF),
    held=st.sets(st.integers(0, 63), max_size=64),
    last=st.none() | st.binary(min_size=4, max_size=64),
    base=_U64,
)  # fmt: skip
def test_progress_is_written_as_json_writes_it(
    engine: Engine, balloon: BalloonState, signalled: int | None, held: set[int],
    last: bytes | None, base: int,
) -> None:  # fmt: skip
    """The progress writer's text is ``json.dumps``'s of the same document, byte for byte,
    whatever the values: every field kind (None, huge ints, floats, hex strings, text keys
    that need escaping, empty and full collections), so a successor's ``json.loads`` reads
    what was there."""
    ring = engine.backend.state.vrings[0].ring
    assert ring is not None
    ring.signalled_used, ring.in_flight = signalled, held
    digest = None if last is None else RequestDigest.of(
        (int(Request.SET_CONFIG)).to_bytes(4, "little") + last
    )  # fmt: skip
    now = 1000.0
    written = encode_progress(engine.backend.state, balloon, digest, base,
                              clock=lambda: now, monotonic_ns=lambda: 5 * 10**12)  # fmt: skip
    stats_time_ns = None if balloon.stats_time is None else max(
        0, 5 * 10**12 - round((now - balloon.stats_time) * 1e9)
    )  # fmt: skip
    assert written == reference_progress(engine.backend.state, balloon, digest, base,
                                         stats_time_ns)  # fmt: skip


def test_progress_refuses_a_total_json_cannot_hold(engine: Engine) -> None:
    """A latency total that is not a finite number (no JSON for it): refused, as ``json``
    refuses it, never written as text a successor cannot read."""
    engine.balloon.state.counters.report_latency.total = math.inf
    with pytest.raises(ValueError):
        encode_progress(engine.backend.state, engine.balloon.state, None, 1)


def test_progress_that_does_not_fit_its_record_is_refused(engine: Engine) -> None:
    """Progress of a connection laid over a record with none, or naming a ring the record
    has not started, or not a progress document at all: refused, never guessed at."""
    progress = encode_progress(engine.backend.state, engine.balloon.state, None, 1)
    idle, _ = encode(dataclasses.replace(small_record(), connection=None))
    with pytest.raises(RecordError, match="no connection"):
        apply_progress(idle, progress)
    data, _ = encode(capture(engine.backend, engine.balloon, "vm0", socket=engine.conn.fileno()))
    document = json.loads(progress)
    document["rings"]["9"] = document["rings"]["0"]
    with pytest.raises(RecordError, match="has not started"):
        apply_progress(data, json.dumps(document).encode())
    assert progress_base(b"{}") is None and progress_base(data) is None
    with pytest.raises(RecordError, match="progress"):
        apply_progress(data, b"[]")

"""The state record: everything a device learned from its frontend and guest, as one
versioned document a successor process can read, with the fds beside it (docs/never-drop.md).

A :class:`DeviceRecord` is plain frozen values whose fd fields hold live fd numbers.
:func:`encode` writes it as JSON plus the list of its fds, in the order of the document's
``fds`` table (each fd's role is the path of its field); :func:`decode` reads it back given
the fds in that order (inherited over execve, sent by SCM_RIGHTS, or gathered by name from
systemd's fd store: :func:`fd_slots` reads the table first). Neither opens, duplicates or
closes an fd. The document's shape is data: each dataclass field carries the spec that
writes and reads it, so writing and reading cannot drift apart.

``version`` is the major version, ``minor`` the minor one. A reader refuses a newer major
version, reads an equal or older minor version strictly, and a newer one ignoring the fields
and fds it does not know (a minor version only adds what an older reader may leave alone).
Anything else it cannot account for raises :class:`RecordError`: refused, never guessed at.

:func:`capture` takes live objects to a record, :func:`restore_state` rebuilds fresh state
objects from one; neither touches guest memory. :mod:`balloond.statefile` keeps records.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from balloond.activation import valid_device_name
from balloond.balloon import (
    LATENCY_BOUNDS,
    Balloon,
    BalloonState,
    Counters,
    Histogram,
    QueueRole,
    queue_roles,
)
from balloond.memory import MAX_MEM_SLOTS
from balloond.protocol import MAX_RINGS, BackendState, VhostUserBackend, Vring
from balloond.schema import (
    BOOL,
    FLOAT,
    HEX,
    SHA256,
    U8,
    U16,
    U32,
    U64,
    Fd,
    Format,
    Int,
    Keys,
    Map,
    Named,
    Opt,
    Rec,
    Seq,
    Str,
    decode_document,
    document_slots,
    dump_part,
    encode_document,
    meta,
)
from balloond.schema import FdSlot as FdSlot
from balloond.schema import RecordError as RecordError
from balloond.virtqueue import MAX_QUEUE_SIZE, RingState
from balloond.wire import VHOST_USER_F_PROTOCOL_FEATURES, MemoryRegion, Request, VringAddr

log = logging.getLogger(__name__)

U64_MAX = (1 << 64) - 1


# --- the record's parts ------------------------------------------------------------------


@dataclass(frozen=True)
class RingRecord:
    """A started ring (:class:`~balloond.virtqueue.RingState`); the heads held, sorted."""

    size: int = field(metadata=meta(Int(MAX_QUEUE_SIZE, 1)))
    desc: int = field(metadata=meta(U64))
    avail: int = field(metadata=meta(U64))
    used: int = field(metadata=meta(U64))
    next_avail: int = field(metadata=meta(U16))
    next_used: int = field(metadata=meta(U16))
    signalled_used: int | None = field(metadata=meta(Opt(U16)))
    in_flight: tuple[int, ...] = field(
        metadata=meta(Seq(Int(MAX_QUEUE_SIZE - 1), MAX_QUEUE_SIZE, unique=True))
    )

    def _validate(self) -> None:
        if any(head >= self.size for head in self.in_flight):
            raise ValueError(f"a head held is not below the ring's size {self.size}")


@dataclass(frozen=True)
class AddrRecord:
    """SET_VRING_ADDR's addresses (frontend virtual; the ring index is the vring's)."""

    flags: int = field(metadata=meta(Int(1)))  # bit 0, VHOST_VRING_F_LOG, is the only one accepted
    desc_user_addr: int = field(metadata=meta(U64))
    used_user_addr: int = field(metadata=meta(U64))
    avail_user_addr: int = field(metadata=meta(U64))
    log_guest_addr: int = field(metadata=meta(U64))


@dataclass(frozen=True)
class VringRecord:
    """One ring's vhost-user state (:class:`~balloond.protocol.Vring`); fds are live."""

    index: int = field(metadata=meta(Int(MAX_RINGS - 1)))
    num: int = field(metadata=meta(Int(MAX_QUEUE_SIZE)))
    base: int = field(metadata=meta(U16))
    addr: AddrRecord | None = field(metadata=meta(Opt(Rec(AddrRecord))))
    kick: int | None = field(metadata=meta(Opt(Fd())))
    call: int | None = field(metadata=meta(Opt(Fd())))
    err: int | None = field(metadata=meta(Opt(Fd())))
    enabled: bool = field(metadata=meta(BOOL))
    broken: str | None = field(metadata=meta(Opt(Str())))
    flushed_used: int = field(metadata=meta(U16))
    ring: RingRecord | None = field(metadata=meta(Opt(Rec(RingRecord))))

    def _validate(self) -> None:
        if self.num & (self.num - 1):
            raise ValueError(f"ring size {self.num} is not a power of two")
        if self.ring is not None and self.ring.size != self.num:
            raise ValueError(f"started with size {self.ring.size}, but its size is {self.num}")


@dataclass(frozen=True)
class BackendRecord:
    """:class:`~balloond.protocol.BackendState`; rings by index."""

    features: int | None = field(metadata=meta(Opt(U64)))
    protocol_features: int = field(metadata=meta(U64))
    owner: bool = field(metadata=meta(BOOL))
    status: int = field(metadata=meta(U8))
    backend_req: int | None = field(metadata=meta(Opt(Fd())))
    vrings: tuple[VringRecord, ...] = field(metadata=meta(Seq(Rec(VringRecord), MAX_RINGS)))

    def _validate(self) -> None:
        indices = [v.index for v in self.vrings]
        if indices != sorted(set(indices)):
            raise ValueError("rings are not in order of their indices, each once")


@dataclass(frozen=True)
class RegionRecord:
    """A region of the memory table (``VhostUserMemoryRegion``) and its fd."""

    guest_phys_addr: int = field(metadata=meta(U64))
    memory_size: int = field(metadata=meta(Int(U64_MAX, 1)))
    userspace_addr: int = field(metadata=meta(U64))
    mmap_offset: int = field(metadata=meta(U64))
    fd: int = field(metadata=meta(Fd()))

    @property
    def spec(self) -> MemoryRegion:
        return MemoryRegion(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    def _validate(self) -> None:
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(self, name) + self.memory_size > 1 << 64:
                raise ValueError(f"{name} + memory_size overflows")


@dataclass(frozen=True)
class HistogramRecord:
    """Bucket bounds are recorded, so counts never land in another version's buckets."""

    bounds: tuple[float, ...] = field(metadata=meta(Seq(FLOAT, 64)))
    counts: tuple[int, ...] = field(metadata=meta(Seq(U64, 65)))
    total: float = field(metadata=meta(FLOAT))

    def _validate(self) -> None:
        if any(lo >= hi for lo, hi in itertools.pairwise(self.bounds)) or 0.0 in self.bounds:
            raise ValueError("bounds are not increasing and positive")
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.counts)} counts for {len(self.bounds)} bounds")


@dataclass(frozen=True)
class CountersRecord:
    """:class:`~balloond.balloon.Counters`."""

    reports: int = field(metadata=meta(U64))
    reported_bytes: int = field(metadata=meta(U64))
    inflated_bytes: int = field(metadata=meta(U64))
    deflated_bytes: int = field(metadata=meta(U64))
    discarded_bytes: int = field(metadata=meta(U64))
    balloon_discarded_bytes: int = field(metadata=meta(U64))
    skipped_bytes: tuple[tuple[str, int], ...] = field(metadata=meta(Map(Str(256), U64)))
    kept_bytes: int = field(metadata=meta(U64))
    discard_errors: int = field(metadata=meta(U64))
    bad_chains: int = field(metadata=meta(U64))
    stats_updates: int = field(metadata=meta(U64))
    report_latency: HistogramRecord = field(metadata=meta(Rec(HistogramRecord)))


@dataclass(frozen=True)
class BalloonRecord:
    """:class:`~balloond.balloon.BalloonState`. ``stats_time_ns`` is CLOCK_MONOTONIC time:
    system-wide, so it holds across execve and restarts, within the boot ``boot_id`` names."""

    ram_size: int = field(metadata=meta(U64))
    num_pages: int = field(metadata=meta(U32))
    actual: int = field(metadata=meta(U32))
    poison_val: int = field(metadata=meta(U32))
    features: int | None = field(metadata=meta(Opt(U64)))
    stats_head: int | None = field(metadata=meta(Opt(Int(MAX_QUEUE_SIZE - 1))))
    stats: tuple[tuple[int, int], ...] = field(metadata=meta(Map(U16, U64)))
    stats_time_ns: int | None = field(metadata=meta(Opt(U64)))
    partial_pages: tuple[tuple[int, int], ...] = field(metadata=meta(Map(U64, HEX)))
    counters: CountersRecord = field(metadata=meta(Rec(CountersRecord)))


@dataclass(frozen=True)
class RequestDigest:
    """The last request whose effect the record holds (its header and payload, hashed):
    met again at the head of the socket after a restart, it was handled already."""

    request: Request = field(metadata=meta(Named(Request)))
    sha256: str = field(metadata=meta(SHA256))

    @classmethod
    def of(cls, message: bytes) -> RequestDigest:
        """The digest of one whole request as read from the socket (header first)."""
        return cls(
            Request(int.from_bytes(message[:4], "little")), hashlib.sha256(message).hexdigest()
        )


@dataclass(frozen=True)
class ConnectionRecord:
    """A connected frontend: its socket, what it set up, and the device's state."""

    socket: int = field(metadata=meta(Fd()))
    backend: BackendRecord = field(metadata=meta(Rec(BackendRecord)))
    memory: tuple[RegionRecord, ...] = field(metadata=meta(Seq(Rec(RegionRecord), MAX_MEM_SLOTS)))
    balloon: BalloonRecord = field(metadata=meta(Rec(BalloonRecord)))
    last_request: RequestDigest | None = field(default=None, metadata=meta(Opt(Rec(RequestDigest))))
    #: A pipe holding a reply not yet wholly sent: (read end, write end).
    reply_pipe: tuple[int, int] | None = field(default=None, metadata=meta(Opt(Seq(Fd(), 2))))

    def _validate(self) -> None:
        if self.reply_pipe is not None and len(self.reply_pipe) != 2:
            raise ValueError("reply_pipe is not a read end and a write end")
        for name in ("guest_phys_addr", "userspace_addr"):
            spans = sorted((getattr(r, name), r.memory_size) for r in self.memory)
            if any(a + size > b for (a, size), (b, _) in itertools.pairwise(spans)):
                raise ValueError(f"memory regions overlap in {name}")
        features = self.backend.features
        if features is not None:
            features &= ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        if self.balloon.features != features:
            raise ValueError(
                f"the balloon's features {self.balloon.features} are not the frontend's "
                f"{self.backend.features} (less bit {VHOST_USER_F_PROTOCOL_FEATURES})"
            )
        head = self.balloon.stats_head
        if head is not None:
            roles = queue_roles(features or 0)
            index = next((i for i, role in roles.items() if role is QueueRole.STATS), None)
            rings = {v.index: v.ring for v in self.backend.vrings}
            ring = rings.get(index) if index is not None else None
            if ring is None or head not in ring.in_flight:
                raise ValueError(f"the stats buffer {head} is not held by the stats ring")


@dataclass(frozen=True)
class DeviceSettings:
    deflate_on_oom: bool = field(default=False, metadata=meta(BOOL))
    discard: bool = field(default=True, metadata=meta(BOOL))
    free_page_reporting: bool = field(default=True, metadata=meta(BOOL))
    socket_path: str | None = field(default=None, metadata=meta(Opt(Str())))
    connect_path: str | None = field(default=None, metadata=meta(Opt(Str())))
    #: The daemon created ``socket_path`` (and removes it with the device); a socket the
    #: service manager passed is the manager's.
    owns_socket: bool = field(default=False, metadata=meta(BOOL))


@dataclass(frozen=True)
class DeviceRecord:
    name: str = field(metadata=meta(Str(64)))
    boot_id: str = field(metadata=meta(Str(64)))
    settings: DeviceSettings = field(metadata=meta(Rec(DeviceSettings)))
    #: The socket QEMU connects to (a listening device's), kept so it never goes away.
    listener: int | None = field(metadata=meta(Opt(Fd())))
    connection: ConnectionRecord | None = field(metadata=meta(Opt(Rec(ConnectionRecord))))
    #: Frontends served so far, and connections dropped by kind of fault.
    connections: int = field(default=0, metadata=meta(U64))
    errors: tuple[tuple[str, int], ...] = field(default=(), metadata=meta(Map(Str(64), U64)))

    def _validate(self) -> None:
        if not valid_device_name(self.name):
            raise ValueError(f"{self.name!r} is not a device name")


@dataclass(frozen=True)
class DaemonRecord:
    """Every device of a daemon: one document and one fd list for a hand-off (execve)."""

    devices: tuple[DeviceRecord, ...] = field(metadata=meta(Seq(Rec(DeviceRecord))))

    def _validate(self) -> None:
        names = [device.name for device in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("a device appears twice")


class Restored(NamedTuple):
    """Fresh live state rebuilt from a record; the fds are the ones passed to decode."""

    backend: BackendState
    regions: list[tuple[MemoryRegion, int]]
    balloon: BalloonState


@functools.cache
def current_boot_id() -> str:
    """This boot's id (read once: it is the same for the life of the process)."""
    with open("/proc/sys/kernel/random/boot_id") as file:
        return file.read().strip()


# --- from live objects, and back -----------------------------------------------------------


def capture(
    backend: VhostUserBackend,
    balloon: Balloon,
    name: str,
    *,
    socket: int,
    settings: DeviceSettings | None = None,
    listener: int | None = None,
    last_request: RequestDigest | None = None,
    reply_pipe: tuple[int, int] | None = None,
    connections: int = 0,
    errors: Mapping[str, int] | None = None,
    monotonic_ns: Callable[[], int] = time.monotonic_ns,
    boot_id: str | None = None,
) -> DeviceRecord:
    """The record of a device whose VM is connected on ``socket``. Call it on the event loop
    thread: jobs out in the discard thread change none of what it reads (their heads are in
    the record as held)."""
    if backend.device is not balloon:
        raise ValueError("capture: the balloon is not the backend's device")
    options = balloon.options
    if settings is None:
        settings = DeviceSettings(
            deflate_on_oom=options.deflate_on_oom, free_page_reporting=options.free_page_reporting
        )
    elif (settings.deflate_on_oom, settings.free_page_reporting) != (
        options.deflate_on_oom,
        options.free_page_reporting,
    ):
        raise ValueError("capture: the settings disagree with the balloon's options")
    connection = capture_connection(
        backend.state,
        backend.memory.snapshot(),
        balloon.state,
        socket,
        clock=balloon.clock,
        monotonic_ns=monotonic_ns,
        last_request=last_request,
        reply_pipe=reply_pipe,
    )
    boot = boot_id if boot_id is not None else current_boot_id()
    counts = tuple(sorted((errors or {}).items()))
    return DeviceRecord(name, boot, settings, listener, connection, connections, counts)


def capture_connection(
    state: BackendState,
    memory: Iterable[tuple[MemoryRegion, int]],
    balloon: BalloonState,
    socket: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    monotonic_ns: Callable[[], int] = time.monotonic_ns,
    last_request: RequestDigest | None = None,
    reply_pipe: tuple[int, int] | None = None,
) -> ConnectionRecord:
    """The record of one connection's plain state; ``clock`` is the balloon's clock."""
    vrings = []
    for index in sorted(state.vrings):
        v = state.vrings[index]
        addr = ring = None
        if v.addr is not None:
            a = v.addr
            addr = AddrRecord(a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr,
                              a.log_guest_addr)  # fmt: skip
        if v.ring is not None:
            ring = _ring_record(v.ring)
        vrings.append(VringRecord(index, v.num, v.base, addr, v.kick_fd, v.call_fd, v.err_fd,
                                  v.enabled, v.broken, v.flushed_used, ring))  # fmt: skip
    backend = BackendRecord(state.features, state.protocol_features, state.owner, state.status,
                            state.backend_req_fd, tuple(vrings))  # fmt: skip
    regions = tuple(RegionRecord(s.guest_phys_addr, s.memory_size, s.userspace_addr,
                                 s.mmap_offset, fd) for s, fd in memory)  # fmt: skip
    record = _balloon_record(balloon, clock, monotonic_ns)
    return ConnectionRecord(socket, backend, regions, record, last_request, reply_pipe)


def _ring_record(r: RingState) -> RingRecord:
    return RingRecord(r.size, r.desc, r.avail, r.used, r.next_avail, r.next_used,
                      r.signalled_used, tuple(sorted(r.in_flight)))  # fmt: skip


def _balloon_record(
    balloon: BalloonState, clock: Callable[[], float], monotonic_ns: Callable[[], int]
) -> BalloonRecord:
    c, h = balloon.counters, balloon.counters.report_latency
    counters = CountersRecord(
        c.reports, c.reported_bytes, c.inflated_bytes, c.deflated_bytes, c.discarded_bytes,
        c.balloon_discarded_bytes, tuple(sorted(c.skipped_bytes.items())), c.kept_bytes,
        c.discard_errors, c.bad_chains, c.stats_updates,
        HistogramRecord(LATENCY_BOUNDS, tuple(h.counts), h.total),
    )  # fmt: skip
    b = balloon
    return BalloonRecord(
        b.ram_size, b.num_pages, b.actual, b.poison_val, b.features, b.stats_head,
        tuple(sorted(b.stats.items())), _stats_time_ns(b, clock, monotonic_ns),
        tuple(sorted(b.partial_pages.items())), counters,
    )  # fmt: skip


def _stats_time_ns(
    balloon: BalloonState, clock: Callable[[], float], monotonic_ns: Callable[[], int]
) -> int | None:
    """When the statistics came, in CLOCK_MONOTONIC nanoseconds (``clock`` is the
    balloon's)."""
    if balloon.stats_time is None:
        return None
    age_ns = round((clock() - balloon.stats_time) * 1e9)
    return max(0, monotonic_ns() - age_ns)


def restore_state(
    record: DeviceRecord,
    *,
    clock: Callable[[], float] = time.monotonic,
    monotonic_ns: Callable[[], int] = time.monotonic_ns,
    boot_id: str | None = None,
) -> Restored:
    """Fresh state objects from a connected device's record. Touches no fd and no guest
    memory: mapping the regions and rebuilding the queues is the caller's. ``clock`` is the
    clock the new :class:`~balloond.balloon.Balloon` will use."""
    connection = record.connection
    if connection is None:
        raise RecordError(f"state record of {record.name}: no frontend was connected")
    current = boot_id if boot_id is not None else current_boot_id()
    if record.boot_id != current:
        raise RecordError(
            f"state record of {record.name}: written in boot {record.boot_id}, this is boot "
            f"{current}: its fds and times belong to another boot"
        )
    b = connection.backend
    state = BackendState(b.features, b.protocol_features, b.owner, b.status, b.backend_req)
    for v in b.vrings:
        addr = ring = None
        if v.addr is not None:
            a = v.addr
            addr = VringAddr(v.index, a.flags, a.desc_user_addr, a.used_user_addr,
                             a.avail_user_addr, a.log_guest_addr)  # fmt: skip
        if v.ring is not None:
            r = v.ring
            ring = RingState(r.size, r.desc, r.avail, r.used, r.next_avail, r.next_used,
                             r.signalled_used, set(r.in_flight))  # fmt: skip
        state.vrings[v.index] = Vring(v.index, v.num, v.base, addr, v.kick, v.call, v.err,
                                      v.enabled, ring, v.broken, v.flushed_used)  # fmt: skip
    regions = [(region.spec, region.fd) for region in connection.memory]
    balloon = _balloon_state(record.name, connection.balloon, clock, monotonic_ns)
    return Restored(state, regions, balloon)


def _balloon_state(
    name: str, b: BalloonRecord, clock: Callable[[], float], monotonic_ns: Callable[[], int]
) -> BalloonState:
    stats_time = None
    if b.stats_time_ns is not None:
        age_ns = monotonic_ns() - b.stats_time_ns
        if age_ns < 0:
            raise RecordError(f"state record of {name}: its statistics time lies in the future")
        stats_time = clock() - age_ns / 1e9
    c, h = b.counters, b.counters.report_latency
    latency = Histogram()
    if h.bounds == LATENCY_BOUNDS:
        latency = Histogram(list(h.counts), h.total)
    else:  # a metric, not the device: start it over rather than refuse the VM
        log.warning("the report latency histogram of %s starts over: its buckets changed", name)
    counters = Counters(
        c.reports, c.reported_bytes, c.inflated_bytes, c.deflated_bytes, c.discarded_bytes,
        c.balloon_discarded_bytes, dict(c.skipped_bytes), c.kept_bytes, c.discard_errors,
        c.bad_chains, c.stats_updates, latency,
    )  # fmt: skip
    return BalloonState(
        b.ram_size, b.num_pages, b.actual, b.poison_val, b.features, b.stats_head,
        dict(b.stats), stats_time, dict(b.partial_pages), counters,
    )  # fmt: skip


# --- encoding and decoding --------------------------------------------------------------------

#: The documents this balloond writes, and the versions it reads (see balloond.schema).
DEVICE = Format("balloond-device", version=1, minor=0)
DAEMON = Format("balloond-daemon", version=1, minor=0)


def encode(
    record: DeviceRecord | DaemonRecord, *, keys: Keys | None = None
) -> tuple[bytes, list[int]]:
    """The record as JSON, and its fds in the order its ``fds`` table names them.

    ``keys`` names every fd (by number, or by number and role) for a keeper that holds fds
    by name (systemd's ``FDNAME=``); the names go into the table, where :func:`fd_slots`
    finds them.
    """
    return encode_document(record, DEVICE if isinstance(record, DeviceRecord) else DAEMON, keys)


def decode(data: bytes, fds: Sequence[int]) -> DeviceRecord:
    """Read a device record whose fds are ``fds``, in the order of its table. RecordError
    for a record this version cannot read, or one that does not fit ``fds``."""
    record: DeviceRecord = decode_document(data, fds, DeviceRecord, DEVICE)
    return record


def decode_daemon(data: bytes, fds: Sequence[int]) -> DaemonRecord:
    """Read a daemon's record (:class:`DaemonRecord`); RecordError as :func:`decode`."""
    record: DaemonRecord = decode_document(data, fds, DaemonRecord, DAEMON)
    return record


def fd_slots(data: bytes) -> tuple[FdSlot, ...]:
    """A record's fd table: gather its fds (by key) with it, then :func:`decode`."""
    return document_slots(data, (DEVICE, DAEMON))


# --- progress: what changes on the data path, committed cheaply between records -----------

#: A progress document: the parts of a connected device's record that serving the guest
#: changes (each started ring's cursors and held heads, the balloon's state and counters, the
#: last request), for the record whose sequence number it names (``base``).
PROGRESS = Format("balloond-progress", version=1, minor=0)


def encode_progress(
    state: BackendState,
    balloon: BalloonState,
    last_request: RequestDigest | None,
    base: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    monotonic_ns: Callable[[], int] = time.monotonic_ns,
) -> bytes:
    """The progress document of a connection since the record ``base``: a few hundred
    bytes, written in a tenth of a record's time. None of what it holds is an fd."""
    # This is on the data path (one commit per report and two per inflate or deflate
    # buffer with the state kept), so the document is written straight from the live state
    # as text: the same bytes as ``json.dumps`` of the nested dicts it stands for, which
    # tests/test_record.py keeps as the reference, in about half the time. Every value is
    # an int, None, a float or a string ``json`` is asked to write.
    rings = []
    for index, v in state.vrings.items():
        r = v.ring
        if r is not None:
            held = ",".join(map(str, sorted(r.in_flight)))
            rings.append(
                f'"{index}":[{v.flushed_used},{{"size":{r.size},"desc":{r.desc},'
                f'"avail":{r.avail},"used":{r.used},"next_avail":{r.next_avail},'
                f'"next_used":{r.next_used},"signalled_used":{_json_int(r.signalled_used)},'
                f'"in_flight":[{held}]}}]'
            )
    b, c = balloon, balloon.counters
    h = c.report_latency
    stats = ",".join(f"[{k},{v}]" for k, v in sorted(b.stats.items()))
    partial = ",".join(f'[{k},"{v:x}"]' for k, v in sorted(b.partial_pages.items()))
    skipped = ",".join(f"[{_json(k)},{v}]" for k, v in sorted(c.skipped_bytes.items()))
    last = "null" if last_request is None else _json(dump_part(last_request))
    return (
        f'{_PROGRESS_HEAD}{base},"rings":{{{",".join(rings)}}},"balloon":{{'
        f'"ram_size":{b.ram_size},"num_pages":{b.num_pages},"actual":{b.actual},'
        f'"poison_val":{b.poison_val},"features":{_json_int(b.features)},'
        f'"stats_head":{_json_int(b.stats_head)},"stats":[{stats}],'
        f'"stats_time_ns":{_json_int(_stats_time_ns(b, clock, monotonic_ns))},'
        f'"partial_pages":[{partial}],"counters":{{'
        f'"reports":{c.reports},"reported_bytes":{c.reported_bytes},'
        f'"inflated_bytes":{c.inflated_bytes},"deflated_bytes":{c.deflated_bytes},'
        f'"discarded_bytes":{c.discarded_bytes},'
        f'"balloon_discarded_bytes":{c.balloon_discarded_bytes},"skipped_bytes":[{skipped}],'
        f'"kept_bytes":{c.kept_bytes},"discard_errors":{c.discard_errors},'
        f'"bad_chains":{c.bad_chains},"stats_updates":{c.stats_updates},'
        f'"report_latency":{{"bounds":{_BOUNDS_JSON},'
        f'"counts":[{",".join(map(str, h.counts))}],"total":{_json(h.total)}}}}}}},'
        f'"last_request":{last}}}'
    ).encode()


_PROGRESS_HEAD = (
    f'{{"format":"{PROGRESS.name}","version":{PROGRESS.version},"minor":{PROGRESS.minor},"base":'
)


def _json(value: object) -> str:
    """``value`` as the document's JSON writes it (a NaN or an infinity refused)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


_BOUNDS_JSON = _json(list(LATENCY_BOUNDS))


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


def progress_base(progress: bytes) -> int | None:
    """The record a progress document goes with; None if it is not one this version reads
    (then it is left out, loudly: see :func:`apply_progress`)."""
    try:
        document = json.loads(progress)
        if (document["format"], document["version"]) != (PROGRESS.name, PROGRESS.version):
            return None
        base = document["base"]
        return base if type(base) is int else None
    except (ValueError, KeyError, TypeError):
        return None


def apply_progress(data: bytes, progress: bytes) -> bytes:
    """The device record ``data`` with a later progress document of it laid over: the same
    document as a record committed at the progress's instant, read (and checked) by
    :func:`decode` like any other."""
    try:
        document = json.loads(data)
        later = json.loads(progress)
        connection = document["connection"]
        if connection is None:
            raise RecordError("progress for a device with no connection in its record")
        rings = later["rings"]
        for vring in connection["backend"]["vrings"]:
            index = str(vring["index"])
            if index in rings:
                vring["flushed_used"], vring["ring"] = rings.pop(index)
        if rings:
            raise RecordError(f"progress of rings {sorted(rings)} the record has not started")
        connection["balloon"] = later["balloon"]
        connection["last_request"] = later["last_request"]
    except (ValueError, KeyError, TypeError) as error:
        raise RecordError(f"progress: not one of this record ({error!r})") from None
    return json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()

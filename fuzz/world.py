"""A frontend, a guest driver and the server's duties around one real VhostUserBackend.

:class:`World` plays everything around a real ``VhostUserBackend(Balloon())``: QEMU's
requests (valid ones, wrong ones, wrong fds), a guest driver writing split rings into real
memfd guest RAM (well-formed reports, inflates, deflates and statistics, and garbage), and
what ``server.Connection`` does (kicks become ``kicked``, jobs come back through
``complete``, a request other than GET_CONFIG/SET_CONFIG is handled only after
``quiesce`` and the jobs out are back, a ``FrontendError`` ends the connection). Discard
jobs are not run: the world records the ranges the engine asks to discard and checks them.

Invariants, checked after every step (a breach raises ``AssertionError``):

- no exception but ``FrontendError`` out of ``handle``; none at all out of ``kicked``,
  ``complete``, ``signals`` and ``request_stats``;
- every range a job asks to discard is well-formed (``DiscardRange.check``), lies inside
  one region of the memory table the frontend declared and inside its file, and each of
  its bytes lies in what the chain named: a device-writable buffer of a free page report,
  or a 4 KiB frame listed by an inflate; only the inflate and reporting queues discard,
  and reports never while the guest poisons free pages;
- every chain the device returns was made available and not yet returned (the used ring
  holds nothing twice and nothing the driver did not offer), and when a ring stops
  (GET_VRING_BASE answers index ``b``) exactly the chains made available before ``b``
  have come back, unless the ring was given up (error eventfd signalled, ``broken`` set);
  after the world's final drain, an active ring has nothing left unpopped;
- memory per ring is bounded: jobs out for a ring <= its size, chains held <= its size,
  no chain in two jobs;
- fds: after every step the process holds exactly the fds it held before the backend
  existed, plus the fds the backend's state names (kick/call/err, backend channel, one per
  memory region and one for its mapping); when a connection ends, after
  ``backend.close()``, exactly the ones before.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator

from balloond import wire
from balloond.balloon import Balloon
from balloond.device import DiscardJob
from balloond.discard import DiscardFailure, DiscardResult
from balloond.errors import FrontendError, OperatorError
from balloond.protocol import SUPPORTED_PROTOCOL_FEATURES, VhostUserBackend
from balloond.wire import Request
from fuzz.guest import (
    EXTRA_SIZE,
    HIGH_GPA,
    HIGH_SIZE,
    LOW_SIZE,
    PAGE,
    RINGS,
    U16,
    UADDR_BASE,
    USED_ELEM,
    GuestDriver,
    GuestRing,
    Memfd,
    Session,
    Violation,
    open_fds,
    require,
    roles,
)
from fuzz.oracle import DiscardOracle

VERSION_1, STATS_VQ, PAGE_POISON, REPORTING = 32, 1, 4, 5
INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES = 28, 29, 30
REPLY_ACK = 1 << wire.ProtocolFeature.REPLY_ACK
HAS_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)
CONFIG_REQUESTS = frozenset({Request.GET_CONFIG, Request.SET_CONFIG})
FD_KINDS = (
    "eventfd", "semaphore", "pipe", "socket", "dgram", "devnull", "low", "high", "extra",
)  # fmt: skip


_after_failure = False


class World(GuestDriver, DiscardOracle):
    """One simulated VM (frontend and guest) around a real backend; see the module doc."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda line: None)
        global _after_failure
        if _after_failure:  # mappings of a world that failed may wait in reference cycles
            gc.collect()
            _after_failure = False
        self._fds_before = open_fds()
        self.mem = {
            "low": Memfd("low", LOW_SIZE),
            "high": Memfd("high", HIGH_SIZE),
            "extra": Memfd("extra", EXTRA_SIZE),
        }
        self.ring_fds = [
            tuple(os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)) for _ in range(RINGS)
        ]
        self.templates: dict[str, int] = {
            "eventfd": os.eventfd(0, os.EFD_NONBLOCK),
            "semaphore": os.eventfd(0, os.EFD_NONBLOCK | os.EFD_SEMAPHORE),
            "devnull": os.open(os.devnull, os.O_RDWR),
        }
        self._pipe = os.pipe()
        self.templates["pipe"] = self._pipe[0]
        self._sockets = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.templates["socket"] = self._sockets[1].fileno()
        self._dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.templates["dgram"] = self._dgram.fileno()
        for name in ("low", "high", "extra"):
            self.templates[name] = self.mem[name].fd
        self.rings = [GuestRing(self, i) for i in range(RINGS)]
        #: Open fds with no backend alive: what every connection must give back.
        self.baseline = open_fds()
        self.connections = 0
        self.discarded: list[tuple[int, int]] = []  # (gpa, length) the engine asked for
        self.steps = 0
        self._new_connection()

    # --- the world's own memory and fds ------------------------------------------------

    def _truth(self, gpa: int, length: int) -> tuple[Memfd, int] | None:
        for name, start, size in (("low", 0, LOW_SIZE), ("high", HIGH_GPA, HIGH_SIZE)):
            if start <= gpa and gpa + length <= start + size:
                return self.mem[name], gpa - start
        return None

    def guest_write(self, gpa: int, data: bytes) -> None:
        found = self._truth(gpa, len(data))
        assert found is not None, f"the driver writes outside its RAM at {gpa:#x}"
        memfd, offset = found
        memfd.map[offset : offset + len(data)] = data

    def guest_read(self, gpa: int, length: int) -> bytes:
        found = self._truth(gpa, length)
        assert found is not None
        memfd, offset = found
        return memfd.map[offset : offset + length]

    def declared_read(self, gpa: int, length: int) -> bytes | None:
        """Read guest memory as the backend sees it: through the declared memory table."""
        for spec, name in self.declared:
            start = spec.guest_phys_addr
            if start <= gpa and gpa + length <= start + spec.memory_size:
                memfd = self.mem[name]
                offset = spec.mmap_offset + gpa - start
                if offset + length > memfd.size:
                    return None
                return memfd.map[offset : offset + length]
        return None

    def _dup(self, kind: str, ring: int = 0) -> int:
        if kind in ("kick", "call", "err"):
            return os.dup(self.ring_fds[ring % RINGS][("kick", "call", "err").index(kind)])
        return os.dup(self.templates[kind])

    def close(self) -> None:
        """End the connection, then release the world; checks that no fd is left behind."""
        self._end_connection("the world closes")
        self._release()
        leaked = open_fds() - self._fds_before
        require(not leaked, f"fds left open after the world closed: {sorted(leaked)}")

    def abandon(self) -> None:
        """Release everything after a failure, checking nothing."""
        global _after_failure
        _after_failure = True
        with contextlib.suppress(Exception):
            self.backend.close()
        with contextlib.suppress(Exception):
            self._release()

    def _release(self) -> None:
        closers: list[Callable[[], None]] = [m.close for m in self.mem.values()]
        closers += [lambda fd=fd: os.close(fd) for fds in self.ring_fds for fd in fds]
        closers += [lambda fd=self.templates[n]: os.close(fd) for n in ("eventfd", "semaphore")]
        closers += [lambda: os.close(self.templates["devnull"])]
        closers += [lambda fd=fd: os.close(fd) for fd in self._pipe]
        closers += [self._sockets[0].close, self._sockets[1].close, self._dgram.close]
        for close in closers:
            with contextlib.suppress(OSError, ValueError, BufferError):
                close()

    # --- connections --------------------------------------------------------------------

    def _new_connection(self) -> None:
        self.connections += 1
        self.backend = VhostUserBackend(Balloon(clock=lambda: float(self.steps)))
        self.jobs: list[tuple[DiscardJob, dict[str, object]]] = []
        self.more: set[int] = set()
        self.quiescent = False
        self.features: int | None = None
        self.protocol_features = 0
        self.declared: list[tuple[wire.MemoryRegion, str]] = []
        self.memory_coherent = True
        self.config = {"num_pages": 0, "actual": 0, "poison": 0}
        for ring in self.rings:
            ring.reset(ring.size)

    def _end_connection(self, why: str) -> None:
        """What the server does when a connection ends: jobs out are dropped (the worker is
        cancelled), the backend closes everything it holds."""
        self.log(f"# connection ends: {why}")
        try:
            self.backend.close()
        except Exception as error:
            raise Violation(f"close() raised {type(error).__name__}: {error}") from error
        left = open_fds() - self.baseline
        lost = self.baseline - open_fds()
        require(not left, f"fds still open after backend.close(): {sorted(left)}")
        require(not lost, f"fds of the world closed by the backend: {sorted(lost)}")

    def reconnect(self) -> None:
        """The frontend goes away; a new one connects (a new device, as the server does)."""
        self._end_connection("the frontend closed the connection")
        self._new_connection()

    # --- requests -----------------------------------------------------------------------

    def request(
        self,
        request: Request | int,
        payload: wire.Payload = None,
        fds: tuple[str, ...] = (),
        *,
        ring: int = 0,
        need_reply: bool = False,
        body: bytes | None = None,
        flags: int | None = None,
    ) -> bytes | None:
        """Send one request as QEMU would, the server's way; returns the reply.

        ``fds`` are kinds of fd (dups are sent); ``body``/``flags`` override the encoding.
        A FrontendError (from decoding or handling) ends the connection and starts a new one.
        """
        if body is None:
            body = wire.encode_payload(payload)
        if flags is None:
            flags = wire.HeaderFlags.VERSION | (wire.HeaderFlags.NEED_REPLY if need_reply else 0)
        sent = tuple(self._dup(kind, ring) for kind in fds)
        try:
            header = wire.decode_header(wire.encode_header(int(request), flags, len(body)))
            message = wire.decode_message(header, body, sent)
        except FrontendError as error:
            for fd in sent:  # the server closes what it received
                os.close(fd)
            self._end_connection(f"decoding: {error}")
            self._new_connection()
            return None
        if message.request not in CONFIG_REQUESTS:
            self.backend.quiesce()
            self.quiescent = True
            self.complete_all()  # the server waits for every job out, in order
        try:
            outcome = self.backend.handle(message)
        except FrontendError as error:
            self._end_connection(f"{message.request.name}: {error}")
            self._new_connection()
            return None
        except Exception as error:
            raise Violation(
                f"{message.request.name} raised {type(error).__name__}: {error}"
            ) from error
        if message.request not in CONFIG_REQUESTS:
            self.quiescent = False
        self._observe()
        self._after(message, outcome.reply)
        for index in outcome.activated:
            self._kicked(index)
        self._check()
        return outcome.reply

    def _after(self, message: wire.Message, reply: bytes | None) -> None:
        """Check the reply; follow what the request did to the driver's world."""
        request, payload = message.request, message.payload
        if reply is not None:
            header = wire.decode_header(reply[: wire.HEADER_SIZE], reply=True)
            require(header.request == request, f"reply to {header.request} for {request.name}")
            require(header.size == len(reply) - wire.HEADER_SIZE, "reply size")
        if request is Request.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, int)
            self.protocol_features = payload  # REPLY_ACK applies to this very request
        if request in HAS_REPLY:
            require(reply is not None, f"{request.name} not answered")
        else:
            acked = message.need_reply and bool(self.protocol_features & REPLY_ACK)
            require(
                (reply is not None) == acked,
                f"{request.name}: reply {reply!r} with need_reply={message.need_reply}",
            )
        if request is Request.SET_FEATURES:
            assert isinstance(payload, int)
            self.features = payload
        elif request in (Request.RESET_DEVICE, Request.RESET_OWNER):
            self.features = None
            for ring in self.rings:  # the driver starts over
                ring.reset(ring.size)
        elif request is Request.SET_MEM_TABLE:
            assert isinstance(payload, wire.MemoryTable)
            pairs = zip(payload.regions, message.fds, strict=True)
            self.declared = [(spec, self._fd_name(fd)) for spec, fd in pairs]
            self._memory_changed()
        elif request is Request.ADD_MEM_REG:
            assert isinstance(payload, wire.MemoryRegion)
            self.declared.append((payload, self._fd_name(message.fds[0])))
            self._memory_changed()
        elif request is Request.REM_MEM_REG:
            assert isinstance(payload, wire.MemoryRegion)
            key = (payload.guest_phys_addr, payload.memory_size)
            for entry in self.declared:
                if (entry[0].guest_phys_addr, entry[0].memory_size) == key:
                    self.declared.remove(entry)
                    break
            self._memory_changed()
        elif request is Request.GET_CONFIG:
            assert isinstance(payload, wire.ConfigSpace) and reply is not None
            expected = self._config_bytes()[payload.offset : payload.offset + payload.size]
            expected += bytes(payload.size - len(expected))
            want = wire.encode_config(wire.ConfigSpace(payload.offset, payload.size, 0, expected))
            require(reply[wire.HEADER_SIZE :] == want, f"GET_CONFIG answered {reply!r}")
        elif request is Request.SET_CONFIG:
            assert isinstance(payload, wire.ConfigSpace)
            current = bytearray(self._config_bytes())
            end = min(16, payload.offset + len(payload.data))
            if payload.offset < end:
                current[payload.offset : end] = payload.data[: end - payload.offset]
                _, self.config["actual"], _, self.config["poison"] = struct.unpack("<IIII", current)
        elif request is Request.GET_VRING_BASE:
            assert isinstance(payload, wire.VringState) and reply is not None
            index, base = struct.unpack("=II", reply[wire.HEADER_SIZE :])
            require(index == payload.index, "GET_VRING_BASE answered for another ring")
            if index < RINGS:
                self._ring_stopped(self.rings[index], base)
        self._sessions()

    def _fd_name(self, fd: int) -> str:
        """Which of the world's memfds a region fd is (by inode), or "other"."""
        with contextlib.suppress(OSError):
            ino = os.fstat(fd).st_ino
            for name, memfd in self.mem.items():
                if memfd.ino == ino:
                    return name
        return "other"

    def _config_bytes(self) -> bytes:
        c = self.config
        return struct.pack("<IIII", c["num_pages"], c["actual"], 0, c["poison"])

    @property
    def poisoning(self) -> bool:
        return bool((self.features or 0) & (1 << PAGE_POISON)) and self.config["poison"] != 0

    def _memory_changed(self) -> None:
        """A table is coherent when it maps every guest address it names to the bytes the
        driver put there, at the frontend addresses QEMU would use."""
        truth = {
            "low": (0, LOW_SIZE),
            "high": (HIGH_GPA, HIGH_SIZE),
        }
        coherent = True
        for spec, name in self.declared:
            if name not in truth:
                coherent = False
                continue
            start, size = truth[name]
            gpa, length = spec.guest_phys_addr, spec.memory_size
            coherent &= (
                spec.mmap_offset == gpa - start
                and start <= gpa
                and gpa + length <= start + size
                and spec.userspace_addr == UADDR_BASE + gpa
            )
        self.memory_coherent = coherent
        for ring in self.rings:
            if ring.session is not None and not coherent:
                ring.session.coherent = False

    def _sessions(self) -> None:
        """A ring the backend started begins a session of the driver's ring."""
        for ring in self.rings:
            vring = self.backend.state.vrings.get(ring.index)
            started = vring is not None and vring.ring is not None
            if started and ring.session is None:
                assert vring is not None and vring.ring is not None
                coherent = (
                    self.memory_coherent
                    and ring.size > 0
                    and vring.num == ring.size
                    and vring.addr is not None
                    and (vring.addr.desc_user_addr, vring.addr.avail_user_addr,
                         vring.addr.used_user_addr)
                    == (UADDR_BASE + ring.desc, UADDR_BASE + ring.avail, UADDR_BASE + ring.used)
                    and vring.base == ring.pos_base
                    and vring.ring.next_used == ring.used_seen
                )  # fmt: skip
                ring.session = Session(vring.base, coherent)
            elif not started and ring.session is not None:
                # Stopped without a GET_VRING_BASE answer to check (a reset): start over.
                ring.reset(ring.size)

    def _ring_stopped(self, ring: GuestRing, base: int) -> None:
        """GET_VRING_BASE answered ``base``: exactly the chains before it came back."""
        session = ring.session
        if session is None:
            return
        ring.session = None
        if session.coherent and not session.given_up:
            popped = (base - session.start) & 0xFFFF
            require(
                popped <= len(ring.entries),
                f"ring {ring.index} stopped at {base}, past the {len(ring.entries)} chains "
                f"made available since {session.start}",
            )
            expected = Counter(ring.entries[:popped])
            require(
                expected == session.returned,
                f"ring {ring.index} stopped at {base}: chains {sorted(expected.elements())} "
                f"were popped, {sorted(session.returned.elements())} came back",
            )
            ring.entries = ring.entries[popped:]
            ring.pos_base = base
            if session.hostile:
                ring.reset(ring.size)  # the driver starts over on a clean ring
        else:
            ring.reset(ring.size)  # the driver's view is lost: it starts the ring over

    # --- the frontend's requests, by name ---------------------------------------------------

    def negotiate(self, features: int, protocol_features: int, backend_channel: bool) -> None:
        """QEMU's preamble and DRIVER_OK: protocol features, owner, features, memory."""
        self.request(Request.GET_FEATURES)
        self.request(Request.GET_PROTOCOL_FEATURES)
        self.request(Request.SET_PROTOCOL_FEATURES, protocol_features)
        self.request(Request.GET_QUEUE_NUM)
        self.request(Request.SET_OWNER)
        if backend_channel:
            self.request(Request.SET_BACKEND_REQ_FD, None, ("socket",))
        self.request(Request.SET_FEATURES, features)
        self.set_mem_table("truth")

    def set_mem_table(self, layout: str, regions: tuple[tuple[int, int, int, int, str], ...] = ()):
        """A coherent layout by name ("truth", "low", "split"), or ``regions`` as given
        (``(gpa, size, uaddr, mmap_offset, fd kind)``)."""
        if layout == "truth":
            regions = (
                (0, LOW_SIZE, UADDR_BASE, 0, "low"),
                (HIGH_GPA, HIGH_SIZE, UADDR_BASE + HIGH_GPA, 0, "high"),
            )
        elif layout == "low":
            regions = ((0, LOW_SIZE, UADDR_BASE, 0, "low"),)
        elif layout == "split":
            half = LOW_SIZE // 2
            regions = (
                (0, half, UADDR_BASE, 0, "low"),
                (half, half, UADDR_BASE + half, half, "low"),
                (HIGH_GPA, HIGH_SIZE, UADDR_BASE + HIGH_GPA, 0, "high"),
            )
        table = wire.MemoryTable(tuple(wire.MemoryRegion(*r[:4]) for r in regions))
        self.request(Request.SET_MEM_TABLE, table, tuple(r[4] for r in regions))

    def start_ring(self, index: int, size: int, *, enable: bool = True) -> None:
        """QEMU starting a ring: num, base, addresses, kick, call, err, enable."""
        ring = self.rings[index]
        vring = self.backend.state.vrings.get(index)
        if vring is not None and vring.ring is not None:
            self.stop_ring(index)
        if ring.size != size or ring.session is not None:
            ring.reset(size)
        self.request(Request.SET_VRING_NUM, wire.VringState(index, size))
        self.request(Request.SET_VRING_BASE, wire.VringState(index, ring.pos_base))
        self.request(Request.SET_VRING_ADDR, ring.uaddr())
        self.request(Request.SET_VRING_KICK, wire.VringFile(index, False), ("kick",), ring=index)
        self.request(Request.SET_VRING_CALL, wire.VringFile(index, False), ("call",), ring=index)
        self.request(Request.SET_VRING_ERR, wire.VringFile(index, False), ("err",), ring=index)
        if enable:
            self.request(Request.SET_VRING_ENABLE, wire.VringState(index, 1))

    def poison(self, value: int) -> None:
        """The driver writes ``poison_val`` into the config space (SET_CONFIG at 12)."""
        data = struct.pack("<I", value)
        self.request(Request.SET_CONFIG, wire.ConfigSpace(12, len(data), 0, data))

    def stop_ring(self, index: int) -> None:
        """A VM pause: disable, then GET_VRING_BASE."""
        self.request(Request.SET_VRING_ENABLE, wire.VringState(index, 0))
        self.request(Request.GET_VRING_BASE, wire.VringState(index, 0))

    def boot(self, features: int, sizes: dict[int, int] | None = None) -> None:
        """Negotiate and start every ring the features give a role (QEMU's start, Linux's
        probe)."""
        self.negotiate(features, SUPPORTED_PROTOCOL_FEATURES, backend_channel=True)
        for index in roles(features & ~(1 << PROTOCOL_FEATURES)):
            self.start_ring(index, (sizes or {}).get(index, 16), enable=False)
        for index in roles(features & ~(1 << PROTOCOL_FEATURES)):
            self.request(Request.SET_VRING_ENABLE, wire.VringState(index, 1))

    # --- the server's duties ---------------------------------------------------------------

    def kick(self, index: int) -> None:
        """The guest kicked ring ``index`` (the server read its kick eventfd)."""
        self._kicked(index)
        self._check()

    def turn(self) -> None:
        """Rings whose turn ran out of budget get another (the loop's ``call_soon``)."""
        for index in sorted(self.more):
            self._kicked(index)
        self._check()

    def _kicked(self, index: int) -> None:
        self.more.discard(index)
        try:
            processed = self.backend.kicked(index)
        except Exception as error:
            raise Violation(f"kicked({index}) raised {type(error).__name__}: {error}") from error
        self._observe()
        for job in processed.jobs:
            self.jobs.append((job, self._allowed(job)))
        if processed.more:
            self.more.add(index)
        self._signal()

    def quiesce(self) -> None:
        self.backend.quiesce()
        self.quiescent = True

    def complete(self, which: int, fail: bool = False) -> None:
        """Job number ``which`` (of those out) is done; ``fail``: the kernel refused it."""
        if not self.jobs:
            return
        job, allowed = self.jobs.pop(which % len(self.jobs))
        self._complete(job, allowed, fail)
        self._check()

    def complete_all(self) -> None:
        while self.jobs:
            job, allowed = self.jobs.pop(0)
            self._complete(job, allowed, False)

    def _complete(self, job: DiscardJob, allowed: dict[str, object], fail: bool) -> None:
        result = self.discard(job, allowed)
        if fail and job.ranges:
            result = DiscardResult(
                result.requested_bytes,
                result.discarded_bytes - job.ranges[0].length,
                result.discarded_ranges - 1,
                (DiscardFailure(job.ranges[0], errno.EIO),),
            )
        try:
            self.backend.complete(job, result)
        except Exception as error:
            raise Violation(f"complete() raised {type(error).__name__}: {error}") from error
        self._observe()
        self._signal()

    def request_stats(self) -> None:
        """An operator asks for fresh statistics (the held buffer goes back)."""
        device = self.backend.device
        assert isinstance(device, Balloon)
        try:
            device.request_stats()
        except Exception as error:
            raise Violation(f"request_stats raised {type(error).__name__}: {error}") from error
        self._observe()
        self._signal()
        self._check()

    def set_target(self, pages: int) -> None:
        """An operator asks the guest to give up ``pages`` 4 KiB pages."""
        device = self.backend.device
        assert isinstance(device, Balloon)
        ram = sum(spec.memory_size for spec, _ in self.declared)
        try:
            device.set_target(ram - pages * PAGE, self.backend.memory.size)
        except OperatorError:
            return
        self.config["num_pages"] = pages
        self._check()

    def _signal(self) -> None:
        try:
            fds = self.backend.signals()
        except Exception as error:
            raise Violation(f"signals() raised {type(error).__name__}: {error}") from error
        calls = {v.call_fd for v in self.backend.state.vrings.values()}
        for fd in fds:
            require(fd in calls, f"signals() names fd {fd}, not a call fd")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)
        self._observe()

    # --- watching the rings --------------------------------------------------------------------

    def _observe(self) -> None:
        """The driver reads its used rings and error eventfds."""
        for ring in self.rings:
            session = ring.session
            if session is None:
                continue
            vring = self.backend.state.vrings.get(ring.index)
            if vring is not None and vring.broken is not None:
                session.given_up = True
            with contextlib.suppress(BlockingIOError):
                if os.eventfd_read(self.ring_fds[ring.index][2]):
                    session.given_up = True
            if not session.coherent:
                continue
            (used_idx,) = U16.unpack(self.guest_read(ring.used + 2, 2))
            new = (used_idx - ring.used_seen) & 0xFFFF
            if new > ring.size:
                require(
                    session.hostile,
                    f"ring {ring.index}: the used index moved by {new}, more than the ring "
                    f"holds, while the driver followed the rules",
                )
                session.coherent = False
                continue
            for k in range(new):
                slot = ring.used + 4 + USED_ELEM.size * ((ring.used_seen + k) % ring.size)
                head, length = USED_ELEM.unpack(self.guest_read(slot, USED_ELEM.size))
                require(
                    ring.outstanding[head] > 0,
                    f"ring {ring.index}: chain {head} returned, but it was not made available "
                    f"(or came back already)",
                )
                require(length == 0, f"ring {ring.index}: chain {head} used length {length}")
                ring.outstanding[head] -= 1
                chain = ring.chains[head].popleft()
                if chain.kind != "garbage" and not session.hostile:
                    ring.free.extend(chain.slots)
                session.returned[head] += 1
            ring.used_seen = used_idx

    def _check(self) -> None:
        self.steps += 1
        backend = self.backend
        require(
            backend.jobs_out == len(self.jobs),
            f"backend counts {backend.jobs_out} jobs out, {len(self.jobs)} were handed out",
        )
        per_queue = Counter(job.queue for job, _ in self.jobs)
        heads = Counter((job.queue, job.head) for job, _ in self.jobs)
        require(max(heads.values(), default=0) <= 1, f"a chain in two jobs: {heads}")
        for index, vring in backend.state.vrings.items():
            if vring.ring is None:
                require(per_queue[index] == 0 or vring.broken is not None,
                        f"jobs out for stopped ring {index}")  # fmt: skip
                continue
            size = vring.ring.size
            require(per_queue[index] <= size, f"ring {index}: {per_queue[index]} jobs > {size}")
            require(
                len(vring.ring.in_flight) <= size,
                f"ring {index} holds {len(vring.ring.in_flight)} chains, size {size}",
            )
        owned = [
            fd
            for vring in backend.state.vrings.values()
            for fd in (vring.kick_fd, vring.call_fd, vring.err_fd)
            if fd is not None
        ]
        if backend.state.backend_req_fd is not None:
            owned.append(backend.state.backend_req_fd)
        owned += [region.fd for region in backend.memory]
        require(len(set(owned)) == len(owned), f"one fd held twice: {sorted(owned)}")
        now = open_fds()
        require(set(owned) <= now, f"the backend holds closed fds: {set(owned) - now}")
        expected = len(self.baseline) + len(owned) + len(backend.memory)  # + mmap's own dup
        require(
            len(now) == expected,
            f"{len(now)} fds open, expected {expected}: leaked or lost "
            f"{sorted(now - self.baseline - set(owned))}",
        )

    # --- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Drain: every job completes, every active ring is processed to the end (nothing
        left unpopped), then every ring stops (the stop checks what came back) and the
        world closes (no fd left)."""
        self.complete_all()
        for _ in range(4 * RINGS):
            active = set(self.backend.watched_kicks().values())
            for index in sorted(active):
                self._kicked(index)
                self.complete_all()
            if not self.more and not self.jobs:
                break
        self.complete_all()
        if not self.quiescent:
            for index in sorted(set(self.backend.watched_kicks().values())):
                ring = self.rings[index] if index < RINGS else None
                queue_state = self.backend.state.vrings[index].ring
                assert queue_state is not None
                if ring is not None and ring.session is not None and ring.session.coherent:
                    require(
                        queue_state.next_avail == ring.avail_idx,
                        f"ring {index} is active and drained, yet chains "
                        f"{queue_state.next_avail}..{ring.avail_idx} were never popped",
                    )
        for index in range(RINGS):
            vring = self.backend.state.vrings.get(index)
            if vring is not None and vring.ring is not None:
                self.request(Request.GET_VRING_BASE, wire.VringState(index, 0))
        self.close()


@contextlib.contextmanager
def world(log: Callable[[str], None] | None = None) -> Iterator[World]:
    """A world for a scripted test; drains and checks at the end."""
    w = World(log)
    try:
        yield w
    except BaseException:
        w.abandon()
        raise
    try:
        w.finish()
    except BaseException:
        w.abandon()
        raise

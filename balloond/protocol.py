"""The vhost-user backend as a sans-IO state machine.

Decoded requests (with their fds) go in through :meth:`VhostUserBackend.handle`; replies
come out as bytes, and the server learns from :class:`Outcome` and :meth:`watched_kicks`
which eventfds to watch and which to signal. Nothing here reads a socket or waits.

Ring life cycle (vhost-user.rst, "Ring states"): a ring is *started* when its kick fd
arrives and *stopped* by GET_VRING_BASE, which answers with the next available index.
When ``VHOST_USER_F_PROTOCOL_FEATURES`` is negotiated a started ring stays disabled until
SET_VRING_ENABLE 1. Only a started, enabled ring of a device whose features are set is
*active*: the device sees it, and only then.

All state lives in :class:`BackendState` as plain values; mappings and virtqueue objects
are derived from it, so a later version can hand it (and its fds) to a successor process.

Device work that leaves the event loop (a :class:`DiscardJob`) uses a region's fd and
mapping and ends by returning a chain to its ring. No request may change a ring or the
memory table while such a job is out, and this class checks it rather than trusting an
ordering: :meth:`quiesce` stops handing out jobs (kicks meanwhile are remembered), the
server waits until every job handed out has come back through :meth:`complete`, and only
then may :meth:`handle` take a request other than GET_CONFIG/SET_CONFIG; it raises
:class:`RuntimeError` (a bug of ours) otherwise. Handling a request ends the quiescence.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from balloond import fdcheck, wire
from balloond.device import VIRTIO_F_VERSION_1, DiscardJob, VirtioDevice
from balloond.discard import DiscardResult
from balloond.errors import FrontendError, GuestError
from balloond.memory import MAX_MEM_SLOTS, GuestMemory
from balloond.virtqueue import MAX_QUEUE_SIZE, RingState, Virtqueue
from balloond.wire import ProtocolFeature, Request

log = logging.getLogger(__name__)

#: Protocol features this backend implements (DOMAIN: offer these, not the others).
SUPPORTED_PROTOCOL_FEATURES = sum(
    1 << bit
    for bit in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.BACKEND_REQ,
        ProtocolFeature.CONFIG,
        ProtocolFeature.RESET_DEVICE,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
        ProtocolFeature.STATUS,
    )
)
#: Rings the frontend may name. QEMU sends CALL/ERR/ENABLE for every queue it created,
#: used or not, so this is more than any device uses; the ring index of
#: SET_VRING_KICK/CALL/ERR is 8 bits wide.
MAX_RINGS = 256
_PROTOCOL_FEATURES_BIT = 1 << wire.VHOST_USER_F_PROTOCOL_FEATURES

#: Requests that answer with their own reply (REPLY_ACK adds none to these).
_HAS_REPLY = frozenset(
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
#: Requests that never wait for in-flight device work (the server answers them at once).
CONFIG_REQUESTS = frozenset({Request.GET_CONFIG, Request.SET_CONFIG})


@dataclass
class Vring:
    """One ring's vhost-user state. ``ring`` exists from start (kick) to stop."""

    index: int
    num: int = 0
    base: int = 0
    addr: wire.VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    ring: RingState | None = None
    #: Why the ring was given up (a corrupt ring), until the frontend sets it up again.
    broken: str | None = None
    #: The used index last considered for a notification.
    flushed_used: int = 0

    @property
    def started(self) -> bool:
        return self.ring is not None


@dataclass
class BackendState:
    """Everything the backend knows about its frontend, as plain values and fds."""

    features: int | None = None
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    backend_req_fd: int | None = None
    vrings: dict[int, Vring] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What handling one request produced."""

    reply: bytes | None = None
    #: Rings to process now, as if kicked: just activated, or kicked while quiescent.
    activated: tuple[int, ...] = ()


class Processed(NamedTuple):
    """What one turn on a kicked ring produced (a tuple: one is made per kick)."""

    #: Discard jobs to run; each must come back through :meth:`VhostUserBackend.complete`.
    jobs: tuple[DiscardJob, ...] = ()
    #: The turn's budget ran out with chains still available: process the ring again
    #: (after letting other work run).
    more: bool = False


class VhostUserBackend:
    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.state = BackendState()
        self.memory = GuestMemory()
        self._queues: dict[int, Virtqueue] = {}
        self._handlers: dict[Request, Callable[[wire.Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_device,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
        }
        self._activated: list[int] = []
        #: Discard jobs handed out and not yet completed.
        self._jobs_out = 0
        #: Set by :meth:`quiesce` until the next request is handled: no jobs handed out.
        self._quiescent = False
        #: Rings kicked while quiescent, to process once the request is handled.
        self._kicked_meanwhile: set[int] = set()
        #: Called before a used index is published when chains were pushed: with the state
        #: kept, the commit that makes the successor of a dead process know them
        #: (docs/never-drop.md, section 3).
        self.before_publish: Callable[[], None] | None = None

    @classmethod
    def restore(
        cls,
        device: VirtioDevice,
        state: BackendState,
        regions: Sequence[tuple[wire.MemoryRegion, int]],
    ) -> VhostUserBackend:
        """A backend carrying on from a state record (:func:`balloond.record.restore_state`):
        maps the regions (taking their fds, also when it raises), adopts ``state`` and
        activates the rings it says are active; ``device`` holds the restored device state.
        Touches guest memory only to map it: :meth:`resume` carries the rings on."""
        backend = cls(device)
        backend.memory.replace(regions)
        backend.state = state
        for index in sorted(state.vrings):
            backend._reconcile(index)
        backend._activated = []
        return backend

    def resume(self) -> Processed:
        """After :meth:`restore`: publish each active ring's recorded used index, and hand
        out the jobs of the chains the rings hold (the process before may have died with
        them out). The caller then processes every active ring once (kicks may have come
        while no process watched) and signals every call fd once (:meth:`call_fds`)."""
        jobs: list[DiscardJob] = []
        for index, queue in list(self._queues.items()):
            try:
                queue.resume()
                jobs += self.device.resume(index)
            except GuestError as error:
                self._break(index, str(error))
        self._jobs_out += len(jobs)
        return Processed(tuple(jobs))

    def active_rings(self) -> list[int]:
        return sorted(self._queues)

    def call_fds(self) -> list[int]:
        """Every active ring's call fd (signalled once after a restore)."""
        return [
            fd
            for index in sorted(self._queues)
            if (fd := self.state.vrings[index].call_fd) is not None
        ]

    # --- entry points -------------------------------------------------------------------

    @property
    def offered_features(self) -> int:
        return self.device.device_features | _PROTOCOL_FEATURES_BIT

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.state.protocol_features & (1 << feature))

    @property
    def running(self) -> bool:
        """Whether any ring is active: the driver is up and the VM is not paused."""
        return bool(self._queues)

    @property
    def jobs_out(self) -> int:
        """Discard jobs handed out by :meth:`kicked` and not yet completed."""
        return self._jobs_out

    def quiesce(self) -> None:
        """Hand out no more jobs until the next request is handled (kicks are remembered).

        With nothing new handed out, the jobs already out come back in bounded time, however
        busy the guest is; then :meth:`handle` may change rings and memory.
        """
        self._quiescent = True

    def unquiesce(self) -> list[int]:
        """End a quiescence no request ended (a hold released); the rings kicked meanwhile,
        to process now."""
        self._quiescent = False
        meanwhile, self._kicked_meanwhile = self._kicked_meanwhile, set()
        return sorted(i for i in meanwhile if i in self._queues)

    def handle(self, message: wire.Message) -> Outcome:
        """Handle one request; takes ownership of its fds. Raises FrontendError.

        Any request but GET_CONFIG/SET_CONFIG needs :attr:`jobs_out` to be 0 (see
        :meth:`quiesce`), since it may change what a job in flight uses.
        """
        handler = self._handlers.get(message.request)
        if handler is None:
            _close_all(message.fds)
            raise FrontendError(f"unsupported request {message.request.name}")
        if message.request not in CONFIG_REQUESTS and self._jobs_out:
            _close_all(message.fds)
            raise RuntimeError(
                f"{message.request.name} while {self._jobs_out} discard jobs are in flight"
            )
        if unpublished := [i for i, q in self._queues.items() if q.unpublished]:
            _close_all(message.fds)
            raise RuntimeError(
                f"{message.request.name} with pushes unpublished on rings {unpublished}"
            )
        self._activated = []
        reply = handler(message)
        # What handling pushed (a stats buffer given back on new features) is published
        # with it; a stopped ring had nothing left to publish.
        self._before_publish()
        for queue in self._queues.values():
            queue.publish_used()
        if message.request not in CONFIG_REQUESTS and self._quiescent:
            self._quiescent = False
            meanwhile, self._kicked_meanwhile = self._kicked_meanwhile, set()
            self._activated += sorted(i for i in meanwhile if i in self._queues)
        if reply is not None:
            reply = wire.encode_reply(message.request, reply)
        elif (
            message.need_reply
            and message.request not in _HAS_REPLY
            and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
        ):
            reply = wire.encode_reply(message.request, wire.encode_u64(0))
        return Outcome(reply, tuple(self._activated))

    def watched_kicks(self) -> dict[int, int]:
        """Kick eventfds to watch, mapped to their ring index (active rings only)."""
        return {
            vring.kick_fd: index
            for index, vring in self.state.vrings.items()
            if index in self._queues and vring.kick_fd is not None
        }

    def kicked(self, index: int) -> Processed:
        """Ring ``index`` was kicked: let the device take one turn's worth of it (``more``: some
        is left for another turn)."""
        if index not in self._queues:
            return Processed()
        if self._quiescent:
            self._kicked_meanwhile.add(index)
            return Processed()
        try:
            jobs = tuple(self.device.process(index))
            self._jobs_out += len(jobs)
            queue = self._queues.get(index)
            return Processed(jobs, queue is not None and queue.pending() > 0)
        except GuestError as error:
            self._break(index, str(error))
            return Processed()

    def complete(self, job: DiscardJob, result: DiscardResult) -> None:
        """A job handed out by :meth:`kicked` is done: its chain goes back to the guest."""
        self._jobs_out -= 1
        if job.queue in self._queues:
            try:
                self.device.complete(job, result)
            except GuestError as error:
                self._break(job.queue, str(error))

    def signals(self) -> list[int]:
        """Publish the chains returned since the last call (each ring's used index) and
        say which call eventfds to signal for them. Whoever makes the device push (a kick,
        a completion, a statistics request) calls this before going back to the event loop:
        :meth:`handle` refuses to run with pushes unpublished (design.md, invariant 8)."""
        fds: list[int] = []
        self._before_publish()
        for index, queue in self._queues.items():
            queue.publish_used()
            vring = self.state.vrings[index]
            if queue.state.next_used == vring.flushed_used:
                continue
            vring.flushed_used = queue.state.next_used
            try:
                wanted = queue.needs_notification()
            except GuestError as error:
                self._break(index, str(error))
                continue
            if wanted and vring.call_fd is not None:
                fds.append(vring.call_fd)
        return fds

    def _before_publish(self) -> None:
        if self.before_publish is not None and any(q.unpublished for q in self._queues.values()):
            self.before_publish()

    def config_change_message(self) -> bytes | None:
        """The BACKEND_CONFIG_CHANGE_MSG that makes the frontend interrupt the driver to
        re-read the config, if a backend channel was negotiated (else None)."""
        if self.state.backend_req_fd is None or not self.has_protocol_feature(
            ProtocolFeature.BACKEND_REQ
        ):
            return None
        return wire.encode_backend_request(
            wire.BackendRequest.CONFIG_CHANGE_MSG, b"", need_reply=False
        )

    def drop_backend_channel(self) -> None:
        """Stop using the backend channel (it broke); config changes then wait for a read."""
        _close_all((self.state.backend_req_fd,))
        self.state.backend_req_fd = None

    def close(self) -> None:
        """Release everything: queues, fds, mappings. The device keeps its own state."""
        for index in list(self._queues):
            self._deactivate(index)
        for vring in self.state.vrings.values():
            _close_all((vring.kick_fd, vring.call_fd, vring.err_fd))
            vring.kick_fd = vring.call_fd = vring.err_fd = None
        if self.state.backend_req_fd is not None:
            os.close(self.state.backend_req_fd)
            self.state.backend_req_fd = None
        self.memory.close()

    # --- ring activation ----------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < MAX_RINGS:
            raise FrontendError(f"ring index {index} out of range")
        return self.state.vrings.setdefault(index, Vring(index))

    def _ring_enabled(self, vring: Vring) -> bool:
        features = self.state.features
        if features is not None and features & _PROTOCOL_FEATURES_BIT:
            return vring.enabled
        return True

    def _should_be_active(self, vring: Vring) -> bool:
        return (
            vring.started
            and vring.broken is None
            and self.state.features is not None
            and self._ring_enabled(vring)
        )

    def _reconcile(self, index: int) -> None:
        """Bring ring ``index`` to the activity its state calls for."""
        vring = self.state.vrings[index]
        active = index in self._queues
        if self._should_be_active(vring) and not active:
            self._activate(index)
        elif active and not self._should_be_active(vring):
            self._deactivate(index)

    def _activate(self, index: int) -> None:
        vring = self.state.vrings[index]
        assert vring.ring is not None and self.state.features is not None
        try:
            queue = Virtqueue(
                self.memory,
                vring.ring,
                event_idx=bool(self.state.features & (1 << 29)),
                indirect=bool(self.state.features & (1 << 28)),
            )
        except GuestError as error:
            self._break(index, str(error))
            return
        self._queues[index] = queue
        vring.flushed_used = vring.ring.next_used
        self.device.start_queue(index, queue)
        self._activated.append(index)
        log.info("ring %d started (size %d, next available %d)", index, vring.num, vring.base)

    def _deactivate(self, index: int) -> None:
        queue = self._queues.pop(index)
        self.device.stop_queue(index)
        log.info("ring %d stopped (next available %d)", index, queue.state.next_avail)

    def _break(self, index: int, reason: str) -> None:
        vring = self.state.vrings[index]
        log.warning("ring %d given up: %s", index, reason)
        vring.broken = reason
        if index in self._queues:
            self._queues.pop(index)
            self.device.stop_queue(index)
        if vring.err_fd is not None:
            with contextlib.suppress(BlockingIOError):  # full: signalled already
                os.eventfd_write(vring.err_fd, 1)

    def _ring_state(self, vring: Vring) -> RingState:
        """Translate the ring's frontend addresses; needs its size, addresses and memory."""
        if vring.addr is None or vring.num == 0:
            raise FrontendError(f"ring {vring.index} started before its size and addresses")
        addr, num = vring.addr, vring.num
        desc = self.memory.uaddr_to_gpa(addr.desc_user_addr, 16 * num)
        avail = self.memory.uaddr_to_gpa(addr.avail_user_addr, 6 + 2 * num)
        used = self.memory.uaddr_to_gpa(addr.used_user_addr, 6 + 8 * num)
        # The used index is whatever guest memory holds (zero on a fresh ring; after a
        # pause, the last one we wrote). A misaligned ring is given up on activation.
        try:
            next_used = self.memory.load_u16(used + 2)
        except GuestError:
            next_used = 0
        return RingState(num, desc, avail, used, next_avail=vring.base, next_used=next_used)

    # --- features and ownership ---------------------------------------------------------

    def _get_features(self, message: wire.Message) -> bytes:
        return wire.encode_u64(self.offered_features)

    def _set_features(self, message: wire.Message) -> None:
        assert isinstance(message.payload, int)
        features = message.payload
        if features & ~self.offered_features:
            raise FrontendError(
                f"SET_FEATURES {features:#x} has bits never offered "
                f"({features & ~self.offered_features:#x})"
            )
        if not features & (1 << VIRTIO_F_VERSION_1):
            raise FrontendError("SET_FEATURES without VIRTIO_F_VERSION_1 (legacy is unsupported)")
        self.state.features = features
        self.device.set_features(features & ~_PROTOCOL_FEATURES_BIT)
        for index in list(self.state.vrings):
            self._reconcile(index)

    def _set_owner(self, message: wire.Message) -> None:
        self.state.owner = True

    def _reset_device(self, message: wire.Message) -> None:
        for index in list(self._queues):
            self._deactivate(index)
        for vring in self.state.vrings.values():
            _close_all((vring.kick_fd,))
            vring.kick_fd, vring.ring, vring.enabled, vring.broken = None, None, False, None
            vring.base = 0
        self.state.features = None
        self.state.status = 0
        self.device.reset()

    def _get_protocol_features(self, message: wire.Message) -> bytes:
        return wire.encode_u64(SUPPORTED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, message: wire.Message) -> None:
        assert isinstance(message.payload, int)
        if message.payload & ~SUPPORTED_PROTOCOL_FEATURES:
            raise FrontendError(f"SET_PROTOCOL_FEATURES {message.payload:#x} not offered")
        self.state.protocol_features = message.payload

    def _get_queue_num(self, message: wire.Message) -> bytes:
        return wire.encode_u64(self.device.max_queues)

    # --- memory -------------------------------------------------------------------------

    def _set_mem_table(self, message: wire.Message) -> None:
        assert isinstance(message.payload, wire.MemoryTable)
        self.memory.replace(zip(message.payload.regions, message.fds, strict=True))
        self._memory_changed()

    def _get_max_mem_slots(self, message: wire.Message) -> bytes:
        return wire.encode_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, message: wire.Message) -> None:
        assert isinstance(message.payload, wire.MemoryRegion)
        self.memory.add(message.payload, message.fds[0])
        self._memory_changed()

    def _rem_mem_reg(self, message: wire.Message) -> None:
        assert isinstance(message.payload, wire.MemoryRegion)
        _close_all(message.fds)
        self.memory.remove(message.payload)
        self._memory_changed()

    def _memory_changed(self) -> None:
        """Ring addresses are frontend addresses: translate every started ring again.

        The device forgets whatever it knew about guest pages by their address."""
        self.device.memory_changed()
        for index, vring in self.state.vrings.items():
            if vring.ring is None:
                continue
            try:
                fresh = self._ring_state(vring)
            except FrontendError:
                continue  # not mapped (yet): the frontend will set the ring up again
            old = vring.ring
            fresh.next_avail, fresh.next_used = old.next_avail, old.next_used
            fresh.signalled_used, fresh.in_flight = old.signalled_used, old.in_flight
            vring.ring = fresh
            if index in self._queues:
                self._queues.pop(index)
                self._activate(index)

    # --- rings --------------------------------------------------------------------------

    def _stopped_vring(self, message: wire.Message) -> tuple[Vring, wire.VringState]:
        assert isinstance(message.payload, wire.VringState)
        vring = self._vring(message.payload.index)
        if vring.started:
            raise FrontendError(f"{message.request.name} on started ring {vring.index}")
        return vring, message.payload

    def _set_vring_num(self, message: wire.Message) -> None:
        vring, payload = self._stopped_vring(message)
        num = payload.num
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise FrontendError(f"SET_VRING_NUM {num} is not a power of two up to 32768")
        vring.num = num

    def _set_vring_base(self, message: wire.Message) -> None:
        vring, payload = self._stopped_vring(message)
        if payload.num > 0xFFFF:
            raise FrontendError(f"SET_VRING_BASE {payload.num} exceeds 16 bits")
        vring.base = payload.num

    def _set_vring_addr(self, message: wire.Message) -> None:
        assert isinstance(message.payload, wire.VringAddr)
        addr = message.payload
        if addr.flags & ~1:  # bit 0: VHOST_VRING_F_LOG, harmless as we never log
            raise FrontendError(f"SET_VRING_ADDR with unknown flags {addr.flags:#x}")
        vring = self._vring(addr.index)
        if vring.started:
            raise FrontendError(f"SET_VRING_ADDR on started ring {vring.index}")
        vring.addr = addr

    def _get_vring_base(self, message: wire.Message) -> bytes:
        assert isinstance(message.payload, wire.VringState)
        vring = self._vring(message.payload.index)
        if vring.index in self._queues:
            self._deactivate(vring.index)
        next_avail = vring.ring.next_avail if vring.ring is not None else vring.base
        _close_all((vring.kick_fd,))
        vring.kick_fd, vring.ring, vring.broken = None, None, None
        vring.base = next_avail
        return wire.encode_vring_state(wire.VringState(vring.index, next_avail))

    def _vring_file(self, message: wire.Message) -> tuple[Vring, int | None]:
        assert isinstance(message.payload, wire.VringFile)
        try:
            vring = self._vring(message.payload.index)
            if message.fds:
                fdcheck.eventfd(
                    message.fds[0],
                    f"{message.request.name} {message.payload.index}",
                    counting=message.request is Request.SET_VRING_KICK,
                )
        except FrontendError:
            _close_all(message.fds)
            raise
        return vring, (message.fds[0] if message.fds else None)

    def _set_vring_kick(self, message: wire.Message) -> None:
        vring, fd = self._vring_file(message)
        if fd is None:
            raise FrontendError("SET_VRING_KICK without an fd (polling) is unsupported")
        _close_all((vring.kick_fd,))
        vring.kick_fd = fd
        if vring.started:
            return  # a new kick fd for a started ring: it keeps its place in the ring
        vring.ring = self._ring_state(vring)
        vring.broken = None
        self._reconcile(vring.index)

    def _set_vring_call(self, message: wire.Message) -> None:
        vring, fd = self._vring_file(message)
        _close_all((vring.call_fd,))
        vring.call_fd = fd

    def _set_vring_err(self, message: wire.Message) -> None:
        vring, fd = self._vring_file(message)
        _close_all((vring.err_fd,))
        vring.err_fd = fd

    def _set_vring_enable(self, message: wire.Message) -> None:
        assert isinstance(message.payload, wire.VringState)
        if message.payload.num > 1:
            raise FrontendError(f"SET_VRING_ENABLE {message.payload.num}")
        vring = self._vring(message.payload.index)
        vring.enabled = bool(message.payload.num)
        self._reconcile(vring.index)

    # --- config, status, backend channel -------------------------------------------------

    def _get_config(self, message: wire.Message) -> bytes:
        assert isinstance(message.payload, wire.ConfigSpace)
        request = message.payload
        config = self.device.read_config()
        window = config[request.offset : request.offset + request.size]
        window += bytes(request.size - len(window))
        return wire.encode_config(wire.ConfigSpace(request.offset, request.size, 0, window))

    def _set_config(self, message: wire.Message) -> None:
        assert isinstance(message.payload, wire.ConfigSpace)
        self.device.write_config(message.payload.offset, message.payload.data)

    def _set_backend_req_fd(self, message: wire.Message) -> None:
        try:
            fdcheck.stream_socket(message.fds[0], "SET_BACKEND_REQ_FD")
        except FrontendError:
            _close_all(message.fds)
            raise
        _close_all((self.state.backend_req_fd,))
        self.state.backend_req_fd = message.fds[0]

    def _set_status(self, message: wire.Message) -> None:
        assert isinstance(message.payload, int)
        if message.payload > 0xFF:
            raise FrontendError(f"SET_STATUS {message.payload:#x} exceeds 8 bits")
        self.state.status = message.payload

    def _get_status(self, message: wire.Message) -> bytes:
        return wire.encode_u64(self.state.status)


def _close_all(fds: Sequence[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)

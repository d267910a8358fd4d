"""asyncio glue: the listening socket, one frontend connection, eventfds, worker threads.

The only module with an event loop. It moves bytes and fds between the vhost-user socket
and :class:`~balloond.protocol.VhostUserBackend`, watches the kick eventfds the backend
names, signals the call eventfds it asks for, and runs discard jobs in a worker thread so
that config requests are answered while a large discard is in progress.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import stat
import termios
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from balloond import logs, wire
from balloond.activation import listening_unix_socket
from balloond.device import DiscardJob, VirtioDevice
from balloond.discard import DiscardResult, RangeDiscarder, total_bytes
from balloond.errors import FrontendError, HostError, OperatorError
from balloond.protocol import CONFIG_REQUESTS, Outcome, VhostUserBackend
from balloond.record import RequestDigest
from balloond.wire import ProtocolFeature, Request

log = logging.getLogger(__name__)

#: Most fds one message carries (SET_MEM_TABLE with 8 regions).
_MAX_FDS = wire.MAX_MEM_REGIONS
_ANCILLARY_SIZE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
#: Requests that change nothing: with the state kept, answered without a commit.
QUERIES = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_CONFIG,
        Request.GET_STATUS,
    }
)
#: The requests that may not be handled twice (the region would overlap, or be gone): met
#: again byte for byte at the head of the socket after a death, they were handled already.
_ONCE = frozenset({Request.ADD_MEM_REG, Request.REM_MEM_REG})


class Keeping(Protocol):
    """Where a device's state is committed with ``--keep-state`` (balloond.keeping)."""

    def commit(self) -> None: ...

    def commit_progress(self) -> None: ...


class ConnectionClosed(Exception):
    """The frontend closed the connection."""


class Connection:
    """One frontend connection, served until it closes, breaks the protocol or is cancelled.

    Concurrency: everything runs on the event loop thread except ``Discarder.discard``,
    which runs in the executor's one thread on ranges a job names. Kicks turn into jobs
    (``backend.kicked``); the worker task runs them one at a time and hands each back
    (``backend.complete``) on the loop. A request other than GET_CONFIG/SET_CONFIG first
    quiesces the backend (no new jobs; kicks meanwhile are remembered) and waits until every
    job out has come back: the wait is bounded by the jobs already out, however busy the
    guest is, and the backend refuses the request otherwise. Its kick fds are not watched
    while the request is handled (it may close them). A ring's turn is bounded
    (``balloon.TURN_CHAINS`` chains, ``TURN_DESCRIPTORS`` descriptors); the rest is processed
    in a later turn of the loop (``_turn_again``), so a busy guest never holds the loop.
    However the connection ends, the jobs out are finished and their chains returned first
    (at most ``DRAIN_TIMEOUT`` seconds).

    :meth:`hold` brings the connection to a point where it can be handed to a successor
    process (``balloond reload``): no request half read, no job out, kicks not watched.
    A connection made with ``resumed`` carries on from a predecessor's record.
    """

    #: Seconds a closing connection waits for its discards in flight.
    DRAIN_TIMEOUT = 10.0

    def __init__(
        self,
        sock: socket.socket,
        backend: VhostUserBackend,
        discarder: RangeDiscarder,
        executor: ThreadPoolExecutor,
        *,
        resumed: bool = False,
        inline: tuple[int, int] = (0, 0),
        keeping: Keeping | None = None,
        reply_pipe: tuple[int, int] | None = None,
        last_request: RequestDigest | None = None,
    ) -> None:
        self.sock = sock
        self.backend = backend
        self.discarder = discarder
        self.executor = executor
        self._loop = asyncio.get_running_loop()
        self._jobs: asyncio.Queue[DiscardJob] = asyncio.Queue()
        self._watched: dict[int, int] = {}
        #: Rings with another turn scheduled (their budget ran out).
        self._again: set[int] = set()
        self._closed = False
        #: A config change to announce once the device runs again.
        self._config_pending = False
        self._resumed = resumed
        self._ended = False
        #: Jobs of at most this many bytes and ranges are discarded on the loop's thread.
        self._inline_bytes, self._inline_ranges = inline
        #: Whether the socket is registered with the loop for reading (_request_ready).
        self._reading = False
        #: :meth:`hold`: read no request (at a message boundary) until released.
        self._held = False
        self._unheld = asyncio.Event()
        self._parked = asyncio.Event()
        self._waiter: asyncio.Future[None] | None = None
        #: With the state kept (docs/never-drop.md): commits the device's state; requests
        #: are peeked, committed, their replies staged in ``reply_pipe``, then consumed.
        self._keeping = keeping
        self.reply_pipe = reply_pipe
        if keeping is not None and reply_pipe is None:
            self.reply_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: The last request whose effect was committed (only while the state is kept).
        self.last_request = last_request
        if keeping is not None:
            backend.before_publish = keeping.commit_progress

    @property
    def keeps_state(self) -> bool:
        return self._keeping is not None

    def commit(self) -> None:
        """Commit the device's whole record (with the state kept; a no-op otherwise)."""
        if self._keeping is not None:
            self._keeping.commit()

    def commit_progress(self) -> None:
        """Commit what serving the guest changed: rings, the balloon's state, the last
        request (no fd replaced, nothing set up); a no-op without the state kept."""
        if self._keeping is not None:
            self._keeping.commit_progress()

    @property
    def closed(self) -> bool:
        """Whether serving has ended (the frontend went away, or broke the protocol)."""
        return self._ended

    async def run(self) -> None:
        """Serve until the frontend goes away; raises FrontendError on a protocol breach."""
        worker = asyncio.create_task(self._work(), name="discard-worker")
        try:
            if self._resumed:
                await self._send_staged(carried=True)
                self._carry_on()
            else:
                self.commit()  # the connection is kept from before its first request
            while True:
                await self._request_ready()
                if self.keeps_state:
                    raw, message = await self._peek()
                else:
                    raw, message = b"", await self._receive()
                log.debug(
                    "<- %s %s fds=%d", message.request.name, message.payload, len(message.fds)
                )
                if self.keeps_state and self._handled_already(message, raw):
                    outcome = Outcome(self._ack(message), ())
                elif message.request in CONFIG_REQUESTS:
                    # Touches no ring and no fd: answered at once, kicks watched throughout
                    # (a guest's config traffic is one request per inflate buffer).
                    outcome = self.backend.handle(message)
                else:
                    self.backend.quiesce()
                    await self._jobs.join()
                    # The request may close a kick fd, whose number a later one may reuse:
                    # nothing stays registered with the loop across it.
                    self._unwatch_kicks()
                    try:
                        outcome = self.backend.handle(message)
                    finally:
                        self._watch_kicks()
                if self.keeps_state:
                    if message.request is Request.SET_CONFIG:  # one per inflate buffer
                        self.last_request = RequestDigest.of(raw)
                        self.commit_progress()
                    elif message.request not in QUERIES:
                        self.last_request = RequestDigest.of(raw)
                        self.commit()
                    if outcome.reply is not None:
                        self._stage(outcome.reply)
                    self._consume(len(raw), message)
                    await self._send_staged()
                elif outcome.reply is not None:
                    await self._reply(outcome.reply)
                if self._config_pending and self.backend.running:
                    self._config_pending = False
                    self.notify_config()
                for index in outcome.activated:
                    self._kicked(index)
        except ConnectionClosed:
            log.info("frontend closed the connection")
        finally:
            self._stop_reading()
            self._ended = True
            self._parked.set()  # a hold finds nothing left to hand over
            # The teardown runs to its end even if this task is cancelled meanwhile (the
            # daemon stopping, the device removed): closing fds while a discard still uses
            # them, in the worker thread, is what it must never do.
            teardown = asyncio.ensure_future(self._teardown(worker))
            cancelled = False
            while not teardown.done():
                try:
                    await asyncio.shield(teardown)
                except asyncio.CancelledError:
                    cancelled = True
            self._closed = True
            self._unwatch_kicks()
            self.backend.close()
            if cancelled:
                raise asyncio.CancelledError

    async def _teardown(self, worker: asyncio.Task[None]) -> None:
        # Jobs out hold guest buffers (a reporting worker in the guest waits for its
        # report): finish them and give the buffers back, within DRAIN_TIMEOUT.
        self.backend.quiesce()
        self._unwatch_kicks()
        drained = asyncio.ensure_future(self._jobs.join())
        await asyncio.wait({drained}, timeout=self.DRAIN_TIMEOUT)
        drained.cancel()
        worker.cancel()
        await asyncio.wait({worker})
        # A discard may still run in the worker thread: the executor has one thread, so
        # this no-op returns only after it, and only then may the fds and mappings it uses
        # be closed.
        await self._loop.run_in_executor(self.executor, _barrier)

    async def _reply(self, reply: bytes) -> None:
        """Send a reply: at once when the socket takes it whole (it always has room for one:
        the frontend waits for each reply), through the loop otherwise."""
        try:
            try:
                sent = self.sock.send(reply)
            except BlockingIOError:
                sent = 0
            if sent < len(reply):
                await self._loop.sock_sendall(self.sock, reply[sent:])
        except (BrokenPipeError, ConnectionResetError):
            raise ConnectionClosed from None  # the frontend went away meanwhile

    # --- a hand-off to a successor process ----------------------------------------------

    def _carry_on(self) -> None:
        """The first steps of a connection resumed from a record: redo the chains the rings
        held, process every active ring once (a kick may have come while no process
        watched), signal every call fd once, and announce the config."""
        processed = self.backend.resume()
        for job in processed.jobs:
            self._jobs.put_nowait(job)
        self._watch_kicks()
        for index in self.backend.active_rings():
            self._kicked(index)
        for fd in self.backend.call_fds():
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)
        if self.backend.running:
            self.notify_config()  # a target set just before the hand-off may be unannounced

    async def _request_ready(self) -> None:
        """Wait until a request can be read: the socket is readable and no hold is asked.
        Nothing of the next request is read before this returns."""
        while True:
            if self._held:
                self._parked.set()
                await self._unheld.wait()
                self._parked.clear()
                continue
            try:
                self.sock.recv(1, socket.MSG_PEEK)  # b"" at EOF: _receive says so
                return
            except BlockingIOError:
                pass
            except ConnectionResetError:
                return
            # Then look again: the socket stays registered, so a wake-up may be a stale one
            # for a request read since.
            await self._readable()

    def _on_readable(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)
        else:  # data waits while a request is handled: look again when asked
            self._stop_reading()

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    async def hold(self) -> None:
        """Stop at a point a successor can carry on from: no request is half read or half
        handled (the next one stays queued in the socket), no discard job is out, and kicks
        are not watched (they stay counted in their eventfds). Until :meth:`release`."""
        self._held = True
        self._unheld.clear()
        if self._waiter is not None:
            _resolve(self._waiter)
        await self._parked.wait()
        self.backend.quiesce()
        await self._jobs.join()
        self._unwatch_kicks()

    def release(self) -> None:
        """Carry on after :meth:`hold` (the hand-off did not happen)."""
        self._held = False
        self._unheld.set()
        self._watch_kicks()
        for index in self.backend.unquiesce():
            self._kicked(index)

    # --- receiving ----------------------------------------------------------------------

    async def _receive(self) -> wire.Message:
        head, fds = await self._receive_exact(wire.HEADER_SIZE)
        try:
            header = wire.decode_header(head)
            body, more = await self._receive_exact(header.size)
            fds += more
            return wire.decode_message(header, body, tuple(fds))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    async def _receive_exact(self, size: int) -> tuple[bytes, list[int]]:
        data = bytearray()
        fds: list[int] = []
        while len(data) < size:
            try:
                chunk, ancillary, flags, _ = self.sock.recvmsg(size - len(data), _ANCILLARY_SIZE)
            except BlockingIOError:
                await self._readable()
                continue
            except ConnectionResetError:
                chunk, ancillary, flags = b"", [], 0
            fds += _fds(ancillary)
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                _blame_truncated_fds()
                raise FrontendError(f"more than {_MAX_FDS} fds attached to one message")
            if not chunk:
                for fd in fds:
                    os.close(fd)
                raise ConnectionClosed
            data += chunk
        return bytes(data), fds

    # --- with the state kept: peek, commit, stage, consume, send (never-drop.md, 4) ------

    async def _peek(self) -> tuple[bytes, wire.Message]:
        """The next whole request, left queued in the socket; its fds are duplicates that
        are ours (the queued ones go with :meth:`_consume`)."""
        size = wire.HEADER_SIZE
        partial = 0
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(
                    size, _ANCILLARY_SIZE, socket.MSG_PEEK
                )
            except BlockingIOError:
                await self._readable()
                continue
            except ConnectionResetError:
                data, ancillary, flags = b"", [], 0
            fds = _fds(ancillary)
            if flags & socket.MSG_CTRUNC:
                _close(fds)
                _blame_truncated_fds()
                raise FrontendError(f"more than {_MAX_FDS} fds attached to one message")
            if not data:
                _close(fds)
                raise ConnectionClosed
            try:
                if len(data) >= wire.HEADER_SIZE:
                    header = wire.decode_header(data[: wire.HEADER_SIZE])
                    if len(data) == wire.HEADER_SIZE + header.size:
                        return data, _peeked_message(header, data[wire.HEADER_SIZE :], fds)
                    if size == wire.HEADER_SIZE:
                        size += header.size
                        _close(fds)
                        continue
                    if fds:  # a peek stops after the first buffer that carries fds
                        raise FrontendError(
                            f"{header.request}: a request cut after the part carrying its fds"
                        )
            except BaseException:
                _close(fds)
                raise
            _close(fds)
            # The rest is on its way (QEMU writes a request whole: this is rare and short).
            # The socket stays readable meanwhile, so wait by the clock, not for readiness.
            partial += 1
            await asyncio.sleep(min(0.05, 0.0005 * partial))

    def _consume(self, size: int, message: wire.Message) -> None:
        """Take the request :meth:`_peek` saw off the socket (its fds again: closed)."""
        received = 0
        while size:
            data, ancillary, _, _ = self.sock.recvmsg(size, _ANCILLARY_SIZE)
            fds = _fds(ancillary)
            _close(fds)
            received += len(fds)
            if not data:
                raise ConnectionClosed
            size -= len(data)
        # Came with fds it takes none of (REM_MEM_REG may bring its region's, unused here).
        if received != len(message.fds) and message.request is not Request.REM_MEM_REG:
            raise FrontendError(
                f"{message.request.name}: {received} fds attached, {len(message.fds)} expected"
            )

    def _handled_already(self, message: wire.Message, raw: bytes) -> bool:
        """Whether ``message`` is the request the last commit holds the effect of, and one
        that may not be handled twice (found at the head of the socket after a death)."""
        if message.request not in _ONCE or self.last_request != RequestDigest.of(raw):
            return False
        _close(message.fds)
        log.info("%s was handled before the last process died: acknowledged", message.request.name)
        return True

    def _ack(self, message: wire.Message) -> bytes | None:
        if message.need_reply and self.backend.has_protocol_feature(ProtocolFeature.REPLY_ACK):
            return wire.encode_reply(message.request, wire.encode_u64(0))
        return None

    def _stage(self, reply: bytes) -> None:
        """Put ``reply`` in the reply pipe: one write of less than PIPE_BUF to an empty
        pipe, whole or not at all."""
        assert self.reply_pipe is not None
        if os.write(self.reply_pipe[1], reply) != len(reply):  # pragma: no cover (PIPE_BUF)
            raise RuntimeError("a reply was cut in the reply pipe")

    async def _send_staged(self, *, carried: bool = False) -> None:
        """Move what the reply pipe holds into the socket. ``carried``: a previous process
        died with a reply staged; if the request it answers is still queued, it is taken
        off first (QEMU sends nothing before it has its reply)."""
        if self.reply_pipe is None:
            return
        pipe = self.reply_pipe[0]
        left = _queued(pipe)
        if carried and left:
            log.info("sending the %d bytes of a reply the last process left staged", left)
            with contextlib.suppress(BlockingIOError):
                self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                raw, message = await self._peek()
                _close(message.fds)
                self._consume(len(raw), message)
        while left:
            try:
                left -= os.splice(pipe, self.sock.fileno(), left, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                await self._writable()
            except (BrokenPipeError, ConnectionResetError):
                raise ConnectionClosed from None

    async def _writable(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(self.sock.fileno(), _resolve, waiter)
        try:
            await waiter
        finally:
            self._loop.remove_writer(self.sock.fileno())

    async def _readable(self) -> None:
        """Until the socket is readable (or a hold is asked, in :meth:`_request_ready`)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        if not self._reading:
            # Stays registered while requests come one after the other (no epoll change
            # per request); _on_readable drops it when nobody waits.
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True
        try:
            await waiter
        finally:
            self._waiter = None

    # --- kicks, calls and discard jobs -------------------------------------------------------

    def _watch_kicks(self) -> None:
        self._watched = self.backend.watched_kicks()
        for fd, index in self._watched.items():
            self._loop.add_reader(fd, self._on_kick, fd, index)

    def _unwatch_kicks(self) -> None:
        for fd in self._watched:
            self._loop.remove_reader(fd)
        self._watched = {}

    def _on_kick(self, fd: int, index: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        self._kicked(index)

    def _kicked(self, index: int) -> None:
        if self._closed:
            return
        processed = self.backend.kicked(index)
        for job in processed.jobs:
            if self._small(job):
                self._finish(job, self._discard_now(job), signal=False)  # signalled below
            else:
                self._jobs.put_nowait(job)
        if processed.more and index not in self._again:
            self._again.add(index)
            self._loop.call_soon(self._turn_again, index)
        self._signal()

    def _turn_again(self, index: int) -> None:
        self._again.discard(index)
        self._kicked(index)

    def _signal(self) -> None:
        for fd in self.backend.signals():
            with contextlib.suppress(BlockingIOError):  # a full counter: signalled already
                os.eventfd_write(fd, 1)

    def flush(self) -> None:
        """Notify the driver of chains the device returned outside a kick."""
        self._signal()

    def notify_config(self) -> bool:
        """Tell the driver the config changed; False if it cannot be told now.

        Not while the device is stopped (the VM paused, or between a reset and the driver's
        return): QEMU 11.1 crashes on a config change notification then. It is sent when a
        ring runs again (a new driver reads the config anyway).
        """
        self.commit_progress()  # the new target: recorded before anyone hears of it
        if not self.backend.running:
            self._config_pending = True
            log.info("the device is stopped: the guest hears of the config change when it runs")
            return False
        message = self.backend.config_change_message()
        fd = self.backend.state.backend_req_fd
        if message is None or fd is None:
            return False
        try:
            sent = os.write(fd, message)  # non-blocking: a frontend that does not read
        except BlockingIOError:  # its backend channel cannot stall the daemon
            log.warning("the frontend does not read its backend channel; config change dropped")
            return False
        except OSError as error:
            log.warning("cannot send a config change to the frontend: %s", error)
            return False
        if sent != len(message):  # the channel is out of step now: never write it again
            log.error("short write on the backend channel; it is no longer used")
            self.backend.drop_backend_channel()
            self.commit()  # its fd is closed: out of the record before its number is reused
            return False
        return True

    async def _work(self) -> None:
        """Run discard jobs one at a time; every job's chain goes back to the guest."""
        while True:
            job = await self._jobs.get()
            try:
                result = await self._loop.run_in_executor(
                    self.executor, self.discarder.discard, job.ranges
                )
            except Exception:
                _failed(job)
                result = _NOTHING
            try:
                self._finish(job, result)
            finally:
                self._jobs.task_done()

    def _small(self, job: DiscardJob) -> bool:
        """Whether ``job`` is cheaper to discard here than to hand to the discard thread and
        back (two thread wake-ups): an inflate buffer, 0.1 to 1 ms of native call."""
        return len(job.ranges) <= self._inline_ranges and (
            total_bytes(job.ranges) <= self._inline_bytes
        )

    def _discard_now(self, job: DiscardJob) -> DiscardResult:
        try:
            return self.discarder.discard(job.ranges)
        except Exception:
            _failed(job)
            return _NOTHING

    def _finish(self, job: DiscardJob, result: DiscardResult, *, signal: bool = True) -> None:
        """Return a job's chain; publish it now, or (``signal`` False) with the caller's
        next :meth:`_signal`."""
        try:
            self.backend.complete(job, result)
            if signal:
                self._signal()
        except Exception:
            log.exception("returning chain %d of ring %d failed", job.head, job.queue)


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return fds


def _close(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _peeked_message(header: wire.Header, body: bytes, fds: list[int]) -> wire.Message:
    """A request read with MSG_PEEK. Peeking on a Unix stream socket also returns the fds of
    a later message when this one carries none (the kernel moves on to the next buffer once
    the bytes asked for are copied), so the fds are this request's only if it takes some;
    :meth:`Connection._consume` checks the count when the request is taken for real."""
    try:
        message = wire.decode_message(header, body, ())
    except FrontendError:
        return wire.decode_message(header, body, tuple(fds))
    _close(fds)
    return message


def _queued(pipe: int) -> int:
    """Bytes waiting in a pipe."""
    count = array.array("i", [0])
    fcntl.ioctl(pipe, termios.FIONREAD, count)
    return count[0]


def _blame_truncated_fds() -> None:
    """The kernel dropped fds of a message: raise HostError if it was for lack of room in
    our fd table (not the frontend's fault); return if we had room (then it sent too many)."""
    try:
        probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.EMFILE, errno.ENFILE):
            raise HostError(
                "the daemon ran out of file descriptors (raise its NOFILE limit)"
            ) from None
        raise
    os.close(probe)


_NOTHING = DiscardResult(requested_bytes=0, discarded_bytes=0, discarded_ranges=0)


def _failed(job: DiscardJob) -> None:
    # Whatever went wrong, the chain goes back: a guest waits for it.
    log.exception("discard job for chain %d of ring %d failed", job.head, job.queue)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: The discard thread's nice value. A large discard (a report of 64 MiB, 8-20 ms in the
#: kernel) competes for the CPUs with the loop's thread, which answers the config requests
#: a vCPU waits for: on a busy 2-core host, GET_CONFIG p99 while 1 GiB was freed was 0.3-2.5
#: ms at nice 0 (4 of 8 figures within 1 ms), 0.24-0.54 ms at nice 10 (8 of 8). The price,
#: with both CPUs taken by other work: freeing the 1 GiB took 1.7-2.5 s instead of 0.8-1.0 s
#: (bench/FINDINGS.md). An idle CPU still runs it at full speed.
DISCARD_NICE = 10


def _discard_thread() -> None:
    """Runs first in the discard thread: it yields the CPU to the event loop's thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DISCARD_NICE)
    except OSError as error:  # not fatal: discards only compete a little harder
        log.warning("cannot lower the discard thread's priority: %s", error)


def _barrier() -> None:
    """Runs in the worker thread after everything queued before it."""


@dataclass(frozen=True)
class Adopted:
    """A connection a predecessor process served, restored from its record."""

    sock: socket.socket
    backend: VhostUserBackend
    device: VirtioDevice
    reply_pipe: tuple[int, int] | None = None
    last_request: RequestDigest | None = None


class DeviceServer:
    """Serves one VM's vhost-user socket: one frontend at a time, the next when it goes.

    The frontend comes from ``listener`` (QEMU connects to us), or from connecting to
    ``connect_path`` (QEMU started with ``server=on`` waits for us; after it goes, the next
    QEMU on that path is waited for). Each DeviceServer has its own discard thread, at a lower
    priority than the loop's (``DISCARD_NICE``).

    ``adopted`` is a connection a predecessor process served (``balloond reload``): its
    socket, and a backend and device restored from the record; it is served first.
    """

    #: Seconds between attempts to reach a frontend that is not listening (yet).
    CONNECT_RETRY = 1.0

    def __init__(
        self,
        listener: socket.socket | None,
        device_factory: Callable[[], VirtioDevice],
        discarder: RangeDiscarder,
        *,
        name: str = "balloon",
        connect_path: str | None = None,
        adopted: Adopted | None = None,
        inline: tuple[int, int] = (0, 0),
        keeping: Keeping | None = None,
    ) -> None:
        if (listener is None) == (connect_path is None):
            raise ValueError("a DeviceServer needs a listener or a path to connect to")
        self.listener = listener
        self.connect_path = connect_path
        self.device_factory = device_factory
        self.discarder = discarder
        self.name = name
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{name}-discard", initializer=_discard_thread
        )
        self.connection: Connection | None = None
        #: The device of the current (or last) frontend: its state outlives a disconnect
        #: so that status still reports the final counters.
        self.device: VirtioDevice | None = None
        #: Frontends served since start, and connections dropped by kind of fault.
        self.connections = 0
        self.errors: dict[str, int] = {}
        self._adopted = adopted
        #: Discard jobs up to (bytes, ranges) run on the loop's thread (:class:`Connection`).
        self.inline = inline
        if adopted is not None:
            self.device = adopted.device
        #: With the state kept: where the device's state is committed (docs/never-drop.md).
        self.keeping = keeping
        #: A frontend connected to a predecessor that died before reading from it: the
        #: first one served.
        self.fresh: socket.socket | None = None
        #: Called when a frontend connects or goes (the daemon's status line).
        self.on_connection: Callable[[], None] = lambda: None
        #: :meth:`hold`: take no new frontend.
        self._held = False
        self._waiter: asyncio.Future[None] | None = None
        if listener is not None:
            listener.setblocking(False)

    async def serve(self) -> None:
        """Accept (or connect to) and serve frontends until cancelled."""
        logs.bind_device(self.name)  # every line logged for this VM names it
        try:
            while True:
                reply_pipe = last_request = None
                if self._adopted is not None:
                    adopted, self._adopted = self._adopted, None
                    sock, backend, self.device = adopted.sock, adopted.backend, adopted.device
                    reply_pipe, last_request = adopted.reply_pipe, adopted.last_request
                    resumed = True
                    log.info("carrying on with the frontend a previous process served")
                else:
                    if self.fresh is not None:
                        sock, self.fresh = self.fresh, None
                        sock.setblocking(False)
                    else:
                        sock = await self._frontend()
                    log.info("frontend connected")
                    self.connections += 1
                    self.device = self.device_factory()
                    backend = VhostUserBackend(self.device)
                    resumed = False
                self.connection = Connection(
                    sock,
                    backend,
                    self.discarder,
                    self.executor,
                    resumed=resumed,
                    inline=self.inline,
                    keeping=self.keeping,
                    reply_pipe=reply_pipe,
                    last_request=last_request,
                )
                self.on_connection()
                try:
                    await self.connection.run()
                except FrontendError as error:
                    self._count("protocol")
                    log.error("frontend broke the protocol, dropping it: %s", error)
                except HostError as error:
                    self._count("host")
                    log.error("the host failed this connection, dropping it: %s", error)
                except Exception:
                    # A bug of ours: lose this connection, not the daemon and its other VMs.
                    self._count("internal")
                    log.exception("internal error, dropping the frontend")
                finally:
                    pipe = self.connection.reply_pipe
                    sock.close()
                    self.connection = None
                    if self.keeping is not None:
                        try:
                            self.keeping.commit()  # its fds are closed: none of them is kept
                        except Exception:
                            log.exception("cannot record that the frontend went")
                    if pipe is not None:
                        _close(pipe)
                    self.on_connection()
        finally:
            self.executor.shutdown(wait=True)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def hold(self) -> None:
        """Take no new frontend, and bring the connected one (if any) to a point a
        successor process can carry on from (:meth:`Connection.hold`)."""
        self._held = True
        if self._waiter is not None:
            _resolve(self._waiter)
        if self.connection is not None:
            await self.connection.hold()

    def release(self) -> None:
        """Carry on after :meth:`hold`."""
        self._held = False
        if self.connection is not None:
            self.connection.release()

    async def _unheld(self, sock: socket.socket | None) -> None:
        """Until no hold is asked and ``sock`` (if any) is readable."""
        loop = asyncio.get_running_loop()
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            if self._held:
                # Held for a hand-off: the process ends in execve, or the hold is released.
                loop.call_later(0.1, _resolve, waiter)
            elif sock is not None:
                loop.add_reader(sock, _resolve, waiter)
            else:
                _resolve(waiter)
            try:
                await waiter
            finally:
                if sock is not None:
                    loop.remove_reader(sock)
                self._waiter = None
            if not self._held:
                return

    async def _frontend(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self.listener is not None:
            while True:
                # Accepted in the same step as it is served, so a hold never finds a
                # frontend accepted and not yet known.
                await self._unheld(self.listener)
                try:
                    sock, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                sock.setblocking(False)
                return sock
        assert self.connect_path is not None
        waiting = False
        while True:
            await self._unheld(None)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.connect_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as error:
                sock.close()
                if not waiting:
                    log.info("waiting for QEMU at %s (%s)", self.connect_path, error)
                    waiting = True
            except OSError as error:
                sock.close()
                raise OperatorError(f"cannot connect to {self.connect_path}: {error}") from None
            await asyncio.sleep(self.CONNECT_RETRY)

    def close(self) -> None:
        """Close the listening socket (once serving has stopped)."""
        if self.listener is not None:
            self.listener.close()


def listen(path: str, *, mode: int = 0o600, group: str | None = None) -> socket.socket:
    """Listen on a Unix socket at ``path``, replacing a stale socket left behind."""
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OperatorError(f"unknown group {group!r}") from None
    if os.path.lexists(path):
        _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        # No moment with looser permissions than asked: create the file owner-only.
        umask = os.umask(0o177)
        try:
            listener.bind(path)
            bound = True
        finally:
            os.umask(umask)
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise OperatorError(
                f"cannot give {path} to group {group!r}: the daemon's user must be a member"
            ) from None
        os.chmod(path, mode)
        listener.listen(1)
    except BaseException as error:
        listener.close()
        if bound:
            os.unlink(path)
        if isinstance(error, OSError):
            raise OperatorError(f"cannot listen on {path}: {error}") from None
        raise
    return listener


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OperatorError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens on it
    except OSError as error:
        raise OperatorError(f"cannot check existing socket {path}: {error}") from None
    else:
        raise OperatorError(f"{path} is in use by another process")
    finally:
        probe.close()


def adopt(fd: int) -> socket.socket:
    """Take an already-listening Unix stream socket (``--fd``)."""
    return listening_unix_socket(fd, f"--fd {fd}")

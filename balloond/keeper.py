"""The keeper: a parent process that holds the daemon's fds while the daemon dies and restarts.

Under systemd, the service manager's fd store keeps what a daemon hands it with
``FDSTORE=1`` (see :meth:`balloond.notify.Notifier.store_fds`) and passes it back to the next
start in ``LISTEN_FDS``/``LISTEN_FDNAMES``. Without systemd, :class:`Keeper` plays that part for
one command: it starts the command as its worker with ``NOTIFY_SOCKET`` pointing at its own
datagram socket, keeps every fd the worker stores there (by name, as systemd does: several fds
may share a name, ``FDSTOREREMOVE=1`` drops all of one name), and when the worker dies of
anything but a clean exit starts it again with the kept fds. So the worker's code is the same
under both: it stores and finds its fds through the sd_notify protocol.

The keeper reads no guest or QEMU input and does little, so it is unlikely to die with the
worker; it takes fds from the worker process only (the kernel names the sender of each
datagram: ``SO_PASSCRED``). Under systemd itself it also passes every message on to the real
manager (readiness, status, the watchdog, and the fd store as a second copy).

Signals: SIGTERM and SIGINT are passed to the worker and end the keeper when the worker has
gone (no restart); SIGHUP is passed on (the worker reloads). A worker that keeps dying is
given up after ``burst`` starts within ``interval`` seconds: the keeper then exits 1 and the
fds it kept close with it.

Not wired into ``balloond serve`` yet: surviving a death also needs the daemon to commit its
state before anything observable happens (docs/never-drop.md, sections 3 and 4).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from balloond.activation import LISTEN_FDS_START
from balloond.notify import NOTIFY_BUFFER_MAX, SCM_MAX_FD, Notifier, valid_fdname

log = logging.getLogger(__name__)

#: What one ``ucred`` (pid, uid, gid) takes in an SCM_CREDENTIALS message.
_UCRED_SIZE = array.array("i", [0, 0, 0]).itemsize * 3
#: systemd's name for fds stored without ``FDNAME=``.
DEFAULT_NAME = "stored"


@dataclass
class FdStore:
    """The fds kept, in the order they came, each with its name; at most ``limit`` of them
    (systemd's ``FileDescriptorStoreMax=``: fds beyond it are closed and refused)."""

    limit: int = 1024
    kept: list[tuple[str, int]] = field(default_factory=list)

    def add(self, name: str, fds: Sequence[int]) -> int:
        """Keep ``fds`` (this store owns them now) as ``name``; returns how many were refused
        (and closed) because the store is full."""
        refused = 0
        for fd in fds:
            if len(self.kept) >= self.limit:
                os.close(fd)
                refused += 1
            else:
                self.kept.append((name, fd))
        return refused

    def remove(self, name: str) -> int:
        """Close every fd kept as ``name``; returns how many."""
        gone = [fd for kept_name, fd in self.kept if kept_name == name]
        self.kept = [(kept_name, fd) for kept_name, fd in self.kept if kept_name != name]
        for fd in gone:
            os.close(fd)
        return len(gone)

    def names(self) -> list[str]:
        return [name for name, _ in self.kept]

    def fds(self) -> list[int]:
        return [fd for _, fd in self.kept]

    def close(self) -> None:
        for _, fd in self.kept:
            os.close(fd)
        self.kept = []


@dataclass(frozen=True)
class Datagram:
    """One notify message: its text, the sending process and the fds it carried."""

    data: bytes
    pid: int
    fds: tuple[int, ...]
    #: The text or the fds did not all fit (the kernel cut them): not to be trusted.
    truncated: bool = False

    def fields(self) -> dict[str, str]:
        """The ``VARIABLE=value`` lines (a line without ``=`` is skipped, as systemd does)."""
        text = self.data.decode(errors="replace")
        return dict(line.split("=", 1) for line in text.split("\n") if "=" in line)


def receive(sock: socket.socket) -> Datagram:
    """One datagram from a socket with ``SO_PASSCRED`` set; the fds it carried are ours."""
    space = socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(_UCRED_SIZE)
    data, ancillary, flags, _ = sock.recvmsg(NOTIFY_BUFFER_MAX, space, socket.MSG_CMSG_CLOEXEC)
    pid, fds = 0, array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = array.array("i", payload[:_UCRED_SIZE])[0]
        elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    return Datagram(data, pid, tuple(fds), truncated)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _child(argv: Sequence[str], environ: Mapping[str, str], kept: Sequence[int]) -> None:
    """In the forked child: put the kept fds at 3, 4, ... and execute ``argv``; never returns."""
    try:
        # Copy every kept fd above both the target range and every kept fd first, so that no
        # dup2 overwrites one not yet copied; then down to 3, 4, ... (dup2 clears FD_CLOEXEC;
        # the originals and the keeper's own fds are close-on-exec).
        top = max([LISTEN_FDS_START + len(kept), *(fd + 1 for fd in kept)])
        high = [os.dup2(fd, top + index) for index, fd in enumerate(kept)]
        for index, fd in enumerate(high):
            os.dup2(fd, LISTEN_FDS_START + index)
        env = dict(environ)
        if kept:
            env["LISTEN_PID"] = str(os.getpid())
        os.closerange(top, top + len(kept))
        os.execvpe(argv[0], list(argv), env)
    except BaseException as error:  # the child must never return into the keeper
        os.write(2, f"balloond keeper: cannot start {argv[0]}: {error}\n".encode())
    os._exit(127)


class Keeper:
    """Runs ``argv`` as its worker and keeps the fds the worker stores; see the module."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        environ: Mapping[str, str] | None = None,
        restart_delay: float = 1.0,
        burst: int = 5,
        interval: float = 60.0,
        store_max: int = 1024,
        upstream: Notifier | None = None,
    ) -> None:
        if not argv:
            raise ValueError("no command to keep")
        self.argv = list(argv)
        base = dict(os.environ if environ is None else environ)
        for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "FDSTORE"):
            base.pop(name, None)
        self.environ = base
        self.restart_delay = restart_delay
        self.burst = burst
        self.interval = interval
        self.store = FdStore(store_max)
        self.upstream = upstream
        #: Workers started so far, and the pid of the one running (0 when none is).
        self.starts = 0
        self.pid = 0
        self._started_at: list[float] = []
        self._stopping: int | None = None
        self._foreign_warned = False

    def run(self) -> int:
        """Start the worker, keep its fds, restart it when it dies; returns the exit status
        the keeper should end with."""
        directory = tempfile.mkdtemp(prefix="balloond-keeper-")
        path = os.path.join(directory, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {
            signum: signal.signal(signum, lambda *_: None)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        old_wakeup = signal.set_wakeup_fd(wake_write)
        try:
            os.chmod(directory, 0o700)
            sock.bind(path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            return self._serve(sock, path, wake_read)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_read)
            os.close(wake_write)
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.rmdir(directory)
            self.store.close()

    def _serve(self, sock: socket.socket, path: str, wake: int) -> int:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ, "notify")
            selector.register(wake, selectors.EVENT_READ, "signal")
            while True:
                self._signals(wake)  # a stop asked for while no worker ran
                if self._stopping is not None:
                    return 0
                pidfd = self._start(path)
                selector.register(pidfd, selectors.EVENT_READ, "worker")
                status = self._watch(selector, sock, wake)
                selector.unregister(pidfd)
                os.close(pidfd)
                outcome = self._after(status)
                if outcome is not None:
                    return outcome
                if self._pause(selector, sock, wake):
                    return 0

    def _pause(self, selector: selectors.BaseSelector, sock: socket.socket, wake: int) -> bool:
        """Wait ``restart_delay`` before the next worker; True if a stop came meanwhile."""
        deadline = time.monotonic() + self.restart_delay
        while (left := deadline - time.monotonic()) > 0 and self._stopping is None:
            for key, _ in selector.select(left):
                if key.data == "signal":
                    self._signals(wake)
                else:
                    self._message(receive(sock))  # no worker: refused
        return self._stopping is not None

    def _start(self, path: str) -> int:
        now = time.monotonic()
        self._started_at = [t for t in self._started_at if now - t < self.interval] + [now]
        # FDSTORE= as systemd >= 254 sets it: the worker knows there is a store, and its size.
        env = dict(self.environ, NOTIFY_SOCKET=path, FDSTORE=str(self.store.limit))
        if self.store.kept:
            env["LISTEN_FDS"] = str(len(self.store.kept))
            env["LISTEN_FDNAMES"] = ":".join(self.store.names())
        pid = os.fork()
        if pid == 0:
            _child(self.argv, env, self.store.fds())
        self.pid = pid
        self.starts += 1
        log.info("worker %d started with %d kept fds", pid, len(self.store.kept))
        return os.pidfd_open(pid)

    def _watch(self, selector: selectors.BaseSelector, sock: socket.socket, wake: int) -> int:
        """Handle messages and signals until the worker exits; its wait status."""
        while True:
            for key, _ in selector.select():
                if key.data == "notify":
                    self._message(receive(sock))
                elif key.data == "signal":
                    self._signals(wake)
                else:
                    _, status = os.waitpid(self.pid, 0)
                    self._drain(sock)  # what it sent just before it went
                    self.pid = 0
                    return status

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                datagram = receive(sock) if _readable(sock) else None
            except BlockingIOError:
                return
            if datagram is None:
                return
            self._message(datagram)

    def _signals(self, wake: int) -> None:
        try:
            received = os.read(wake, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stopping = signum
            if self.pid:
                os.kill(self.pid, signum)

    def _message(self, datagram: Datagram) -> None:
        fds = list(datagram.fds)
        if datagram.truncated:
            _close_all(fds)
            log.warning("ignored a notify message cut short by the kernel (too long)")
            return
        if datagram.pid != self.pid or not self.pid:
            _close_all(fds)
            if not self._foreign_warned:
                log.warning("ignored a notify message of process %d (not the worker)", datagram.pid)
                self._foreign_warned = True
            return
        if self.upstream is not None:
            self._forward(datagram)
        fields = datagram.fields()
        name = fields.get("FDNAME", DEFAULT_NAME)
        if fields.get("FDSTORE") == "1" and fds:
            if not valid_fdname(name):
                log.warning("refused %d fds stored under the invalid name %r", len(fds), name)
                _close_all(fds)
            elif refused := self.store.add(name, fds):
                log.warning("fd store full: refused %d fds of %s", refused, name)
        else:
            _close_all(fds)
        if fields.get("FDSTOREREMOVE") == "1" and valid_fdname(name):
            self.store.remove(name)

    def _forward(self, datagram: Datagram) -> None:
        """The message, as the worker sent it, with the fds it carried, to the manager above
        (under systemd: readiness, status, the watchdog, and a second copy of the fd store).
        ``MAINPID=`` is left out: to the manager, the keeper is the main process."""
        assert self.upstream is not None
        text = datagram.data.decode(errors="replace")
        lines = [line for line in text.split("\n") if "=" in line]
        lines = [line for line in lines if not line.startswith("MAINPID=")]
        if lines:
            self.upstream.send(*lines, fds=datagram.fds)

    def _after(self, status: int) -> int | None:
        """What a worker's wait ``status`` means: an exit status for the keeper, or None to
        start a new worker."""
        code = os.waitstatus_to_exitcode(status)
        if code == 0 or (self._stopping is not None and code == -self._stopping):
            return 0
        if self._stopping is not None:
            return code if code > 0 else 128 - code
        how = f"exit status {code}" if code > 0 else f"signal {signal.Signals(-code).name}"
        if len(self._started_at) >= self.burst:
            log.error(
                "worker died (%s), %d starts within %.0f s: giving up; the %d kept fds close",
                how,
                len(self._started_at),
                self.interval,
                len(self.store.kept),
            )
            return 1
        log.warning(
            "worker died (%s): starting a new one in %.1f s with %d kept fds",
            how,
            self.restart_delay,
            len(self.store.kept),
        )
        return None


def _readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m balloond.keeper",
        description="Run COMMAND as a worker, keep the fds it stores with FDSTORE=1 "
        "(the sd_notify protocol), and start it again with them (LISTEN_FDS) when it dies.",
    )
    parser.add_argument("--restart-delay", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--burst", type=int, default=5, help="starts within --interval, at most")
    parser.add_argument("--interval", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument(
        "--store-max",
        type=int,
        default=16384,
        metavar="FDS",
        help="fds kept, at most (each VM of balloond --keep-state keeps about 30)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the worker's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    logging.basicConfig(level=logging.INFO, format="balloond keeper: %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # the store holds every VM's fds
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    keeper = Keeper(
        command,
        restart_delay=args.restart_delay,
        burst=args.burst,
        interval=args.interval,
        store_max=args.store_max,
        upstream=Notifier(),
    )
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())

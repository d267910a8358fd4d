"""Telling the service manager how the daemon is doing: the sd_notify protocol.

A service of ``Type=notify`` finds the manager's datagram socket in ``NOTIFY_SOCKET`` (a
path, or ``@name`` for an abstract socket) and sends it newline-separated assignments, one
datagram per message (sd_notify(3)): ``READY=1`` once it serves, ``STATUS=`` lines for
``systemctl status``, ``STOPPING=1`` on the way out, ``WATCHDOG=1`` at least once per
``WATCHDOG_USEC`` when ``WatchdogSec=`` is set, and ``FDSTORE=1`` with fds attached
(SCM_RIGHTS) to have the manager keep them across a restart. Without ``NOTIFY_SOCKET`` every
call is a no-op, so the daemon calls the same methods in a terminal as under systemd.

Nothing here may stop the daemon: the socket is non-blocking (a full queue drops the
message), and a message that cannot be sent is logged once, at the first failure, never
raised. The watchdog is pinged from the event loop (:func:`watchdog_loop`), so a loop that
stops turning stops the pings and the manager restarts the daemon.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Most fds the kernel carries in one SCM_RIGHTS message (``SCM_MAX_FD``).
SCM_MAX_FD = 253
#: Longest fd name systemd accepts (``FDNAME_MAX``).
FDNAME_MAX = 255
#: The manager reads at most this much of one message (``NOTIFY_BUFFER_MAX``, PIPE_BUF).
NOTIFY_BUFFER_MAX = 4096
#: Seconds an ``FDSTORE=1`` message waits for room in the manager's queue: a kept fd the
#: store never got would cost a VM its balloon at the next crash.
STORE_PATIENCE = 2.0
#: Longest ``STATUS=`` text sent; longer text is cut, so a message always fits.
STATUS_MAX = 1024


@dataclass(frozen=True)
class NotifySettings:
    """What the manager told us in the environment.

    ``address`` is the manager's socket as the kernel wants it (a leading NUL byte for an
    abstract socket), None when there is none; ``watchdog_usec`` is the watchdog interval in
    microseconds, None when the watchdog is off or meant for another process.
    """

    address: bytes | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> NotifySettings:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        A value we cannot use is logged and treated as absent: a daemon that cannot notify
        still serves (the manager then times it out, which says more than a crash would).
        """
        env = os.environ if environ is None else environ
        address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        watchdog = _watchdog_usec(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        return cls(address, watchdog if address is not None else None)


def _notify_address(value: str) -> bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        address = b"\0" + os.fsencode(value[1:])
    elif value.startswith("/"):
        address = os.fsencode(value)
    else:  # vsock:CID:PORT (systemd >= 254) and anything else
        log.warning("NOTIFY_SOCKET=%s is not a Unix socket address; not notifying", value)
        return None
    if len(address) > (108 if address.startswith(b"\0") else 107):  # sizeof(sun_path)
        log.warning("NOTIFY_SOCKET=%s is too long for a Unix socket; not notifying", value)
        return None
    return address


def _watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    if usec is None:
        return None
    if pid is not None:
        if not pid.isdigit():
            log.warning("WATCHDOG_PID=%s is not a process id; watchdog off", pid)
            return None
        if int(pid) != os.getpid():
            return None  # meant for another process (sd_watchdog_enabled(3))
    if not usec.isdigit() or int(usec) == 0:
        log.warning("WATCHDOG_USEC=%s is not a positive number; watchdog off", usec)
        return None
    return int(usec)


def valid_fdname(name: str) -> bool:
    """Whether systemd takes ``name`` as an fd name: 1-255 ASCII characters, no control
    character, no ``:`` (the separator of ``LISTEN_FDNAMES``)."""
    return 0 < len(name) <= FDNAME_MAX and all(" " <= c < "\x7f" and c != ":" for c in name)


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op without one.

    Concurrency: every method sends at most one datagram per call on a non-blocking socket
    and returns at once; none waits for the manager. Methods may be called from any thread
    (each datagram is sent whole or not at all); the event loop is where the daemon calls
    them. The first failure is logged as a warning, later ones at debug level, so a manager
    that went away cannot flood the log.
    """

    def __init__(self, settings: NotifySettings | None = None) -> None:
        self.settings = NotifySettings.from_environment() if settings is None else settings
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether there is a manager to notify."""
        return self.settings.address is not None

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the daemon serves now (call it once every socket listens)."""
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=``: one line for ``systemctl status``."""
        return self.send(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the daemon is shutting down."""
        return self.send("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (what ``Type=notify-reload`` wants, systemd
        >= 253); send :meth:`ready` when the reload is done."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now}", *_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: starting or stopping takes up to ``seconds`` more."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (``WATCHDOG_USEC``), None when it is off.

        Ping at least once per interval; :func:`watchdog_loop` pings at half of it.
        """
        usec = self.settings.watchdog_usec
        return None if usec is None else usec / 1_000_000

    def store_fds(self, name: str, fds: Sequence[int], *, poll: bool = True) -> bool:
        """``FDSTORE=1`` + ``FDNAME=``: have the manager keep ``fds`` under ``name``.

        They come back at the next start in ``LISTEN_FDS``, named ``name`` in
        ``LISTEN_FDNAMES`` (see :mod:`balloond.activation`). The unit needs
        ``FileDescriptorStoreMax=``. With ``poll`` the manager drops an fd once it reports
        EPOLLHUP or EPOLLERR (a connection whose peer closed); ``poll=False`` sends
        ``FDPOLL=0``. More than :data:`SCM_MAX_FD` fds go in several messages of one name.
        The caller keeps (and may close) its own fds: the manager gets duplicates.
        """
        if not valid_fdname(name):
            raise ValueError(f"{name!r} is not a valid fd name")
        fields = ["FDSTORE=1", f"FDNAME={name}", *(() if poll else ("FDPOLL=0",))]
        sent = True
        for start in range(0, len(fds), SCM_MAX_FD):
            part = fds[start : start + SCM_MAX_FD]
            sent = self.send(*fields, fds=part, patience=STORE_PATIENCE) and sent
        return sent

    def remove_fds(self, name: str) -> bool:
        """``FDSTOREREMOVE=1`` + ``FDNAME=``: the manager closes every fd it keeps as ``name``."""
        if not valid_fdname(name):
            raise ValueError(f"{name!r} is not a valid fd name")
        return self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def send(self, *assignments: str, fds: Sequence[int] = (), patience: float = 0.0) -> bool:
        """Send one message of ``VARIABLE=value`` lines (and ``fds``); True if it went out.

        A no-op returning False without a manager. Never raises for a failure to send.
        ``patience``: seconds to keep trying while the manager's queue is full (else the
        message is dropped at once).
        """
        address = self.settings.address
        if address is None or not assignments:
            return False
        for assignment in assignments:
            if "\n" in assignment or "=" not in assignment:
                raise ValueError(f"not a notify assignment: {assignment!r}")
        data = "\n".join(assignments).encode()
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                )
            _send_patiently(self._socket, data, ancillary, address, patience)
        except OSError as error:
            level = logging.DEBUG if self._failed else logging.WARNING
            self._failed = True
            log.log(
                level,
                "cannot notify the service manager (%s): %s",
                data.split(b"\n", 1)[0].decode(),
                error,
            )
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _send_patiently(
    sock: socket.socket,
    data: bytes,
    ancillary: list[tuple[int, int, array.array[int]]],
    address: bytes,
    patience: float,
) -> None:
    """One ``sendmsg``, tried again while the receiver's queue is full, for ``patience``
    seconds (a datagram socket's poll does not say when the peer's queue has room)."""
    deadline = time.monotonic() + patience
    pause = 0.0005
    while True:
        try:
            sock.sendmsg([data], ancillary, 0, address)
            return
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def _status(text: str | None) -> tuple[str, ...]:
    """A ``STATUS=`` assignment of one line, cut to :data:`STATUS_MAX` characters."""
    if text is None:
        return ()
    line = " ".join(text.split("\n"))
    if len(line) > STATUS_MAX:
        line = line[: STATUS_MAX - 3] + "..."
    return (f"STATUS={line}",)


async def watchdog_loop(notifier: Notifier) -> None:
    """Ping the watchdog at half its interval, from the event loop, until cancelled.

    A loop that stops turning stops the pings: that is the point, the manager then kills
    and (``Restart=on-failure``) restarts the daemon. Without a watchdog this waits to be
    cancelled and sends nothing, so it can sit among the daemon's other long-lived tasks.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        await asyncio.Event().wait()
        return
    period = interval / 2
    log.debug("pinging the watchdog every %.3f s", period)
    while True:
        notifier.watchdog()
        await asyncio.sleep(period)

"""Sockets handed over by the service manager: socket activation (sd_listen_fds(3)).

systemd starts a socket-activated service with its listening sockets already open at fds 3,
4, ..., and says so in the environment: ``LISTEN_PID`` (the process they are meant for),
``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES`` (their names, colon-separated, from each
socket unit's ``FileDescriptorName=``). balloond serves each such socket as a device: this
is how a ``balloond.socket`` holds VM sockets before the daemon runs, and keeps them (and
the connections QEMU queues on them) while it restarts.

Names. A socket named by ``FileDescriptorName=`` becomes the device of that name. A socket
systemd named by default takes the file name of its socket path less ``.sock``, as
``--socket-path`` does (``/run/balloond/vm0.sock`` serves device ``vm0``): systemd's default
is the socket unit's own name with its ``.socket`` suffix, which one unit with several
``ListenStream=`` lines gives to all of them, and tools that pass no names at all leave
``unknown`` (or nothing). A device name is 1 to 64 letters, digits, ``-``, ``_`` or ``.``,
beginning with a letter or digit (:func:`valid_device_name`); two sockets of one name are
refused.

Checks, before anything is served: ``LISTEN_PID`` must be ours (otherwise the fds were meant
for another process, the variables were inherited, and nothing is taken), and every fd must
be a listening ``AF_UNIX`` ``SOCK_STREAM`` socket (``Accept=no``): anything else is an
:class:`~balloond.errors.OperatorError` naming the fd. Every passed fd is made close-on-exec,
and the ``LISTEN_*`` variables are removed, so that no child inherits either.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from balloond.errors import OperatorError

log = logging.getLogger(__name__)

#: The first fd the manager passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

_DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Names meaning "not named": what sd_listen_fds_with_names(3) reports without
#: LISTEN_FDNAMES, and what systemd-socket-activate passes for fds it was given no name for.
_UNNAMED = frozenset({"", "unknown"})


def valid_device_name(name: str) -> bool:
    """1 to 64 letters, digits, ``-``, ``_`` or ``.``, beginning with a letter or digit."""
    return _DEVICE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class PassedFd:
    """One fd the manager passed, with the name it gave (``unknown`` when it gave none)."""

    fd: int
    name: str


@dataclass(frozen=True)
class ActivatedSocket:
    """A listening socket passed by the manager, and the device it serves.

    ``path`` is the socket's file (empty for an abstract or unbound socket); it belongs to
    the manager, which keeps listening on it: the daemon must not remove it.
    """

    name: str
    listener: socket.socket
    path: str


def passed_fds(environ: MutableMapping[str, str] | None = None) -> list[PassedFd]:
    """The fds passed to this process, in order; [] when none were.

    Reads and removes ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from ``environ``
    (``os.environ`` by default, which also unsets them for child processes), and makes
    every passed fd close-on-exec. Checks only the variables, not what the fds are.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in LISTEN_VARIABLES}
    pid_text, count_text, names_text = values.values()
    if pid_text is None:
        if count_text is not None:
            log.warning("LISTEN_FDS is set without LISTEN_PID; ignored")
        return []
    if not pid_text.isdigit():
        raise OperatorError(f"socket activation: LISTEN_PID={pid_text} is not a process id")
    if int(pid_text) != os.getpid():
        log.warning(
            "LISTEN_PID=%s is not this process (%d): the passed sockets are not ours; ignored",
            pid_text,
            os.getpid(),
        )
        return []
    if count_text is None:
        return []
    if not count_text.isdigit():
        raise OperatorError(f"socket activation: LISTEN_FDS={count_text} is not a number")
    count = int(count_text)
    if names_text is None:
        names = ["unknown"] * count
    else:
        names = names_text.split(":") if count else []
        if len(names) != count:
            raise OperatorError(
                f"socket activation: LISTEN_FDNAMES has {len(names)} names "
                f"for LISTEN_FDS={count} fds"
            )
    passed = []
    for offset, name in enumerate(names):
        fd = LISTEN_FDS_START + offset
        try:
            os.set_inheritable(fd, False)
        except OSError as error:
            raise OperatorError(f"socket activation: fd {fd} ({name}): {error}") from None
        passed.append(PassedFd(fd, name))
    return passed


def activated_sockets(environ: MutableMapping[str, str] | None = None) -> list[ActivatedSocket]:
    """The listening sockets the manager passed, each with its device name, in order.

    Raises :class:`~balloond.errors.OperatorError` for anything that is not a listening
    Unix stream socket, a name that is no device name, and a name given twice. See the
    module's docstring for how sockets are named.
    """
    return listening_sockets(passed_fds(environ))


def listening_sockets(passed: list[PassedFd]) -> list[ActivatedSocket]:
    """Check that every passed fd is a listening Unix stream socket and name its device."""
    sockets: list[ActivatedSocket] = []
    try:
        for item in passed:
            listener = _listener(item)
            path = _bound_path(listener)
            try:
                name = device_name(item, path)
            except OperatorError:
                listener.detach()
                raise
            taken = next((s for s in sockets if s.name == name), None)
            if taken is not None:
                listener.detach()
                raise OperatorError(
                    f"socket activation: fd {taken.listener.fileno()} and fd {item.fd} "
                    f"both serve device {name!r}: give each socket unit its own "
                    "FileDescriptorName="
                )
            sockets.append(ActivatedSocket(name, listener, path))
    except OperatorError:
        for activated in sockets:
            activated.listener.detach()  # leave the fds as they came
        raise
    return sockets


def device_name(passed: PassedFd, path: str) -> str:
    """The device a passed socket serves: its fd name, or when unnamed its file's name less
    ``.sock``."""
    name = passed.name
    if name in _UNNAMED or name.endswith(".socket"):
        if not path:
            raise OperatorError(
                f"socket activation: fd {passed.fd} has no name ({name or 'empty'}) and no "
                "socket path to take one from: set FileDescriptorName="
            )
        name = os.path.basename(path).removesuffix(".sock")
        where = f"fd {passed.fd} ({path}, named after its file)"
    else:
        where = f"fd {passed.fd} (FileDescriptorName={name})"
    if not valid_device_name(name):
        raise OperatorError(
            f"socket activation: {where}: {name!r} is not a device name (1 to 64 letters, "
            "digits, '-', '_' or '.', beginning with a letter or digit)"
        )
    return name


def _listener(passed: PassedFd) -> socket.socket:
    where = f"socket activation: fd {passed.fd} ({passed.name or 'unnamed'})"
    return listening_unix_socket(
        passed.fd,
        where,
        stream_hint=" (ListenStream=/path)",
        listen_hint=" (the socket unit needs Accept=no)",
    )


def listening_unix_socket(
    fd: int, where: str, *, stream_hint: str = "", listen_hint: str = ""
) -> socket.socket:
    """Take fd ``fd`` as a listening Unix stream socket; OperatorError naming ``where`` if
    it is not one (the fd is then left open, not taken)."""
    try:
        listener = socket.socket(fileno=fd)
    except OSError as error:
        raise OperatorError(f"{where} is not a socket: {error.strerror}") from None
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        listener.detach()
        raise OperatorError(f"{where} is not a Unix stream socket{stream_hint}")
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.detach()
        raise OperatorError(f"{where} is not listening{listen_hint}")
    return listener


def _bound_path(listener: socket.socket) -> str:
    """The file a Unix socket is bound to; "" for an abstract or unbound socket."""
    address = listener.getsockname()
    return address if isinstance(address, str) else ""

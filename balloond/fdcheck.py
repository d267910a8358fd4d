"""What an fd from the frontend must be, checked when it arrives, and made non-blocking.

The daemon's one event loop thread reads kicks and writes calls, errors and backend-channel
messages: an fd that is not what the protocol says could spin it (a pipe at EOF is always
readable; a semaphore eventfd stays readable after one read) or block it (a full pipe, a
backend channel the frontend does not read). So: a kick, call or error fd must be an
eventfd, a kick fd a counting one (not EFD_SEMAPHORE), the backend channel a Unix stream
socket; each is made non-blocking. On a non-blocking eventfd a write that would block
means the counter is full, which is as good as signalled.

Setting O_NONBLOCK changes the open file description QEMU shares; QEMU's own eventfds are
non-blocking already (its event notifiers are created with EFD_NONBLOCK).
"""

from __future__ import annotations

import os
import socket
import stat

from balloond.errors import FrontendError


def _fdinfo(fd: int) -> dict[str, str]:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            lines = info.read().splitlines()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in lines if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def eventfd(fd: int, what: str, *, counting: bool = False) -> None:
    """Raise FrontendError unless ``fd`` is an eventfd (a counting one if ``counting``);
    make it non-blocking."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as error:
        raise FrontendError(f"{what}: fd {fd} cannot be inspected: {error}") from None
    if kind != "anon_inode:[eventfd]":
        raise FrontendError(f"{what}: fd {fd} is {kind}, not an eventfd")
    if counting and _fdinfo(fd).get("eventfd-semaphore") == "1":
        raise FrontendError(f"{what}: fd {fd} is a semaphore eventfd (EFD_SEMAPHORE)")
    os.set_blocking(fd, False)


def stream_socket(fd: int, what: str) -> None:
    """Raise FrontendError unless ``fd`` is a Unix stream socket; make it non-blocking."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise FrontendError(f"{what}: fd {fd}: {error}") from None
    if not stat.S_ISSOCK(mode):
        raise FrontendError(f"{what}: fd {fd} is not a socket")
    probe = socket.socket(fileno=fd)
    try:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            raise FrontendError(f"{what}: fd {fd} is not a Unix stream socket")
    finally:
        probe.detach()
    os.set_blocking(fd, False)

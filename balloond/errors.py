"""The exception hierarchy of balloond, split by who is at fault.

Every exception the package raises on purpose derives from `BalloondError`. Each
subclass names the party that caused it, so that each can be caught at one boundary:
a `FrontendError` ends the vhost-user connection, a `GuestError` completes the bad
chain and is counted, a `HostError` is logged with its errno, and an `OperatorError`
becomes a one-line message and a non-zero exit.
"""

from __future__ import annotations

import os


class BalloondError(Exception):
    """Root of every error balloond raises deliberately."""


class FrontendError(BalloondError):
    """The vhost-user frontend (QEMU) broke the protocol."""


class GuestError(BalloondError):
    """The guest wrote something invalid into a ring or into guest memory."""


class HostError(BalloondError):
    """The host operating system refused a request.

    `errno` is the error number the kernel returned, or None when there was none.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        if errno is not None:
            message = f"{message}: {os.strerror(errno)} (errno {errno})"
        super().__init__(message)
        self.errno = errno


class OperatorError(BalloondError):
    """Bad configuration or command line."""

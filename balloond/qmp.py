"""A small synchronous QMP client (QEMU's JSON monitor) on a Unix socket.

QMP is one JSON object per line each way. After the greeting the client must send
``qmp_capabilities``; then each ``{"execute": ...}`` gets exactly one ``{"return": ...}`` or
``{"error": {"class", "desc"}}``, in order, while asynchronous ``{"event": ...}`` lines may
arrive at any time, before or between replies. The client keeps the events it reads while
waiting for a reply, so that :meth:`QmpClient.wait_event` also finds an event that arrived
before it was asked for (``DEVICE_DELETED`` often comes back before ``device_del``'s reply is
read). Reference: QEMU ``docs/interop/qmp-spec.rst``.

A QEMU monitor on a socket serves one client at a time: a tool that needs QMP next to a
management layer that keeps its own connection needs a second ``-qmp`` (or ``-mon``) socket.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from balloond.errors import BalloondError

#: Longest line accepted from QEMU (``query-pci`` on a large machine is a few hundred KiB).
MAX_LINE = 16 << 20

Event = dict[str, Any]


class QmpError(BalloondError):
    """QEMU refused a command (``error_class`` is QMP's class, e.g. ``GenericError``), or
    the monitor connection failed (``error_class`` is None)."""

    def __init__(self, message: str, error_class: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class


class QmpClient:
    """One QMP connection. Not thread-safe: one caller at a time.

    Concurrency: the socket is read only inside :meth:`execute` and :meth:`wait_event`;
    events read meanwhile are queued (at most ``max_events``, oldest dropped) until a
    :meth:`wait_event` takes them.
    """

    def __init__(self, path: str, *, timeout: float = 30.0, max_events: int = 1000) -> None:
        self.path = path
        self.timeout = timeout
        self.events: deque[Event] = deque(maxlen=max_events)
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            greeting = self._read(timeout)
            if "QMP" not in greeting:
                raise QmpError(f"{path}: not a QMP monitor (greeting {greeting!r})")
            self.version = greeting["QMP"].get("version", {}).get("qemu", {})
            self.execute("qmp_capabilities")
        except OSError as error:
            self._sock.close()
            raise QmpError(f"cannot reach QEMU's monitor at {path}: {error}") from None
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _read(self, timeout: float) -> dict[str, Any]:
        """The next message, or QmpError after ``timeout`` seconds or on a closed monitor."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as error:
                raise QmpError(f"{self.path}: {error}") from None
            if not chunk:
                raise QmpError(f"{self.path}: QEMU closed the monitor connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise QmpError(f"{self.path}: a QMP message longer than {MAX_LINE} bytes")
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpError(f"{self.path}: not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QmpError(f"{self.path}: not a QMP message: {line[:200]!r}")
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; its ``return`` value, or QmpError with QEMU's class and text."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as error:
            raise QmpError(f"{self.path}: {command}: {error}") from None
        while True:
            try:
                message = self._read(self.timeout)
            except TimeoutError:
                raise QmpError(
                    f"{self.path}: no answer to {command} in {self.timeout:g} s"
                ) from None
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                failure = message["error"]
                raise QmpError(f"{command}: {failure.get('desc')}", str(failure.get("class")))
            if "return" in message:
                return message["return"]
            raise QmpError(f"{self.path}: unexpected answer to {command}: {message!r}")

    def wait_event(
        self, name: str, match: Callable[[Event], bool] = lambda _: True, timeout: float = 10.0
    ) -> Event | None:
        """The first event called ``name`` for which ``match`` holds, queued or arriving
        within ``timeout`` seconds; None if none came. Other events stay queued."""
        for event in list(self.events):
            if event.get("event") == name and match(event):
                self.events.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self._read(left)
            except TimeoutError:
                return None
            if "event" not in message:
                raise QmpError(f"{self.path}: an answer with no command: {message!r}")
            if message["event"] == name and match(message):
                return message
            self.events.append(message)
        return None

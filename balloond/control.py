"""The control socket: status, balloon target and guest statistics, as JSON lines.

One request per line, ``{"command": ..., ...}``; one answer per line, ``{"ok": true,
"result": {...}}`` or ``{"ok": false, "error": "..."}``. Commands:

- ``status``: connection, memory, target, counters and the latest guest statistics;
- ``set-target`` with ``target_bytes``: the guest memory size the balloon should leave;
- ``stats`` with optional ``refresh`` and ``timeout``: the guest's statistics, asking the
  guest for fresh ones first when ``refresh`` is true (a frozen guest gets ``timeout``).

The socket is owner-only by default, like the vhost-user socket: whoever can reach it can
take memory from the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from balloond.balloon import BALLOON_PAGE_SIZE, STAT_NAMES, Balloon
from balloond.errors import OperatorError
from balloond.server import DeviceServer

log = logging.getLogger(__name__)

#: Longest request line accepted.
MAX_REQUEST = 4096
DEFAULT_STATS_TIMEOUT = 5.0


class BalloonControl:
    """Operator actions on the balloon behind one DeviceServer."""

    def __init__(
        self, server: DeviceServer, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.server = server
        self.clock = clock

    def _balloon(self) -> Balloon | None:
        device = self.server.device
        return device if isinstance(device, Balloon) else None

    def _connected_balloon(self) -> Balloon:
        balloon = self._balloon()
        if balloon is None or self.server.connection is None:
            raise OperatorError(f"{self.server.name}: no VM is connected")
        return balloon

    def _ram_bytes(self) -> int:
        connection = self.server.connection
        return connection.backend.memory.size if connection is not None else 0

    def status(self) -> dict[str, Any]:
        balloon = self._balloon()
        result: dict[str, Any] = {
            "device": self.server.name,
            "connected": self.server.connection is not None,
            "ram_bytes": self._ram_bytes(),
        }
        if balloon is None:
            return result
        state = balloon.state
        ram = self._ram_bytes() or state.ram_size
        result.update(
            features=state.features,
            target_bytes=ram - state.num_pages * BALLOON_PAGE_SIZE if ram else None,
            balloon_target_bytes=state.num_pages * BALLOON_PAGE_SIZE,
            actual_bytes=state.actual * BALLOON_PAGE_SIZE,
            poison_val=state.poison_val,
            page_poisoning=balloon.poisoning,
            queues={str(i): role.value for i, role in balloon.roles.items()},
            counters=asdict(state.counters),
        )
        result.update(self._stats(balloon))
        return result

    def _stats(self, balloon: Balloon) -> dict[str, Any]:
        state = balloon.state
        named = {STAT_NAMES.get(tag, f"tag_{tag}"): value for tag, value in state.stats.items()}
        age = None if state.stats_time is None else round(self.clock() - state.stats_time, 3)
        return {"stats": named, "stats_age_seconds": age}

    def set_target(self, target_bytes: int) -> dict[str, Any]:
        balloon = self._connected_balloon()
        balloon.set_target(target_bytes, self._ram_bytes())
        connection = self.server.connection
        told = connection is not None and connection.notify_config()
        if not told:
            log.warning(
                "%s: no backend channel; the guest sees the target on its next read",
                self.server.name,
            )
        log.info("%s: balloon target set to %d bytes", self.server.name, target_bytes)
        return {"target_bytes": target_bytes, "guest_notified": told}

    def request_stats(self) -> bool:
        """Ask the guest for fresh statistics (give its buffer back); False if impossible."""
        balloon = self._balloon()
        connection = self.server.connection
        if balloon is None or connection is None or not balloon.request_stats():
            return False
        connection.flush()
        return True

    async def stats(self, *, refresh: bool, timeout: float) -> dict[str, Any]:
        balloon = self._connected_balloon()
        if refresh:
            before = balloon.state.stats_time
            if not balloon.stats_queue_running:
                raise OperatorError(
                    f"{self.server.name}: the guest's statistics queue is not running "
                    "(no driver, or the VM is paused)"
                )
            # False when a request is already out: then wait for its answer as well.
            self.request_stats()
            deadline = self.clock() + timeout
            while balloon.state.stats_time == before:
                if self.clock() >= deadline:
                    raise OperatorError(
                        f"{self.server.name}: the guest did not answer within {timeout:g} s"
                    )
                await asyncio.sleep(0.02)
        return self._stats(balloon)

    async def poll_stats(self, interval: float) -> None:
        """Ask for fresh statistics every ``interval`` seconds (QEMU's polling interval)."""
        while True:
            await asyncio.sleep(interval)
            self.request_stats()


class ControlServer:
    """Serves JSON-line requests on a Unix socket for one or more devices."""

    def __init__(self, listener: socket.socket, devices: dict[str, BalloonControl]) -> None:
        self.listener = listener
        self.devices = devices

    async def serve(self) -> None:
        server = await asyncio.start_unix_server(
            self._client, sock=self.listener, limit=MAX_REQUEST
        )
        async with server:
            await server.serve_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = await self.answer(line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ValueError, ConnectionError) as error:  # a line over the limit, a reset
            log.info("control client dropped: %s", error)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise OperatorError("a request is a JSON object")
            return {"ok": True, "result": await self._dispatch(request)}
        except json.JSONDecodeError as error:
            return {"ok": False, "error": f"not JSON: {error}"}
        except OperatorError as error:
            return {"ok": False, "error": str(error)}

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("device")
        if name is None and len(self.devices) == 1:
            control = next(iter(self.devices.values()))
        elif name in self.devices:
            control = self.devices[name]
        else:
            raise OperatorError(f"no device {name!r} (devices: {', '.join(self.devices)})")
        command = request.get("command")
        if command == "status":
            return control.status()
        if command == "set-target":
            target = request.get("target_bytes")
            if not isinstance(target, int) or isinstance(target, bool):
                raise OperatorError("set-target needs an integer target_bytes")
            return control.set_target(target)
        if command == "stats":
            timeout = request.get("timeout", DEFAULT_STATS_TIMEOUT)
            if not isinstance(timeout, int | float) or not 0 < timeout <= 300:
                raise OperatorError("timeout must be a number of seconds in (0, 300]")
            return await control.stats(refresh=bool(request.get("refresh")), timeout=timeout)
        raise OperatorError(f"unknown command {command!r} (status, set-target, stats)")


def request(path: str, message: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to a control socket and return its result (blocking client)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(path)
        except OSError as error:
            raise OperatorError(f"cannot reach balloond at {path}: {error.strerror}") from None
        client.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                raise OperatorError(f"balloond at {path} closed the connection")
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise OperatorError(str(answer.get("error")))
    result: dict[str, Any] = answer["result"]
    return result

"""Operator actions on one device, and the daemon's control socket (JSON lines).

One request per line, ``{"version": 1, "command": ..., ...}``; one answer per line,
``{"version": 1, "ok": true, "result": {...}}`` or ``{"version": 1, "ok": false, "error":
"..."}``. The commands are listed in ``balloond.daemon`` and docs/operations.md.

The socket is owner-only by default: whoever can reach it can take memory from guests.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from balloond.balloon import BALLOON_PAGE_SIZE, STAT_NAMES, Balloon
from balloond.errors import OperatorError
from balloond.server import DeviceServer

log = logging.getLogger(__name__)

#: Longest request line accepted.
MAX_REQUEST = 4096
#: The control protocol's version: sent with every answer, checked in every request.
VERSION = 1
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

    def host_resident_bytes(self) -> int | None:
        """Guest memory the host really holds: the allocated blocks of the guest memory
        files (each file once, however many regions map it); None without a VM."""
        connection = self.server.connection
        if connection is None:
            return None
        files: dict[tuple[int, int], int] = {}
        for _, fd in connection.backend.memory.snapshot():
            try:
                info = os.fstat(fd)
            except OSError:
                continue
            files[(info.st_dev, info.st_ino)] = info.st_blocks * 512
        return sum(files.values())

    def status(self) -> dict[str, Any]:
        balloon = self._balloon()
        result: dict[str, Any] = {
            "device": self.server.name,
            "connected": self.server.connection is not None,
            "ram_bytes": self._ram_bytes(),
            "host_resident_bytes": self.host_resident_bytes(),
            "connections": self.server.connections,
            "errors": dict(self.server.errors),
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
                "no backend channel; the guest sees the target on its next read",
                extra={"device": self.server.name},
            )
        log.info("balloon target set to %d bytes", target_bytes, extra={"device": self.server.name})
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
                if self.server.connection is None or self.server.device is not balloon:
                    raise OperatorError(f"{self.server.name}: the VM went away before it answered")
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
    """Serves JSON-line requests on the daemon's Unix control socket.

    Each request goes to ``dispatch``; its answer (or its OperatorError, as a one-line
    error) goes back with the protocol version. Only peers the daemon trusts get answers:
    root, the daemon's own user, and members of ``group`` (checked with SO_PEERCRED on
    every connection, as well as by the socket file's mode). At most ``max_clients``
    connections at once, each closed after ``idle_timeout`` seconds without a request: a
    client cannot use up the daemon's fds, which QEMU's next message may need.

    Concurrency: each client is one task on the event loop; a request waits only for its
    own answer (a stats refresh waits for the guest, at most its timeout).
    """

    def __init__(
        self,
        listener: socket.socket,
        dispatch: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        *,
        group: str | None = None,
        max_clients: int = 32,
        idle_timeout: float = 60.0,
    ) -> None:
        self.listener = listener
        self.dispatch = dispatch
        self.gid = _group_id(group) if group is not None else None
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self._clients = 0

    async def serve(self) -> None:
        server = await asyncio.start_unix_server(
            self._client, sock=self.listener, limit=MAX_REQUEST
        )
        async with server:
            await server.serve_forever()

    def allowed(self, uid: int, gid: int) -> bool:
        """Whether a peer with this uid (and primary gid) may use the daemon."""
        if uid in (0, os.geteuid()):
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            return False
        return self.gid in os.getgrouplist(user, gid)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._clients >= self.max_clients:
                log.warning("control client refused: %d connections open", self._clients)
                await _send(writer, _error("too many control connections; try again"))
                return
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, gid = _UCRED.unpack(creds)
            if not self.allowed(uid, gid):
                log.warning("control client refused: pid %d uid %d gid %d", pid, uid, gid)
                await _send(writer, _error("permission denied"))
                return
            self._clients += 1
            try:
                while True:
                    try:
                        line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                    except ValueError:  # longer than MAX_REQUEST: say so, then hang up
                        await _send(writer, _error(f"request longer than {MAX_REQUEST} bytes"))
                        return
                    if not line:
                        return
                    await _send(writer, await self.answer(line))
            finally:
                self._clients -= 1
        except (ValueError, ConnectionError, TimeoutError) as error:
            # a line over the limit, a reset, an idle client
            log.info("control client dropped: %s", error or type(error).__name__)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise OperatorError("a request is a JSON object")
            version = request.get("version", VERSION)
            if version != VERSION:
                raise OperatorError(f"protocol version {version!r} is not {VERSION}")
            return {"version": VERSION, "ok": True, "result": await self.dispatch(request)}
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
            return _error(f"not JSON: {error}")
        except OperatorError as error:
            return _error(str(error))


_UCRED = struct.Struct("3i")


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise OperatorError(f"unknown group {name!r}") from None


def _error(message: str) -> dict[str, Any]:
    return {"version": VERSION, "ok": False, "error": message}


async def _send(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
    writer.write(json.dumps(answer).encode() + b"\n")
    await writer.drain()


def request(path: str, message: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to a daemon's control socket and return its result (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OperatorError(
                f"no balloond is running at {path} (start one with 'balloond serve', or "
                "name its control socket with --control)"
            ) from None
        except PermissionError:
            raise OperatorError(
                f"permission denied on {path}: run as root, as the daemon's user, or as a "
                "member of its --control-group"
            ) from None
        except OSError as error:
            raise OperatorError(f"cannot reach balloond at {path}: {error.strerror}") from None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # A daemon that refuses a peer answers at once and hangs up; read why below.
            client.sendall(json.dumps({"version": VERSION, **message}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = client.recv(65536)
            except TimeoutError:
                raise OperatorError(f"balloond at {path} did not answer in {timeout:g} s") from None
            except ConnectionResetError:  # it went away with the request unread (a reload)
                chunk = b""
            if not chunk:
                raise OperatorError(f"balloond at {path} closed the connection")
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise OperatorError(str(answer.get("error")))
    result: dict[str, Any] = answer["result"]
    return result

"""One daemon, many VMs: the named devices a ``balloond serve`` process serves.

Each device is one VM's balloon: a vhost-user socket (listening for QEMU, or connecting to a
QEMU that listens), its :class:`~balloond.server.DeviceServer` with its own discard thread
(a slow discard of one VM never delays another VM's config reply or report), and its
:class:`~balloond.control.BalloonControl`. Devices are added at start (command line, config
file, sockets passed by systemd) and while the daemon runs (``balloond add``/``remove``).

Concurrency: everything here runs on the event loop thread. Adding a device starts its
serving task; removing one cancels that task, which ends the VM's connection (the server
waits for its discard thread before closing any fd) and removes the socket file if this
process created it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balloond import logs, record
from balloond.activation import valid_device_name
from balloond.balloon import Balloon, BalloonOptions
from balloond.control import BalloonControl
from balloond.discard import Discarder, NullDiscarder, RangeDiscarder
from balloond.errors import OperatorError
from balloond.keeping import DeviceKeeping
from balloond.notify import Notifier, NotifySettings
from balloond.protocol import VhostUserBackend
from balloond.record import DeviceRecord, DeviceSettings, restore_state
from balloond.server import Adopted, DeviceServer, listen

log = logging.getLogger(__name__)

#: Discard jobs up to this size (bytes, ranges) run on the event loop's thread: an inflate
#: buffer (256 pages of 4 KiB, 1 MiB) whose pages are not all scattered, a native call of
#: 0.1 to 1 ms; two thread wake-ups per buffer cost more (docs/PERFORMANCE.md). A report of
#: 32 blocks of 2 MiB (up to 20 ms) goes to the device's discard thread, so that config
#: requests are answered while it runs.
INLINE = (4 << 20, 64)
#: With ``--no-discard`` no job makes a native call: every one runs on the loop's thread.
EVERY_JOB_INLINE = (1 << 64, 1 << 32)


def check_name(name: str) -> str:
    """A device name: what ``balloond status NAME`` and the metrics' ``device`` label show."""
    if not valid_device_name(name):
        raise OperatorError(
            f"bad device name {name!r}: letters, digits, '_', '.', '-', at most 64, "
            "starting with a letter or digit"
        )
    return name


def name_for_path(path: str) -> str:
    """A device named after its socket file: ``/run/balloond/vm0.sock`` -> ``vm0``."""
    return os.path.basename(path).removesuffix(".sock")


@dataclass(frozen=True)
class ServiceOptions:
    """What every device of the daemon shares."""

    discard: bool = True
    deflate_on_oom: bool = False
    free_page_reporting: bool = True
    socket_mode: int = 0o600
    socket_group: str | None = None
    stats_interval: float = 0.0
    #: Keep every device's fds and state record in the fd store (balloond.keeping); None:
    #: when there is a store (``$FDSTORE``).
    keep_state: bool | None = None


@dataclass(frozen=True)
class DeviceSpec:
    """Where a device's frontend is found: a socket to listen on (``socket_path``), one to
    connect to (``connect_path``, QEMU started with ``server=on``), or a listening socket
    handed over by the service manager (``listener``)."""

    name: str
    socket_path: str | None = None
    connect_path: str | None = None
    listener: socket.socket | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        if self.connect_path is not None:
            return f"connecting to {self.connect_path}"
        if self.socket_path is not None:
            return f"listening on {self.socket_path}"
        return "listening on a socket passed by the service manager"


class Device:
    """One VM's balloon in the daemon."""

    def __init__(self, spec: DeviceSpec, server: DeviceServer, owned_path: str | None) -> None:
        self.spec = spec
        self.server = server
        self.control = BalloonControl(server)
        #: The socket file this process created (removed when the device goes).
        self.owned_path = owned_path
        self.tasks: list[asyncio.Task[None]] = []
        #: Its fds and record in the fd store (``keep_state``), else None.
        self.keeping: DeviceKeeping | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def status(self) -> dict[str, Any]:
        result = self.control.status()
        result["socket"] = self.spec.connect_path or self.spec.socket_path
        result["mode"] = "connect" if self.spec.connect_path else "listen"
        result["pid"] = os.getpid()
        return result


class Service:
    """The devices of one daemon, by name."""

    def __init__(
        self,
        options: ServiceOptions,
        *,
        discarder: RangeDiscarder | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.options = options
        #: Where devices keep their fds with ``keep_state``: the service manager, or the
        #: built-in keeper.
        self.notifier = notifier or Notifier(NotifySettings())
        self.discarder: RangeDiscarder = discarder or (
            Discarder() if options.discard else NullDiscarder()
        )
        #: A discarder given by the caller may block (tests hold discards in flight): its
        #: jobs all go to the discard thread.
        self.inline = (0, 0)
        if discarder is None:
            self.inline = INLINE if options.discard else EVERY_JOB_INLINE
        self.devices: dict[str, Device] = {}
        #: Called with a device's name when it is added or removed (metrics, notify).
        self.on_change: Callable[[], None] = lambda: None

    @property
    def balloon_options(self) -> BalloonOptions:
        return BalloonOptions(
            deflate_on_oom=self.options.deflate_on_oom,
            free_page_reporting=self.options.free_page_reporting,
        )

    def _factory(self, options: BalloonOptions | None = None) -> Callable[[], Balloon]:
        chosen = options or self.balloon_options
        return lambda: Balloon(chosen)

    def add(self, spec: DeviceSpec) -> Device:
        """Start serving ``spec``; OperatorError for a taken name or socket."""
        check_name(spec.name)
        if spec.name in self.devices:
            raise OperatorError(f"device {spec.name!r} exists already")
        for other in self.devices.values():
            for mine, theirs in (
                (spec.socket_path, other.spec.socket_path),
                (spec.connect_path, other.spec.connect_path),
            ):
                if mine is not None and theirs is not None and _same(mine, theirs):
                    raise OperatorError(f"{mine} is already device {other.name!r}")
        owned: str | None = None
        if spec.connect_path is not None:
            server = DeviceServer(
                None,
                self._factory(),
                self.discarder,
                name=spec.name,
                connect_path=spec.connect_path,
                inline=self.inline,
            )
        else:
            listener = spec.listener
            if listener is None:
                if spec.socket_path is None:
                    raise OperatorError(f"device {spec.name!r} needs a socket path")
                listener = listen(
                    spec.socket_path, mode=self.options.socket_mode, group=self.options.socket_group
                )
                owned = spec.socket_path
            server = DeviceServer(
                listener, self._factory(), self.discarder, name=spec.name, inline=self.inline
            )
        return self._start(Device(spec, server, owned))

    def restore(
        self,
        record: DeviceRecord,
        keeping: DeviceKeeping | None = None,
        fresh: socket.socket | None = None,
    ) -> Device:
        """Serve a device as a predecessor process served it (``balloond reload``): its
        listening socket, and its connected frontend carried on from the record. Takes the
        record's fds; RecordError (or an OSError from mapping guest memory) if the record
        cannot be carried on, and then the caller closes them. ``keeping``: where the
        device's fds and record were kept (a restart after a death), else they are kept
        anew if the service keeps state. ``fresh``: a frontend's connection nothing was read
        from yet, served first as a new one."""
        if record.name in self.devices:
            raise OperatorError(f"device {record.name!r} exists already")
        settings = record.settings
        options = BalloonOptions(
            deflate_on_oom=settings.deflate_on_oom,
            free_page_reporting=settings.free_page_reporting,
        )
        adopted = None
        if record.connection is not None:
            restored = restore_state(record)
            balloon = Balloon(options, state=restored.balloon)
            backend = VhostUserBackend.restore(balloon, restored.backend, restored.regions)
            sock = socket.socket(fileno=record.connection.socket)
            sock.setblocking(False)
            connection = record.connection
            adopted = Adopted(
                sock, backend, balloon, connection.reply_pipe, connection.last_request
            )
        listener = None if record.listener is None else socket.socket(fileno=record.listener)
        server = DeviceServer(
            listener,
            self._factory(options),
            self.discarder,
            name=record.name,
            connect_path=settings.connect_path,
            adopted=adopted,
            inline=self.inline,
        )
        server.connections = record.connections
        server.errors = dict(record.errors)
        server.fresh = fresh
        spec = DeviceSpec(
            record.name,
            socket_path=settings.socket_path,
            connect_path=settings.connect_path,
            listener=listener,
        )
        owned = settings.socket_path if settings.owns_socket else None
        return self._start(Device(spec, server, owned), keeping)

    def capture(self, device: Device) -> DeviceRecord:
        """The device's record as it is now (with its VM's connection, if one is served)."""
        server = device.server
        spec = device.spec
        listener = None if server.listener is None else server.listener.fileno()
        connection = server.connection
        balloon = server.device
        options = balloon.options if isinstance(balloon, Balloon) else None
        settings = DeviceSettings(
            deflate_on_oom=options.deflate_on_oom if options else False,
            discard=self.options.discard,
            free_page_reporting=options.free_page_reporting if options else True,
            socket_path=spec.socket_path,
            connect_path=spec.connect_path,
            owns_socket=device.owned_path is not None,
        )
        if connection is None or connection.closed:
            return DeviceRecord(
                device.name,
                record.current_boot_id(),
                settings,
                listener,
                None,
                server.connections,
                tuple(sorted(server.errors.items())),
            )
        if not isinstance(balloon, Balloon):
            raise TypeError(f"{device.name}: the device is not a balloon")
        return record.capture(
            connection.backend,
            balloon,
            device.name,
            socket=connection.sock.fileno(),
            settings=settings,
            listener=listener,
            last_request=connection.last_request,
            reply_pipe=connection.reply_pipe,
            connections=server.connections,
            errors=server.errors,
        )

    def capture_progress(self, device: Device, base: int) -> bytes | None:
        """The device's progress document since record ``base``; None with no VM."""
        connection = device.server.connection
        balloon = device.server.device
        if connection is None or connection.closed or not isinstance(balloon, Balloon):
            return None
        return record.encode_progress(
            connection.backend.state,
            balloon.state,
            connection.last_request,
            base,
            clock=balloon.clock,
        )

    def _start(self, device: Device, keeping: DeviceKeeping | None = None) -> Device:
        spec = device.spec
        device.server.on_connection = lambda: self.on_change()
        new = keeping is None and bool(self.options.keep_state)
        if new:
            keeping = DeviceKeeping.create(self.notifier, spec.name)
        if keeping is not None:
            keeping.capture = lambda: self.capture(device)
            keeping.capture_progress = lambda base: self.capture_progress(device, base)
            device.keeping = keeping
            device.server.keeping = keeping
            # A new device's first record. A restored one commits nothing until its serving
            # task runs: before that, its connection is not yet in the server, and a record
            # without it would let the store drop every fd of the VM.
            if new:
                keeping.commit()
        context = contextvars.copy_context()
        context.run(logs.bind_device, spec.name)
        device.tasks.append(
            asyncio.create_task(self._serve(device), name=f"device-{spec.name}", context=context)
        )
        if self.options.stats_interval > 0:
            device.tasks.append(
                asyncio.create_task(
                    device.control.poll_stats(self.options.stats_interval),
                    name=f"stats-{spec.name}",
                    context=context,
                )
            )
        self.devices[spec.name] = device
        log.info("%s", spec.where, extra={"device": spec.name})
        self.on_change()
        return device

    async def _serve(self, device: Device) -> None:
        try:
            await device.server.serve()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug of ours in one device: that device stops, the daemon and the others go on.
            log.exception("the device stopped on an internal error")

    async def remove(self, name: str, *, force: bool = False) -> None:
        """Stop serving ``name``. A connected VM is refused unless ``force``: its balloon
        stays dead until the VM restarts (QEMU never reconnects)."""
        device = self.devices.get(name)
        if device is None:
            raise OperatorError(f"no device {name!r} ({self._known()})")
        if device.server.connection is not None:
            if not force:
                raise OperatorError(
                    f"{name}: a VM is connected; removing the device kills its balloon until "
                    "the VM restarts (use --force to do it anyway)"
                )
            log.warning(
                "removed with a VM connected: its balloon stays dead until the VM restarts",
                extra={"device": name},
            )
        del self.devices[name]
        await _stop(device)
        log.info("device removed", extra={"device": name})
        self.on_change()

    async def close(self) -> None:
        """Stop every device (daemon shutdown)."""
        devices, self.devices = list(self.devices.values()), {}
        for device in devices:
            if device.server.connection is not None:
                # Stop means stop, also with the state kept: the fds leave the store. Said
                # loudly, once per VM: a reload or a crash would have kept it.
                log.error(
                    "stopping with a VM connected: its balloon stays dead until the VM restarts",
                    extra={"device": device.name},
                )
        await asyncio.gather(*(_stop(device) for device in devices))

    def device(self, name: str | None) -> Device:
        """The device ``name``; with None, the only device (OperatorError otherwise)."""
        if name is None:
            if len(self.devices) == 1:
                return next(iter(self.devices.values()))
            raise OperatorError(f"which device? ({self._known()})")
        try:
            return self.devices[name]
        except KeyError:
            raise OperatorError(f"no device {name!r} ({self._known()})") from None

    def find(self, name_or_path: str) -> Device:
        """A device by name, or by the path of its vhost-user socket."""
        if name_or_path in self.devices or "/" not in name_or_path:
            return self.device(name_or_path)
        for device in self.devices.values():
            path = device.spec.socket_path or device.spec.connect_path
            if path is not None and _same(path, name_or_path):
                return device
        raise OperatorError(f"no device serves {name_or_path} ({self._known()})")

    def _known(self) -> str:
        return f"devices: {', '.join(sorted(self.devices))}" if self.devices else "no devices"


async def _stop(device: Device) -> None:
    for task in device.tasks:
        task.cancel()
    for task in device.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if device.keeping is not None:
        device.keeping.forget()
    device.server.close()
    if device.owned_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(device.owned_path)


def _same(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)

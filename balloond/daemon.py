"""``balloond serve``: the daemon's configuration, its control commands and its main loop.

The configuration comes from an optional TOML file (``--config``) and the command line
(which wins); devices come from both and from sockets the service manager passes. The
control socket's commands (JSON lines, see ``balloond.control``):

- ``status`` (``device`` optional): every device, or one; ``schema_version`` says which
  shape the answer has (docs/operations.md);
- ``set-target`` (``device``, ``target_bytes``): the memory size the guest should keep;
- ``stats`` (``device``, ``refresh``, ``timeout``): the guest's memory statistics;
- ``add`` (``name``, and ``socket_path`` or ``connect_path``): serve another VM;
- ``remove`` (``name``, ``force``): stop serving one;
- ``reload``: hand every device over to a new image of the daemon (``balloond.handoff``),
  answered before the hand-off; ``status`` then shows ``reloads`` one higher.

``device`` is a device name or the path of its vhost-user socket, and may be left out when
the daemon serves one device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import time
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from balloond import handoff, keeping, metrics, record
from balloond.activation import PassedFd, listening_sockets, passed_fds
from balloond.control import DEFAULT_STATS_TIMEOUT, ControlServer
from balloond.errors import OperatorError
from balloond.notify import Notifier, NotifySettings, watchdog_loop
from balloond.server import listen
from balloond.service import DeviceSpec, Service, ServiceOptions, check_name

log = logging.getLogger("balloond")

#: The shape of ``status`` answers; bump when a field changes meaning or goes away.
STATUS_SCHEMA = 1
CONTROL_NAME = "control.sock"


def default_control_path() -> str:
    """Where the daemon's control socket is unless told: ``$BALLOOND_CONTROL``; systemd's
    ``$RUNTIME_DIRECTORY`` (RuntimeDirectory=balloond); ``/run/balloond`` for root; else the
    user's ``$XDG_RUNTIME_DIR/balloond``."""
    if configured := os.environ.get("BALLOOND_CONTROL"):
        return configured
    if runtime := os.environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(runtime.split(":")[0], CONTROL_NAME)
    if os.geteuid() == 0:
        return os.path.join("/run/balloond", CONTROL_NAME)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(xdg, "balloond", CONTROL_NAME)
    return os.path.join(f"/tmp/balloond-{os.geteuid()}", CONTROL_NAME)


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``balloond serve`` was told, merged from the file and the command line."""

    options: ServiceOptions = field(default_factory=ServiceOptions)
    devices: tuple[DeviceSpec, ...] = ()
    control_socket: str | None = None
    control_group: str | None = None
    control_mode: int | None = None
    log_level: str = "info"
    metrics_listen: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def control_path(self) -> str:
        return self.control_socket or default_control_path()


_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "control_socket": str,
    "control_group": str,
    "socket_mode": str,
    "socket_group": str,
    "stats_interval": (int, float),
    "discard": bool,
    "deflate_on_oom": bool,
    "free_page_reporting": bool,
    "keep_state": bool,
    "log_level": str,
    "metrics_listen": str,
    "devices": dict,
}


def read_config(path: str) -> DaemonConfig:
    """Read a TOML configuration file; OperatorError, naming the key, for anything wrong."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise OperatorError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise OperatorError(f"{path}: {error}") from None
    for key, value in data.items():
        kinds = _FILE_KEYS.get(key)
        if kinds is None:
            raise OperatorError(f"{path}: unknown setting {key!r} ({', '.join(_FILE_KEYS)})")
        if not isinstance(value, kinds) or (kinds is not bool and isinstance(value, bool)):
            raise OperatorError(f"{path}: {key} has the wrong type")
    options = ServiceOptions(
        discard=data.get("discard", True),
        deflate_on_oom=data.get("deflate_on_oom", False),
        free_page_reporting=data.get("free_page_reporting", True),
        socket_mode=parse_mode(data["socket_mode"]) if "socket_mode" in data else 0o600,
        socket_group=data.get("socket_group"),
        stats_interval=float(data.get("stats_interval", 0.0)),
        keep_state=data.get("keep_state"),
    )
    devices: list[DeviceSpec] = []
    for name, table in data.get("devices", {}).items():
        check_name(name)
        if not isinstance(table, dict) or set(table) - {"socket_path", "connect"}:
            raise OperatorError(f"{path}: devices.{name} takes socket_path or connect")
        socket_path, connect = table.get("socket_path"), table.get("connect")
        if (socket_path is None) == (connect is None) or not isinstance(
            socket_path or connect, str
        ):
            raise OperatorError(f"{path}: devices.{name} needs one of socket_path, connect")
        devices.append(DeviceSpec(name, socket_path=socket_path, connect_path=connect))
    return DaemonConfig(
        options=options,
        devices=tuple(devices),
        control_socket=data.get("control_socket"),
        control_group=data.get("control_group"),
        log_level=data.get("log_level", "info"),
        metrics_listen=data.get("metrics_listen"),
    )


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise OperatorError(f"{text!r} is not an octal mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise OperatorError(f"{text!r} is not a permission mode")
    return mode


def merge(base: DaemonConfig, **changes: Any) -> DaemonConfig:
    """``base`` with the command line's settings (None means not given) on top."""
    options = {k: v for k, v in changes.pop("options", {}).items() if v is not None}
    devices = changes.pop("devices", ())
    names = [spec.name for spec in (*base.devices, *devices)]
    for name in names:
        if names.count(name) > 1:
            raise OperatorError(f"device {name!r} is given twice")
    given = {k: v for k, v in changes.items() if v is not None}
    return replace(
        base,
        options=replace(base.options, **options),
        devices=(*base.devices, *devices),
        **given,
    )


class Daemon:
    """The running daemon: its service, its control socket, its shutdown."""

    def __init__(
        self,
        config: DaemonConfig,
        service: Service,
        notifier: Notifier | None = None,
        *,
        reloads: int = 0,
    ) -> None:
        self.config = config
        self.service = service
        self.notifier = notifier or Notifier(NotifySettings())
        #: How many times this daemon was reloaded (its pid stays the same).
        self.reloads = reloads
        #: Why the last reload failed (None while one runs, or if none failed).
        self.reload_error: str | None = None
        self._reload: asyncio.Task[None] | None = None

    def start_reload(self) -> bool:
        """Start a reload (``balloond reload``, SIGHUP); False if one is under way."""
        if self._reload is not None and not self._reload.done():
            return False
        self.reload_error = None
        self._reload = asyncio.create_task(self.reload(), name="reload")
        return True

    async def reload(self) -> None:
        """Hand every device over to a new image of this program; returns only if that
        failed, and then every device carries on here."""
        log.info("reloading: holding %d devices", len(self.service.devices))
        self.notifier.reloading("reloading")
        since_ns = time.monotonic_ns()
        holding = asyncio.ensure_future(handoff.hold_all(self.service))
        try:
            await asyncio.wait_for(holding, handoff.HOLD_TIMEOUT)
            handoff.hand_over(self.service, self.reloads + 1, since_ns)
            raise OSError("execve returned")  # pragma: no cover
        except Exception as error:
            log.error("reload failed, carrying on in this process: %s", error)
            self.reload_error = str(error) or type(error).__name__
            handoff.release_all(self.service)
            self.notifier.ready(summary(self.service))

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "status":
            return self.status(_optional_str(request, "device"))
        if command == "add":
            return self.add(request)
        if command == "reload":
            if not self.start_reload():
                raise OperatorError("a reload is under way")
            return {"reloading": True, "pid": os.getpid(), "reloads": self.reloads}
        if command == "remove":
            name = _str(request, "name")
            await self.service.remove(name, force=request.get("force") is True)
            return {"removed": name}
        wanted = _optional_str(request, "device")
        device = self.service.find(wanted) if wanted else self.service.device(None)
        if command == "set-target":
            target = request.get("target_bytes")
            if not isinstance(target, int) or isinstance(target, bool):
                raise OperatorError("set-target needs an integer target_bytes")
            return {"device": device.name, **device.control.set_target(target)}
        if command == "stats":
            timeout = request.get("timeout", DEFAULT_STATS_TIMEOUT)
            if not isinstance(timeout, int | float) or not 0 < timeout <= 300:
                raise OperatorError("timeout must be a number of seconds in (0, 300]")
            stats = await device.control.stats(
                refresh=request.get("refresh") is True, timeout=timeout
            )
            return {"device": device.name, **stats}
        raise OperatorError(
            f"unknown command {command!r} (status, set-target, stats, add, remove, reload)"
        )

    def status(self, device: str | None) -> dict[str, Any]:
        if device is not None:
            return {"schema_version": STATUS_SCHEMA, **self.service.find(device).status()}
        devices = [d.status() for d in sorted(self.service.devices.values(), key=_by_name)]
        return {
            "schema_version": STATUS_SCHEMA,
            "pid": os.getpid(),
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "devices": devices,
        }

    def add(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _str(request, "name")
        socket_path = _optional_str(request, "socket_path")
        connect_path = _optional_str(request, "connect_path")
        if (socket_path is None) == (connect_path is None):
            raise OperatorError("add needs one of socket_path, connect_path")
        for path in (socket_path, connect_path):
            if path is not None and not os.path.isabs(path):
                raise OperatorError(f"{path}: give an absolute path (the daemon has its own cwd)")
        spec = DeviceSpec(name, socket_path=socket_path, connect_path=connect_path)
        self.service.add(spec)
        return {"added": name, "socket": socket_path or connect_path}


def _by_name(device: Any) -> str:
    return str(device.name)


def _str(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise OperatorError(f"{key} must be a non-empty string")
    return value


def _optional_str(request: dict[str, Any], key: str) -> str | None:
    return None if request.get(key) is None else _str(request, key)


def raise_fd_limit() -> None:
    """Take the whole hard NOFILE limit: each VM holds some 25 fds, and a message whose
    fds do not fit is lost for good (the VM's connection with it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("NOFILE limit raised from %d to %d", soft, hard)


def summary(service: Service) -> str:
    """The one line the service manager shows (``systemctl status``)."""
    names = sorted(service.devices)
    connected = sum(1 for d in service.devices.values() if d.server.connection is not None)
    return f"serving {len(names)} devices ({connected} connected): {', '.join(names) or '-'}"


def keeps_state(config: DaemonConfig, notifier: Notifier) -> bool:
    """Whether devices keep their fds and state in an fd store: as configured, else when
    ``$FDSTORE`` (systemd >= 254, and ``serve --supervise``) says there is a store."""
    wanted = config.options.keep_state
    if wanted is None:
        store = os.environ.get("FDSTORE", "")
        wanted = store.isdigit() and int(store) > 0 and notifier.enabled
    if wanted and not notifier.enabled:
        raise OperatorError(
            "--keep-state needs an fd store: run under systemd with FileDescriptorStoreMax= "
            "(docs/systemd.md), or with --supervise"
        )
    return bool(wanted)


def restore_kept(service: Service, kept: list[PassedFd]) -> list[str]:
    """Carry on every device the fd store kept (the previous process died); their names."""
    if not kept:
        return []
    found = keeping.restore_devices(service.notifier, kept)
    names = []
    for item in found.devices:
        try:
            service.restore(item.record, item.keeping, item.fresh)
        except Exception:
            log.exception(
                "cannot carry this device on: its VM's balloon is lost until the VM restarts",
                extra={"device": item.name},
            )
            # The record's fds first (numbers the failed restore closed are not reused
            # before this: nothing opened an fd since), then the store's copies.
            handoff.close_fds(record.encode(item.record)[1])
            if item.fresh is not None:
                item.fresh.close()
            item.keeping.forget()
            continue
        names.append(item.name)
    log.info(
        "carried on %d devices from the fd store after the last process ended%s",
        len(names),
        f"; lost {', '.join(found.lost)}" if found.lost else "",
    )
    return names


#: The exit status of a daemon that ends on an internal error with the state kept.
INTERNAL_ERROR_EXIT = 70


def _die_for_a_successor() -> None:
    """An internal error ends the daemon: with the state kept, end it now, as a crash would,
    so that the next daemon carries every VM on from the store; the orderly shutdown would
    close every VM's connection and empty the store."""
    log.critical(
        "internal error: exiting at once, every VM's state kept for the next daemon",
        exc_info=True,
    )
    handoff.flush_logs()
    os._exit(INTERNAL_ERROR_EXIT)


def _announce(notifier: Notifier, service: Service) -> None:
    notifier.status(summary(service))


async def run(
    config: DaemonConfig, service: Service | None = None, notifier: Notifier | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; OperatorError if a socket cannot be set up.

    Under systemd: sockets passed by the manager become devices (named by their
    FileDescriptorName=), READY=1 goes out once every socket listens, STATUS= follows the
    devices, the watchdog is pinged from the event loop, and STOPPING=1 precedes shutdown.
    """
    notifier = notifier or Notifier()
    options = replace(config.options, keep_state=keeps_state(config, notifier))
    config = replace(config, options=options)
    service = service or Service(config.options, notifier=notifier)
    raise_fd_limit()
    # Passed fds: what this daemon kept in the fd store before it died, and sockets the
    # manager listens on for it (socket activation).
    kept, activation = keeping.split(passed_fds())
    # After a reload: the devices the previous image served, before anything else.
    reloads = handoff.take_over(service)
    # After a death: every device carried on from the record it last committed.
    restored = set(restore_kept(service, kept))
    daemon = Daemon(config, service, notifier, reloads=reloads or 0)
    control_path = config.control_path
    tasks: list[asyncio.Task[Any]] = []
    control_listener = None
    try:
        # Passed sockets first: a bad one stops the daemon before anything listens.
        for passed in listening_sockets(activation):
            if passed.name in restored:  # served on the kept copy of this very socket
                passed.listener.close()
                continue
            service.add(DeviceSpec(passed.name, socket_path=passed.path, listener=passed.listener))
        for spec in config.devices:
            if (reloads is not None or restored) and spec.name in service.devices:
                # Carried on from the previous process. A --fd listener is the very fd the
                # record handed over: let go of this second socket object without closing it.
                if spec.listener is not None and reloads is not None:
                    spec.listener.detach()
                continue
            service.add(spec)
        os.makedirs(os.path.dirname(control_path) or ".", mode=0o755, exist_ok=True)
        mode = config.control_mode or (0o660 if config.control_group else 0o600)
        control_listener = listen(control_path, mode=mode, group=config.control_group)
        control = ControlServer(control_listener, daemon.dispatch, group=config.control_group)
        tasks.append(asyncio.create_task(control.serve(), name="control"))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, daemon.start_reload)
        if config.metrics_listen is not None:
            host, port = metrics.parse_listen(config.metrics_listen)
            registry = metrics.new_registry(lambda: [d.status() for d in service.devices.values()])
            exporter = metrics.MetricsServer(registry, host, port)
            await exporter.start()  # a taken address fails here, before READY=1
            tasks.append(asyncio.create_task(exporter.serve(), name="metrics"))
        tasks.append(asyncio.create_task(watchdog_loop(notifier), name="watchdog"))
        log.info(
            "serving %d devices, control on %s%s%s",
            len(service.devices),
            control_path,
            "" if config.options.discard else " (discarding disabled)",
            "" if config.options.free_page_reporting else " (free page reporting not offered)",
        )
        notifier.ready(summary(service))
        service.on_change = lambda: _announce(notifier, service)
        stopping = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
        tasks.append(stopping)
        for task in done:
            try:
                task.result()
            except Exception:
                if config.options.keep_state:
                    _die_for_a_successor()
                raise
        log.info("shutting down")
        service.on_change = lambda: None  # the status says "stopping" from now on
        notifier.stopping("stopping")
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await service.close()
        if control_listener is not None:
            control_listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path)

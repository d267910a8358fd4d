"""Live migration of a VM whose balloon balloond serves: the steps and their QMP and control
conversation, with no socket of its own (``balloond-migrate`` is the command, in
``balloond.migrate``).

QEMU's generic vhost-user device cannot migrate (its state lives in the backend), so the
balloon leaves the VM for the move, and a new one, served by the destination's daemon, joins
it on arrival. The steps, in order (docs/migration.md):

  check    both QEMUs and daemons are ready; the balloon sits on a root port; the
           destination waits for the VM (``-incoming``) with an empty root port
  serve    the destination daemon serves the device (``add`` when missing)
  unplug   the source daemon's target is read; ``device_del``, the guest deflates and
           releases the device (``DEVICE_DELETED``); ``chardev-remove``
  migrate  ``migrate-incoming`` on a deferred destination, ``migrate``, until completed
  plug     ``chardev-add`` and ``device_add`` on the destination's root port
  driver   the guest's driver is up on the destination (its features acknowledged)
  restore  ``set-target`` on the destination daemon, when the source had a target
  release  the source daemon stops serving the device

A migration that fails, is cancelled (SIGINT, SIGTERM, ``--migrate-timeout``, or
``migrate_cancel`` by someone else) or is still blocked after the unplug puts the balloon back
into the source QEMU (``replug``, ``driver``, ``restore`` there, with the source daemon, which
still serves the device) and takes back what ``serve`` added.

:class:`Migration` holds the whole QMP and control conversation; the monitors, the control
client, the clock and the sleep are passed in, so that tests drive it against a simulated QEMU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from balloond.errors import BalloondError, OperatorError
from balloond.qmp import Event, QmpError

#: The QEMU device type of a balloond balloon, and the properties a new one copies.
DEVICE_TYPE = "vhost-user-test-device-pci"
COPIED_PROPERTIES = ("virtio-id", "num_vqs", "vq_size", "config_size")
#: The virtio-balloon feature bits (0-5) whose negotiation should match on both sides.
BALLOON_FEATURES = 0x3F
#: Migration states after which nothing more happens (QAPI MigrationStatus).
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
RESULT_SCHEMA = 1


class MigrationError(BalloondError):
    """A step failed; the message says which and why."""


class Outcome(StrEnum):
    MIGRATED = "migrated"  # the VM runs on the destination, with its balloon
    NOT_STARTED = "not-started"  # a check failed; nothing was changed
    ROLLED_BACK = "rolled-back"  # the VM stays on the source, with its balloon again
    ATTENTION = "needs-attention"  # the VM runs without its balloon, or may lose it soon


EXIT_CODES = {Outcome.MIGRATED: 0, Outcome.NOT_STARTED: 1, Outcome.ROLLED_BACK: 1}
EXIT_ATTENTION = 3


class Monitor(Protocol):
    """What the migration needs of a QMP connection (:class:`~balloond.qmp.QmpClient`)."""

    def execute(self, command: str, **arguments: Any) -> Any: ...

    def wait_event(
        self, name: str, match: Callable[[Event], bool] = ..., timeout: float = ...
    ) -> Event | None: ...


#: ``control(path, message)``: one request to a daemon's control socket, its result.
Control = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Side:
    """One end: its QEMU's monitor, its daemon's control socket, the device's name there
    (or the path of its vhost-user socket), and the vhost-user socket QEMU should use."""

    qmp: str
    control: str
    device: str | None = None
    socket_path: str | None = None
    port: str | None = None  # the root port's id (the bus of the new device)


@dataclass(frozen=True)
class Timeouts:
    unplug: float = 30.0  # the guest releasing the device
    migrate: float = 0.0  # 0: no limit
    running: float = 30.0  # the destination running after the stream ends
    driver: float = 60.0  # the guest's driver up on a plugged device
    poll: float = 0.2


@dataclass(frozen=True)
class MigrationRequest:
    source: Side
    destination: Side
    device_id: str
    uri: str
    chardev_id: str | None = None  # the balloon's chardev on the source; default: read from QOM
    listen_uri: str | None = None  # migrate-incoming on a destination started "-incoming defer"
    multifd: bool = False
    quit_source: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True)
class Balloon:
    """The source QEMU's balloon device, as ``device_add`` would recreate it."""

    device_id: str
    chardev_id: str
    port: str
    properties: dict[str, Any]

    def device_add_arguments(self, port: str, chardev: str) -> dict[str, Any]:
        return {
            "driver": DEVICE_TYPE,
            "id": self.device_id,
            "bus": port,
            "chardev": chardev,
            **self.properties,
        }


@dataclass(frozen=True)
class StepRecord:
    step: str
    ok: bool
    seconds: float
    detail: str


@dataclass
class MigrationResult:
    outcome: Outcome = Outcome.NOT_STARTED
    error: str | None = None
    target_bytes: int | None = None
    steps: list[StepRecord] = field(default_factory=list)
    migration: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.outcome, EXIT_ATTENTION)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["ok"] = self.outcome is Outcome.MIGRATED
        return {"schema_version": RESULT_SCHEMA, **data}


# -- reading QEMU's answers ----------------------------------------------------------------


def _pci_devices(buses: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Every PCI device with the id of the bridge whose secondary bus holds it (None: a
    root bus)."""

    def walk(devices: list[dict[str, Any]], parent: str | None) -> Iterator[Any]:
        for device in devices:
            yield device, parent
            bridge = device.get("pci_bridge")
            if bridge is not None:
                yield from walk(bridge.get("devices", []), device.get("qdev_id") or None)

    for bus in buses:
        yield from walk(bus.get("devices", []), None)


def port_of(query_pci: list[dict[str, Any]], device_id: str) -> str:
    """The root port ``device_id`` sits on; MigrationError if absent or on a root bus."""
    for device, parent in _pci_devices(query_pci):
        if device.get("qdev_id") == device_id:
            if parent is None:
                raise MigrationError(
                    f"{device_id} is on the root bus, where q35 cannot unplug it: put it "
                    "behind a root port (-device pcie-root-port,id=rp-balloon,chassis=1,slot=1 "
                    "and bus=rp-balloon on the balloon)"
                )
            return parent
    raise MigrationError(f"the source QEMU has no PCI device {device_id!r}")


def check_free_port(query_pci: list[dict[str, Any]], port: str) -> None:
    """MigrationError unless the root port ``port`` exists with nothing on it."""
    found = False
    for device, parent in _pci_devices(query_pci):
        if device.get("qdev_id") == port:
            found = device.get("pci_bridge") is not None
        elif parent == port:
            raise MigrationError(f"root port {port} already holds {device.get('qdev_id')!r}")
    if not found:
        raise MigrationError(f"the destination QEMU has no root port {port!r}")


def chardev_socket(query_chardev: list[dict[str, Any]], label: str) -> str | None:
    """The Unix socket path a socket chardev uses (``unix:PATH[,server=on]``), if any."""
    for chardev in query_chardev:
        if chardev.get("label") == label:
            filename = str(chardev.get("filename", ""))
            if filename.startswith("unix:"):
                return filename[len("unix:") :].split(",")[0]
            return None
    return None


def chardev_add_arguments(chardev_id: str, socket_path: str) -> dict[str, Any]:
    """``chardev-add`` of a Unix socket client: QEMU connects to the daemon."""
    address = {"type": "unix", "data": {"path": socket_path}}
    return {
        "id": chardev_id,
        "backend": {"type": "socket", "data": {"addr": address, "server": False}},
    }


def fresh_label(label: str, taken: set[Any]) -> str:
    """``label``, or ``label-N`` if a chardev of that name is still there."""
    candidate, number = label, 0
    while candidate in taken:
        number += 1
        candidate = f"{label}-{number}"
    return candidate


def migration_summary(answer: dict[str, Any]) -> dict[str, Any]:
    """What to keep of ``query-migrate``: times and how much RAM went over."""
    ram = answer.get("ram", {})
    kept: dict[str, Any] = {
        k: answer[k] for k in ("status", "total-time", "downtime", "setup-time") if k in answer
    }
    kept.update({f"ram-{k}": ram[k] for k in ("total", "transferred", "duplicate") if k in ram})
    if "error-desc" in answer:
        kept["error-desc"] = answer["error-desc"]
    return kept


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.0f} MiB"


class _Cancel(Exception):
    """The operator cancelled before the migration completed."""


# -- the migration ----------------------------------------------------------------------


class Migration:
    """One migration of one VM's balloon. Call :meth:`run` once.

    Concurrency: none; every call blocks, one after the other. ``cancelled`` is read between
    steps and while waiting (a signal handler may set what it reads): before the migration
    completes, a cancel ends it and puts the balloon back on the source; afterwards the
    destination's steps run to the end, since they are what gives the VM its balloon back.
    """

    def __init__(
        self,
        request: MigrationRequest,
        source: Monitor,
        destination: Monitor,
        control: Control,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        progress: Callable[[StepRecord], None] = lambda record: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.request = request
        self.source = source
        self.destination = destination
        self.control = control
        self.clock = clock
        self.sleep = sleep
        self.progress = progress
        self.cancelled = cancelled
        self.result = MigrationResult()
        self.balloon: Balloon | None = None
        self._source_status: dict[str, Any] = {}
        self._added_on_destination: str | None = None
        self._unplug_requested = False
        self._unplugged = False
        self._dest_port = ""
        self._dest_name = ""
        self._dest_socket = ""
        self._connections = 0

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _step(self, name: str) -> Iterator[list[str]]:
        """Time a step; what the step appends to the yielded list is its detail."""
        detail: list[str] = []
        began = self.clock()
        try:
            yield detail
        except BaseException as error:
            why = str(error) if isinstance(error, BalloondError | OSError) else repr(error)
            self._record(StepRecord(name, False, self.clock() - began, "; ".join([*detail, why])))
            raise
        self._record(StepRecord(name, True, self.clock() - began, "; ".join(detail)))

    def _record(self, record: StepRecord) -> None:
        self.result.steps.append(record)
        self.progress(record)

    def _status(self, side: Side, device: str) -> dict[str, Any]:
        return self.control(side.control, {"command": "status", "device": device})

    def _poll(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = self.clock() + timeout
        while not check():
            if self.clock() >= deadline:
                raise MigrationError(f"{what}: not within {timeout:g} s")
            self.sleep(self.request.timeouts.poll)

    def _check_cancel(self) -> None:
        if self.cancelled():
            raise _Cancel("cancelled by the operator")

    @property
    def _same_device(self) -> bool:
        """Source and destination are one device of one daemon (a migration on one host)."""
        src, dst = self.request.source, self.request.destination
        return (
            os.path.realpath(src.control) == os.path.realpath(dst.control)
            and self._source_status.get("device") == self._dest_name
        )

    # -- the run --------------------------------------------------------------------------

    def run(self) -> MigrationResult:
        began = self.clock()
        try:
            self._run()
        finally:
            self.result.seconds = self.clock() - began
        return self.result

    def _run(self) -> None:
        result = self.result
        try:
            self._check()
            self._serve()
            self._check_cancel()
            self._unplug()
            self._check_cancel()
            self._migrate()
        except Exception as error:  # whatever went wrong, the balloon goes back
            result.error = (
                str(error) if isinstance(error, BalloondError | OSError | _Cancel) else repr(error)
            )
            if self._unplugged:
                self._roll_back()
                return
            if self._unplug_requested:  # the guest may still release it: nobody knows when
                result.outcome = Outcome.ATTENTION
            self._take_back_destination()
            return
        result.outcome = Outcome.ATTENTION  # from here on, the VM runs on the destination
        try:
            self._arrive()
        except Exception as error:
            result.error = f"the VM runs on the destination without its balloon: {error}"
            return
        result.outcome = Outcome.MIGRATED
        self._release()

    def _check(self) -> None:
        request = self.request
        with self._step("check") as detail:
            pci = self.source.execute("query-pci")
            port = port_of(pci, request.device_id)
            path = f"/machine/peripheral/{request.device_id}"
            kind = self.source.execute("qom-get", path=path, property="type")
            if kind != DEVICE_TYPE:
                raise MigrationError(f"{request.device_id} is a {kind}, not a {DEVICE_TYPE}")
            chardev = self.source.execute("qom-get", path=path, property="chardev")
            properties = {
                name: self.source.execute("qom-get", path=path, property=name)
                for name in COPIED_PROPERTIES
            }
            self.balloon = Balloon(
                request.device_id, request.chardev_id or chardev, port, properties
            )
            qemu_socket = chardev_socket(
                self.source.execute("query-chardev"), self.balloon.chardev_id
            )
            wanted = request.source.device or qemu_socket
            if wanted is None:
                raise MigrationError(
                    f"name the source daemon's device: chardev {chardev} is not a Unix socket"
                )
            status = self._status(request.source, wanted)
            if status.get("mode") != "listen" or not status.get("socket"):
                raise MigrationError(
                    f"source device {status.get('device')} does not listen on a socket: "
                    "a balloon could not be put back on the source if the migration failed"
                )
            if not status.get("connected"):
                raise MigrationError(f"source device {status.get('device')}: no VM connected")
            self._source_status = status
            running = self.source.execute("query-status").get("status")
            if running != "running":
                raise MigrationError(
                    f"the source VM is {running}: its guest must run to release the balloon"
                )
            detail.append(
                f"{request.device_id} on root port {port}, served as "
                f"{status['device']} ({status['socket']})"
            )

            state = self.destination.execute("query-status")
            if state.get("status") != "inmigrate":
                raise MigrationError(
                    f"the destination QEMU is {state.get('status')}, not waiting for a "
                    "migration (start it with -incoming defer, or -incoming URI)"
                )
            self._dest_port = request.destination.port or port
            check_free_port(self.destination.execute("query-pci"), self._dest_port)
            taken = {
                d.get("name")
                for d in self.destination.execute("qom-list", path="/machine/peripheral")
            }
            if request.device_id in taken:
                raise MigrationError(
                    f"the destination QEMU has a device {request.device_id} already"
                )
            labels = {c.get("label") for c in self.destination.execute("query-chardev")}
            if self.balloon.chardev_id in labels:
                raise MigrationError(
                    f"the destination QEMU has a chardev {self.balloon.chardev_id} already"
                )
            if request.multifd:
                capability = [{"capability": "multifd", "state": True}]
                self.source.execute("migrate-set-capabilities", capabilities=capability)
                self.destination.execute("migrate-set-capabilities", capabilities=capability)
                detail.append("multifd on both sides")
            blocked = self.source.execute("query-migrate").get("blocked-reasons", [])
            detail.append(f"{len(blocked)} migration blockers now")

    def _serve(self) -> None:
        """The destination daemon serves the device before anything changes: a daemon that
        cannot (a bad path, a name taken) stops the migration while the VM is untouched."""
        dest = self.request.destination
        self._dest_name = dest.device or str(self._source_status["device"])
        with self._step("serve") as detail:
            if self._same_device:
                detail.append(f"{self._dest_name}: the same device serves both QEMUs")
                self._dest_socket = str(self._source_status["socket"])
                return
            try:
                status = self._status(dest, self._dest_name)
            except OperatorError:
                if dest.socket_path is None:
                    raise MigrationError(
                        f"the destination daemon has no device {self._dest_name}: give its "
                        "vhost-user socket path to add it"
                    ) from None
                self.control(
                    dest.control,
                    {"command": "add", "name": self._dest_name, "socket_path": dest.socket_path},
                )
                self._added_on_destination = self._dest_name
                status = self._status(dest, self._dest_name)
                detail.append(f"added {self._dest_name} on {dest.socket_path}")
            else:
                detail.append(f"{self._dest_name} served already")
            if status.get("connected"):
                raise MigrationError(f"destination device {self._dest_name}: a VM uses it")
            if dest.socket_path is not None and status.get("socket") != dest.socket_path:
                raise MigrationError(
                    f"destination device {self._dest_name} listens on {status.get('socket')}, "
                    f"not {dest.socket_path}"
                )
            if status.get("mode") != "listen":
                raise MigrationError(f"destination device {self._dest_name} does not listen")
            self._dest_socket = str(status["socket"])

    def _unplug(self) -> None:
        balloon, result = self._balloon(), self.result
        with self._step("unplug") as detail:
            status = self._status(self.request.source, str(self._source_status["device"]))
            self._source_status = status
            if status.get("balloon_target_bytes"):
                result.target_bytes = int(status["target_bytes"])
            detail.append(
                f"target {_mib(result.target_bytes)}"
                f", guest at {_mib(status.get('ram_bytes', 0) - status.get('actual_bytes', 0))}"
            )
            self.source.execute("device_del", id=balloon.device_id)
            self._unplug_requested = True
            deadline = self.clock() + self.request.timeouts.unplug
            released = None
            while released is None:
                left = deadline - self.clock()
                if left <= 0:
                    raise MigrationError(
                        f"the guest did not release {balloon.device_id} within "
                        f"{self.request.timeouts.unplug:g} s; the unplug request stays pending "
                        "and the guest may still release it later"
                    )
                released = self.source.wait_event(
                    "DEVICE_DELETED",
                    lambda e: e.get("data", {}).get("device") == balloon.device_id,
                    min(left, 1.0),
                )
            self._unplugged = True
            detail.append("released by the guest")
            self._remove_chardev(detail)

    def _remove_chardev(self, detail: list[str]) -> None:
        """``chardev-remove``; QEMU may still hold the chardev briefly after DEVICE_DELETED
        ("is busy"), so retry for a few seconds. A chardev left behind is harmless (it is not
        migrated), but never reused: a new device on the old chardev made balloond drop the
        connection and QEMU 11.1.3 abort (contrib/libvirt/README.md)."""
        chardev = self._balloon().chardev_id
        deadline = self.clock() + 5.0
        while True:
            try:
                self.source.execute("chardev-remove", id=chardev)
                return
            except QmpError as error:
                if self.clock() >= deadline:
                    self.result.warnings.append(f"chardev {chardev} left on the source: {error}")
                    detail.append(f"chardev {chardev} left behind")
                    return
                self.sleep(self.request.timeouts.poll)

    def _migrate(self) -> None:
        request = self.request
        with self._step("migrate") as detail:
            blocked = self.source.execute("query-migrate").get("blocked-reasons", [])
            if blocked:
                raise MigrationError(f"still blocked after the unplug: {'; '.join(blocked)}")
            if request.listen_uri is not None:
                self.destination.execute("migrate-incoming", uri=request.listen_uri)
            self.source.execute("migrate", uri=request.uri)
            deadline = self.clock() + request.timeouts.migrate if request.timeouts.migrate else None
            cancel: str | None = None
            cancel_sent = False
            while True:
                answer = self.source.execute("query-migrate")
                if answer.get("status") in FINAL_STATES:
                    break
                if cancel is None and self.cancelled():
                    cancel = "cancelled by the operator"
                elif cancel is None and deadline is not None and self.clock() >= deadline:
                    cancel = f"not completed within {request.timeouts.migrate:g} s"
                if cancel is not None and not cancel_sent:
                    self.source.execute("migrate_cancel")
                    cancel_sent = True
                self.sleep(request.timeouts.poll)
            self.result.migration = migration_summary(answer)
            if answer["status"] != "completed":
                why = cancel or answer.get("error-desc") or f"migration {answer['status']}"
                raise MigrationError(why)
            detail.append(
                f"{answer.get('total-time', 0) / 1000:.1f} s in QEMU, downtime "
                f"{answer.get('downtime', 0)} ms, {_mib(answer.get('ram', {}).get('transferred'))}"
                " sent"
            )
            # The destination runs once it has loaded the last of the stream.
            self._poll(
                "the destination QEMU running",
                lambda: self.destination.execute("query-status").get("status") == "running",
                request.timeouts.running,
            )
            if request.quit_source:
                self.source.execute("quit")
                detail.append("source QEMU quit")

    def _arrive(self) -> None:
        dest = self.request.destination
        self._plug(
            "plug", self.destination, self._dest_port, self._dest_socket, dest, self._dest_name
        )
        self._driver_and_target(dest, self._dest_name)

    def _plug(
        self, step: str, monitor: Monitor, port: str, socket_path: str, side: Side, device: str
    ) -> None:
        """Plug the balloon into ``monitor``'s QEMU, its chardev to ``socket_path``, served as
        ``device`` by ``side``'s daemon, whose connection count is noted first: the driver
        step waits for the new connection, not for one the daemon has yet to see close."""
        balloon = self._balloon()
        with self._step(step) as detail:
            self._connections = int(self._status(side, device).get("connections", 0))
            labels = {c.get("label") for c in monitor.execute("query-chardev")}
            chardev = fresh_label(balloon.chardev_id, labels)
            monitor.execute("chardev-add", **chardev_add_arguments(chardev, socket_path))
            try:
                monitor.execute("device_add", **balloon.device_add_arguments(port, chardev))
            except QmpError:
                monitor.execute("chardev-remove", id=chardev)
                raise
            detail.append(f"{balloon.device_id} on {port}, chardev {chardev} to {socket_path}")

    def _driver_and_target(self, side: Side, device: str) -> None:
        status: dict[str, Any] = {}

        def driver_up() -> bool:
            nonlocal status
            status = self._status(side, device)
            new = int(status.get("connections", 0)) > self._connections
            return bool(new and status.get("connected") and status.get("features"))

        with self._step("driver") as detail:
            self._poll(
                f"the guest's balloon driver on {device}", driver_up, self.request.timeouts.driver
            )
            features = int(status["features"])
            detail.append(f"features {features:#x}")
            before = int(self._source_status.get("features") or 0)
            if (before ^ features) & BALLOON_FEATURES:
                warning = (
                    f"balloon features differ: {before & BALLOON_FEATURES:#x} before, "
                    f"{features & BALLOON_FEATURES:#x} now (daemon options such as "
                    "--deflate-on-oom should match on both hosts)"
                )
                self.result.warnings.append(warning)
                detail.append(warning)
        target = self.result.target_bytes
        with self._step("restore") as detail:
            if target is None:
                detail.append("no target to restore")
                return
            self.control(
                side.control, {"command": "set-target", "device": device, "target_bytes": target}
            )
            detail.append(f"target {_mib(target)} on {device}")

    def _release(self) -> None:
        with self._step("release") as detail:
            name = str(self._source_status["device"])
            if self._same_device:
                detail.append(f"{name} serves the destination")
                return
            try:
                self.control(self.request.source.control, {"command": "remove", "name": name})
                detail.append(f"{name} removed from the source daemon")
            except BalloondError as error:
                # The VM has its balloon; a leftover device costs nothing but a socket.
                self.result.warnings.append(f"{name} left on the source daemon: {error}")
                detail.append(f"{name} left on the source daemon")

    def _roll_back(self) -> None:
        """After a failed or cancelled migration: the balloon back into the source QEMU."""
        source, status = self.request.source, self._source_status
        try:
            self._poll(
                "the source VM running again",
                lambda: self.source.execute("query-status").get("status") == "running",
                self.request.timeouts.running,
            )
            self._plug(
                "replug",
                self.source,
                self._balloon().port,
                str(status["socket"]),
                source,
                str(status["device"]),
            )
            self._driver_and_target(source, str(status["device"]))
        except Exception as error:
            self.result.outcome = Outcome.ATTENTION
            self.result.error = f"{self.result.error}; and the balloon is not back: {error}"
            return
        self.result.outcome = Outcome.ROLLED_BACK
        self._take_back_destination()

    def _take_back_destination(self) -> None:
        name = self._added_on_destination
        if name is None:
            return
        try:
            self.control(self.request.destination.control, {"command": "remove", "name": name})
        except BalloondError as error:
            self.result.warnings.append(f"{name} left on the destination daemon: {error}")

    def _balloon(self) -> Balloon:
        assert self.balloon is not None, "check runs first"
        return self.balloon

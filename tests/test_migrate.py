"""balloond-migrate without a guest: the migration's QMP and control conversation against a
simulated QEMU pair and simulated daemons (every failure path, on a fake clock), the QMP
client against a scripted monitor on a real socket, and the command line.

The simulated QEMU answers as QEMU 11.1 did in tests/e2e/test_migration_e2e.py (its
``query-pci`` and ``query-chardev`` shapes are copied from real answers); the real guest, the
real daemons and the real migration are the end-to-end test's.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from balloond import migrate
from balloond.errors import OperatorError
from balloond.migration import (
    DEVICE_TYPE,
    Migration,
    MigrationError,
    MigrationRequest,
    Outcome,
    Side,
    Timeouts,
    chardev_add_arguments,
    chardev_socket,
    check_free_port,
    port_of,
)
from balloond.qmp import Event, QmpClient, QmpError

MIB = 1 << 20
RAM = 2048 * MIB
PROPERTIES = {"virtio-id": 5, "num_vqs": 4, "vq_size": 128, "config_size": 16}
FEATURES = 0x120000022


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# -- simulated daemons ----------------------------------------------------------------------


@dataclass
class FakeDevice:
    name: str
    socket: str
    mode: str = "listen"
    connected: bool = False
    features: int = 0
    balloon_target_bytes: int = 0
    connections: int = 0

    def status(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "socket": self.socket,
            "mode": self.mode,
            "connected": self.connected,
            "ram_bytes": RAM if self.connected else 0,
            "features": self.features,
            "target_bytes": RAM - self.balloon_target_bytes,
            "balloon_target_bytes": self.balloon_target_bytes,
            "actual_bytes": 0,
            "connections": self.connections,
        }


@dataclass
class Daemons:
    """The daemons' control sockets, by path: what ``balloond.control.request`` reaches."""

    devices: dict[str, dict[str, FakeDevice]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Features the guest's driver acknowledges on each new connection.
    features: int = FEATURES
    #: With a clock: QEMU's new connection reaches the daemon 0.3 s after device_add, and the
    #: daemon sees an unplugged device's connection close only then (until, it looks alive).
    clock: Clock | None = None
    pending: list[tuple[float, str, bool]] = field(default_factory=list)

    def serve(self, control: str, name: str, socket_path: str, **kwargs: Any) -> FakeDevice:
        device = FakeDevice(name, socket_path, **kwargs)
        self.devices.setdefault(control, {})[name] = device
        return device

    def by_socket(self, path: str) -> FakeDevice:
        for devices in self.devices.values():
            for device in devices.values():
                if device.socket == path:
                    return device
        raise AssertionError(f"no daemon listens on {path}")

    def __call__(self, control: str, message: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((control, message))
        for when, path, up in list(self.pending):
            if self.clock is not None and when <= self.clock.now:
                self.pending.remove((when, path, up))
                self._connect(path) if up else self._disconnect(path)
        if control not in self.devices:
            raise OperatorError(f"no balloond is running at {control}")
        devices = self.devices[control]
        command = message["command"]
        if command == "add":
            name = message["name"]
            if name in devices:
                raise OperatorError(f"device {name!r} exists already")
            self.serve(control, name, message["socket_path"])
            return {"added": name}
        if command == "remove":
            device = self._find(devices, message["name"])
            if device.connected:
                raise OperatorError(f"{device.name}: a VM is connected")
            del devices[device.name]
            return {"removed": device.name}
        device = self._find(devices, message["device"])
        if command == "status":
            return device.status()
        if command == "set-target":
            if not device.connected:
                raise OperatorError(f"{device.name}: no VM is connected")
            device.balloon_target_bytes = RAM - message["target_bytes"]
            return {"target_bytes": message["target_bytes"]}
        raise AssertionError(command)

    @staticmethod
    def _find(devices: dict[str, FakeDevice], wanted: str) -> FakeDevice:
        for device in devices.values():
            if wanted in (device.name, device.socket):
                return device
        raise OperatorError(f"no device {wanted!r}")

    def connect(self, path: str) -> None:
        """A QEMU connected and the guest's driver came up: a new balloon, no target."""
        if self.clock is not None:
            self.pending.append((self.clock.now + 0.3, path, True))
        else:
            self._connect(path)

    def disconnect(self, path: str) -> None:
        if self.clock is not None:
            self.pending.append((self.clock.now + 0.3, path, False))
        else:
            self._disconnect(path)

    def _connect(self, path: str) -> None:
        device = self.by_socket(path)
        device.connected, device.features = True, self.features
        device.balloon_target_bytes = 0
        device.connections += 1

    def _disconnect(self, path: str) -> None:
        device = self.by_socket(path)
        device.connected, device.features = False, 0


# -- a simulated QEMU -----------------------------------------------------------------------


@dataclass
class PciDevice:
    device_id: str
    bus: str | None  # a root port's id, or None for the root bus
    chardev: str
    properties: dict[str, Any]
    driver: str = DEVICE_TYPE


class FakeQemu:
    """A QEMU as balloond-migrate sees it through QMP. ``log`` is shared by both QEMUs of a
    test, so that the order of commands across them can be checked."""

    def __init__(
        self,
        name: str,
        clock: Clock,
        daemons: Daemons,
        log: list[tuple[str, str, dict[str, Any]]],
        *,
        status: str = "running",
        ports: tuple[str, ...] = ("rp-balloon",),
    ) -> None:
        self.name, self.clock, self.daemons, self.log = name, clock, daemons, log
        self.status = status
        self.ports = list(ports)
        self.devices: dict[str, PciDevice] = {}
        self.chardevs: dict[str, str] = {}
        self.events: list[tuple[float, Event]] = []
        self.peer: FakeQemu | None = None
        self.migration: dict[str, Any] = {}
        # behaviour
        self.release_after: float | None = 1.0  # the guest releases an unplugged device
        self.busy_chardev_removes = 0  # chardev-remove answers "busy" this often
        self.polls_to_complete = 5
        self.fail_migration: str | None = None
        self.other_blockers: list[str] = []
        self.refuse: dict[str, str] = {}  # command -> error text

    def plug(self, device_id: str, bus: str | None, chardev: str, socket_path: str) -> None:
        self.chardevs[chardev] = socket_path
        self.devices[device_id] = PciDevice(device_id, bus, chardev, dict(PROPERTIES))
        self.daemons.connect(socket_path)

    def commands(self) -> list[str]:
        return [command for side, command, _ in self.log if side == self.name]

    def arguments(self, command: str) -> dict[str, Any]:
        return next(args for side, cmd, args in self.log if side == self.name and cmd == command)

    # -- Monitor --------------------------------------------------------------------------

    def execute(self, command: str, **arguments: Any) -> Any:
        self.log.append((self.name, command, arguments))
        if command in self.refuse:
            raise QmpError(f"{command}: {self.refuse[command]}", "GenericError")
        handler: Callable[..., Any] = getattr(self, "_" + command.replace("-", "_"))
        return handler(**arguments)

    def wait_event(
        self, name: str, match: Callable[[Event], bool] = lambda _: True, timeout: float = 10.0
    ) -> Event | None:
        deadline = self.clock.now + timeout
        for when, event in sorted(self.events, key=lambda pair: pair[0]):
            if when <= deadline and event["event"] == name and match(event):
                self.events.remove((when, event))
                self.clock.now = max(self.clock.now, when)
                self._deleted(event["data"]["device"])
                return event
        self.clock.now = deadline
        return None

    # -- commands -------------------------------------------------------------------------

    def _query_pci(self) -> list[dict[str, Any]]:
        def entry(device: PciDevice, slot: int) -> dict[str, Any]:
            return {"bus": 1, "slot": slot, "function": 0, "qdev_id": device.device_id}

        root: list[dict[str, Any]] = [{"bus": 0, "slot": 0, "qdev_id": "", "function": 0}]
        for slot, port in enumerate(self.ports, start=1):
            bridge: dict[str, Any] = {"bus": {"number": 0, "secondary": slot}}
            held = [entry(d, 0) for d in self.devices.values() if d.bus == port]
            if held:  # QEMU leaves "devices" out of an empty bridge
                bridge["devices"] = held
            root.append({"bus": 0, "slot": slot, "qdev_id": port, "pci_bridge": bridge})
        root += [entry(d, 9) for d in self.devices.values() if d.bus is None]
        return [{"bus": 0, "devices": root}]

    def _qom_get(self, path: str, property: str) -> Any:
        device = self.devices[path.removeprefix("/machine/peripheral/")]
        if property == "type":
            return device.driver
        if property == "chardev":
            return device.chardev
        return device.properties[property]

    def _qom_list(self, path: str) -> list[dict[str, Any]]:
        assert path == "/machine/peripheral"
        return [{"name": name, "type": "child<x>"} for name in [*self.ports, *self.devices]]

    def _query_chardev(self) -> list[dict[str, Any]]:
        return [
            {"label": label, "filename": f"unix:{path}", "frontend-open": False}
            for label, path in self.chardevs.items()
        ] + [{"label": "compat_monitor0", "filename": "unix:/run/q.sock,server=on"}]

    def _query_status(self) -> dict[str, Any]:
        return {"status": self.status, "running": self.status == "running"}

    def _query_migrate(self) -> dict[str, Any]:
        answer = dict(self.migration)
        if answer.get("status") == "active":
            self.polls_to_complete -= 1
            if self.fail_migration is not None:
                self.migration = {"status": "failed", "error-desc": self.fail_migration}
            elif self.polls_to_complete <= 0:
                self._complete()
        blocked = [f"non-migratable device: {d}" for d in self.devices] + self.other_blockers
        if blocked and not answer:
            answer["blocked-reasons"] = blocked
        return answer

    def _complete(self) -> None:
        assert self.peer is not None and self.peer.status == "inmigrate"
        self.migration = {
            "status": "completed",
            "total-time": 3000,
            "downtime": 30,
            "ram": {"total": RAM, "transferred": 300 * MIB, "duplicate": 400000},
        }
        self.status = "postmigrate"
        self.peer.status = "running"

    def _device_del(self, id: str) -> dict[str, Any]:
        if id not in self.devices:
            raise QmpError(f"device_del: Device '{id}' not found", "DeviceNotFound")
        if self.release_after is not None:
            event = {"event": "DEVICE_DELETED", "data": {"device": id, "path": f"/m/p/{id}"}}
            self.events.append((self.clock.now + self.release_after, event))
        return {}

    def _deleted(self, device_id: str) -> None:
        device = self.devices.pop(device_id)
        self.daemons.disconnect(self.chardevs[device.chardev])

    def _chardev_remove(self, id: str) -> dict[str, Any]:
        in_use = any(d.chardev == id for d in self.devices.values())
        if in_use or self.busy_chardev_removes > 0:
            self.busy_chardev_removes -= 1
            raise QmpError(f"chardev-remove: Chardev '{id}' is busy", "GenericError")
        del self.chardevs[id]
        return {}

    def _chardev_add(self, id: str, backend: dict[str, Any]) -> dict[str, Any]:
        assert id not in self.chardevs
        assert backend["data"]["server"] is False
        self.chardevs[id] = backend["data"]["addr"]["data"]["path"]
        return {}

    def _device_add(self, driver: str, id: str, bus: str, chardev: str, **props: Any) -> Any:
        assert driver == DEVICE_TYPE and bus in self.ports and id not in self.devices
        self.devices[id] = PciDevice(id, bus, chardev, props)
        self.daemons.connect(self.chardevs[chardev])
        return {}

    def _migrate_set_capabilities(self, capabilities: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def _migrate_incoming(self, uri: str) -> dict[str, Any]:
        assert self.status == "inmigrate"
        return {}

    def _migrate(self, uri: str) -> dict[str, Any]:
        assert self.peer is not None
        if self.devices or self.other_blockers:
            raise QmpError("migrate: State blocked by non-migratable device", "GenericError")
        self.migration = {"status": "active", "ram": {"transferred": 0}}
        return {}

    def _migrate_cancel(self) -> dict[str, Any]:
        self.migration = {"status": "cancelled"}
        return {}

    def _quit(self) -> dict[str, Any]:
        self.status = "shutdown"
        return {}


# -- the setup --------------------------------------------------------------------------------

SOURCE_CONTROL = "/run/src/control.sock"
DEST_CONTROL = "/run/dst/control.sock"
SOURCE_SOCKET = "/run/src/vm0.sock"
DEST_SOCKET = "/run/dst/vm0.sock"


@dataclass
class World:
    clock: Clock
    daemons: Daemons
    log: list[tuple[str, str, dict[str, Any]]]
    source: FakeQemu
    destination: FakeQemu
    records: list[Any] = field(default_factory=list)
    cancel_when: Callable[[World], bool] = lambda world: False

    def request(self, **changes: Any) -> MigrationRequest:
        base: dict[str, Any] = {
            "source": Side("/run/src/qmp.sock", SOURCE_CONTROL),
            "destination": Side("/run/dst/qmp.sock", DEST_CONTROL, socket_path=DEST_SOCKET),
            "device_id": "balloon0",
            "uri": "unix:/run/migrate.sock",
            "listen_uri": "unix:/run/migrate.sock",
            "timeouts": Timeouts(poll=0.5),
        }
        return MigrationRequest(**{**base, **changes})

    def run(self, **changes: Any) -> Any:
        migration = Migration(
            self.request(**changes),
            self.source,
            self.destination,
            self.daemons,
            clock=self.clock,
            sleep=self.clock.sleep,
            progress=self.records.append,
            cancelled=lambda: self.cancel_when(self),
        )
        return migration.run()


@pytest.fixture
def world() -> World:
    """A running source VM whose balloon (target 1.5 GiB of 2) balloond serves, on a root
    port; a destination QEMU waiting (-incoming defer) with an empty port, and its daemon."""
    clock, daemons, log = Clock(), Daemons(), []
    source = FakeQemu("source", clock, daemons, log)
    destination = FakeQemu("destination", clock, daemons, log, status="inmigrate")
    source.peer = destination
    daemons.serve(SOURCE_CONTROL, "vm0", SOURCE_SOCKET)
    daemons.devices[DEST_CONTROL] = {}
    source.plug("balloon0", "rp-balloon", "balloon", SOURCE_SOCKET)
    daemons.by_socket(SOURCE_SOCKET).balloon_target_bytes = 512 * MIB
    return World(clock, daemons, log, source, destination)


def step_names(result: Any) -> list[tuple[str, bool]]:
    return [(record.step, record.ok) for record in result.steps]


HAPPY = ["check", "serve", "unplug", "migrate", "plug", "driver", "restore", "release"]


# -- the conversation -----------------------------------------------------------------------


def test_a_migration_unplugs_migrates_plugs_and_restores_the_target(world: World) -> None:
    result = world.run(multifd=True)
    assert result.outcome is Outcome.MIGRATED and result.exit_code == 0, result.error
    assert step_names(result) == [(name, True) for name in HAPPY]
    assert world.records == result.steps  # each step was shown as it ended
    # The order across both QEMUs: the balloon leaves before the migration starts, and the
    # destination listens before the source sends.
    order = [(side, command) for side, command, _ in world.log if not command.startswith("q")]
    assert order == [
        ("source", "migrate-set-capabilities"),
        ("destination", "migrate-set-capabilities"),
        ("source", "device_del"),
        ("source", "chardev-remove"),
        ("destination", "migrate-incoming"),
        ("source", "migrate"),
        ("destination", "chardev-add"),
        ("destination", "device_add"),
    ]
    # The new balloon is the old one, on the destination's port, served by its daemon.
    assert world.destination.arguments("device_add") == {
        "driver": DEVICE_TYPE, "id": "balloon0", "bus": "rp-balloon", "chardev": "balloon",
        **PROPERTIES,
    }  # fmt: skip
    assert world.destination.chardevs == {"balloon": DEST_SOCKET}
    moved = world.daemons.devices[DEST_CONTROL]["vm0"]
    assert moved.connected and moved.balloon_target_bytes == 512 * MIB
    assert result.target_bytes == 1536 * MIB
    assert world.daemons.devices[SOURCE_CONTROL] == {}  # released
    assert result.migration["status"] == "completed" and result.migration["downtime"] == 30
    assert json.loads(json.dumps(result.to_json()))["outcome"] == "migrated"


def test_the_unplug_waits_for_the_guest_and_the_step_times_show_it(world: World) -> None:
    world.source.release_after = 2.5
    result = world.run()
    unplug = next(record for record in result.steps if record.step == "unplug")
    assert unplug.ok and 2.5 <= unplug.seconds < 3.5
    assert "target 1536 MiB" in unplug.detail


def test_a_target_of_full_memory_is_not_restored(world: World) -> None:
    world.daemons.by_socket(SOURCE_SOCKET).balloon_target_bytes = 0
    result = world.run()
    assert result.outcome is Outcome.MIGRATED and result.target_bytes is None
    assert not any(m["command"] == "set-target" for _, m in world.daemons.requests)


def test_a_destination_daemon_that_serves_the_device_already_is_used(world: World) -> None:
    world.daemons.serve(DEST_CONTROL, "vm0", DEST_SOCKET)
    result = world.run()
    assert result.outcome is Outcome.MIGRATED
    assert "served already" in result.steps[1].detail
    assert not any(m["command"] == "add" for _, m in world.daemons.requests)


def test_one_device_of_one_daemon_serves_a_migration_on_one_host(world: World) -> None:
    """Source and destination on one host, one daemon, one device (a QEMU upgrade in place):
    the destination's balloon connects to the same socket, and nothing is added or removed."""
    request_changes = {"destination": Side("/run/dst/qmp.sock", SOURCE_CONTROL)}
    result = world.run(**request_changes)
    assert result.outcome is Outcome.MIGRATED, result.error
    assert world.destination.chardevs == {"balloon": SOURCE_SOCKET}
    device = world.daemons.devices[SOURCE_CONTROL]["vm0"]
    assert device.connected and device.connections == 2
    assert device.balloon_target_bytes == 512 * MIB
    assert {m["command"] for _, m in world.daemons.requests} == {"status", "set-target"}


def test_a_feature_negotiated_differently_is_a_warning(world: World) -> None:
    world.daemons.by_socket(SOURCE_SOCKET).features = FEATURES | 0x4  # DEFLATE_ON_OOM
    result = world.run()
    assert result.outcome is Outcome.MIGRATED
    assert any("--deflate-on-oom" in warning for warning in result.warnings)


def test_a_chardev_busy_after_the_unplug_is_removed_when_released(world: World) -> None:
    world.source.busy_chardev_removes = 3
    result = world.run()
    assert result.outcome is Outcome.MIGRATED
    assert world.source.commands().count("chardev-remove") == 4
    assert world.source.chardevs == {}


# -- nothing changes when a check fails --------------------------------------------------------


def untouched(world: World, result: Any) -> None:
    assert result.outcome is Outcome.NOT_STARTED and result.exit_code == 1
    assert "device_del" not in world.source.commands()
    assert world.daemons.by_socket(SOURCE_SOCKET).connected
    assert world.daemons.devices[DEST_CONTROL] == {}


def test_a_balloon_on_the_root_bus_is_refused_before_anything_changes(world: World) -> None:
    world.source.devices["balloon0"].bus = None
    result = world.run()
    untouched(world, result)
    assert "root bus" in str(result.error) and "pcie-root-port" in str(result.error)


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (lambda w: setattr(w.destination, "status", "running"), "not waiting for a migration"),
        (lambda w: setattr(w.destination, "ports", []), "no root port 'rp-balloon'"),
        (
            lambda w: w.destination.plug("nic0", "rp-balloon", "net", DEST_SOCKET + "x"),
            "already holds 'nic0'",
        ),
        (lambda w: setattr(w.source, "status", "paused"), "must run to release"),
        (lambda w: w.daemons.devices.pop(DEST_CONTROL), "no balloond is running"),
        (
            lambda w: setattr(w.daemons.by_socket(SOURCE_SOCKET), "mode", "connect"),
            "could not be put back",
        ),
        (
            lambda w: setattr(w.source.devices["balloon0"], "driver", "virtio-balloon-pci"),
            "not a vhost-user-test-device-pci",
        ),
    ],
    ids=["destination-running", "no-port", "port-taken", "source-paused", "no-daemon",
         "source-connect-mode", "builtin-balloon"],
)  # fmt: skip
def test_a_failed_check_changes_nothing(
    world: World, spoil: Callable[[World], Any], why: str
) -> None:
    if why == "already holds 'nic0'":
        world.daemons.serve(DEST_CONTROL, "nic", DEST_SOCKET + "x")
    spoil(world)
    result = world.run()
    assert result.outcome is Outcome.NOT_STARTED and why in str(result.error), result.error
    assert "device_del" not in world.source.commands()
    assert world.daemons.by_socket(SOURCE_SOCKET).connected


def test_a_destination_device_the_daemon_lacks_needs_its_socket(world: World) -> None:
    result = world.run(destination=Side("/run/dst/qmp.sock", DEST_CONTROL))
    untouched(world, result)
    assert "give its vhost-user socket path" in str(result.error)


def test_a_destination_device_in_use_is_refused_and_what_was_added_is_not_kept(
    world: World,
) -> None:
    world.daemons.serve(DEST_CONTROL, "vm0", DEST_SOCKET, connected=True)
    result = world.run()
    assert result.outcome is Outcome.NOT_STARTED and "a VM uses it" in str(result.error)
    assert "device_del" not in world.source.commands()


def test_a_later_check_failure_takes_back_the_added_device(world: World) -> None:
    world.source.refuse["device_del"] = "Bus 'rp-balloon' does not support hotplugging"
    result = world.run()
    assert result.outcome is Outcome.NOT_STARTED and "hotplugging" in str(result.error)
    assert world.daemons.devices[DEST_CONTROL] == {}
    assert [m["command"] for _, m in world.daemons.requests if m["command"] != "status"] == [
        "add",
        "remove",
    ]


# -- the balloon goes back to the source ----------------------------------------------------


ROLLED_BACK = [
    ("check", True), ("serve", True), ("unplug", True), ("migrate", False),
    ("replug", True), ("driver", True), ("restore", True),
]  # fmt: skip


def back_on_source(world: World, result: Any) -> None:
    assert result.outcome is Outcome.ROLLED_BACK and result.exit_code == 1, result.error
    assert step_names(result) == ROLLED_BACK
    replug = [cmd for cmd in world.source.commands() if cmd in ("chardev-add", "device_add")]
    assert replug == ["chardev-add", "device_add"]
    assert world.source.chardevs["balloon"] == SOURCE_SOCKET
    assert world.source.devices["balloon0"].bus == "rp-balloon"
    assert world.source.devices["balloon0"].properties == PROPERTIES
    device = world.daemons.by_socket(SOURCE_SOCKET)
    assert device.connected and device.connections == 2
    assert device.balloon_target_bytes == 512 * MIB  # the target is back
    assert world.daemons.devices[DEST_CONTROL] == {}  # what serve added is taken back
    assert "device_add" not in world.destination.commands()


def test_a_failed_migration_puts_the_balloon_back_on_the_source(world: World) -> None:
    world.source.fail_migration = "Unable to write to socket: Broken pipe"
    result = world.run()
    back_on_source(world, result)
    assert result.error == "Unable to write to socket: Broken pipe"
    assert result.migration["status"] == "failed"


def test_a_migration_cancelled_by_someone_else_puts_the_balloon_back(world: World) -> None:
    def cancel_elsewhere(_: float) -> None:
        world.clock.now += 0.5
        if world.source.migration.get("status") == "active":
            world.source.migration = {"status": "cancelled"}

    migration = Migration(
        world.request(),
        world.source,
        world.destination,
        world.daemons,
        clock=world.clock,
        sleep=cancel_elsewhere,
    )
    result = migration.run()
    back_on_source(world, result)
    assert "migrate_cancel" not in world.source.commands()
    assert result.error == "migration cancelled"


def test_the_operator_cancels_a_migration_under_way(world: World) -> None:
    world.cancel_when = lambda w: w.source.migration.get("status") == "active"
    result = world.run()
    back_on_source(world, result)
    assert world.source.commands().count("migrate_cancel") == 1
    assert result.error == "cancelled by the operator"


def test_a_cancel_before_the_migration_starts_still_puts_the_balloon_back(world: World) -> None:
    world.cancel_when = lambda w: "device_del" in w.source.commands()
    result = world.run()
    assert result.outcome is Outcome.ROLLED_BACK
    assert "migrate" not in world.source.commands()
    assert world.daemons.by_socket(SOURCE_SOCKET).connected


def test_a_migration_over_its_time_is_cancelled(world: World) -> None:
    world.source.polls_to_complete = 1000
    result = world.run(timeouts=Timeouts(migrate=5.0, poll=0.5))
    back_on_source(world, result)
    assert result.error == "not completed within 5 s"


def test_a_blocker_left_after_the_unplug_puts_the_balloon_back(world: World) -> None:
    world.source.other_blockers = ["vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD"]
    result = world.run()
    back_on_source(world, result)
    assert "LOG_SHMFD" in str(result.error) and "migrate" not in world.source.commands()


def test_the_target_goes_to_the_new_connection_not_to_one_closing(world: World) -> None:
    """Put back at once (a blocker left after the unplug): the source daemon has not yet seen
    the old connection close when the balloon is plugged again. The target must reach the
    guest's new driver, not the connection that is going away."""
    world.daemons.clock = world.clock
    world.source.release_after = 0.0
    world.source.other_blockers = ["another device"]
    result = world.run()
    assert result.outcome is Outcome.ROLLED_BACK, result.error
    device = world.daemons.by_socket(SOURCE_SOCKET)
    assert device.connections == 2 and device.balloon_target_bytes == 512 * MIB


def test_a_chardev_qemu_keeps_is_never_reused_when_the_balloon_comes_back(world: World) -> None:
    """A new device on the old chardev made balloond drop the connection and QEMU abort: the
    balloon comes back on a new chardev."""
    world.source.busy_chardev_removes = 1000
    world.source.fail_migration = "boom"
    result = world.run()
    assert result.outcome is Outcome.ROLLED_BACK
    assert any("chardev balloon left" in warning for warning in result.warnings)
    assert world.source.arguments("chardev-add")["id"] == "balloon-1"
    assert world.source.devices["balloon0"].chardev == "balloon-1"
    assert world.source.chardevs["balloon-1"] == SOURCE_SOCKET


def test_a_failed_put_back_needs_attention(world: World) -> None:
    world.source.fail_migration = "boom"
    world.source.refuse["device_add"] = "Bus 'rp-balloon' not found"
    result = world.run()
    assert result.outcome is Outcome.ATTENTION and result.exit_code == 3
    assert "the balloon is not back" in str(result.error)
    assert "balloon" not in world.source.chardevs  # the chardev of a failed device_add goes
    assert world.source.commands()[-1] == "chardev-remove"


# -- the VM moved but has no balloon, or might lose it -------------------------------------


def test_a_guest_that_does_not_release_the_balloon_needs_attention(world: World) -> None:
    world.source.release_after = None
    result = world.run(timeouts=Timeouts(unplug=5.0, poll=0.5))
    assert result.outcome is Outcome.ATTENTION and result.exit_code == 3
    assert "did not release balloon0 within 5 s" in str(result.error)
    assert "migrate" not in world.source.commands()
    assert world.daemons.devices[DEST_CONTROL] == {}


def test_a_destination_that_refuses_the_balloon_needs_attention(world: World) -> None:
    world.destination.refuse["device_add"] = "Bus 'rp-balloon' does not support hotplugging"
    result = world.run()
    assert result.outcome is Outcome.ATTENTION and result.exit_code == 3
    assert "runs on the destination without its balloon" in str(result.error)
    assert world.destination.chardevs == {}
    assert "vm0" in world.daemons.devices[SOURCE_CONTROL]  # not released
    assert step_names(result)[-1] == ("plug", False)


def test_a_driver_that_never_comes_up_needs_attention(world: World) -> None:
    world.daemons.features = 0
    result = world.run(timeouts=Timeouts(driver=3.0, poll=0.5))
    assert result.outcome is Outcome.ATTENTION
    assert "balloon driver on vm0: not within 3 s" in str(result.error)


def test_quit_source(world: World) -> None:
    result = world.run(quit_source=True)
    assert result.outcome is Outcome.MIGRATED and world.source.status == "shutdown"


# -- what QEMU answers ------------------------------------------------------------------------

#: QEMU 11.1.3's query-pci for q35 with the balloon on rp-balloon and an empty rp2 (trimmed).
REAL_PCI: list[dict[str, Any]] = [
    {
        "bus": 0,
        "devices": [
            {"bus": 0, "slot": 0, "function": 0, "qdev_id": "", "class_info": {"class": 1536}},
            {
                "bus": 0, "slot": 1, "function": 0, "qdev_id": "rp-balloon",
                "pci_bridge": {
                    "bus": {"number": 0, "secondary": 1, "subordinate": 1},
                    "devices": [{"bus": 1, "slot": 0, "function": 0, "qdev_id": "balloon0",
                                 "class_info": {"class": 1920}}],
                },
            },
            {
                "bus": 0, "slot": 2, "function": 0, "qdev_id": "rp2",
                "pci_bridge": {"bus": {"number": 0, "secondary": 0, "subordinate": 0}},
            },
            {"bus": 0, "slot": 31, "function": 2, "qdev_id": "sata", "class_info": {"class": 262}},
        ],
    }
]  # fmt: skip


def test_the_balloon_s_port_is_found_in_query_pci() -> None:
    assert port_of(REAL_PCI, "balloon0") == "rp-balloon"
    with pytest.raises(MigrationError, match="root bus"):
        port_of(REAL_PCI, "sata")
    with pytest.raises(MigrationError, match="no PCI device 'nope'"):
        port_of(REAL_PCI, "nope")
    check_free_port(REAL_PCI, "rp2")
    with pytest.raises(MigrationError, match="already holds 'balloon0'"):
        check_free_port(REAL_PCI, "rp-balloon")
    with pytest.raises(MigrationError, match="no root port 'sata'"):
        check_free_port(REAL_PCI, "sata")


def test_a_chardev_s_socket_is_read_from_query_chardev() -> None:
    real = [
        {"frontend-open": False, "filename": "unix:/tmp/l.sock", "label": "balloon"},
        {"frontend-open": True, "filename": "unix:/tmp/q.sock,server=on", "label": "mon"},
        {"frontend-open": True, "filename": "stdio", "label": "serial0"},
    ]
    assert chardev_socket(real, "balloon") == "/tmp/l.sock"
    assert chardev_socket(real, "mon") == "/tmp/q.sock"
    assert chardev_socket(real, "serial0") is None
    assert chardev_socket(real, "gone") is None
    assert chardev_add_arguments("balloon", "/run/b.sock") == {
        "id": "balloon",
        "backend": {
            "type": "socket",
            "data": {"addr": {"type": "unix", "data": {"path": "/run/b.sock"}}, "server": False},
        },
    }


# -- the QMP client on a real socket ------------------------------------------------------------


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A scripted QMP monitor: after the greeting, each client line is answered with the next
    script entry (bytes, possibly several lines); then ``late`` is sent after 0.2 s. Returns
    the socket path."""
    path = str(tmp_path / "qmp.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    threads: list[threading.Thread] = []
    received: list[dict[str, Any]] = []

    def start(script: list[bytes], late: bytes = b"") -> str:
        def serve() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 11}}, "capabilities": []}}\n')
                for answer in script:
                    line = lines.readline()
                    if not line:
                        return
                    received.append(json.loads(line))
                    conn.sendall(answer)
                if late:
                    threading.Event().wait(0.2)
                    conn.sendall(late)
                lines.readline()  # until the client closes

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    start.received = received  # type: ignore[attr-defined]
    yield start
    listener.close()
    for thread in threads:
        thread.join(5)


def test_the_qmp_client_keeps_events_that_come_before_a_reply(
    monitor: Callable[..., str],
) -> None:
    deleted = b'{"event": "DEVICE_DELETED", "data": {"device": "balloon0", "path": "/x"}}\n'
    other = b'{"event": "DEVICE_DELETED", "data": {"path": "/x/virtio-backend"}}\n'
    path = monitor(
        [
            b'{"return": {}}\n',  # qmp_capabilities
            other + deleted + b'{"return": {}}\n',  # device_del: both events come first
            b'{"error": {"class": "GenericError", "desc": "Chardev \'balloon\' is busy"}}\n',
            b'{"return": [{"label": "balloon"}]}\n',
        ]
    )
    with QmpClient(path, timeout=5) as client:
        assert client.version == {"major": 11}
        assert client.execute("device_del", id="balloon0") == {}
        event = client.wait_event(
            "DEVICE_DELETED", lambda e: e["data"].get("device") == "balloon0", timeout=0.1
        )
        assert event is not None and event["data"]["path"] == "/x"
        assert [e["data"] for e in client.events] == [{"path": "/x/virtio-backend"}]
        with pytest.raises(QmpError, match="is busy") as refused:
            client.execute("chardev-remove", id="balloon")
        assert refused.value.error_class == "GenericError"
        assert client.execute("query-chardev") == [{"label": "balloon"}]
        assert client.wait_event("MIGRATION", timeout=0.1) is None
    received = monitor.received  # type: ignore[attr-defined]
    assert received[0] == {"execute": "qmp_capabilities"}
    assert received[1] == {"execute": "device_del", "arguments": {"id": "balloon0"}}


def test_the_qmp_client_waits_for_an_event_that_comes_later(
    monitor: Callable[..., str],
) -> None:
    late = b'{"event": "RESUME"}\n{"event": "DEVICE_DELETED", "data": {"device": "b"}}\n'
    path = monitor([b'{"return": {}}\n', b'{"return": {}}\n'], late=late)
    with QmpClient(path, timeout=5) as client:
        client.execute("device_del", id="b")
        assert client.wait_event("DEVICE_DELETED", timeout=0.05) is None  # not yet
        event = client.wait_event("DEVICE_DELETED", timeout=5)
        assert event == {"event": "DEVICE_DELETED", "data": {"device": "b"}}
        assert list(client.events) == [{"event": "RESUME"}]


def test_a_monitor_that_goes_away_or_is_not_there_is_a_qmp_error(
    monitor: Callable[..., str], tmp_path: Path
) -> None:
    path = monitor([b'{"return": {}}\n'])
    with QmpClient(path, timeout=5) as client, pytest.raises(QmpError, match="closed"):
        client.execute("query-status")
    with pytest.raises(QmpError, match="cannot reach QEMU's monitor"):
        QmpClient(str(tmp_path / "absent.sock"))


# -- the command line -------------------------------------------------------------------------


def test_the_command_line_makes_the_request() -> None:
    args = migrate.build_parser().parse_args(
        [
            "--source-qmp", "/s.qmp", "--device-id", "balloon0", "--dest-qmp", "/d.qmp",
            "--source-control", "/s.ctl", "--dest-socket", "/run/d.sock", "--deferred",
            "--multifd", "--migrate-timeout", "60", "unix:/m.sock",
        ]
    )  # fmt: skip
    request = migrate.request_from_args(args)
    assert request.source == Side("/s.qmp", "/s.ctl")
    assert request.destination == Side("/d.qmp", "/s.ctl", socket_path="/run/d.sock")
    assert (request.uri, request.listen_uri, request.multifd) == ("unix:/m.sock",) * 2 + (True,)
    assert request.timeouts.migrate == 60.0


def test_the_command_refuses_multifd_without_a_deferred_destination(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--source-qmp", "/s", "--device-id", "b", "--dest-qmp", "/d", "--multifd", "tcp:h:1"]
    assert migrate.main(argv) == 2
    assert "--multifd needs a destination started with -incoming defer" in capsys.readouterr().err


def test_the_command_says_which_monitor_it_cannot_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = str(tmp_path / "absent.qmp")
    argv = ["--source-qmp", absent, "--device-id", "b", "--dest-qmp", absent, "unix:/m"]
    assert migrate.main(argv) == 1
    assert f"cannot reach QEMU's monitor at {absent}" in capsys.readouterr().err

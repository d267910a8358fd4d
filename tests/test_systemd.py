"""balloond under systemd: the notify protocol, socket activation, and the unit files.

systemd is not PID 1 where these run, so each part is tested against the real thing that
does run here: notifications against a real AF_UNIX datagram socket standing in for the
manager (it reads the sender's credentials as systemd does), and checked byte for byte
against what systemd's own ``systemd-notify`` sends; socket activation in child processes
that get real sockets at fds 3.. the way systemd hands them over, and through systemd's own
``systemd-socket-activate``; the units through ``systemd-analyze verify`` and
``systemd-analyze security --offline=yes`` (Debian package ``systemd``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from balloond import keeper
from balloond.activation import (
    PassedFd,
    activated_sockets,
    device_name,
    passed_fds,
    valid_device_name,
)
from balloond.errors import OperatorError
from balloond.notify import (
    SCM_MAX_FD,
    STATUS_MAX,
    Notifier,
    NotifySettings,
    valid_fdname,
    watchdog_loop,
)

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
MiB_ = 1 << 20
SYSTEMD_MISSING = "needs systemd's tools (Debian package systemd)"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: {SYSTEMD_MISSING}")
    return path


# --- the manager's side of sd_notify ------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One datagram as the service manager receives it."""

    raw: bytes
    pid: int
    fds: tuple[int, ...]

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.raw.decode().split("\n"))


class Manager:
    """A real datagram socket where systemd's notify socket would be.

    Like systemd it sets SO_PASSCRED, so the kernel tells it which process sent each
    message (what ``NotifyAccess=main`` checks), and it takes the fds that come along.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def notifier(self, **environ: str) -> Notifier:
        return Notifier(NotifySettings.from_environment({"NOTIFY_SOCKET": self.address, **environ}))

    def receive(self, timeout: float = 2.0) -> Message:
        """One message, as the keeper receives it (it is a manager too)."""
        self.sock.settimeout(timeout)
        datagram = keeper.receive(self.sock)
        assert not datagram.truncated
        return Message(datagram.data, datagram.pid, datagram.fds)

    def nothing(self, timeout: float = 0.2) -> bool:
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    manager = Manager(str(tmp_path / "notify"))
    yield manager
    manager.close()


@pytest.fixture
def abstract_manager() -> Iterator[Manager]:
    manager = Manager(f"@balloond-test-{uuid.uuid4().hex}")
    yield manager
    manager.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier(NotifySettings.from_environment({}))
    assert not notifier.enabled
    assert not notifier.ready("serving")
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert not notifier.store_fds("vm0", [0])
    assert notifier.watchdog_interval() is None


@pytest.mark.parametrize("fixture", ["manager", "abstract_manager"])
def test_ready_status_watchdog_stopping_reach_the_manager(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    manager: Manager = request.getfixturevalue(fixture)
    notifier = manager.notifier()
    assert notifier.enabled
    assert notifier.ready("serving 2 devices")
    assert notifier.status("vm0: connected")
    assert notifier.watchdog()
    assert notifier.extend_timeout(2.5)
    assert notifier.stopping()
    received = [manager.receive() for _ in range(5)]
    assert [m.raw for m in received] == [
        b"READY=1\nSTATUS=serving 2 devices",
        b"STATUS=vm0: connected",
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=2500000",
        b"STOPPING=1",
    ]
    assert {m.pid for m in received} == {os.getpid()}, "NotifyAccess=main: sent by us"
    notifier.close()


def test_reloading_carries_the_monotonic_clock(manager: Manager) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert manager.notifier().reloading("reading the configuration")
    fields = manager.receive().fields
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields["RELOADING"] == "1"
    assert fields["STATUS"] == "reading the configuration"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_same_bytes_as_systemd_notify(manager: Manager) -> None:
    """What systemd's own client sends for the same notification."""
    systemd_notify = tool("systemd-notify")
    subprocess.run(
        [systemd_notify, "--no-block", "--ready", "--status=serving 2 devices"],
        env={"NOTIFY_SOCKET": manager.address},
        check=True,
        timeout=10,
    )
    theirs = manager.receive().raw
    assert manager.notifier().ready("serving 2 devices")
    assert manager.receive().raw == theirs


def test_status_is_one_line_and_fits_one_message(manager: Manager) -> None:
    notifier = manager.notifier()
    notifier.status("two\nlines")
    assert manager.receive().raw == b"STATUS=two lines"
    notifier.status("x" * 10_000)
    status = manager.receive().fields["STATUS"]
    assert len(status) == STATUS_MAX and status.endswith("...")
    with pytest.raises(ValueError):
        notifier.send("READY=1\nMAINPID=1")


def test_store_fds_pass_the_files_themselves(manager: Manager) -> None:
    notifier = manager.notifier()
    memfd = os.memfd_create("guest-ram")
    eventfd = os.eventfd(0)
    try:
        assert notifier.store_fds("vm0", [memfd, eventfd])
        message = manager.receive()
        assert message.raw == b"FDSTORE=1\nFDNAME=vm0"
        assert len(message.fds) == 2
        for ours, theirs in zip((memfd, eventfd), message.fds, strict=True):
            mine, stored = os.fstat(ours), os.fstat(theirs)
            assert (mine.st_dev, mine.st_ino) == (stored.st_dev, stored.st_ino)
            os.close(theirs)
        assert notifier.store_fds("vm0-memory", [memfd], poll=False)
        message = manager.receive()
        assert message.fields == {"FDSTORE": "1", "FDNAME": "vm0-memory", "FDPOLL": "0"}
        os.close(message.fds[0])
        assert notifier.remove_fds("vm0")
        assert manager.receive().raw == b"FDSTOREREMOVE=1\nFDNAME=vm0"
    finally:
        os.close(memfd)
        os.close(eventfd)


def test_store_more_fds_than_one_message_carries(manager: Manager) -> None:
    eventfd = os.eventfd(0)
    try:
        assert manager.notifier().store_fds("many", [eventfd] * (SCM_MAX_FD + 2))
        counts = []
        for _ in range(2):
            message = manager.receive()
            assert message.fields["FDNAME"] == "many"
            counts.append(len(message.fds))
            for fd in message.fds:
                os.close(fd)
        assert counts == [SCM_MAX_FD, 2]
    finally:
        os.close(eventfd)


@pytest.mark.parametrize("name", ["", "a:b", "tab\there", "x" * 256, "caf\u00e9"])
def test_fd_names_systemd_refuses_are_refused(name: str, manager: Manager) -> None:
    assert not valid_fdname(name)
    with pytest.raises(ValueError):
        manager.notifier().store_fds(name, [0])
    assert valid_fdname("vm0 memory.1") and valid_fdname("x" * 255)


def test_a_missing_manager_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(NotifySettings(address=os.fsencode(tmp_path / "gone")))
    with caplog.at_level(logging.DEBUG, logger="balloond.notify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "READY=1" in warnings[0].getMessage()


def test_a_manager_that_does_not_read_never_blocks_the_sender(manager: Manager) -> None:
    notifier = manager.notifier()
    started = time.monotonic()
    results = [notifier.watchdog() for _ in range(5000)]
    assert time.monotonic() - started < 2
    assert results[0] and not all(results), "the queue fills, sends then fail, none blocks"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "<ours>"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    environ: dict[str, str], expected: float | None, manager: Manager
) -> None:
    environ = {k: str(os.getpid()) if v == "<ours>" else v for k, v in environ.items()}
    assert manager.notifier(**environ).watchdog_interval() == expected


def test_no_watchdog_without_a_manager() -> None:
    settings = NotifySettings.from_environment({"WATCHDOG_USEC": "1000000"})
    assert Notifier(settings).watchdog_interval() is None


@pytest.mark.parametrize(
    "value", ["", "relative/path", "vsock:2:1234", "/" + "x" * 107, "@" + "x" * 108]
)
def test_unusable_notify_socket_means_no_notifications(value: str) -> None:
    assert NotifySettings.from_environment({"NOTIFY_SOCKET": value}).address is None


async def test_watchdog_pings_at_half_the_interval(manager: Manager) -> None:
    notifier = manager.notifier(WATCHDOG_USEC="200000")  # 0.2 s: a ping every 0.1 s
    pinging = asyncio.create_task(watchdog_loop(notifier))
    await asyncio.sleep(0.45)
    pinging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pinging
    pings = 0
    while not manager.nothing(0):
        pings += 1
    assert 4 <= pings <= 6, pings  # at 0, 0.1, 0.2, 0.3 and 0.4 s


async def test_watchdog_loop_pings_nothing_without_a_watchdog(manager: Manager) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watchdog_loop(manager.notifier()), 0.3)
    assert manager.nothing()


async def test_a_stuck_loop_leaves_a_gap_longer_than_the_interval(manager: Manager) -> None:
    notifier = manager.notifier(WATCHDOG_USEC="200000")
    pinging = asyncio.create_task(watchdog_loop(notifier))
    arrivals: list[float] = []

    async def listen() -> None:
        loop = asyncio.get_running_loop()
        manager.sock.setblocking(False)
        while True:
            await loop.sock_recv(manager.sock, 4096)
            arrivals.append(time.monotonic())

    listening = asyncio.create_task(listen())
    await asyncio.sleep(0.35)
    time.sleep(0.4)  # stuck: longer than the whole 0.2 s interval
    await asyncio.sleep(0.35)
    for task in (pinging, listening):
        task.cancel()
    await asyncio.gather(pinging, listening, return_exceptions=True)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) > 0.35, "the manager sees no ping while the loop is stuck"
    assert sorted(gaps)[len(gaps) // 2] < 0.15, "otherwise every 0.1 s"


# --- socket activation, parsed in this process (no fd is touched) ---------------------------


def test_not_activated_without_listen_pid() -> None:
    environ = {"LISTEN_FDS": "2"}
    assert passed_fds(environ) == []
    assert environ == {}, "the variables are removed"


def test_fds_meant_for_another_process_are_left_alone() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "vm0"}
    assert passed_fds(environ) == []
    assert environ == {}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS=two is not a number"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "vm0"}, "1 names for LISTEN_FDS=2"),
        ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vm0:vm1"}, "2 names for LISTEN_FDS=1"),
    ],
)
def test_inconsistent_variables_are_an_operator_error(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(OperatorError, match=message):
        passed_fds({"LISTEN_PID": str(os.getpid()), **environ})
    with pytest.raises(OperatorError, match="LISTEN_PID=x is not a process id"):
        passed_fds({"LISTEN_PID": "x", "LISTEN_FDS": "1"})


def test_zero_fds() -> None:
    assert passed_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


@pytest.mark.parametrize(
    ("name", "path", "device"),
    [
        ("vm0", "/run/balloond/other.sock", "vm0"),
        ("unknown", "/run/balloond/vm1.sock", "vm1"),
        ("", "/run/balloond/vm2.sock", "vm2"),
        ("balloond.socket", "/run/balloond/vm3.sock", "vm3"),
        ("balloond-vm@vm4.socket", "/run/balloond/vm4.sock", "vm4"),
        ("unknown", "/run/balloond/db.v2.sock", "db.v2"),
        ("unknown", "/run/balloond/vm5", "vm5"),
        ("web.example_1-a", "", "web.example_1-a"),
        ("x" * 64, "", "x" * 64),
    ],
)
def test_device_names(name: str, path: str, device: str) -> None:
    assert device_name(PassedFd(3, name), path) == device


@pytest.mark.parametrize(
    ("name", "path", "message"),
    [
        ("bad name", "/run/balloond/vm0.sock", "not a device name"),
        ("x" * 65, "", "not a device name"),
        (".hidden", "", "not a device name"),
        ("unknown", "", "set FileDescriptorName="),
        ("unknown", "/run/balloond/v m.sock", "named after its file"),
    ],
)
def test_bad_device_names(name: str, path: str, message: str) -> None:
    with pytest.raises(OperatorError, match=message):
        device_name(PassedFd(3, name), path)


# --- socket activation, as the manager hands it over -----------------------------------------

#: What the activated program does: take the sockets, accept one connection on each named
#: in argv (answering with the device name), check that a child inherits neither the fds
#: nor the variables, and report it all as JSON.
REPORTER = """
import json, os, socket, subprocess, sys
from balloond.activation import activated_sockets
from balloond.errors import OperatorError
try:
    sockets = activated_sockets()
except OperatorError as error:
    print(json.dumps({"error": str(error)}), flush=True)
    sys.exit(1)
for activated in sockets:
    if activated.name in sys.argv[1:]:
        connection, _ = activated.listener.accept()
        connection.sendall(activated.name.encode())
        connection.close()
fds = [s.listener.fileno() for s in sockets]
child = subprocess.run(
    [sys.executable, "-c", "import json, os, sys; print(json.dumps([[k for k in os.environ "
     "if k.startswith('LISTEN_')], [fd for fd in map(int, sys.argv[1:]) "
     "if os.path.exists(f'/proc/self/fd/{fd}')]]))", *map(str, fds)],
    close_fds=False, capture_output=True, text=True, check=True,
)
print(json.dumps({
    "sockets": [[s.name, s.listener.fileno(), s.path] for s in sockets],
    "child": json.loads(child.stdout),
}), flush=True)
"""

#: systemd's part, played as systemd does it: move the fds to 3, 4, ... in the process
#: that will run the service, set LISTEN_PID to its pid, and exec the service.
LAUNCHER = """
import fcntl, json, os, sys
fds, names, pid = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) if fd >= 0 else -1 for fd in fds]
for fd in fds:
    if fd >= 0:
        os.close(fd)
for offset, fd in enumerate(high):
    if fd >= 0:
        os.dup2(fd, 3 + offset)
        os.close(fd)
    else:
        try:
            os.close(3 + offset)
        except OSError:
            pass
os.environ["LISTEN_PID"] = str(os.getpid() if pid is None else pid)
os.environ["LISTEN_FDS"] = str(len(fds))
if names is not None:
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], *sys.argv[3:]])
"""


@dataclass(frozen=True)
class Report:
    returncode: int
    data: dict[str, object]


def activate(
    fds: Sequence[int],
    names: str | None = None,
    *,
    pid: int | None = None,
    accept: Sequence[str] = (),
) -> Report:
    """Run REPORTER with ``fds`` at 3, 4, ... (-1: leave that fd closed)."""
    argv = [sys.executable, "-c", LAUNCHER, json.dumps([list(fds), names, pid]), REPORTER]
    result = subprocess.run(
        [*argv, *accept],
        pass_fds=[fd for fd in fds if fd >= 0],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.stdout, result.stderr
    return Report(result.returncode, json.loads(result.stdout.splitlines()[-1]))


def unix_listener(path: Path, *, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if listen:
        sock.listen()
    return sock


def test_named_sockets_become_devices_of_those_names(tmp_path: Path) -> None:
    a, b = unix_listener(tmp_path / "a.sock"), unix_listener(tmp_path / "b.sock")
    report = activate([a.fileno(), b.fileno()], "vm0:vm1")
    assert report.returncode == 0, report.data
    assert report.data["sockets"] == [
        ["vm0", 3, str(tmp_path / "a.sock")],
        ["vm1", 4, str(tmp_path / "b.sock")],
    ]
    assert report.data["child"] == [[], []], "no LISTEN_* and no fd reach a child"


def test_unnamed_sockets_are_named_after_their_files(tmp_path: Path) -> None:
    a, b = unix_listener(tmp_path / "vm0.sock"), unix_listener(tmp_path / "web-1.sock")
    for names in (None, "balloond.socket:balloond.socket", "unknown:unknown"):
        report = activate([a.fileno(), b.fileno()], names)
        assert report.returncode == 0, report.data
        assert [s[0] for s in report.data["sockets"]] == ["vm0", "web-1"]  # type: ignore[index, union-attr]


def test_wrong_listen_pid_takes_nothing(tmp_path: Path) -> None:
    a = unix_listener(tmp_path / "vm0.sock")
    report = activate([a.fileno()], "vm0", pid=1)
    assert report.returncode == 0
    assert report.data["sockets"] == []
    assert report.data["child"] == [[], []]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("file", "fd 4 (vm1) is not a socket"),
        ("closed", "fd 4 (vm1): .*Bad file descriptor"),
        ("not listening", "fd 4 (vm1) is not listening"),
        ("datagram", "fd 4 (vm1) is not a Unix stream socket"),
        ("tcp", "fd 4 (vm1) is not a Unix stream socket"),
        ("abstract unnamed", "fd 4 has no name"),
        ("duplicate", "fd 3 and fd 4 both serve device 'vm0'"),
        ("bad name", "'vm 1' is not a device name"),
    ],
)
def test_anything_but_a_listening_unix_stream_socket_is_refused(
    kind: str, message: str, tmp_path: Path
) -> None:
    good = unix_listener(tmp_path / "vm0.sock")
    names = "vm0:vm1"
    keep: list[object] = []
    if kind == "file":
        file = (tmp_path / "file").open("w")
        keep.append(file)
        fd = file.fileno()
    elif kind == "closed":
        fd = -1
    elif kind == "not listening":
        keep.append(sock := unix_listener(tmp_path / "vm1.sock", listen=False))
        fd = sock.fileno()
    elif kind == "datagram":
        keep.append(sock := socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        sock.bind(str(tmp_path / "vm1.sock"))
        fd = sock.fileno()
    elif kind == "tcp":
        keep.append(sock := socket.create_server(("127.0.0.1", 0)))
        fd = sock.fileno()
    elif kind == "abstract unnamed":
        keep.append(sock := socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.bind(f"\0balloond-test-{uuid.uuid4().hex}")
        sock.listen()
        fd, names = sock.fileno(), "vm0:unknown"
    else:
        keep.append(sock := unix_listener(tmp_path / "vm1.sock"))
        fd = sock.fileno()
        names = "vm0:vm0" if kind == "duplicate" else "vm0:vm 1"
    report = activate([good.fileno(), fd], names)
    assert report.returncode == 1
    error = str(report.data["error"])
    assert error.startswith("socket activation: ")
    assert re.search(message.replace("(", r"\(").replace(")", r"\)"), error), error


def test_activated_sockets_without_variables_is_empty() -> None:
    assert activated_sockets({}) == []


# --- socket activation by systemd-socket-activate -------------------------------------------


def socket_activate(
    tmp_path: Path, sockets: Sequence[str], *fdnames: str, connect: str, device: str
) -> Report:
    """Listen with systemd-socket-activate, which runs REPORTER on the first connection;
    REPORTER answers that connection, on ``device``, with the device's name."""
    launcher = tool("systemd-socket-activate")
    argv = [launcher, *(f"--listen={tmp_path / s}" for s in sockets)]
    argv += [f"--fdname={name}" for name in fdnames]
    process = subprocess.Popen(
        [*argv, sys.executable, "-c", REPORTER, device],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        path = tmp_path / connect
        deadline = time.monotonic() + 10
        while not path.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "systemd-socket-activate never listened"
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))  # this starts the program, as a socket unit would
            answer = client.recv(100).decode() if process.wait(timeout=30) == 0 else ""
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    report = Report(process.returncode, json.loads(stdout.splitlines()[-1]) if stdout else {})
    if report.returncode == 0:
        assert answer == device, (answer, stderr)
    return report


def test_systemd_socket_activate_named(tmp_path: Path) -> None:
    report = socket_activate(
        tmp_path, ["a.sock", "b.sock"], "vm0", "vm1", connect="b.sock", device="vm1"
    )
    assert report.returncode == 0, report.data
    assert report.data["sockets"] == [
        ["vm0", 3, str(tmp_path / "a.sock")],
        ["vm1", 4, str(tmp_path / "b.sock")],
    ]
    assert report.data["child"] == [[], []]


def test_systemd_socket_activate_unnamed(tmp_path: Path) -> None:
    report = socket_activate(tmp_path, ["vm0.sock", "vm1.sock"], connect="vm1.sock", device="vm1")
    assert report.returncode == 0, report.data
    assert [s[0] for s in report.data["sockets"]] == ["vm0", "vm1"]  # type: ignore[index, union-attr]


def test_systemd_socket_activate_one_name_for_two_sockets_is_refused(tmp_path: Path) -> None:
    # systemd-socket-activate (like one socket unit with two ListenStream= and one
    # FileDescriptorName=) gives both fds the same name: two devices cannot share it.
    report = socket_activate(tmp_path, ["a.sock", "b.sock"], "vm0", connect="a.sock", device="vm0")
    assert report.returncode == 1
    assert "both serve device 'vm0'" in str(report.data["error"])


# --- the unit files ----------------------------------------------------------------------


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units as installed, with ExecStart= pointing at this balloond (verify checks it
    is an executable) instead of /usr/bin/balloond."""
    balloond = Path(sys.executable).with_name("balloond")
    if not os.access(balloond, os.X_OK):
        pytest.skip(f"no balloond entry point next to {sys.executable}: run make setup")
    installed = tmp_path / "units"
    shutil.copytree(UNITS, installed)
    for unit in installed.glob("*.service"):
        text = unit.read_text()
        assert "ExecStart=/usr/bin/balloond " in text
        unit.write_text(text.replace("=/usr/bin/balloond ", f"={balloond} "))
    return installed


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), *args], capture_output=True, text=True, timeout=60
    )


def test_units_verify_clean(units: Path) -> None:
    names = sorted(p.name for p in units.iterdir() if p.suffix in (".service", ".socket"))
    assert names == ["balloond-vm@.socket", "balloond.service", "balloond.socket"]
    targets = [units / n.replace("@.", "@vm0.") for n in names]  # a template needs an instance
    result = analyze("verify", *map(str, targets))
    # verify exits 0 on unknown keys and bad values too: every line it prints is a complaint.
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr


def test_metrics_drop_in_verifies_clean(units: Path) -> None:
    assert (units / "balloond.service.d" / "metrics.conf").is_file()
    result = analyze("verify", str(units / "balloond.service"))  # reads balloond.service.d/
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr


def exposure(units: Path) -> float:
    result = analyze("security", "--offline=yes", str(units / "balloond.service"))
    match = re.search(r"Overall exposure level for balloond\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_security_exposure_as_documented(units: Path) -> None:
    """docs/systemd.md gives the scores of systemd 252; newer systemd may score stricter."""
    documented = (ROOT / "docs" / "systemd.md").read_text()
    plain = float(re.search(r"exposure \*\*(\d\.\d)\*\*", documented).group(1))  # type: ignore[union-attr]
    metrics = float(re.search(r"with metrics \*\*(\d\.\d)\*\*", documented).group(1))  # type: ignore[union-attr]
    shutil.rmtree(units / "balloond.service.d")
    assert exposure(units) <= plain
    shutil.copytree(UNITS / "balloond.service.d", units / "balloond.service.d")
    assert exposure(units) <= metrics


def test_socket_units_hand_over_what_activation_accepts() -> None:
    """Each socket unit is one listening Unix stream socket with a device name."""
    for unit in sorted(UNITS.glob("*.socket")):
        settings = dict(
            line.split("=", 1)
            for line in unit.read_text().splitlines()
            if "=" in line and not line.startswith("#")
        )
        assert settings["Service"] == "balloond.service", unit
        assert settings.get("Accept", "no") == "no", unit
        assert settings["ListenStream"].startswith("/run/balloond/"), unit
        name = settings["FileDescriptorName"].replace("%i", "vm0")
        assert valid_device_name(name), unit
        path = settings["ListenStream"].replace("%i", "vm0")
        assert os.path.basename(path).removesuffix(".sock") == name, unit


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """Every setting of a unit file and its values, in order (comments left out)."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_service_keeps_its_vms_in_the_fd_store() -> None:
    """Crash survival is on: --keep-state given (systemd 252 sets no $FDSTORE to infer it
    from), a store for a few hundred VMs of about 30 fds each, the restart that uses it, and
    room under LimitNOFILE= for the new daemon to take every stored fd back."""
    settings = unit_settings(UNITS / "balloond.service")
    [start] = settings["ExecStart"]
    assert start.split()[:3] == ["/usr/bin/balloond", "serve", "--keep-state"]
    [store] = map(int, settings["FileDescriptorStoreMax"])
    [limit] = map(int, settings["LimitNOFILE"])
    assert 300 * 30 <= store <= limit - 1024
    assert settings["Restart"] == ["on-failure"]
    assert settings["NotifyAccess"] == ["main"], "FDSTORE=1 is taken from the main process"


# --- the units under a real systemd, PID 1 of its own namespaces (root only) -----------------

#: QEMU and a guest on the socket unit's socket: report 8 MiB of touched memory as free.
DRIVER = """
import json, sys
from tests.frontend import Frontend, Guest, GuestRam, MiB
huge = sys.argv[2] == "huge"
def free_huge_pages():
    for line in open("/proc/meminfo"):
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
ram = GuestRam(low=32 * MiB, high=0, hugetlb=huge)
frontend = Frontend(sys.argv[1], timeout=30)
guest = Guest(frontend, ram)
guest.start()
ram.write(8 * MiB, b"\\x01" * (8 * MiB))
blocks, pages = ram.blocks(), free_huge_pages()
guest.report([(8 * MiB, 2 * MiB), (10 * MiB, 2 * MiB), (12 * MiB, 4 * MiB)])
print(json.dumps({"freed": blocks - ram.blocks(), "huge_pages_back": free_huge_pages() - pages}))
"""

#: Run inside new PID, mount and cgroup namespaces: a /proc, /run and cgroup2 hierarchy of
#: its own, then systemd as PID 1 with only our units (and empty boot targets).
BOOT = """
set -e
mount -t proc proc /proc
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir /run/balloond-test
export container=balloond-test SYSTEMD_UNIT_PATH="$1/units"
export SYSTEMD_GENERATOR_PATH="$1/none" SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$1/none"
exec /lib/systemd/systemd --system --unit=test.target --log-level=warning --show-status=no
"""

BOOT_TARGETS = ("sysinit", "basic", "sockets", "multi-user", "shutdown", "local-fs", "paths")


class Pid1:
    """systemd as PID 1 of its own namespaces; ``run`` runs a command inside them."""

    def __init__(self, base: Path, cgroup: Path) -> None:
        self.base = base
        self.cgroup = cgroup
        script = f"echo $$ > {cgroup}/cgroup.procs && exec unshare --pid --fork --mount "
        script += "--cgroup --uts --ipc --propagation private --kill-child=SIGKILL "
        script += f'sh -c "$0" boot {base}'
        self.process = subprocess.Popen(
            ["sh", "-c", script, BOOT], stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 20
        while (children := self._children()) == []:
            assert self.process.poll() is None, "unshare failed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.pid = children[0]

    def _children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(pid) for pid in text.split()]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def popen(self, *argv: str, stderr: Path) -> subprocess.Popen[str]:
        """A long-lived process inside the namespaces: lines in on stdin, out on stdout."""
        with open(stderr, "w") as errors:
            return subprocess.Popen(
                ["nsenter", "-t", str(self.pid), "-m", "-p", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        args = [f"--property={p}" for p in properties]
        result = self.run("systemctl", "show", *args, unit, check=False)
        return dict(line.split("=", 1) for line in result.stdout.splitlines())

    def wait(self, unit: str, timeout: float = 20, **expected: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.show(unit, *expected, "StatusText", "MainPID", "NRestarts", "Result")
            if all(shown.get(k) == v for k, v in expected.items()):
                return shown
            assert time.monotonic() < deadline, (shown, self.log())
            time.sleep(0.1)

    def log(self) -> str:
        return self.run("cat", "/run/balloond-test/log", check=False).stdout

    def close(self) -> None:
        self.process.kill()  # unshare kills systemd (--kill-child), and with it its namespaces
        self.process.wait(timeout=20)
        deadline = time.monotonic() + 10
        while self.cgroup.exists():  # busy until the namespaces' last process is gone
            directories = [p for p in self.cgroup.rglob("*") if p.is_dir()]
            try:
                for directory in sorted(directories, key=lambda p: -len(p.parts)):
                    directory.rmdir()
                self.cgroup.rmdir()
            except OSError:
                assert time.monotonic() < deadline, "processes left in the test's cgroup"
                time.sleep(0.1)


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, *_ = line.split()
        if kind == "cgroup2":
            return Path(where)
    return None


@pytest.fixture
def pid1(tmp_path: Path) -> Iterator[Pid1]:
    if os.geteuid() != 0:
        pytest.skip("running systemd as PID 1 of its own namespaces needs root")
    tool("systemd-analyze")
    for needed in ("unshare", "nsenter", "useradd"):
        if shutil.which(needed) is None:
            pytest.skip(f"{needed} not found (Debian packages util-linux, passwd)")
    hierarchy = _cgroup2_mount()
    if hierarchy is None or not os.access(hierarchy, os.W_OK):
        pytest.skip("needs a writable cgroup2 hierarchy")
    created_user = subprocess.run(["id", "balloond"], capture_output=True).returncode != 0
    if created_user:  # what installing balloond.sysusers does
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/", "--shell",
             "/usr/sbin/nologin", "balloond"],
            check=True,
        )  # fmt: skip
    units = tmp_path / "units"
    units.mkdir()
    (tmp_path / "none").mkdir()
    for target in BOOT_TARGETS:
        (units / f"{target}.target").write_text(f"[Unit]\nDescription={target}\n")
    (units / "test.target").write_text("[Unit]\nWants=balloond.socket\nAfter=balloond.socket\n")
    shutil.copy(UNITS / "balloond.socket", units)
    # This Python runs the daemon; the unit's arguments (serve --keep-state) stay as shipped.
    service, started = re.subn(
        r"^ExecStart=/usr/bin/balloond serve ",
        f"ExecStart={sys.executable} -m balloond serve ",
        (UNITS / "balloond.service").read_text(),
        flags=re.MULTILINE,
    )
    assert started == 1
    service, reloading = re.subn(
        r"^ExecReload=/usr/bin/balloond reload$",
        f"ExecReload={sys.executable} -m balloond reload",
        service,
        flags=re.MULTILINE,
    )
    assert reloading == 1
    (units / "balloond.service").write_text(service)
    # Only what the test needs changes: this Python and tree visible (they may live in a home
    # directory), the daemon's output in a file (no journald here), a short watchdog.
    dropin = units / "balloond.service.d"
    dropin.mkdir()
    readable = " ".join(sorted({str(ROOT), sys.prefix, sys.base_prefix}))
    (dropin / "test.conf").write_text(
        "[Service]\nProtectHome=tmpfs\n"
        f"BindReadOnlyPaths={readable}\n"
        f"Environment=PYTHONPATH={ROOT}\n"
        "StandardOutput=append:/run/balloond-test/log\nStandardError=inherit\n"
        "WatchdogSec=2s\n"
    )
    cgroup = hierarchy / f"balloond-test-{uuid.uuid4().hex[:12]}"
    cgroup.mkdir()
    manager = None
    try:
        manager = Pid1(tmp_path, cgroup)
        manager.wait("balloond.socket", ActiveState="active")
        yield manager
    finally:
        if manager is not None:
            manager.close()
        elif cgroup.exists():
            cgroup.rmdir()
        if created_user:
            subprocess.run(["userdel", "balloond"], check=False)


def drive(pid1: Pid1, kind: str) -> dict[str, int]:
    result = pid1.run(sys.executable, "-c", DRIVER, "/run/balloond/vm0.sock", kind, check=False)
    assert result.returncode == 0, result.stderr + pid1.log()
    return dict(json.loads(result.stdout))


def test_the_units_under_systemd_as_pid1(pid1: Pid1) -> None:
    """QEMU's connection starts balloond through balloond.socket; the daemon serves it under
    the unit's whole hardening, the watchdog restarts a stuck daemon, stop is clean."""
    assert pid1.show("balloond.service", "ActiveState") == {"ActiveState": "inactive"}
    assert drive(pid1, "memfd")["freed"] == 8 * MiB_
    shown = pid1.wait("balloond.service", ActiveState="active", SubState="running")
    assert shown["StatusText"].startswith("serving 1 devices"), "READY=1 and STATUS= arrived"
    assert shown["StatusText"].endswith(": vm0")
    status = pid1.run("cat", f"/proc/{shown['MainPID']}/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split()[0] == pid1.run("id", "-u", "balloond").stdout.strip()
    assert int(fields["CapEff"], 16) == 0 and fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2", "SystemCallFilter= is in force"
    mounts = pid1.run("cat", f"/proc/{shown['MainPID']}/mountinfo").stdout
    assert re.search(r" /dev ro,nosuid,noexec", mounts), "PrivateDevices= is in force"
    socket_owner = pid1.run("stat", "-c", "%U:%G %a", "/run/balloond/vm0.sock").stdout
    assert socket_owner.split() == ["balloond:balloond", "660"]

    free = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("HugePages_Free:")
    )
    if free >= 16:  # 2 MiB huge pages arrive as an fd too: PrivateDevices= hides no memory
        assert drive(pid1, "huge")["huge_pages_back"] == 4

    pid1.run("kill", "-STOP", shown["MainPID"])  # the event loop is stuck from now on
    restarted = pid1.wait("balloond.service", timeout=30, NRestarts="1", SubState="running")
    assert restarted["MainPID"] != shown["MainPID"]
    assert "Fatal Python error: Aborted" in pid1.log(), "the watchdog's SIGABRT"
    assert drive(pid1, "memfd")["freed"] == 8 * MiB_, "the socket was handed over again"

    # A reload (ExecReload=: balloond reload) under the whole hardening: the same process
    # carries the socket balloond.socket passed on, in a new image.
    pid1.run("systemctl", "reload", "balloond.service")
    reloaded = pid1.wait("balloond.service", SubState="running")
    assert reloaded["MainPID"] == restarted["MainPID"]
    assert "reloaded: 1 devices carried on" in pid1.log()
    assert drive(pid1, "memfd")["freed"] == 8 * MiB_, "the socket was carried over the reload"

    pid1.run("systemctl", "stop", "balloond.service")
    stopped = pid1.show("balloond.service", "ActiveState", "Result", "StatusText")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "StatusText": "stopping"}
    assert pid1.show("balloond.socket", "ActiveState") == {"ActiveState": "active"}
    assert pid1.run("test", "-S", "/run/balloond/vm0.sock", check=False).returncode == 0


#: A VM that stays connected across the test: it reports 8 MiB of touched memory as free,
#: then at each line on stdin does its next step, printing what it saw as one JSON line.
VM = """
import json, socket, sys
from tests.frontend import Frontend, Guest, GuestRam, MiB
ram = GuestRam(low=32 * MiB, high=0)
frontend = Frontend(sys.argv[1], timeout=30)
guest = Guest(frontend, ram)
guest.start()
ram.write(8 * MiB, b"\\x01" * (16 * MiB))

def report(gpa):
    blocks = ram.blocks()
    guest.report([(gpa, 4 * MiB), (gpa + 4 * MiB, 4 * MiB)], timeout=30)
    return blocks - ram.blocks()

def connected():
    # Nothing to read and no EOF: the connection is open, and nothing came unasked.
    frontend.sock.settimeout(0.2)
    try:
        frontend.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        frontend.sock.settimeout(30)
    return False

def step(**seen):
    print(json.dumps(seen), flush=True)
    sys.stdin.readline()

step(freed=report(8 * MiB))
step(connected=connected(), freed=report(16 * MiB), config=len(frontend.get_config()))
print(json.dumps({"closed": frontend.closed_by_backend(timeout=10)}), flush=True)
"""


class Vm:
    """The VM above, run inside the namespaces; ``step`` lets it go on and reads its line."""

    def __init__(self, pid1: Pid1, stderr: Path) -> None:
        self.pid1 = pid1
        self.stderr = stderr
        self.process = pid1.popen(sys.executable, "-c", VM, "/run/balloond/vm0.sock", stderr=stderr)

    def read(self, timeout: float = 60) -> dict[str, object]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        assert line, f"the VM said nothing:\n{self.stderr.read_text()}\n{self.pid1.log()}"
        return dict(json.loads(line))

    def step(self) -> dict[str, object]:
        assert self.process.stdin is not None
        self.process.stdin.write("go on\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=20)


def stored(pid1: Pid1) -> int:
    """How many fds systemd keeps in balloond.service's fd store."""
    return int(pid1.show("balloond.service", "NFileDescriptorStore")["NFileDescriptorStore"])


def log_events(pid1: Pid1) -> list[dict[str, object]]:
    return [json.loads(line) for line in pid1.log().splitlines() if line.startswith("{")]


def test_a_killed_daemon_carries_its_vm_on_under_systemd_as_pid1(
    pid1: Pid1, tmp_path: Path
) -> None:
    """--keep-state in the shipped unit, under a real systemd 252: a SIGKILLed daemon is
    restarted (Restart=on-failure) with the fds its device stored (FDSTORE=1, FDPOLL=0), and
    carries the VM on: the VM never sees its connection close, and its next report frees
    memory. The store outlives a daemon-reload; a stop empties it and the VM loses its
    balloon (one warning for the device)."""
    start = pid1.show("balloond.service", "ExecStart")["ExecStart"]
    assert " -m balloond serve --keep-state " in start, "the unit's arguments, as shipped"
    vm = Vm(pid1, tmp_path / "vm.stderr")
    try:
        assert vm.read()["freed"] == 8 * MiB_, "served, through balloond.socket"
        first = pid1.wait("balloond.service", SubState="running", NRestarts="0")
        kept = stored(pid1)
        assert kept > 2, "the VM's fds are kept, not only the listener and the state file"

        # A daemon-reload (what a package upgrade runs) serializes the store and reads it back.
        pid1.run("systemctl", "daemon-reload")
        assert stored(pid1) == kept

        pid1.run("kill", "-KILL", first["MainPID"])
        second = pid1.wait("balloond.service", timeout=30, NRestarts="1", SubState="running")
        assert second["MainPID"] != first["MainPID"]
        assert stored(pid1) == kept, "the store was kept across the restart, nothing added"
        assert "(1 connected)" in first["StatusText"], first
        assert "(1 connected)" in second["StatusText"], second

        after = vm.step()
        assert after == {"connected": True, "freed": 8 * MiB_, "config": 16}, pid1.log()
        events = [str(e["event"]) for e in log_events(pid1)]
        assert events.count("frontend connected") == 1, "one connection, never a second"
        assert "carried on 1 devices from the fd store after the last process ended" in events
        assert "carrying on with the frontend a previous process served" in events

        # A stop: SIGTERM, the daemon drops what it stored and closes the VM's connection,
        # and systemd empties the store (the unit is dead with no job queued).
        pid1.run("systemctl", "stop", "balloond.service")
        stopped = pid1.show("balloond.service", "ActiveState", "Result")
        assert stopped == {"ActiveState": "inactive", "Result": "success"}
        assert stored(pid1) == 0
        assert vm.step() == {"closed": True}
        warnings = [
            e
            for e in log_events(pid1)
            if str(e["event"]).startswith("stopping with a VM connected")
        ]
        assert [e.get("device") for e in warnings] == ["vm0"], pid1.log()
        assert warnings[0]["level"] == "error", "said loudly"
    finally:
        vm.close()

"""``balloond`` as an operator runs it: a real process, real signals, real sockets."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balloond.wire import Request
from tests.frontend import Frontend

BALLOOND = [sys.executable, "-m", "balloond"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BALLOOND, *args], capture_output=True, text=True, timeout=30)


def wait_for_socket(path: Path, process: subprocess.Popen[str]) -> None:
    """Wait for balloond's "control on" log line, its last at start (a socket file alone
    may be a stale one)."""
    assert process.stderr is not None
    for line in process.stderr:
        if "control on" in line:
            return
    raise AssertionError(f"balloond exited with {process.wait()} before listening")


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_daemon_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Every daemon and client of a test uses the test's own control socket (inherited).
    monkeypatch.setenv("BALLOOND_CONTROL", str(tmp_path / "control.sock"))
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def serve(path: Path, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [*BALLOOND, "serve", "--socket-path", str(path), *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    _STARTED.append(process)
    wait_for_socket(path, process)
    return process


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> tuple[int, str]:
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=10)
    return process.returncode, stderr


def test_print_capabilities_is_json() -> None:
    result = run("--print-capabilities")
    assert result.returncode == 0
    assert json.loads(result.stdout)["type"] == "balloon"


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--socket-path", "bad name=/tmp/x"),
        ("serve", "--socket-path", "/tmp/x", "--socket-path", "x=/tmp/y"),
        ("serve", "--socket-path", "/tmp/x", "--socket-mode", "999"),
        ("serve", "--fd", "banana"),
        ("frobnicate",),
    ],
)
def test_bad_arguments_give_one_line_and_fail(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_operator_errors_are_one_line(tmp_path: Path) -> None:
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("keep me")
    result = run("serve", "--socket-path", str(not_a_socket))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"balloond: error: {not_a_socket} exists and is not a socket"
    ]
    assert not_a_socket.read_text() == "keep me"
    result = run("serve", "--fd", "97")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    result = run("serve", "--socket-path", str(tmp_path / "nodir" / "s.sock"))
    assert result.returncode == 1 and "cannot listen" in result.stderr


def test_serves_and_exits_promptly_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    process = serve(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    frontend = Frontend(str(path))
    assert frontend.u64(Request.GET_FEATURES) & (1 << 32)
    started = time.monotonic()
    code, stderr = stop(process)
    assert code == 0, stderr
    assert time.monotonic() - started < 5
    assert not path.exists(), "the socket file is removed on the way out"
    assert not Path(os.environ["BALLOOND_CONTROL"]).exists()
    assert "Traceback" not in stderr
    frontend.close()


def test_sigint_too(tmp_path: Path) -> None:
    process = serve(tmp_path / "vm.sock")
    code, stderr = stop(process, signal.SIGINT)
    assert code == 0, stderr


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    process = serve(path, "--socket-mode", "0660")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    second = run("serve", "--socket-path", str(path))
    assert second.returncode == 1
    assert "in use" in second.stderr
    code, _ = stop(process)
    assert code == 0


def test_takes_a_listening_socket_by_fd(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    process = subprocess.Popen(
        [*BALLOOND, "serve", "--fd", str(listener.fileno())],
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
        text=True,
    )
    _STARTED.append(process)
    listener.close()
    frontend = Frontend(str(path), timeout=15)
    assert frontend.u64(Request.GET_FEATURES) & (1 << 32)
    frontend.close()
    code, stderr = stop(process)
    assert code == 0, stderr


def test_help_shows_the_qemu_command_line() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    assert "vhost-user-test-device-pci" in result.stdout
    assert "--no-discard" in result.stdout


def test_status_and_set_target_through_the_control_socket(tmp_path: Path) -> None:
    from tests.frontend import Guest, GuestRam, MiB

    path = tmp_path / "vm7.sock"
    process = serve(path)
    try:
        idle = json.loads(run("status", "vm7", "--json").stdout)
        assert idle["device"] == "vm7" and idle["socket"] == str(path)
        assert (idle["connected"], idle["ram_bytes"], idle["host_resident_bytes"]) == (
            False,
            0,
            None,
        )
        assert idle["schema_version"] == 1
        refused = run("set-target", "vm7", "1GiB")
        assert refused.returncode == 1
        assert refused.stderr.strip() == "balloond: error: vm7: no VM is connected"

        ram = GuestRam(low=64 * MiB, high=64 * MiB)
        frontend = Frontend(str(path))
        guest = Guest(frontend, ram)
        guest.start()
        ram.write(0, b"\x01" * (8 * MiB))  # the host now holds 8 MiB of the guest's memory
        done = run("set-target", "vm7", "96MiB")
        assert done.stdout.strip() == "vm7: target set to 96.0 MiB"
        status = json.loads(run("status", str(path), "--json").stdout)  # by socket path too
        assert status["ram_bytes"] == 128 * MiB
        assert status["target_bytes"] == 96 * MiB
        assert status["balloon_target_bytes"] == 32 * MiB
        assert status["host_resident_bytes"] == ram.blocks() >= 8 * MiB
        too_big = run("set-target", "vm7", "1GiB")
        assert too_big.returncode == 1 and "outside" in too_big.stderr
        assert "reporting" in run("status").stdout
        guest.close()
        frontend.close()
        ram.close()
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr


def test_one_daemon_serves_many_devices_added_and_removed(tmp_path: Path) -> None:
    from tests.frontend import Guest, GuestRam, MiB

    process = serve(tmp_path / "a.sock", "--socket-path", f"web={tmp_path / 'b.sock'}")
    try:
        listed = json.loads(run("status", "--json").stdout)
        assert [d["device"] for d in listed["devices"]] == ["a", "web"]
        added = run("add", "db", "--socket-path", str(tmp_path / "db.sock"))
        assert added.stdout.strip() == f"db: serving {tmp_path / 'db.sock'}"
        assert run("add", "db", "--socket-path", str(tmp_path / "x.sock")).stderr.strip() == (
            "balloond: error: device 'db' exists already"
        )
        # A VM on the new device; a protocol breach on another does not disturb it.
        ram = GuestRam(low=32 * MiB, high=0)
        frontend = Frontend(str(tmp_path / "db.sock"))
        guest = Guest(frontend, ram)
        guest.start()
        rogue = Frontend(str(tmp_path / "a.sock"))
        rogue.send_raw(b"\xff" * 12)
        assert rogue.closed_by_backend()
        assert json.loads(run("status", "db", "--json").stdout)["connected"] is True
        assert json.loads(run("status", "a", "--json").stdout)["errors"] == {"protocol": 1}
        busy = run("remove", "db")
        assert busy.returncode == 1 and "--force" in busy.stderr
        guest.close()
        frontend.close()
        ram.close()
        rogue.close()
        deadline = time.monotonic() + 30  # a hang; each status is a Python start-up
        while json.loads(run("status", "db", "--json").stdout)["connected"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert run("remove", "db").stdout.strip() == "db: removed"
        assert not (tmp_path / "db.sock").exists()
        unknown = run("status", "db")
        assert unknown.stderr.strip() == "balloond: error: no device 'db' (devices: a, web)"
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr


def test_clients_say_plainly_when_no_daemon_runs(tmp_path: Path) -> None:
    result = run("status")
    assert result.returncode == 1
    assert result.stderr.startswith("balloond: error: no balloond is running at ")


def test_a_config_file_names_devices_and_settings(tmp_path: Path) -> None:
    config = tmp_path / "balloond.toml"
    config.write_text(
        f'socket_mode = "0660"\nstats_interval = 5\n'
        f'[devices.vm1]\nsocket_path = "{tmp_path / "one.sock"}"\n'
    )
    process = serve(tmp_path / "two.sock", "--config", str(config))
    try:
        listed = json.loads(run("status", "--json").stdout)
        assert [d["device"] for d in listed["devices"]] == ["two", "vm1"]
        assert stat.S_IMODE(os.stat(tmp_path / "one.sock").st_mode) == 0o660
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    config.write_text("socket_mood = 1\n")
    wrong = run("serve", "--config", str(config))
    assert wrong.returncode == 1
    assert "unknown setting 'socket_mood'" in wrong.stderr


def test_feature_settings_come_from_the_file_and_the_command_line(tmp_path: Path) -> None:
    from balloond.cli import build_parser
    from balloond.daemon import read_config

    config = tmp_path / "balloond.toml"
    config.write_text("free_page_reporting = false\ndeflate_on_oom = true\n")
    options = read_config(str(config)).options
    assert (options.free_page_reporting, options.deflate_on_oom) == (False, True)
    args = build_parser().parse_args(["serve", "--no-free-page-reporting"])
    assert args.free_page_reporting is False
    assert build_parser().parse_args(["serve"]).free_page_reporting is None


@pytest.mark.parametrize(
    ("text", "size"),
    [("1.5GiB", 3 << 29), ("1536MiB", 3 << 29), ("2G", 2 << 30), ("4096", 4096), ("1GB", 10**9)],
)
def test_sizes(text: str, size: int) -> None:
    from balloond.cli import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1G", "1.5", "GiB", "1 parsec", ""])
def test_bad_sizes_are_refused(text: str, tmp_path: Path) -> None:
    result = run("set-target", str(tmp_path / "x.sock"), text)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_control_socket_in_use_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    control = os.environ["BALLOOND_CONTROL"]
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(control)
    other.listen(1)
    result = run("serve", "--socket-path", str(path))
    assert result.returncode == 1
    assert "in use" in result.stderr
    assert Path(control).exists(), "another process's socket is not removed"
    assert not path.exists()
    other.close()


def a_group_to_give() -> grp.struct_group:
    """A group other than the user's own that the user may give a file to.

    Root may give a file to any group; anyone else only to a group they are a member of.
    """
    own = os.getegid()
    if os.geteuid() == 0:
        others = sorted((g for g in grp.getgrall() if g.gr_gid != own), key=lambda g: g.gr_name)
        preferred = [g for g in others if g.gr_name == "users"]
        if preferred or others:
            return (preferred or others)[0]
    for gid in sorted(set(os.getgroups()) - {own}):
        with contextlib.suppress(KeyError):
            return grp.getgrgid(gid)
    user = pwd.getpwuid(os.geteuid()).pw_name
    pytest.skip(
        f"{user} is in no group but its own, and may give a socket only to a group it is in: "
        f"add it to one to run this test (sudo usermod -aG users {user}, then log in again)"
    )


def test_socket_group(tmp_path: Path) -> None:
    group = a_group_to_give()
    assert group.gr_gid != os.getegid(), "the socket would have this group anyway"
    path = tmp_path / "vm.sock"
    process = serve(path, "--socket-group", group.gr_name, "--socket-mode", "0660")
    try:
        info = os.stat(path)
        assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (group.gr_gid, 0o660)
        control = os.stat(os.environ["BALLOOND_CONTROL"])
        assert stat.S_IMODE(control.st_mode) == 0o600, "the control socket has its own mode"
    finally:
        code, _ = stop(process)
    assert code == 0


def test_an_unknown_socket_group_is_refused(tmp_path: Path) -> None:
    unknown = run("serve", "--socket-path", str(tmp_path / "b.sock"), "--socket-group", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "balloond: error: unknown group 'nope'"
    assert not (tmp_path / "b.sock").exists()


def ask_as_nobody(control: str) -> str:
    """Ask the daemon for its status from a child running as nobody (nogroup): "ok", or
    the daemon's error."""
    from balloond.control import request
    from balloond.errors import OperatorError

    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                request(control, {"command": "status"}, timeout=10)
                answer = "ok"
            except OperatorError as error:
                answer = str(error)
            os.write(writer, answer.encode())
            code = 0
        except BaseException as error:
            os.write(writer, repr(error).encode())
        finally:
            os._exit(code)
    os.close(writer)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(reader, "rb") as answer:
        text = answer.read().decode()
    assert status == 0, text
    return text


@pytest.mark.parametrize("group", [None, "nogroup"])
def test_the_control_socket_answers_only_trusted_peers(
    tmp_path: Path, group: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("acting as another user (nobody) needs root")
    extra = ("--control-group", group) if group else ()
    public = Path(tempfile.mkdtemp(prefix="balloond-test-"))  # pytest's tmp is root-only
    public.chmod(0o755)
    control = str(public / "control.sock")
    monkeypatch.setenv("BALLOOND_CONTROL", control)
    process = serve(tmp_path / "vm.sock", *extra)
    try:
        assert stat.S_IMODE(os.stat(control).st_mode) == (0o660 if group else 0o600)
        # Open the file itself to everyone: the daemon still checks who is asking.
        os.chmod(control, 0o666)
        assert ask_as_nobody(control) == ("ok" if group else "permission denied")
    finally:
        code, stderr = stop(process)
        shutil.rmtree(public, ignore_errors=True)
    assert code == 0, stderr


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    # Enough devices that the JSON outgrows a pipe's buffer: the write meets the closed pipe.
    config = tmp_path / "many.toml"
    config.write_text(
        "".join(f'[devices.v{i}]\nsocket_path = "{tmp_path}/v{i}.sock"\n' for i in range(300))
    )
    process = serve(tmp_path / "vm.sock", "--config", str(config))
    try:
        done = subprocess.run(
            f"{sys.executable} -m balloond status --json | head -1",
            shell=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.stdout.strip() == "{"
        assert "Traceback" not in done.stderr, done.stderr
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr


def ask(control: str, line: bytes) -> dict[str, object]:
    """One raw request line on the control socket; the parsed answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(control)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # A daemon over its cap answers at once and hangs up, maybe before this is sent.
            client.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            assert chunk, "the daemon closed the connection without an answer"
            data += chunk
    answer: dict[str, object] = json.loads(data)
    return answer


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"command": "status", "device": ["vm"]}\n', "device must be a non-empty string"),
        (b'{"command": "status", "device": {"a": 1}}\n', "device must be a non-empty string"),
        (b"[" * 3000 + b"]" * 3000 + b"\n", "longer than 4096 bytes"),
        (b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"\n", "longer than 4096 bytes"),
        (b"[" * 1000 + b"]" * 1000 + b"\n", "not JSON: maximum recursion depth"),
        (b"[1, 2]\n", "a request is a JSON object"),
        (b'{"command": "set-target", "target_bytes": true}\n', "integer target_bytes"),
        (b'{"version": 2, "command": "status"}\n', "protocol version 2"),
        (b"\xff\xfe\n", "not JSON"),
    ],
)
def test_odd_control_requests_get_an_answer(tmp_path: Path, line: bytes, error: str) -> None:
    process = serve(tmp_path / "vm.sock")
    try:
        answer = ask(os.environ["BALLOOND_CONTROL"], line)
        assert answer["ok"] is False and error in str(answer["error"]), answer
        assert ask(os.environ["BALLOOND_CONTROL"], b'{"command": "status"}\n')["ok"] is True
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr


def until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds; False after ``timeout`` (a hang, not pacing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_control_connections_are_capped(tmp_path: Path) -> None:
    process = serve(tmp_path / "vm.sock")
    control = os.environ["BALLOOND_CONTROL"]
    idle: list[socket.socket] = []
    try:
        for _ in range(32):  # idle clients, up to the cap
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(control)
            idle.append(client)
        # The daemon takes the 32 in its own time (a loaded machine): ask until it counts
        # them all. A client under the cap is answered and closed, so asking adds nothing.
        refusal = {"version": 1, "ok": False, "error": "too many control connections; try again"}
        assert until(lambda: ask(control, b'{"command": "status"}\n') == refusal)
        for client in idle:
            client.close()
        idle.clear()
        assert until(lambda: ask(control, b'{"command": "status"}\n')["ok"] is True)
    finally:
        for client in idle:
            client.close()
        code, stderr = stop(process)
    assert code == 0, stderr

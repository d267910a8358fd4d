"""The keeper (balloond.keeper) with real processes: a worker stores fds through the sd_notify
protocol, dies by SIGKILL, and the next worker finds the same open files in LISTEN_FDS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.test_systemd import Manager

REPO = Path(__file__).resolve().parents[1]

#: The worker: each start appends one JSON line to RUN/starts (its pid and the fds it was
#: passed: name, inode, and for a memfd its text, for an eventfd its count), then does what
#: MODE says for a first start, and exits 0 on a later one (or when told to stop).
WORKER = r"""
import json, os, signal, socket, subprocess, sys, time
from balloond.activation import passed_fds
from balloond.notify import Notifier

run, mode = sys.argv[1], sys.argv[2]
passed = passed_fds()
seen = []
for item in passed:
    entry = {"name": item.name, "fd": item.fd, "inode": os.fstat(item.fd).st_ino}
    if item.name.endswith("kick"):
        entry["count"] = int.from_bytes(os.read(item.fd, 8), "little")
    else:
        entry["text"] = os.pread(item.fd, 64, 0).decode()
    seen.append(entry)
with open(os.path.join(run, "starts"), "a") as out:
    out.write(json.dumps({"pid": os.getpid(), "passed": seen}) + "\n")

def memfd(text):
    fd = os.memfd_create("state")
    os.write(fd, text.encode())
    return fd

def note(what):
    with open(os.path.join(run, "events"), "a") as out:
        out.write(what + "\n")

notifier = Notifier()
if mode == "crash-loop":
    sys.exit(3)
if passed and mode != "hup":
    sys.exit(0)
if mode == "store-and-die":
    state = memfd("record-1")
    kick = os.eventfd(0)
    os.eventfd_write(kick, 5)
    notifier.store_fds("vm0.state", [state])
    notifier.store_fds("vm0.kick", [kick])
    note(f"stored {os.fstat(state).st_ino} {os.fstat(kick).st_ino}")
elif mode == "remove":
    notifier.store_fds("a", [memfd("first")])
    notifier.store_fds("b", [memfd("second")])
    notifier.remove_fds("a")
elif mode == "foreign":
    code = "import os; from balloond.notify import Notifier; fd = os.memfd_create('x'); " \
        "os.write(fd, b'foreign'); Notifier().store_fds('foreign', [fd])"
    subprocess.run([sys.executable, "-c", code], check=True)
    notifier.store_fds("own", [memfd("own")])
elif mode in ("term", "hup"):
    signal.signal(signal.SIGTERM, lambda *_: (note("term"), sys.exit(0)))
    signal.signal(signal.SIGHUP, lambda *_: note("hup"))
    notifier.ready("serving")
    note("ready")
    while True:
        time.sleep(0.05)
elif mode == "notify":
    state = memfd("record-1")
    notifier.send("READY=1", "STATUS=serving", f"MAINPID={os.getpid()}")
    notifier.store_fds("vm0.state", [state])
    note(f"stored {os.fstat(state).st_ino}")
time.sleep(0.2)  # the keeper reads what was sent before it hears of the death anyway
os.kill(os.getpid(), signal.SIGKILL)
"""


class Run:
    """``python -m balloond.keeper -- python WORKER RUN MODE`` and what its workers wrote."""

    started: ClassVar[list[Run]] = []

    def __init__(self, tmp_path: Path, mode: str, *options: str, **environ: str) -> None:
        self.dir = tmp_path
        worker = tmp_path / "worker.py"
        worker.write_text(WORKER)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env.update(PYTHONPATH=str(REPO), **environ)
        argv = [
            sys.executable, "-m", "balloond.keeper", "--restart-delay", "0.05", *options,
            "--", sys.executable, str(worker), str(tmp_path), mode,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        Run.started.append(self)

    def wait(self, timeout: float = 30.0) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err

    def starts(self) -> list[dict[str, Any]]:
        path = self.dir / "starts"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def events(self) -> list[str]:
        path = self.dir / "events"
        return path.read_text().splitlines() if path.exists() else []

    def wait_for(self, event: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while event not in self.events():
            assert self.process.poll() is None, self.wait()
            assert time.monotonic() < deadline, f"no {event!r} in {self.events()}"
            time.sleep(0.02)


@pytest.fixture(autouse=True)
def _no_keeper_left() -> Iterator[None]:
    """A test that failed half-way leaves no keeper (or worker) running."""
    yield
    while Run.started:
        run = Run.started.pop()
        if run.process.poll() is None:
            run.process.send_signal(signal.SIGTERM)
            try:
                run.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.communicate()


def test_a_killed_worker_s_fds_come_back_to_the_next_one(tmp_path: Path) -> None:
    """The first worker stores a memfd and an eventfd with a count of 5 and is SIGKILLed; the
    second is passed the same two open files (same inodes, the memfd's text, the eventfd's
    count) under their names, at fds 3 and 4, and its clean exit ends the keeper."""
    run = Run(tmp_path, "store-and-die")
    code, err = run.wait()
    assert code == 0, err
    first, second = run.starts()
    assert first["passed"] == []
    [stored] = [e for e in run.events() if e.startswith("stored")]
    state_inode, kick_inode = (int(word) for word in stored.split()[1:])
    assert second["passed"] == [
        {"name": "vm0.state", "fd": 3, "inode": state_inode, "text": "record-1"},
        {"name": "vm0.kick", "fd": 4, "inode": kick_inode, "count": 5},
    ]
    assert "worker died (signal SIGKILL): starting a new one" in err, err


def test_removed_fds_are_not_passed_on(tmp_path: Path) -> None:
    run = Run(tmp_path, "remove")
    code, err = run.wait()
    assert code == 0, err
    _, second = run.starts()
    assert [(p["name"], p["text"]) for p in second["passed"]] == [("b", "second")]


def test_fds_from_another_process_are_refused(tmp_path: Path) -> None:
    """Only the worker may store fds: a process it started sends to the same socket, and
    what it stored is not passed on (the kernel names each datagram's sender)."""
    run = Run(tmp_path, "foreign")
    code, err = run.wait()
    assert code == 0, err
    _, second = run.starts()
    assert [(p["name"], p["text"]) for p in second["passed"]] == [("own", "own")]
    assert "ignored a notify message of process" in err, err


def test_a_worker_that_keeps_dying_is_given_up(tmp_path: Path) -> None:
    run = Run(tmp_path, "crash-loop", "--burst", "3", "--interval", "60")
    code, err = run.wait()
    assert code == 1
    assert len(run.starts()) == 3
    assert "worker died (exit status 3), 3 starts within 60 s: giving up" in err, err


def test_sigterm_stops_the_worker_and_the_keeper_without_a_restart(tmp_path: Path) -> None:
    run = Run(tmp_path, "term")
    run.wait_for("ready")
    run.process.send_signal(signal.SIGTERM)
    code, err = run.wait()
    assert code == 0, err
    assert run.events() == ["ready", "term"]
    assert len(run.starts()) == 1


def test_a_stop_between_two_workers_starts_no_other(tmp_path: Path) -> None:
    """SIGTERM while the keeper waits to start the next worker: it starts none, and ends."""
    run = Run(tmp_path, "store-and-die", "--restart-delay", "30")
    deadline = time.monotonic() + 30
    while not run.starts():
        assert time.monotonic() < deadline, "no worker started"
        time.sleep(0.02)
    time.sleep(0.5)  # the worker killed itself; the keeper sleeps before the next one
    run.process.send_signal(signal.SIGTERM)
    code, err = run.wait(timeout=10)
    assert code == 0, err
    assert len(run.starts()) == 1


def test_sighup_reaches_the_worker_which_goes_on(tmp_path: Path) -> None:
    run = Run(tmp_path, "hup")
    run.wait_for("ready")
    run.process.send_signal(signal.SIGHUP)
    run.wait_for("hup")
    assert run.process.poll() is None
    run.process.send_signal(signal.SIGINT)
    code, err = run.wait()
    assert code == 0, err
    assert run.events() == ["ready", "hup"]  # SIGINT: Python's KeyboardInterrupt, no handler
    assert len(run.starts()) == 1


def test_messages_go_on_to_the_service_manager_above(tmp_path: Path) -> None:
    """Under systemd the keeper is the main process: the worker's READY/STATUS reach the
    manager from the keeper (MAINPID dropped), and the fds it stores are kept by the manager
    too (a second copy: the same open file)."""
    manager = Manager(str(tmp_path / "notify"))
    try:
        run = Run(tmp_path, "notify", NOTIFY_SOCKET=manager.address)
        code, err = run.wait()
        assert code == 0, err
        ready = manager.receive()
        assert ready.pid == run.process.pid
        assert ready.fields == {"READY": "1", "STATUS": "serving"}
        stored = manager.receive()
        assert stored.pid == run.process.pid
        assert stored.fields == {"FDSTORE": "1", "FDNAME": "vm0.state"}
        [fd] = stored.fds
        [line] = [e for e in run.events() if e.startswith("stored")]
        assert os.fstat(fd).st_ino == int(line.split()[1])
        assert os.pread(fd, 64, 0) == b"record-1"
        os.close(fd)
    finally:
        manager.close()


def test_the_worker_s_socket_is_private(tmp_path: Path) -> None:
    """The notify socket the worker is given sits in a directory only the keeper's user may
    enter."""
    run = Run(tmp_path, "term")
    run.wait_for("ready")
    environ = Path(f"/proc/{run.starts()[0]['pid']}/environ").read_bytes().split(b"\0")
    [address] = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"NOTIFY_SOCKET=")]
    mode = os.stat(os.path.dirname(address)).st_mode & 0o777
    run.process.send_signal(signal.SIGTERM)
    assert run.wait()[0] == 0
    assert mode == 0o700
    assert not os.path.exists(address), "the keeper leaves its socket behind"


@pytest.mark.parametrize("argv", [[], ["--"]])
def test_no_command_is_a_usage_error(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "balloond.keeper", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2
    assert "no command given" in done.stderr

"""Least privilege with a real guest: ``balloond serve`` as an unprivileged uid with no
capabilities, owning nothing but its socket directory, serves a QEMU that runs as root.

QEMU's guest memory arrives as fds over the vhost-user socket, so the daemon maps it, punches
holes in it and reads its size without any right over QEMU, its files or its process. The test
shows each part working for real: host-resident guest memory (the memfd's allocated blocks,
read by the test, not by the daemon) falls after the guest frees memory, a target set on the
control socket inflates the balloon, and ``balloond status`` answers.

It needs root to hand the daemon a uid of its own (``setpriv``); as a normal user the whole
suite already runs the daemon without privileges, and the test skips saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kit.guest import Guest
from tests.e2e.conftest import REPO_ROOT, Balloond, BootGuest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason=f"the suite runs as uid {os.geteuid()}, unprivileged already: every e2e test "
        "runs balloond without root or capabilities (as root, this test drops it to uid 65534)",
    ),
]

MIB = 1 << 20
GUEST_MIB = 1024
HELD_MIB = 384
BALLOON_MIB = 256
#: ``nobody``: a uid that owns no file the daemon needs.
UID = GID = 65534
#: The daemon's uid and gid become UID and GID, with no supplementary groups. It has no
#: capabilities: the permitted and effective sets go with the uid, and the inheritable and
#: bounding sets are emptied. It cannot gain any on exec, and starts with a clean environment.
#: It gets SIGKILL when the test process goes away (setting a uid clears the signal the
#: fixture asked for).
DROP_PRIVILEGES = (
    "setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups",
    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--reset-env",
    "--pdeathsig=KILL", "--",
)  # fmt: skip


def as_daemon_user(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DROP_PRIVILEGES, *argv], capture_output=True, text=True, timeout=60, cwd="/"
    )


def first_out_of_reach(path: Path) -> Path | None:
    """The first of ``path`` and its parents that UID (group GID, no other groups) cannot
    search, or read if it is ``path`` itself (mode bits; ACLs are not consulted)."""
    for step in (*reversed(path.parents), path):
        info = step.stat()
        if info.st_uid == UID:
            bits = info.st_mode >> 6
        elif info.st_gid == GID:
            bits = info.st_mode >> 3
        else:
            bits = info.st_mode
        need = 0o4 if step == path else 0
        need |= 0o1 if stat.S_ISDIR(info.st_mode) else 0
        if bits & need != need:
            return step
    return None


@pytest.fixture(scope="session")
def daemon_user_runs_balloond() -> None:
    """Skip, naming the path to fix, when UID cannot run this checkout's balloond (checked
    before the kit is built: a session fixture the test asks for first)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not found (Debian package util-linux)")
    interpreter = Path(sys.executable)
    probe = "import balloond.cli, balloond.discard; print(balloond.__file__)"
    tried = as_daemon_user(str(interpreter), "-c", probe)
    if tried.returncode == 0:
        imported = Path(tried.stdout.strip())
        assert imported.is_relative_to(REPO_ROOT), f"uid {UID} imports balloond from {imported}"
        return
    needed = {
        "the interpreter": interpreter.resolve(),
        "the standard library": Path(os.__file__).resolve(),
        "the virtual environment": Path(sys.prefix),
        "the checkout": REPO_ROOT / "balloond" / "cli.py",
    }
    for what, path in needed.items():
        blocked = first_out_of_reach(path)
        if blocked is not None:
            mode = stat.filemode(blocked.stat().st_mode)
            pytest.skip(
                f"uid {UID} cannot reach {what} ({path}): {blocked} is {mode} "
                f"(owner uid {blocked.stat().st_uid}): let others search and read it "
                f"(chmod o+rX), or run the suite from a checkout and a venv (and its python3) "
                f"that others can read"
            )
    raise AssertionError(f"uid {UID} cannot import balloond:\n{tried.stderr}")


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines)}


def wait_for(
    what: str, probe: Callable[[], Any], done: Callable[[Any], bool], timeout: float
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s: {value}"
        time.sleep(0.25)


def test_an_unprivileged_daemon_serves_a_root_qemu(
    daemon_user_runs_balloond: None, tmp_path: Path, boot_guest: BootGuest
) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="balloond-e2e-"))
    os.chown(sockets, UID, GID)  # mkdtemp made it 0700: the daemon's, and root's
    daemon = Balloond(sockets / "vm.sock", tmp_path / "balloond.log", runner=DROP_PRIVILEGES)
    guest: Guest | None = None
    try:
        daemon.start()
        assert daemon.process is not None
        fields = proc_status(daemon.process.pid)
        assert "balloond" in Path(f"/proc/{daemon.process.pid}/cmdline").read_text()
        assert fields["Uid"].split() == [str(UID)] * 4 and fields["Gid"].split() == [str(GID)] * 4
        assert fields["Groups"] == ""
        for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[capabilities], 16) == 0, (capabilities, fields[capabilities])
        assert fields["NoNewPrivs"] == "1"
        for made in (daemon.socket_path, daemon.control_path):
            info = made.stat()
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (UID, 0o600), made
        # What the daemon may write to: its socket directory, and nothing this test made or
        # runs from (its log is an fd the test opened; world-writable /tmp is beyond the
        # test: the systemd unit's PrivateTmp= and ProtectSystem=strict cover that).
        for path in (sockets, tmp_path, daemon.log_path, REPO_ROOT, Path(sys.prefix)):
            writable = as_daemon_user("test", "-w", str(path)).returncode == 0
            assert writable == (path == sockets), f"uid {UID} writable {path}: {writable}"

        guest = boot_guest(daemon.device_args(), name="vm", memory_mib=GUEST_MIB)

        def host_memory() -> int:
            allocated = guest.memfd_allocated()
            assert allocated is not None, "guest RAM is not a memfd"
            return allocated

        wait_for(
            "connected, first reports",
            daemon.status,
            lambda s: s["connected"] and s["counters"]["reports"] > 0,
            30,
        )
        booted = host_memory()
        guest.check(f"workload hold {HELD_MIB} 7 /tmp/h", timeout=120)
        held = wait_for(
            "the host holds what the guest filled",
            host_memory,
            lambda b: b >= booted + 0.8 * HELD_MIB * MIB,
            30,
        )
        guest.check("workload release /tmp/h", timeout=120)
        freed = wait_for(
            "the guest's freed memory back to the host",
            host_memory,
            lambda b: b <= held - 0.8 * HELD_MIB * MIB,
            40,
        )

        before = daemon.status()
        mem_total = guest.meminfo()["MemTotal"]
        daemon.command("set-target", "vm", f"{GUEST_MIB - BALLOON_MIB}MiB")
        inflated = wait_for(
            "the balloon inflated",
            daemon.status,
            lambda s: s["actual_bytes"] == BALLOON_MIB * MIB,
            60,
        )
        assert inflated["target_bytes"] == (GUEST_MIB - BALLOON_MIB) * MIB
        shrunk = mem_total - guest.meminfo()["MemTotal"]
        assert abs(shrunk - BALLOON_MIB * MIB) < MIB, f"guest MemTotal fell {shrunk} bytes"
        discarded = inflated["counters"]["balloon_discarded_bytes"]
        assert discarded > before["counters"]["balloon_discarded_bytes"], "inflation discarded"
        assert host_memory() <= freed + 32 * MIB, "the inflated guest holds no more host memory"
        assert inflated["counters"]["discard_errors"] == 0 and not inflated["errors"], inflated

        shown = daemon.command("status")
        assert "device       vm" in shown and "on the host" in shown, shown
        listed = json.loads(daemon.command("status", "--json"))
        assert [d["device"] for d in listed["devices"]] == ["vm"], listed
        print(
            f"guest memory on the host: {booted / MIB:.0f} MiB booted, {held / MIB:.0f} held, "
            f"{freed / MIB:.0f} freed; balloon {BALLOON_MIB} MiB, MemTotal -{shrunk / MIB:.0f} MiB"
        )
    finally:
        if guest is not None:
            guest.close()
        status = daemon.stop()
        leftovers = sorted(os.listdir(sockets))
        shutil.rmtree(sockets, ignore_errors=True)
    assert status == 0, daemon.log()[-3000:]
    assert not leftovers, f"balloond left its sockets behind: {leftovers}"

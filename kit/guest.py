"""Boot the kit's Linux guest under the kit's QEMU and drive it over the serial console.

The guest's init (``kit/init.sh``) reads one command per line from the serial console and
answers ``@@done <id> rc=<status>``; :meth:`Guest.run` sends a command and waits for that
line. QEMU always runs under TCG: the nested /dev/kvm of the test machines crashes stock
guest kernels. A guest whose balloon device stops answering cannot power off, so every guest
has a hard lifetime after which its QEMU is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kit import hostmem
from kit.layout import Kit

MIB = 1 << 20
_PR_SET_PDEATHSIG = 1
_DONE = re.compile(r"@@done (\d+) rc=(\d+)")


def die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when its parent thread exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)


class GuestError(Exception):
    """The guest or its QEMU did not behave; the message carries the console's last lines."""


@dataclass(frozen=True)
class GuestConfig:
    """How to boot a guest. ``device_args`` are extra QEMU arguments (the balloon device)."""

    memory_mib: int = 2048
    cpus: int = 1
    device_args: tuple[str, ...] = ()
    cmdline_extra: tuple[str, ...] = ()
    # The guest RAM object; "{size}" is replaced by the size in MiB. It must keep id=mem.
    memory_object: str = "memory-backend-memfd,id=mem,size={size}M,share=on"
    boot_timeout: float = 180.0
    lifetime: float = 1800.0  # hard limit on the QEMU process, in seconds
    # Kill QEMU when the thread that started it exits (so a killed test run leaves no QEMU).
    die_with_parent: bool = True
    # A QEMU that waits for a migrated VM (``-incoming defer``): started without a boot; after
    # the migration the guest's console is this QEMU's, so run() and check() work as usual.
    incoming: bool = False


@dataclass(frozen=True)
class CommandResult:
    command: str
    rc: int
    output: tuple[str, ...]
    seconds: float

    def text(self) -> str:
        return "\n".join(self.output)


@dataclass
class _Console:
    """Lines read from the serial console, shared between the reader thread and callers."""

    lines: list[str] = field(default_factory=list)
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)


class Qmp:
    """A minimal synchronous QMP client on a UNIX socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise GuestError("QMP connection closed")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise GuestError(f"QMP {command} failed: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class Guest:
    """One QEMU process running the kit's guest. Use as a context manager."""

    def __init__(self, kit: Kit, workdir: Path, config: GuestConfig | None = None) -> None:
        self.kit = kit
        self.config = config or GuestConfig()
        self.workdir = workdir
        self.serial_log_path = workdir / "serial.log"
        self.qemu_log_path = workdir / "qemu.log"
        self.qmp_path = workdir / "qmp.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self._console = _Console()
        self._reader: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None
        self._qmp: Qmp | None = None
        self._next_id = 1
        self._started = 0.0
        self._write_lock = threading.Lock()
        self.boot_seconds = 0.0
        self.memfd_path: str | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def command_line(self) -> list[str]:
        """The complete QEMU command line for this guest."""
        cfg = self.config
        cmdline = ["console=ttyS0", "panic=-1", *cfg.cmdline_extra]
        return [
            *self.kit.qemu_argv(),
            "-machine", "q35,accel=tcg,memory-backend=mem",
            "-cpu", "max",
            "-smp", str(cfg.cpus),
            "-m", f"{cfg.memory_mib}M",
            "-object", cfg.memory_object.format(size=cfg.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(self.kit.kernel),
            "-initrd", str(self.kit.initramfs),
            "-append", " ".join(cmdline),
            *cfg.device_args,
            *(("-incoming", "defer") if cfg.incoming else ()),
        ]  # fmt: skip

    @property
    def pid(self) -> int:
        if self._process is None:
            raise GuestError("guest not started")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start QEMU and wait until the guest's init serves commands (an incoming QEMU:
        until its monitor answers)."""
        if self._process is not None:
            raise GuestError("guest already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        argv = self.command_line()
        (self.workdir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        with open(self.qemu_log_path, "wb") as qemu_log:
            self._started = time.monotonic()
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=qemu_log,
                env=self.kit.qemu_env(),
                start_new_session=True,
                preexec_fn=die_with_parent if self.config.die_with_parent else None,
            )
        self._watchdog = threading.Timer(self.config.lifetime, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        assert self._process.stdout is not None
        log = open(self.serial_log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._reader = threading.Thread(
            target=self._read_console, args=(self._process.stdout, log), daemon=True
        )
        self._reader.start()
        try:
            if self.config.incoming:
                self._qmp = self._wait_for_monitor(60.0)
            else:
                self.wait_for(r"@@ready", self.config.boot_timeout, start=0)
                self.boot_seconds = time.monotonic() - self._started
                modules = self.wait_for(r"@@modules rc=(\d+)", 1.0, start=0)
                if modules.group(1) != "0":
                    raise GuestError("the guest failed to load its kernel modules" + self._tail())
                self._qmp = Qmp(self.qmp_path)
            self.memfd_path = hostmem.find_memfd(self.pid, self.config.memory_mib * MIB)
        except BaseException:
            self.close()
            raise

    def _wait_for_monitor(self, timeout: float) -> Qmp:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Qmp(self.qmp_path)
            except OSError:
                assert self._process is not None
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise GuestError(f"QEMU's monitor did not answer{self._tail()}") from None
                time.sleep(0.1)

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)

    def close(self, timeout: float = 15.0) -> int | None:
        """Stop QEMU (QMP ``quit``, then SIGKILL after ``timeout``); return its exit status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None and self._qmp is not None:
            with contextlib.suppress(OSError, GuestError):
                self._qmp.execute("quit")
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            process.wait()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._watchdog is not None:
            self._watchdog.cancel()
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if self._reader is not None:
            self._reader.join(5.0)
        return process.returncode

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- console ------------------------------------------------------------------------

    def _read_console(self, stream: IO[bytes], log: IO[str]) -> None:
        console = self._console
        pending = b""
        with log:
            while True:
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if not complete:
                    continue
                stamp = time.monotonic() - self._started
                lines = [raw.decode("utf-8", "replace").rstrip("\r") for raw in complete]
                log.writelines(f"[{stamp:8.2f}] {line}\n" for line in lines)
                log.flush()
                with console.cond:
                    console.lines += lines
                    console.cond.notify_all()
        with console.cond:
            if pending:
                console.lines.append(pending.decode("utf-8", "replace"))
            console.closed = True
            console.cond.notify_all()

    @property
    def line_count(self) -> int:
        """How many console lines were read so far: a ``start`` for :meth:`wait_for`."""
        with self._console.cond:
            return len(self._console.lines)

    def lines(self, start: int = 0) -> list[str]:
        with self._console.cond:
            return self._console.lines[start:]

    def _tail(self, count: int = 30) -> str:
        qemu_log = self.qemu_log_path.read_text(errors="replace") if self.workdir.exists() else ""
        console = "\n".join(self.lines()[-count:])
        return f"\n--- QEMU stderr ---\n{qemu_log[-3000:]}\n--- console (last lines) ---\n{console}"

    def wait_for(self, pattern: str, timeout: float, start: int | None = None) -> re.Match[str]:
        """Wait for a console line (from index ``start`` on) matching ``pattern``."""
        regex = re.compile(pattern)
        index = self.line_count if start is None else start
        deadline = time.monotonic() + timeout
        console = self._console
        with console.cond:
            while True:
                while index < len(console.lines):
                    match = regex.search(console.lines[index])
                    index += 1
                    if match:
                        return match
                left = deadline - time.monotonic()
                if console.closed or left <= 0:
                    break
                console.cond.wait(min(left, 1.0))
        why = "QEMU exited" if console.closed else f"timed out after {timeout:.0f} s"
        raise GuestError(f"waiting for {pattern!r}: {why}{self._tail()}")

    def send_line(self, line: str) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise GuestError("guest not started")
        with self._write_lock:
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Run a shell command in the guest and return its exit status and output lines."""
        if "\n" in command:
            raise ValueError("a guest command is one line")
        ident = self._next_id
        self._next_id += 1
        start = self.line_count
        began = time.monotonic()
        self.send_line(f"{ident} {command}")
        done = re.compile(rf"@@done {ident} rc=(\d+)")
        match = self.wait_for(done.pattern, timeout, start=start)
        output: list[str] = []
        for line in self.lines(start):
            if done.search(line):
                break
            if not _DONE.search(line):
                output.append(line)
        return CommandResult(command, int(match.group(1)), tuple(output), time.monotonic() - began)

    def check(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Like :meth:`run`, but raise :class:`GuestError` unless the command exits 0."""
        result = self.run(command, timeout)
        if result.rc != 0:
            raise GuestError(f"guest command {command!r} exited {result.rc}:\n{result.text()}")
        return result

    def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo, in bytes."""
        values: dict[str, int] = {}
        for line in self.check("workload meminfo").output:
            name, _, rest = line.partition(":")
            words = rest.split()
            if words and words[0].isdigit():
                factor = 1024 if words[1:] == ["kB"] else 1
                values[name.strip()] = int(words[0]) * factor
        return values

    # -- host side ----------------------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        if self._qmp is None:
            raise GuestError("no QMP connection (guest not started)")
        return self._qmp.execute(command, **arguments)

    def rss_shmem(self) -> int:
        """The QEMU process's RssShmem, in bytes."""
        return hostmem.rss_shmem(self.pid)

    def memfd_allocated(self) -> int | None:
        """Bytes allocated to the guest RAM memfd, if the RAM is a memfd."""
        return None if self.memfd_path is None else hostmem.allocated_bytes(self.memfd_path)

    def host_memory(self) -> tuple[int, int | None]:
        """(RssShmem, memfd allocated bytes): the probe :func:`kit.hostmem.sample` takes."""
        return self.rss_shmem(), self.memfd_allocated()

    def sample(self, **kwargs: Any) -> hostmem.Timeline:
        """Sample host memory of this guest; keyword arguments as :func:`kit.hostmem.sample`."""
        return hostmem.sample(self.host_memory, **kwargs)


def boot(kit: Kit, workdir: Path, device_args: Sequence[str] = (), **config: Any) -> Guest:
    """Start a guest with ``device_args`` and other :class:`GuestConfig` fields; caller closes."""
    guest = Guest(kit, workdir, GuestConfig(device_args=tuple(device_args), **config))
    guest.start()
    return guest

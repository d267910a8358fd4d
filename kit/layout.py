"""Where the kit lives on the host and how to run the QEMU inside it.

The kit is a Debian sid root (QEMU >= 10.2, a Linux kernel with free page reporting, busybox)
plus files derived from it. Its QEMU runs on the host through the root's own dynamic loader
and libraries, so the host's libc and packages stay untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENV_DIR = "BALLOOND_KIT_DIR"
MIN_QEMU = (10, 2)


class KitError(Exception):
    """The kit cannot be built or used; the message says what to do."""


def default_directory() -> Path:
    """The kit directory: ``$BALLOOND_KIT_DIR``, else ``~/.cache/balloond-kit``."""
    configured = os.environ.get(ENV_DIR)
    if configured:
        return Path(configured).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "balloond-kit"


@dataclass(frozen=True)
class QemuVersion:
    major: int
    minor: int
    micro: int
    text: str

    def at_least(self, wanted: tuple[int, int]) -> bool:
        return (self.major, self.minor) >= wanted


@dataclass(frozen=True)
class Kit:
    """A kit directory. Paths exist once :func:`kit.build.build` has succeeded."""

    directory: Path

    @property
    def root(self) -> Path:
        """The Debian sid root (made by mmdebstrap, see :mod:`kit.rootfs`)."""
        return self.directory / "root"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio.gz"

    @property
    def workload(self) -> Path:
        """The guest workload, compiled for the host (the guest runs the same binary)."""
        return self.directory / "workload"

    @property
    def stamp(self) -> Path:
        return self.directory / "stamp.json"

    @property
    def qemu_binary(self) -> Path:
        return self.root / "usr/bin/qemu-system-x86_64"

    @property
    def loader(self) -> Path:
        return self.root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"

    @property
    def library_path(self) -> tuple[Path, ...]:
        return (self.root / "usr/lib/x86_64-linux-gnu",)

    @property
    def firmware_dirs(self) -> tuple[Path, ...]:
        """``-L`` directories: QEMU's option ROMs and SeaBIOS (``bios-256k.bin``)."""
        return (self.root / "usr/share/qemu", self.root / "usr/share/seabios")

    def qemu_argv(self) -> list[str]:
        """The command prefix that runs the root's ``qemu-system-x86_64`` on the host."""
        argv = [
            str(self.loader),
            "--library-path",
            ":".join(str(path) for path in self.library_path),
            str(self.qemu_binary),
        ]
        for firmware in self.firmware_dirs:
            argv += ["-L", str(firmware)]
        return argv

    def qemu_env(self) -> dict[str, str]:
        """The host's environment, with QEMU's loadable modules taken from the root."""
        env = dict(os.environ)
        env["QEMU_MODULE_DIR"] = str(self.root / "usr/lib/x86_64-linux-gnu/qemu")
        return env

    def qemu_version(self) -> QemuVersion:
        try:
            result = subprocess.run(
                [*self.qemu_argv(), "--version"],
                env=self.qemu_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except OSError as error:
            raise KitError(f"cannot run the kit's QEMU: {error}") from error
        match = re.search(r"version (\d+)\.(\d+)\.(\d+)", result.stdout)
        if result.returncode != 0 or match is None:
            raise KitError(
                f"the kit's QEMU does not run (exit {result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}"
            )
        major, minor, micro = (int(part) for part in match.groups())
        return QemuVersion(major, minor, micro, result.stdout.splitlines()[0])

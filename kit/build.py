"""Build the kit: a Debian sid root, the guest kernel, the workload and the initramfs.

Each piece carries a fingerprint in ``stamp.json``; a piece is rebuilt when it is missing or
its fingerprint changed (a new kit version, ``workload.c`` or the init script edited).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kit import initramfs, rootfs
from kit.layout import MIN_QEMU, Kit, KitError, default_directory

# Bump when the layout or contents of the kit change in a way the fingerprints do not see.
KIT_VERSION = 2

PACKAGE_DIR = Path(__file__).resolve().parent
WORKLOAD_SOURCE = PACKAGE_DIR / "workload.c"
INIT_SCRIPT = PACKAGE_DIR / "init.sh"
GCC_FLAGS = ("-static", "-O2", "-Wall", "-Wextra")

Log = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Fingerprints:
    root: str
    workload: str
    initramfs: str


class _Progress:
    def __init__(self, log: Log) -> None:
        self._log = log
        self._start = time.monotonic()

    def __call__(self, message: str) -> None:
        self._log(f"[kit {time.monotonic() - self._start:6.1f}s] {message}")


def _digest(*parts: bytes | str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "little") + data)
    return hasher.hexdigest()[:16]


def fingerprints(kernel_version: str) -> Fingerprints:
    root = _digest(str(KIT_VERSION), rootfs.SUITE, *rootfs.ROOT_PACKAGES, *rootfs.APT_OPTIONS)
    workload = _digest(str(KIT_VERSION), WORKLOAD_SOURCE.read_bytes(), *GCC_FLAGS)
    sources = [(PACKAGE_DIR / name).read_bytes() for name in ("initramfs.py", "cpio.py")]
    initrd = _digest(
        root, workload, kernel_version, INIT_SCRIPT.read_bytes(), *sources, *initramfs.GUEST_MODULES
    )
    return Fingerprints(root, workload, initrd)


def _read_stamp(kit: Kit) -> dict[str, str]:
    try:
        data = json.loads(kit.stamp.read_text())
    except (OSError, ValueError):
        return {}
    return {str(key): str(value) for key, value in data.items()} if isinstance(data, dict) else {}


def _write_stamp(kit: Kit, stamp: dict[str, str]) -> None:
    partial = kit.stamp.with_name("stamp.json.partial")
    partial.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    partial.replace(kit.stamp)


def _is_root() -> bool:
    return os.geteuid() == 0


def _apt_install(packages: Sequence[str], progress: _Progress) -> None:
    """As root: install what is missing. A normal user is told the one command to run."""
    if not _is_root():
        raise KitError(
            f"missing host packages; install them once: sudo apt install {' '.join(packages)}"
        )
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    progress(f"installing host packages: {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(command, env=env, check=False, capture_output=True).returncode == 0:
        return
    subprocess.run(["apt-get", "update"], env=env, check=False, capture_output=True)
    result = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise KitError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def _ensure_host_tools(progress: _Progress, need_root: bool, need_gcc: bool) -> None:
    missing = rootfs.missing_packages(as_root=_is_root()) if need_root else []
    if need_gcc and shutil.which("gcc") is None:
        missing.append("gcc")
    if need_gcc and not any(
        Path(d).joinpath("libc.a").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib")
    ):
        missing.append("libc6-dev")
    if missing:
        _apt_install(missing, progress)
    if need_root and not _is_root():
        rootfs.check_unprivileged()


def _build_root(kit: Kit, progress: _Progress) -> None:
    mirror = rootfs.host_mirror()
    tarball = kit.directory / "root.tar.partial"
    partial = kit.directory / "root.partial"
    tarball.unlink(missing_ok=True)
    rootfs.remove_tree(partial)
    try:
        rootfs.run_mmdebstrap(tarball, mirror, progress)
        size = tarball.stat().st_size
        progress(f"  unpacking the root ({size / 2**20:.0f} MiB tarball)")
        entries = rootfs.unpack(tarball, partial)
        progress(f"  unpacked {entries} entries")
    finally:
        tarball.unlink(missing_ok=True)
    rootfs.remove_tree(kit.root)
    partial.rename(kit.root)


def _install_kernel(kit: Kit, version: str) -> None:
    source = kit.root / "boot" / f"vmlinuz-{version}"
    partial = kit.kernel.with_name("vmlinuz.partial")
    shutil.copyfile(source, partial)
    partial.chmod(0o644)
    partial.replace(kit.kernel)


def _compile_workload(kit: Kit, progress: _Progress) -> None:
    partial = kit.workload.with_name("workload.partial")
    command = ["gcc", *GCC_FLAGS, "-o", str(partial), str(WORKLOAD_SOURCE)]
    progress(f"running: {' '.join(command)}")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KitError(f"compiling the workload failed:\n{result.stdout}{result.stderr}")
    partial.replace(kit.workload)


def status(directory: Path | None = None) -> dict[str, bool]:
    """Which pieces of the kit are present and fresh (no building)."""
    kit = Kit(directory or default_directory())
    stamp = _read_stamp(kit)
    try:
        version = initramfs.kernel_version(kit.root)
    except KitError:
        version = ""
    prints = fingerprints(version)
    return {
        "root": kit.qemu_binary.exists() and stamp.get("root") == prints.root,
        "kernel": kit.kernel.exists() and stamp.get("kernel") == version != "",
        "workload": kit.workload.exists() and stamp.get("workload") == prints.workload,
        "initramfs": kit.initramfs.exists() and stamp.get("initramfs") == prints.initramfs,
    }


def build(directory: Path | None = None, *, log: Log = _print, force: bool = False) -> Kit:
    """Build what is missing or stale in the kit directory and return the ready kit.

    Raises :class:`KitError` with a message saying what to do when the host cannot build it.
    """
    kit = Kit(directory or default_directory())
    kit.directory.mkdir(parents=True, exist_ok=True)
    # One builder at a time per kit directory: a second one waits, then finds the kit fresh.
    with open(kit.directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(kit, _Progress(log), force)


def _build_locked(kit: Kit, progress: _Progress, force: bool) -> Kit:
    stamp = {} if force else _read_stamp(kit)
    if stamp.get("kit_version") != str(KIT_VERSION):
        stamp = {}
    stamp["kit_version"] = str(KIT_VERSION)
    prints = fingerprints("")
    root_fresh = kit.qemu_binary.exists() and stamp.get("root") == prints.root
    progress(f"kit directory {kit.directory}")
    workload_fresh = kit.workload.exists() and stamp.get("workload") == prints.workload
    _ensure_host_tools(progress, need_root=not root_fresh, need_gcc=not workload_fresh)

    if root_fresh:
        progress("sid root: up to date")
    else:
        progress("sid root: building with mmdebstrap (about a minute)")
        stamp.pop("root", None)
        _write_stamp(kit, stamp)
        _build_root(kit, progress)
        stamp["root"] = prints.root
        _write_stamp(kit, stamp)
        progress("sid root: done")

    qemu = kit.qemu_version()
    if not qemu.at_least(MIN_QEMU):
        raise KitError(f"the root's QEMU is too old: {qemu.text}; need >= 10.2")
    progress(f"QEMU: {qemu.text}")

    version = initramfs.kernel_version(kit.root)
    prints = fingerprints(version)
    if kit.kernel.exists() and stamp.get("kernel") == version:
        progress(f"kernel {version}: up to date")
    else:
        _install_kernel(kit, version)
        stamp["kernel"] = version
        _write_stamp(kit, stamp)
        progress(f"kernel {version}: copied")

    if kit.workload.exists() and stamp.get("workload") == prints.workload:
        progress("workload: up to date")
    else:
        _compile_workload(kit, progress)
        stamp["workload"] = prints.workload
        _write_stamp(kit, stamp)
        progress("workload: compiled")

    if kit.initramfs.exists() and stamp.get("initramfs") == prints.initramfs:
        progress("initramfs: up to date")
    else:
        initramfs.write(kit.initramfs, kit.root, kit.workload, INIT_SCRIPT.read_bytes())
        stamp["initramfs"] = prints.initramfs
        _write_stamp(kit, stamp)
        size = kit.initramfs.stat().st_size
        progress(f"initramfs: written ({size / 2**20:.1f} MiB)")
    progress("kit ready")
    return kit


def ready(directory: Path | None = None) -> Kit:
    """The kit, if every piece is present and fresh; else :class:`KitError`."""
    state = status(directory)
    stale = [name for name, fresh in state.items() if not fresh]
    if stale:
        raise KitError(f"kit not built or stale ({', '.join(stale)}): run python3 -m kit build")
    return Kit(directory or default_directory())

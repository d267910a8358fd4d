"""The kit's Debian sid root: made by ``mmdebstrap`` as a tarball, unpacked as the user.

As a normal user ``mmdebstrap --mode=unshare`` builds the root inside a user namespace, where
the user's subordinate ids (``/etc/subuid``, ``/etc/subgid``) stand in for root and the
system users; ``newuidmap``/``newgidmap`` (package ``uidmap``) set that mapping up. As root
the same mode only unshares the mount and process namespaces, so nothing the build mounts can
leak onto the host. Either way the result is a tarball, which Python's ``tarfile`` unpacks
as the calling user: every file then belongs to that user, who can read, replace and delete
the root without privileges (a directory made in the namespace would belong to subordinate
ids the user cannot remove). Device nodes are left out: nothing on the host uses them.

apt checks the archive's signatures against the host's Debian keyring as usual. It is told
not to check ``Valid-Until``: sid's Release file is valid for a week only, and a mirror that
lags (or a snapshot) serves one apt would otherwise refuse as expired.
"""

from __future__ import annotations

import os
import pwd
import queue
import shlex
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from kit.layout import KitError

SUITE = "sid"
ROOT_PACKAGES = ("qemu-system-x86", "linux-image-amd64", "busybox-static")
ENV_MIRROR = "BALLOOND_KIT_MIRROR"
#: apt options for the build, also left in the root's ``/etc/apt/apt.conf.d/99mmdebstrap``.
APT_OPTIONS = ('Acquire::Check-Valid-Until "false"', 'APT::Install-Recommends "false"')
#: Subordinate ids a normal user needs: the root's files belong to ids up to 65534 (nobody).
SUBORDINATE_IDS = 65536

Log = Callable[[str], None]


def host_mirror() -> str:
    """The Debian mirror to bootstrap from: ``$BALLOOND_KIT_MIRROR``, else the host apt's own."""
    configured = os.environ.get(ENV_MIRROR)
    if configured:
        return configured
    candidates: list[str] = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                candidates += words[1:]
            elif words[:1] == ["deb"]:
                candidates += [word for word in words[1:] if "://" in word][:1]
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    raise KitError(
        f"no Debian mirror found in the host's apt sources; set {ENV_MIRROR} to a Debian "
        "archive URL (the directory holding dists/ and pool/)"
    )


# --- what the host must offer -------------------------------------------------------------


def missing_packages(as_root: bool) -> list[str]:
    """Debian packages the host lacks for building the root (``uidmap`` only as a user)."""
    missing = [] if shutil.which("mmdebstrap") else ["mmdebstrap"]
    if not as_root and not (shutil.which("newuidmap") and shutil.which("newgidmap")):
        missing.append("uidmap")
    return missing


def _subordinate_ranges(path: Path) -> list[tuple[str, int, int]]:
    """The ``(owner, first id, count)`` lines of ``/etc/subuid`` or ``/etc/subgid``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise KitError(f"cannot read {path}: {error}") from error
    ranges: list[tuple[str, int, int]] = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            ranges.append((fields[0], int(fields[1]), int(fields[2])))
    return ranges


#: Kernel switches that turn unprivileged user namespaces off: (file, value meaning off, sysctl).
_USERNS_SWITCHES = (
    ("/proc/sys/kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces=10000"),
    (
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
        "1",
        "kernel.apparmor_restrict_unprivileged_userns=0",
    ),
)


def check_unprivileged() -> None:
    """Raise :class:`KitError` naming the fix when a normal user cannot run ``--mode=unshare``."""
    for file, off, setting in _USERNS_SWITCHES:
        try:
            value = Path(file).read_text().strip()
        except OSError:
            continue
        if value == off:
            name = setting.split("=")[0]
            raise KitError(
                f"unprivileged user namespaces are off ({name} = {value}); building the kit's "
                f"root as a normal user needs them: sudo sysctl {setting} "
                "(and a file in /etc/sysctl.d/ to keep it)"
            )
    uid = os.getuid()
    user = pwd.getpwuid(uid).pw_name
    files = {"uids": Path("/etc/subuid"), "gids": Path("/etc/subgid")}
    ranges = {kind: _subordinate_ranges(path) for kind, path in files.items()}
    lacking = [
        kind
        for kind in files
        if max((n for owner, _, n in ranges[kind] if owner in (user, str(uid))), default=0)
        < SUBORDINATE_IDS
    ]
    if lacking:
        # Suggest ids past every range handed out so far, so that no two users share any.
        first = max([100000, *(start + n for kind in files for _, start, n in ranges[kind])])
        span = f"{first}-{first + SUBORDINATE_IDS - 1}"
        options = " ".join(f"--add-sub{kind} {span}" for kind in lacking)
        where = " and ".join(str(files[kind]) for kind in lacking)
        raise KitError(
            f"{user} has no range of {SUBORDINATE_IDS} subordinate ids in {where}, which "
            f"mmdebstrap needs to build the kit's root as a normal user; add one once: "
            f"sudo usermod {options} {user}"
        )


# --- building -------------------------------------------------------------------------------


def mmdebstrap_command(tarball: Path, mirror: str) -> list[str]:
    command = [
        "mmdebstrap",
        "--mode=unshare",
        "--variant=minbase",
        "--format=tar",
        f"--include={','.join(ROOT_PACKAGES)}",
    ]
    command += [f"--aptopt={option}" for option in APT_OPTIONS]
    return [*command, SUITE, str(tarball), mirror]


def _lines(process: subprocess.Popen[str], silence: float) -> Iterator[str | None]:
    """The process's output lines; ``None`` after each ``silence`` seconds without one."""
    output: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            output.put(raw.rstrip())
        output.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = output.get(timeout=silence)
        except queue.Empty:
            yield None
            continue
        if line is None:
            return
        yield line


def run_mmdebstrap(tarball: Path, mirror: str, progress: Log) -> None:
    """Build the root into ``tarball``, showing mmdebstrap's steps as they come."""
    command = mmdebstrap_command(tarball, mirror)
    progress(f"running: {shlex.join(command)}")
    # INITRD=No: the kernel package's hook makes no initrd (the kit writes its own initramfs).
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", INITRD="No")
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    except OSError as error:
        raise KitError(f"cannot run mmdebstrap: {error}") from error
    tail: list[str] = []
    last_shown = time.monotonic()
    for line in _lines(process, silence=15.0):
        now = time.monotonic()
        if line is None:
            progress(f"  mmdebstrap still running; last line: {tail[-1] if tail else ''}")
            last_shown = now
            continue
        tail = [*tail[-39:], line]
        if line.startswith(("I:", "W:", "E:")) or now - last_shown >= 5.0:
            progress(f"  mmdebstrap: {line}")
            last_shown = now
    if process.wait() != 0:
        detail = "\n".join(tail)
        raise KitError(f"mmdebstrap failed (exit {process.returncode}):\n{detail}")


def _owned_by_me(member: tarfile.TarInfo, uid: int, gid: int) -> tarfile.TarInfo | None:
    """The member as the calling user unpacks it, or ``None`` to leave it out."""
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return None  # device nodes and fifos: only root may make them, and no one here uses them
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise KitError(f"refusing to unpack {member.name!r}: outside the root")
    if member.islnk() and ".." in PurePosixPath(member.linkname).parts:
        raise KitError(f"refusing to unpack a hard link to {member.linkname!r}")
    # No set-id or sticky bits, nothing writable by others, and always readable and writable
    # (and searchable, for directories) by the owner, so that the owner can delete it again.
    member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
    member.uid, member.gid, member.uname, member.gname = uid, gid, "", ""
    return member


def unpack(tarball: Path, target: Path) -> int:
    """Unpack the root into ``target`` (which must not exist); return the number of entries."""
    uid, gid = os.getuid(), os.getgid()
    # The members are vetted above; newer Pythons would otherwise apply their own filter,
    # which refuses the root's absolute symlinks (/etc/alternatives).
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    target.mkdir()
    try:
        with tarfile.open(tarball) as archive:
            members = [
                kept
                for member in archive.getmembers()
                if (kept := _owned_by_me(member, uid, gid)) is not None
            ]
            archive.extractall(target, members=members, numeric_owner=True, **trusted)
    except (OSError, tarfile.TarError) as error:
        raise KitError(f"cannot unpack {tarball}: {error}") from error
    return len(members)


# --- removing -------------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[Path]:
    prefix = str(path.resolve())
    found: list[Path] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                found.append(Path(mount_point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a root or a half-unpacked one.

    A root left by an older kit (debootstrap, as root) may still have file systems mounted in
    it, and belongs to root: root unmounts and removes it; a normal user is told how.
    """
    if not path.exists() and not path.is_symlink():
        return
    for mount_point in _mounts_under(path):
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
    left = _mounts_under(path)
    if left:
        raise KitError(f"cannot remove {path}: still mounted: {', '.join(map(str, left))}")
    try:
        shutil.rmtree(path)
    except PermissionError as error:
        raise KitError(
            f"cannot remove {path} ({error}; made by an older kit or by another user, such as "
            f"a build as root); remove it once: sudo rm -rf {path}"
        ) from error

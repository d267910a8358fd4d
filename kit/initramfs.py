"""The guest's initramfs: busybox, the balloon driver and its dependencies, our workload and init.

Everything comes from the kit's sid root, except the workload (compiled on the host) and the
init script (``kit/init.sh``).
"""

from __future__ import annotations

import gzip
import lzma
from dataclasses import dataclass
from pathlib import Path

from kit import cpio
from kit.layout import KitError

# Kernel modules the guest loads, in the kernel's own naming (``modprobe`` names).
GUEST_MODULES = ("virtio_balloon",)


@dataclass(frozen=True)
class Module:
    name: str
    path: str  # relative to /lib/modules/<version>, as in modules.dep


def kernel_version(root: Path) -> str:
    """The version of the one kernel installed in ``root``."""
    versions = sorted(
        path.name
        for path in (root / "usr/lib/modules").glob("*")
        if (root / "boot" / f"vmlinuz-{path.name}").exists()
    )
    if not versions:
        raise KitError(f"no kernel with modules found in {root}")
    return versions[-1]


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1].split(".ko", 1)[0]
    return base.replace("-", "_")


def resolve_modules(modules_dep: str, wanted: tuple[str, ...]) -> list[Module]:
    """The modules to load for ``wanted``, dependencies first, from a ``modules.dep`` text."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        paths[_module_name(path)] = path
        deps[path] = rest.split()
    order: list[Module] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if any(module.path == path for module in order):
            return
        if path in visiting:
            raise KitError(f"module dependency cycle through {path}")
        visiting.add(path)
        for dependency in deps.get(path, []):
            visit(dependency)
        visiting.discard(path)
        order.append(Module(_module_name(path), path))

    for name in wanted:
        found = paths.get(name.replace("-", "_"))
        if found is None:
            raise KitError(f"kernel module {name} is not in modules.dep (built in, or missing?)")
        visit(found)
    return order


def decompress_module(path: Path) -> bytes:
    """The plain ELF object of a module file; busybox ``insmod`` loads only uncompressed ones."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise KitError(f"cannot decompress kernel module {path} (only .ko, .ko.xz, .ko.gz)")


def entries(root: Path, workload: Path, init_script: bytes) -> list[cpio.Entry]:
    """The initramfs members."""
    version = kernel_version(root)
    modules_dir = root / "usr/lib/modules" / version
    modules = resolve_modules((modules_dir / "modules.dep").read_text(), GUEST_MODULES)
    busybox = root / "usr/bin/busybox"
    if not busybox.exists():
        raise KitError(f"{busybox} is missing: the root lacks busybox-static")
    result = [cpio.Entry.directory(name) for name in ("bin", "dev", "etc", "etc/kit", "lib")]
    result += [
        cpio.Entry.directory("lib/modules"),
        cpio.Entry.directory("lib/modules/kit"),
        cpio.Entry.char_device("dev/console", 5, 1),
        cpio.Entry.char_device("dev/ttyS0", 4, 64),
        cpio.Entry.char_device("dev/null", 1, 3, 0o666),
        cpio.Entry.file("bin/busybox", busybox.read_bytes(), 0o755),
        cpio.Entry.symlink("bin/sh", "busybox"),
        cpio.Entry.file("bin/workload", workload.read_bytes(), 0o755),
        cpio.Entry.file("init", init_script, 0o755),
        cpio.Entry.file(
            "etc/kit/modules", "".join(f"{module.name}.ko\n" for module in modules).encode()
        ),
    ]
    for module in modules:
        data = decompress_module(modules_dir / module.path)
        result.append(cpio.Entry.file(f"lib/modules/kit/{module.name}.ko", data))
    return result


def write(path: Path, root: Path, workload: Path, init_script: bytes) -> None:
    cpio.write_gzip(path, entries(root, workload, init_script))

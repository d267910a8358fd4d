"""Command line: ``python3 -m kit build|status|qemu-command|boot``."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kit import devices
from kit.build import build, ready, status
from kit.guest import Guest, GuestConfig, GuestError
from kit.layout import KitError, default_directory


def _boot(args: argparse.Namespace, directory: Path) -> int:
    device_args: tuple[str, ...] = ()
    if args.builtin_balloon:
        device_args = devices.builtin_balloon()
    elif args.vhost_user:
        device_args = devices.vhost_user_balloon(args.vhost_user.absolute())
    config = GuestConfig(
        memory_mib=args.memory, device_args=device_args, cmdline_extra=tuple(args.append)
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="balloond-kit-guest-"))
    with Guest(ready(directory), workdir.absolute(), config) as guest:
        print(f"guest up in {guest.boot_seconds:.1f} s; console log {guest.serial_log_path}")
        lines = args.command or _prompt(guest)
        status = 0
        for line in lines:
            result = guest.run(line, timeout=3600)
            print(result.text())
            print(
                f"[rc={result.rc} {result.seconds:.1f} s; host RssShmem "
                f"{guest.rss_shmem() / 2**20:.0f} MiB]"
            )
            status = result.rc
    return status


def _prompt(guest: Guest) -> Iterator[str]:
    while True:
        try:
            line = input("guest$ ")
        except EOFError:
            return
        if line.strip():
            yield line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m kit", description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="kit directory")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build what is missing or stale")
    build_parser.add_argument("--force", action="store_true", help="rebuild everything")
    commands.add_parser("status", help="show which pieces are present and fresh")
    commands.add_parser("qemu-command", help="print the command prefix that runs the kit's QEMU")
    boot_parser = commands.add_parser(
        "boot", help="boot a guest and run commands in it (interactive without COMMAND)"
    )
    device = boot_parser.add_mutually_exclusive_group()
    device.add_argument("--builtin-balloon", action="store_true", help="QEMU's own balloon")
    device.add_argument("--vhost-user", metavar="SOCKET", type=Path, help="balloond's socket")
    boot_parser.add_argument("--append", action="append", default=[], help="kernel argument")
    boot_parser.add_argument("--memory", type=int, default=2048, help="guest RAM in MiB")
    boot_parser.add_argument("--workdir", type=Path, help="for logs (default: a new temp dir)")
    boot_parser.add_argument("command", nargs="*", help="guest shell lines to run")
    args = parser.parse_args(argv)
    directory = args.dir.absolute() if args.dir else default_directory()
    try:
        if args.command == "build":
            build(directory, force=args.force)
        elif args.command == "status":
            for piece, fresh in status(directory).items():
                print(f"{piece:10} {'ok' if fresh else 'missing or stale'}")
        elif args.command == "qemu-command":
            print(shlex.join(ready(directory).qemu_argv()))
        else:
            return _boot(args, directory)
    except (KitError, GuestError) as error:
        print(f"kit: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

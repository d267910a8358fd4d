"""Command line: ``python3 -m kit build|status|qemu-command``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kit.build import build, ready, status
from kit.layout import KitError, default_directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m kit", description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="kit directory")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build what is missing or stale")
    build_parser.add_argument("--force", action="store_true", help="rebuild everything")
    commands.add_parser("status", help="show which pieces are present and fresh")
    commands.add_parser("qemu-command", help="print the command prefix that runs the kit's QEMU")
    args = parser.parse_args(argv)
    directory = args.dir.absolute() if args.dir else default_directory()
    try:
        if args.command == "build":
            build(directory, force=args.force)
        elif args.command == "status":
            for piece, fresh in status(directory).items():
                print(f"{piece:10} {'ok' if fresh else 'missing or stale'}")
        else:
            print(shlex.join(ready(directory).qemu_argv()))
    except KitError as error:
        print(f"kit: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

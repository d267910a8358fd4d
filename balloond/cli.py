"""The ``balloond`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from balloond import __version__
from balloond.balloon import Balloon, BalloonOptions
from balloond.discard import Discarder, NullDiscarder, RangeDiscarder
from balloond.errors import BalloondError, OperatorError
from balloond.server import DeviceServer, adopt, listen

log = logging.getLogger("balloond")

#: What ``--print-capabilities`` prints (vhost-user.rst, "Backend program conventions").
CAPABILITIES = {"type": "balloon", "features": []}

QEMU_EXAMPLE = """\
QEMU (>= 10.2) connects to the socket as a client; start balloond first:

  -object memory-backend-memfd,id=mem,size=4G,share=on -machine memory-backend=mem
  -chardev socket,id=bal,path=/run/balloond/vm0.sock
  -device vhost-user-test-device-pci,chardev=bal,virtio-id=5,num_vqs=4,vq_size=128,config_size=16
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode")
    return mode


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="balloond",
        description="A virtio-balloon device for QEMU, served over vhost-user: gives the "
        "host the memory its Linux guests report free.",
        epilog=QEMU_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"balloond {__version__}")
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the backend's capabilities as JSON and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = commands.add_parser(
        "serve",
        help="serve one VM's balloon device on a Unix socket",
        description="Serve one VM's balloon device. Runs in the foreground until SIGTERM or "
        "SIGINT; a frontend that goes away is replaced by the next one to connect.",
        epilog=QEMU_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    where.add_argument(
        "--fd", type=int, metavar="N", help="use the already-listening Unix socket on fd N"
    )
    serve.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o600,
        metavar="MODE",
        help="permissions of the socket file (octal, default 0600)",
    )
    serve.add_argument("--socket-group", metavar="GROUP", help="group owning the socket file")
    serve.add_argument(
        "--no-discard",
        action="store_true",
        help="acknowledge reports and inflations without freeing memory (use when guest "
        "memory is pinned, e.g. VFIO passthrough)",
    )
    serve.add_argument(
        "--deflate-on-oom",
        action="store_true",
        help="offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take ballooned memory "
        "back when it runs out",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default: info",
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    if args.socket_path is not None:
        listener = listen(args.socket_path, mode=args.socket_mode, group=args.socket_group)
        where = args.socket_path
    else:
        listener = adopt(args.fd)
        where = f"fd {args.fd}"
    discarder: RangeDiscarder = NullDiscarder() if args.no_discard else Discarder()
    options = BalloonOptions(deflate_on_oom=args.deflate_on_oom)
    server = DeviceServer(listener, lambda: Balloon(options), discarder)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("listening on %s%s", where, " (discarding disabled)" if args.no_discard else "")
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving in done:
            serving.result()
        log.info("shutting down")
    finally:
        for task in (serving, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        listener.close()
        if args.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.socket_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_serve(args))
    except OperatorError as error:
        print(f"balloond: error: {error}", file=sys.stderr)
        return 1
    except BalloondError as error:
        print(f"balloond: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``balloond`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, NoReturn

from balloond import __version__
from balloond.balloon import Balloon, BalloonOptions
from balloond.control import BalloonControl, ControlServer, request
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
        "--control-socket",
        metavar="PATH",
        help="control socket for status, set-target and stats (default: the socket path "
        "plus .ctl; none with --fd unless given); same mode and group as the socket",
    )
    serve.add_argument(
        "--stats-interval",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="ask the guest for fresh memory statistics this often (default 0: only on "
        "request, like QEMU)",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default: info",
    )

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "device",
            metavar="SOCKET",
            help="the VM's vhost-user socket (its control socket is SOCKET.ctl), or a "
            "control socket",
        )
        return command

    status = client("status", "show a running device: guest, target, memory returned, stats")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    target = client("set-target", "set the memory size the balloon should leave the guest")
    target.add_argument(
        "size", type=parse_size, metavar="SIZE", help="e.g. 1.5GiB, 1536MiB, 2G or bytes"
    )
    stats = client("stats", "show the guest's memory statistics")
    stats.add_argument("--refresh", action="store_true", help="ask the guest for fresh ones")
    stats.add_argument(
        "--timeout", type=_seconds, default=5.0, metavar="SECONDS", help="default: 5"
    )
    stats.add_argument("--json", action="store_true", help="print them as JSON")
    return parser


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_size(text: str) -> int:
    """``1.5GiB`` -> bytes. K/M/G/T are binary (as in QEMU); kB/MB/GB/TB are decimal."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1.5GiB or 1536MiB")
    size = Decimal(match.group(1)) * _UNITS[unit]
    if size != size.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes")
    return int(size)


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return value


def control_path(device: str) -> str:
    return device if device.endswith(".ctl") else device + ".ctl"


async def _serve(args: argparse.Namespace) -> None:
    if args.socket_path is not None:
        listener = listen(args.socket_path, mode=args.socket_mode, group=args.socket_group)
        where = args.socket_path
    else:
        listener = adopt(args.fd)
        where = f"fd {args.fd}"
    discarder: RangeDiscarder = NullDiscarder() if args.no_discard else Discarder()
    options = BalloonOptions(deflate_on_oom=args.deflate_on_oom)
    name = os.path.basename(args.socket_path or f"fd{args.fd}").removesuffix(".sock")
    server = DeviceServer(listener, lambda: Balloon(options), discarder, name=name)
    control = BalloonControl(server)
    control_socket = args.control_socket
    if control_socket is None and args.socket_path is not None:
        control_socket = control_path(args.socket_path)
    # Socket files to remove on the way out: only those this process created.
    sockets = [args.socket_path] if args.socket_path is not None else []
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(server.serve(), name="device")]
    try:
        if control_socket is not None:
            control_listener = listen(
                control_socket, mode=args.socket_mode, group=args.socket_group
            )
            sockets.append(control_socket)
            controls = ControlServer(control_listener, {name: control})
            tasks.append(asyncio.create_task(controls.serve(), name="control"))
        if args.stats_interval > 0:
            tasks.append(asyncio.create_task(control.poll_stats(args.stats_interval)))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info(
            "listening on %s%s%s",
            where,
            f", control on {control_socket}" if control_socket else "",
            " (discarding disabled)" if args.no_discard else "",
        )
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
        tasks.append(stopping)
        for task in done:
            task.result()
        log.info("shutting down")
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        listener.close()
        for path in sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _client(args: argparse.Namespace) -> int:
    path = control_path(args.device)
    if args.command == "set-target":
        result = request(path, {"command": "set-target", "target_bytes": args.size})
        note = "" if result["guest_notified"] else " (the guest was not notified)"
        print(f"target set to {format_bytes(args.size)}{note}")
        return 0
    if args.command == "stats":
        message = {"command": "stats", "refresh": args.refresh, "timeout": args.timeout}
        result = request(path, message, timeout=args.timeout + 5)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(_format_stats(result))
        return 0
    result = request(path, {"command": "status"})
    print(json.dumps(result, indent=2) if args.json else _format_status(result))
    return 0


def _format_stats(result: dict[str, Any]) -> str:
    stats = result.get("stats") or {}
    if not stats:
        return "no statistics from the guest yet"
    age = result.get("stats_age_seconds")
    lines = [f"{'guest statistics':20} {'' if age is None else f'{age:.1f} s old'}"]
    for name, value in stats.items():
        shown = format_bytes(value) if name.endswith("_bytes") else str(value)
        lines.append(f"  {name:20} {shown}")
    return "\n".join(lines)


def _format_status(s: dict[str, Any]) -> str:
    lines = [f"{'device':12} {s['device']}"]
    if not s["connected"]:
        lines.append(f"{'guest':12} not connected")
    else:
        lines.append(f"{'guest':12} connected, {format_bytes(s['ram_bytes'])} of RAM")
    if "counters" not in s:
        return "\n".join(lines)
    c = s["counters"]
    if s.get("target_bytes") is not None:
        lines.append(
            f"{'target':12} {format_bytes(s['target_bytes'])}: balloon of "
            f"{format_bytes(s['balloon_target_bytes'])}, guest has given "
            f"{format_bytes(s['actual_bytes'])}"
        )
    skipped = sum(c["skipped_bytes"].values())
    lines.append(
        f"{'reporting':12} {c['reports']} reports of {format_bytes(c['reported_bytes'])}; "
        f"skipped {format_bytes(skipped)}, kept {format_bytes(c['kept_bytes'])}"
        + (" (page poisoning)" if s.get("page_poisoning") else "")
    )
    lines.append(
        f"{'balloon':12} inflated {format_bytes(c['inflated_bytes'])}, "
        f"deflated {format_bytes(c['deflated_bytes'])}"
    )
    # Holes are punched over every reported range, also over memory the host never held
    # (a fresh guest reports all its free RAM): this bounds what the host got back.
    lines.append(
        f"{'discarded':12} {format_bytes(c['discarded_bytes'])} of guest memory "
        f"({format_bytes(c['balloon_discarded_bytes'])} ballooned), host backing dropped"
    )
    if c["bad_chains"] or c["discard_errors"]:
        lines.append(
            f"{'problems':12} {c['bad_chains']} malformed chains, "
            f"{c['discard_errors']} failed discards"
        )
    for reason, amount in c["skipped_bytes"].items():
        lines.append(f"{'':12} skipped {format_bytes(amount)}: {reason}")
    if s.get("stats"):
        lines.append(_format_stats(s))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command != "serve":
        try:
            return _client(args)
        except OperatorError as error:
            print(f"balloond: error: {error}", file=sys.stderr)
            return 1
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

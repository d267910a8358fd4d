"""The ``balloond`` command line."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, NoReturn

from balloond import __version__, logs
from balloond.control import request
from balloond.daemon import DaemonConfig, default_control_path, merge, read_config, run
from balloond.errors import BalloondError, OperatorError
from balloond.metrics import parse_listen
from balloond.server import adopt
from balloond.service import DeviceSpec, check_name, name_for_path

log = logging.getLogger("balloond")

#: What ``--print-capabilities`` prints (vhost-user.rst, "Backend program conventions").
CAPABILITIES = {"type": "balloon", "features": []}

QEMU_EXAMPLE = """\
QEMU (>= 10.2) connects to the socket as a client; start balloond first. The balloon sits
behind its own PCIe root port, so that it can be unplugged for a live migration:

  -object memory-backend-memfd,id=mem,size=4G,share=on -machine memory-backend=mem
  -chardev socket,id=bal,path=/run/balloond/vm0.sock
  -device pcie-root-port,id=rp-balloon,chassis=1,slot=1
  -device vhost-user-test-device-pci,id=balloon0,bus=rp-balloon,chardev=bal,virtio-id=5,\
num_vqs=4,vq_size=128,config_size=16
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
        "host the memory its Linux guests report free. One daemon serves every VM of a host.",
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
    commands.add_parser(
        "migrate",
        help="live-migrate a VM with its balloon (balloond migrate --help)",
        add_help=False,
    )
    serve = commands.add_parser(
        "serve",
        help="serve the balloon devices of VMs, one vhost-user socket each",
        description="Serve VMs' balloon devices, one vhost-user socket per VM. Runs in the "
        "foreground until SIGTERM or SIGINT; a VM's QEMU that goes away is replaced by the "
        "next one on the same socket. Devices can also be added and removed while it runs "
        "(balloond add/remove).",
        epilog=QEMU_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--socket-path",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="serve a device listening on this Unix socket, named NAME or after the file "
        "(vm0.sock -> vm0); repeat for more VMs",
    )
    serve.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="serve a device by connecting to a QEMU that listens on PATH "
        "(-chardev socket,...,server=on); repeat for more VMs",
    )
    serve.add_argument(
        "--fd", type=int, metavar="N", help="serve a device on the already-listening socket fd N"
    )
    serve.add_argument(
        "--config", metavar="FILE", help="read settings and devices from this TOML file"
    )
    serve.add_argument(
        "--socket-mode",
        type=_mode,
        metavar="MODE",
        help="permissions of the VM socket files (octal, default 0600)",
    )
    serve.add_argument("--socket-group", metavar="GROUP", help="group owning the VM socket files")
    serve.add_argument(
        "--no-discard",
        action="store_const",
        const=False,
        dest="discard",
        help="acknowledge reports and inflations without freeing memory (use when guest "
        "memory is pinned, e.g. VFIO passthrough)",
    )
    serve.add_argument(
        "--no-free-page-reporting",
        action="store_const",
        const=False,
        dest="free_page_reporting",
        help="do not offer free page reporting (VIRTIO_BALLOON_F_REPORTING): the guest keeps "
        "its free memory until the balloon inflates",
    )
    serve.add_argument(
        "--deflate-on-oom",
        action="store_const",
        const=True,
        help="offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take ballooned memory "
        "back when it runs out",
    )
    serve.add_argument(
        "--keep-state",
        action=argparse.BooleanOptionalAction,
        help="keep every VM's connection, fds and device state in the service manager's fd "
        "store (FileDescriptorStoreMax=) or --supervise's, so that a crash or a kill of the "
        "daemon costs no VM its balloon (default: on when $FDSTORE says there is a store)",
    )
    serve.add_argument(
        "--supervise",
        action="store_true",
        help="run under a small built-in supervisor that keeps the fds (as systemd's fd "
        "store does) and starts the daemon again when it dies; implies --keep-state",
    )
    serve.add_argument(
        "--control-socket",
        metavar="PATH",
        help="the daemon's control socket (default: $RUNTIME_DIRECTORY/control.sock under "
        "systemd, /run/balloond/control.sock as root, else $XDG_RUNTIME_DIR/balloond/)",
    )
    serve.add_argument(
        "--control-group",
        metavar="GROUP",
        help="members of GROUP may use the control socket too (mode 0660); by default only "
        "root and the daemon's user may",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics for every device at http://HOST:PORT/metrics (off by "
        "default; bind to 127.0.0.1 or [::1] unless the network is trusted)",
    )
    serve.add_argument(
        "--stats-interval",
        type=_seconds,
        metavar="SECONDS",
        help="ask guests for fresh memory statistics this often (default 0: only on "
        "request, like QEMU)",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="default: info; debug logs every vhost-user request",
    )
    serve.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="auto",
        help="json (one JSON object per line, for the journal), console (key=value), or "
        "auto: console on a terminal, json otherwise (the default)",
    )

    def client(name: str, help_text: str, *, device: str = "required") -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        device_help = "the device's name (or its vhost-user socket's path)"
        if device == "optional":
            command.add_argument("device", nargs="?", metavar="NAME", help=device_help)
        elif device == "required":
            command.add_argument("device", metavar="NAME", help=device_help)
        command.add_argument(
            "--control",
            metavar="PATH",
            help="the daemon's control socket (default: $BALLOOND_CONTROL, else where "
            "'balloond serve' puts it)",
        )
        return command

    status = client(
        "status", "show every device, or one: guest, target, memory returned", device="optional"
    )
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
    add = client("add", "serve another VM's balloon in the running daemon", device="none")
    add.add_argument("name", metavar="NAME", help="the device's name")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--connect", metavar="PATH", help="connect to a QEMU listening here")
    reload = client(
        "reload",
        "load the installed balloond into the running daemon without disconnecting any VM "
        "(same pid, same sockets; also SIGHUP)",
        device="none",
    )
    reload.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the daemon to come back (default: 60)",
    )
    remove = client("remove", "stop serving a VM's balloon", device="none")
    remove.add_argument("name", metavar="NAME", help="the device's name")
    remove.add_argument(
        "--force",
        action="store_true",
        help="even with a VM connected (its balloon then stays dead until the VM restarts)",
    )
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


def _named(text: str) -> DeviceSpec:
    name, sep, path = text.partition("=")
    if not sep:
        name, path = name_for_path(text), text
    return DeviceSpec(check_name(name), socket_path=path)


def _config(args: argparse.Namespace) -> DaemonConfig:
    """The file's settings (if any) with the command line's on top."""
    base = read_config(args.config) if args.config else DaemonConfig()
    devices = [_named(text) for text in args.socket_path]
    for text in args.connect:
        spec = _named(text)
        devices.append(DeviceSpec(spec.name, connect_path=spec.socket_path))
    if args.fd is not None:
        if args.keep_state or os.environ.get("FDSTORE", "0") not in ("", "0"):
            # After a death the store gives the socket back at another number, and fd N is
            # whatever the new process got there.
            raise OperatorError(
                "--fd cannot be used with --keep-state: pass the socket by "
                "socket activation (LISTEN_FDS) or give --socket-path"
            )
        devices.append(DeviceSpec(f"fd{args.fd}", listener=adopt(args.fd)))
    config = merge(
        base,
        options={
            "discard": args.discard,
            "deflate_on_oom": args.deflate_on_oom,
            "free_page_reporting": args.free_page_reporting,
            "socket_mode": args.socket_mode,
            "socket_group": args.socket_group,
            "stats_interval": args.stats_interval,
            "keep_state": args.keep_state,
        },
        devices=tuple(devices),
        control_socket=args.control_socket,
        control_group=args.control_group,
        log_level=args.log_level,
        metrics_listen=args.metrics_listen,
    )
    if config.metrics_listen is not None:
        parse_listen(config.metrics_listen)  # a bad address fails before anything listens
    if not config.devices:
        log.info("no devices yet: add them with 'balloond add NAME --socket-path PATH'")
    return config


def _client(args: argparse.Namespace) -> int:
    path = args.control or default_control_path()
    device = getattr(args, "device", None)
    if args.command == "set-target":
        message = {"command": "set-target", "device": device, "target_bytes": args.size}
        result = request(path, message)
        note = "" if result["guest_notified"] else " (the guest was not notified)"
        print(f"{result['device']}: target set to {format_bytes(args.size)}{note}")
        return 0
    if args.command == "stats":
        message = {
            "command": "stats",
            "device": device,
            "refresh": args.refresh,
            "timeout": args.timeout,
        }
        result = request(path, message, timeout=args.timeout + 5)
        print(json.dumps(result, indent=2) if args.json else _format_stats(result))
        return 0
    if args.command == "add":
        message = {"command": "add", "name": args.name}
        if args.socket_path is not None:
            message["socket_path"] = os.path.abspath(args.socket_path)
        else:
            message["connect_path"] = os.path.abspath(args.connect)
        result = request(path, message)
        print(f"{result['added']}: serving {result['socket']}")
        return 0
    if args.command == "reload":
        return _reload(path, args.timeout)
    if args.command == "remove":
        result = request(path, {"command": "remove", "name": args.name, "force": args.force})
        print(f"{result['removed']}: removed")
        return 0
    result = request(path, {"command": "status", "device": device})
    if args.json:
        print(json.dumps(result, indent=2))
    elif device is not None:
        print(_format_status(result))
    elif not result["devices"]:
        print("no devices: add one with 'balloond add NAME --socket-path PATH'")
    else:
        print("\n\n".join(_format_status(d) for d in result["devices"]))
    return 0


def _supervise(argv: list[str]) -> int:
    """``serve --supervise``: become the keeper (balloond.keeper) of ``serve`` without it."""
    worker = [sys.executable, "-m", "balloond", *(a for a in argv if a != "--supervise")]
    if "--no-keep-state" in worker:
        raise SystemExit("balloond: error: --supervise keeps the state: drop --no-keep-state")
    keeper = [sys.executable, "-m", "balloond.keeper", "--restart-delay", "0.1"]
    os.execv(sys.executable, [*keeper, "--", *worker])


def _reload(path: str, timeout: float) -> int:
    """Ask for a reload, then wait until the daemon answers again with one more reload."""
    started = time.monotonic()
    before = request(path, {"command": "reload"})["reloads"]
    print("reloading...", file=sys.stderr, flush=True)
    while True:
        time.sleep(0.02)
        try:
            status = request(path, {"command": "status"}, timeout=5.0)
        except BalloondError:
            status = None  # the new image is not listening yet
        if status is not None and status.get("reload_error"):
            raise OperatorError(f"reload failed: {status['reload_error']}")
        if status is not None and status.get("reloads", 0) > before:
            break
        if time.monotonic() - started > timeout:
            raise OperatorError(f"the daemon did not come back within {timeout:g} s")
    devices = status["devices"]
    connected = sum(1 for d in devices if d.get("connected"))
    print(
        f"reloaded in {1000 * (time.monotonic() - started):.0f} ms: pid {status['pid']}, "
        f"{len(devices)} devices ({connected} connected) carried on"
    )
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
    lines = [f"{'device':12} {s['device']}" + (f"  ({s['socket']})" if s.get("socket") else "")]
    if not s["connected"]:
        lines.append(f"{'guest':12} not connected")
    else:
        lines.append(f"{'guest':12} connected, {format_bytes(s['ram_bytes'])} of RAM")
    if s.get("host_resident_bytes") is not None:
        lines.append(
            f"{'on the host':12} {format_bytes(s['host_resident_bytes'])} of guest memory "
            "resident (allocated in its memory files)"
        )
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["migrate"]:  # its own options: balloond-migrate, under one name
        from balloond.migrate import main as migrate

        return migrate(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "serve" and args.supervise:
        return _supervise(argv)
    if args.command != "serve":
        try:
            return _client(args)
        except OperatorError as error:
            print(f"balloond: error: {error}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `balloond status | head`: the reader has had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    try:
        faulthandler.enable()  # a watchdog abort shows where every thread was
        logs.configure(args.log_level or "info", args.log_format)
        config = _config(args)
        logs.configure(config.log_level, args.log_format)
        asyncio.run(run(config))
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

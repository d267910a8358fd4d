"""``balloond-migrate``: live-migrate a VM whose balloon balloond serves, with one command.

The steps are :class:`balloond.migration.Migration`'s; this module reads the command line,
connects to both QEMU monitors (stdlib QMP, ``balloond.qmp``) and the daemons' control
sockets, shows each step as it ends, and turns SIGINT and SIGTERM into a cancel: before the
migration completes, the balloon goes back into the source QEMU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from balloond.errors import OperatorError
from balloond.migration import Migration, MigrationRequest, Outcome, Side, StepRecord, Timeouts
from balloond.qmp import QmpClient, QmpError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


EXAMPLE = """\
The source's balloon must sit on a PCIe root port, and the destination QEMU must run the
same command line without the balloon's -chardev and -device, plus -incoming defer:

  source:       -device pcie-root-port,id=rp-balloon,chassis=1,slot=1
                -chardev socket,id=balloon,path=/run/balloond/vm0.sock
                -device vhost-user-test-device-pci,id=balloon0,bus=rp-balloon,chardev=balloon,...
  destination:  -device pcie-root-port,id=rp-balloon,chassis=1,slot=1  -incoming defer

  balloond-migrate --source-qmp /run/vm0/qmp.sock --device-id balloon0 \\
      --dest-qmp /run/vm0-in/qmp.sock --dest-socket /run/balloond/vm0-in.sock \\
      --deferred --multifd unix:/run/vm0/migrate.sock

Exit status: 0 migrated; 1 not migrated, the VM keeps its balloon on the source; 2 bad usage;
3 the VM runs without its balloon (the output says why).
"""


def build_parser() -> argparse.ArgumentParser:
    from balloond.daemon import default_control_path

    parser = _Parser(
        prog="balloond-migrate",
        description="Live-migrate a VM whose balloon balloond serves: unplug the balloon, "
        "migrate, plug a balloon served by the destination's daemon, restore the target.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "uri", help="the migration URI (QMP migrate), e.g. unix:PATH or tcp:HOST:PORT"
    )
    source = parser.add_argument_group("source")
    source.add_argument(
        "--source-qmp", required=True, metavar="PATH", help="the source QEMU's QMP socket"
    )
    source.add_argument(
        "--device-id", required=True, metavar="ID", help="the balloon's QEMU device id"
    )
    source.add_argument(
        "--chardev",
        metavar="ID",
        help="the balloon's chardev id (default: the one the device uses); the new balloon's "
        "chardev gets the same id",
    )
    source.add_argument(
        "--source-control",
        metavar="PATH",
        default=default_control_path(),
        help="the source daemon's control socket (default: %(default)s)",
    )
    source.add_argument(
        "--source-device",
        metavar="NAME",
        help="the device's name in the source daemon (default: the one serving "
        "the balloon's socket)",
    )
    dest = parser.add_argument_group("destination")
    dest.add_argument(
        "--dest-qmp", required=True, metavar="PATH", help="the destination QEMU's QMP socket"
    )
    dest.add_argument(
        "--dest-control",
        metavar="PATH",
        help="the destination daemon's control socket (default: the source's)",
    )
    dest.add_argument(
        "--dest-device",
        metavar="NAME",
        help="the device's name in the destination daemon (default: the source's)",
    )
    dest.add_argument(
        "--dest-socket",
        metavar="PATH",
        help="its vhost-user socket; the device is added to the daemon when missing",
    )
    dest.add_argument(
        "--dest-port",
        metavar="ID",
        help="the destination's root port for the balloon (default: the source's)",
    )
    listen = dest.add_mutually_exclusive_group()
    listen.add_argument(
        "--deferred",
        action="store_true",
        help="the destination runs -incoming defer: start it listening on URI",
    )
    listen.add_argument(
        "--listen",
        metavar="URI",
        help="like --deferred, listening on this URI instead (tcp:0:4444)",
    )
    how = parser.add_argument_group("migration")
    how.add_argument(
        "--multifd",
        action="store_true",
        help="migrate with multifd (needs --deferred/--listen): the destination then "
        "leaves the guest's free memory unallocated",
    )
    how.add_argument(
        "--quit-source", action="store_true", help="quit the source QEMU after the move"
    )
    how.add_argument(
        "--unplug-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long the guest may take to release the balloon (%(default)g)",
    )
    how.add_argument(
        "--migrate-timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="cancel a migration not done after S seconds (default: no limit)",
    )
    how.add_argument(
        "--driver-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long the guest's driver may take to start (%(default)g)",
    )
    how.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    how.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def request_from_args(args: argparse.Namespace) -> MigrationRequest:
    if args.multifd and not (args.deferred or args.listen):
        raise OperatorError(
            "--multifd needs a destination started with -incoming defer (--deferred or --listen)"
        )
    for name in ("unplug_timeout", "driver_timeout"):
        if getattr(args, name) <= 0:
            raise OperatorError(f"--{name.replace('_', '-')} must be positive")
    return MigrationRequest(
        source=Side(args.source_qmp, args.source_control, args.source_device),
        destination=Side(
            args.dest_qmp,
            args.dest_control or args.source_control,
            args.dest_device,
            _absolute(args.dest_socket),
            args.dest_port,
        ),
        device_id=args.device_id,
        uri=args.uri,
        chardev_id=args.chardev,
        listen_uri=args.listen or (args.uri if args.deferred else None),
        multifd=args.multifd,
        quit_source=args.quit_source,
        timeouts=Timeouts(
            unplug=args.unplug_timeout, migrate=args.migrate_timeout, driver=args.driver_timeout
        ),
    )


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def show_step(record: StepRecord) -> None:
    mark = "ok" if record.ok else "FAILED"
    print(
        f"balloond-migrate: {record.step:<8} {record.seconds:6.2f} s  {mark:<6} {record.detail}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from balloond.control import request as control_request

    args = build_parser().parse_args(argv)
    try:
        migration_request = request_from_args(args)
    except OperatorError as error:
        print(f"balloond-migrate: error: {error}", file=sys.stderr)
        return 2
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            source = QmpClient(migration_request.source.qmp)
            destination = QmpClient(migration_request.destination.qmp)
        except QmpError as error:
            print(f"balloond-migrate: error: {error}", file=sys.stderr)
            return 1
        with source, destination:
            migration = Migration(
                migration_request,
                source,
                destination,
                lambda path, message: control_request(path, message),
                progress=(lambda record: None) if args.quiet else show_step,
                cancelled=lambda: bool(stop),
            )
            result = migration.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    for warning in result.warnings:
        print(f"balloond-migrate: warning: {warning}", file=sys.stderr)
    if result.outcome is Outcome.MIGRATED:
        if not args.quiet:
            print(f"balloond-migrate: migrated in {result.seconds:.1f} s", file=sys.stderr)
    else:
        print(f"balloond-migrate: {result.outcome.value}: {result.error}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

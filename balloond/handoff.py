"""``balloond reload``: the daemon hands every device over to a new image of itself.

A socket stays connected as long as a process holds it, and fds without ``FD_CLOEXEC``
survive ``execve``. So a reload holds every device at a point a successor can carry on from
(:meth:`~balloond.server.DeviceServer.hold`: no request half read, no discard job out, kicks
left counted in their eventfds), writes the daemon's state record (every device's, with
its fds; docs/never-drop.md) into a sealed memfd, makes that memfd and every fd the record
names inheritable, and ``execve``\\ s the same command line: new code, same pid, same fds.
QEMU sees no disconnect; its next request waits in the socket until the new process reads
it.

The new process finds the memfd in ``$BALLOOND_HANDOFF`` (``FD:RELOADS:SINCE``, SINCE the
CLOCK_MONOTONIC nanoseconds when the devices were first held), reads the record
(refusing one it cannot read, loudly, rather than guess), and restores every device before
it serves anything else (:func:`take_over`); each connected device then redoes the chains its
rings hold, processes every active ring once and signals every call fd once. The fds are
named in the record's fd table by their own numbers, which ``execve`` keeps.

What a reload does not cover: a crash or a SIGKILL of the process (the fds die with it),
and a restart by the service manager (a new process that inherits nothing). Those need a
keeper of the fds outside the process (docs/never-drop.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import MutableMapping, Sequence

from balloond import keeping, record, statefile
from balloond.keeping import DeviceKeeping
from balloond.record import DaemonRecord, DeviceRecord, RecordError
from balloond.service import Service
from balloond.statefile import StateFile

log = logging.getLogger(__name__)

#: The environment variable that carries the hand-off to the new image.
ENV = "BALLOOND_HANDOFF"
#: Seconds a reload waits for every device to reach a point it can be handed over at.
HOLD_TIMEOUT = 30.0


async def hold_all(service: Service) -> None:
    """Hold every device (:meth:`~balloond.server.DeviceServer.hold`), in parallel."""
    await asyncio.gather(*(d.server.hold() for d in service.devices.values()))


def release_all(service: Service) -> None:
    for device in service.devices.values():
        device.server.release()


def hand_over(service: Service, reloads: int, since_ns: int) -> None:
    """Replace this process by a new image of it that carries every held device on
    (``since_ns``: when the hold began, for the log). Returns only if that failed (an
    OSError, or a record it cannot write)."""
    devices = [service.capture(d) for d in service.devices.values()]
    daemon = DaemonRecord(tuple(devices))
    _, fds = record.encode(daemon)
    data, fds = record.encode(daemon, keys={fd: str(fd) for fd in fds})
    # Devices that keep their state: the state file goes along, holding this very record
    # with the names its fds are kept by.
    kept = {d.name: d.keeping for d in service.devices.values() if d.keeping is not None}
    for state in kept.values():
        state.commit()
    states = [file.fd for k in kept.values() for file in (k.state, k.progress) if file is not None]
    memfd = statefile.seal(data, "balloond-handoff")
    try:
        for fd in [*fds, *states, memfd]:
            os.set_inheritable(fd, True)
        environ = dict(os.environ)
        environ[ENV] = f"{memfd}:{reloads}:{since_ns}"
        if kept:
            environ[ENV] += ":" + ",".join(f"{n}={_files(k)}" for n, k in kept.items())
        argv = [sys.executable, *sys.orig_argv[1:]]
        log.info(
            "reloading: %d devices (%d connected) handed over in %d bytes with %d fds",
            len(devices),
            sum(1 for d in devices if d.connection is not None),
            len(data),
            len(fds),
        )
        flush_logs()
        os.execve(sys.executable, argv, environ)
    finally:  # only after a failed execve
        for fd in [*fds, *states]:
            os.set_inheritable(fd, False)
        os.close(memfd)


def take_over(service: Service, environ: MutableMapping[str, str] | None = None) -> int | None:
    """In the new image: restore every device the previous one handed over; the number of
    reloads so far, or None if this process was not started by a reload. A device that
    cannot be carried on is logged and its fds closed (its VM's balloon is lost, as with a
    restart); a record this version cannot read loses them all, loudly."""
    env = os.environ if environ is None else environ
    value = env.pop(ENV, None)
    if value is None:
        return None
    try:
        memfd_text, reloads_text, since_text, *rest = value.split(":")
        memfd, reloads, since_ns = int(memfd_text), int(reloads_text), int(since_text)
        pairs = rest[0].split(",") if rest else []
        states = {
            name: [int(fd) for fd in files.split("+")]
            for name, files in (pair.split("=") for pair in pairs)
        }
    except ValueError:
        log.error("ignoring $%s=%r: not FD:RELOADS:SINCE[:NAME=FD+FD,...]", ENV, value)
        return None
    for files in states.values():
        for fd in files:
            os.set_inheritable(fd, False)
    fds: list[int] = []
    try:
        data = statefile.read_sealed(memfd)
        fds = [int(slot.key or "") for slot in record.fd_slots(data)]
        handed = record.decode_daemon(data, fds)
    except (RecordError, ValueError) as error:
        log.critical(
            "the previous process's state cannot be read, every VM it served loses its "
            "balloon until it restarts: %s",
            error,
        )
        close_fds(fds)
        return reloads
    finally:
        os.close(memfd)
    for fd in fds:
        os.set_inheritable(fd, False)
    for device in handed.devices:
        state = states.pop(device.name, None)
        kept = None
        try:
            if state is not None:
                kept = _kept(service, device, *state)
            service.restore(device, kept)
        except Exception:
            log.exception(
                "cannot carry this device on: its VM's balloon is lost until the VM restarts",
                extra={"device": device.name},
            )
            # What the restore took (region fds it mapped) it closed already; nothing opened
            # an fd since, so closing the record's fds again only meets EBADF for those.
            close_fds(record.encode(device)[1])
            if kept is not None:
                kept.forget()  # nothing of the VM stays in the store to keep QEMU waiting
            elif state is not None:
                _forget(service, device.name, *state)
    log.info(
        "reloaded: %d devices carried on, %.0f ms after they were held",
        len(service.devices),
        (time.monotonic_ns() - since_ns) / 1e6,
    )
    return reloads


def _files(kept: DeviceKeeping) -> str:
    """A device's state file and progress file, for the new image: ``STATE+PROGRESS``."""
    files = [kept.state] if kept.progress is None else [kept.state, kept.progress]
    return "+".join(str(file.fd) for file in files)


def _kept(service: Service, device: DeviceRecord, fd: int, *progress: int) -> DeviceKeeping:
    """The keeping of a device handed over with its state file: the names its fds are kept
    by are in the file's latest record, which the previous image committed last."""
    state = StateFile(fd)
    slots = record.fd_slots(state.read())
    fds = record.encode(device)[1]
    roles = [slot.role for slot in slots]
    if roles != [slot.role for slot in record.fd_slots(record.encode(device)[0])]:
        raise RecordError("the state file does not hold the record handed over")
    keys = {(n, slot.role): str(slot.key) for n, slot in zip(fds, slots, strict=True)}
    later = StateFile(progress[0]) if progress else None
    return DeviceKeeping(service.notifier, device.name, state, keys=keys, progress=later)


def _forget(service: Service, name: str, fd: int, *progress: int) -> None:
    """Drop from the fd store every fd a device's state file says it keeps, and the files."""
    with contextlib.suppress(RecordError, OSError):
        for slot in record.fd_slots(StateFile(fd).read()):
            if slot.key is not None:
                service.notifier.remove_fds(keeping.store_name(name, slot.key))
    service.notifier.remove_fds(keeping.store_name(name, keeping.STATE))
    service.notifier.remove_fds(keeping.store_name(name, keeping.PROGRESS))
    close_fds([fd, *progress])


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()

"""Keeping each device's fds and state record outside the process, so a crash loses no VM.

With ``--keep-state`` every device keeps, in an fd store (systemd's with
``FileDescriptorStoreMax=``, or the built-in keeper of ``balloond serve --supervise``), a
duplicate of every fd its record names and the memfd its record is committed to
(:class:`~balloond.statefile.StateFile`). When the process dies, whatever killed it, the
store still holds the connection to QEMU, so QEMU sees nothing; the next process gets every
fd back in ``LISTEN_FDS`` and carries each device on from its last committed record
(:func:`restore_devices`).

Names in the store: ``keep/DEVICE/state`` for the state file, ``keep/DEVICE/N`` for each fd
the record names (N counts up per device). An fd reaches the store before the commit that
names it, and leaves it after the first commit that no longer does
(docs/never-drop.md, section 3). A commit is a capture of the device, JSON, and one
``pwrite`` to the memfd; nothing is sent for it unless the set of fds changed.

An fd is known by its number and its role in the record (``connection.socket``): between
two commits of a device no fd it records is closed and its number given to another file of
the same role (every request that closes fds is followed by a commit before the event loop
turns again, and the fds a request brings are open before it closes any).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from balloond import record
from balloond.activation import PassedFd
from balloond.errors import HostError, OperatorError
from balloond.notify import Notifier
from balloond.record import DeviceRecord, RecordError
from balloond.statefile import StateFile

log = logging.getLogger(__name__)

#: Every name this daemon stores fds under begins so (a socket unit's never does: device
#: names have no ``/``).
PREFIX = "keep/"
STATE = "state"
PROGRESS = "progress"


def store_name(device: str, key: str) -> str:
    return f"{PREFIX}{device}/{key}"


class DeviceKeeping:
    """One device's state file and the fds it keeps in the store.

    ``capture`` returns the device's record as it is now (its fds live numbers).
    """

    def __init__(
        self,
        notifier: Notifier,
        name: str,
        state: StateFile,
        capture: Callable[[], DeviceRecord] | None = None,
        *,
        keys: Mapping[tuple[int, str], str] | None = None,
        progress: StateFile | None = None,
    ) -> None:
        self.notifier = notifier
        self.name = name
        self.state = state
        self.capture = capture
        #: Where progress documents go (record.encode_progress): what the data path
        #: changes, committed in a tenth of a record's time, laid over the record at restore.
        self.progress = progress
        #: The device's progress document since the record of a sequence number; None when
        #: no VM is connected (then a record is committed instead).
        self.capture_progress: Callable[[int], bytes | None] | None = None
        #: (fd, role) -> key in the store, for every fd the last commit named.
        self.keys: dict[tuple[int, str], str] = dict(keys or {})
        self._serial = 1 + max((int(k) for k in self.keys.values() if k.isdigit()), default=0)

    @classmethod
    def create(cls, notifier: Notifier, name: str) -> DeviceKeeping:
        """A new device: empty state and progress files, stored at once."""
        state = StateFile.create(f"balloond-{name}")
        progress = StateFile.create(f"balloond-{name}-progress")
        for key, file in ((PROGRESS, progress), (STATE, state)):  # the record's file last
            if not notifier.store_fds(store_name(name, key), [file.fd], poll=False):
                os.close(state.fd)
                os.close(progress.fd)
                raise OperatorError(f"{name}: cannot keep its state in the fd store (see the log)")
        return cls(notifier, name, state, progress=progress)

    def commit(self) -> None:
        """Commit the device's record now: new fds stored first, fds no longer named
        dropped from the store after."""
        assert self.capture is not None
        self.commit_record(self.capture())

    def commit_record(self, device: DeviceRecord) -> None:
        wanted: dict[tuple[int, str], str] = {}
        added: list[str] = []

        def key(fd: int, role: str) -> str:
            name = self.keys.get((fd, role))
            if name is None:  # new: in the store before the commit that names it
                name = str(self._serial)
                self._serial += 1
                if not self.notifier.store_fds(store_name(self.name, name), [fd], poll=False):
                    # Never a record naming an fd the store does not hold.
                    raise HostError(f"cannot keep {role} in the fd store (see the log)")
                added.append(name)
            wanted[(fd, role)] = name
            return name

        try:
            data, _ = record.encode(device, keys=key)
            self.state.commit(data)
        except BaseException:
            for name in added:  # no committed record names them
                self.notifier.remove_fds(store_name(self.name, name))
            raise
        for slot, name in self.keys.items():
            if wanted.get(slot) != name:
                self.notifier.remove_fds(store_name(self.name, name))
        self.keys = wanted

    def commit_progress(self) -> None:
        """Commit what serving the guest changed since the last record (rings, balloon,
        last request); a whole record when there is no connection or no record yet. Only
        for changes that replace no fd and set up nothing: those take :meth:`commit`."""
        if self.progress is None or self.capture_progress is None or self.state.latest is None:
            self.commit()
            return
        data = self.capture_progress(self.state.sequence)
        if data is None:
            self.commit()
            return
        self.progress.commit(data)

    def forget(self) -> None:
        """The device is gone: drop everything it stored, and close the state file."""
        for key in self.keys.values():
            self.notifier.remove_fds(store_name(self.name, key))
        self.notifier.remove_fds(store_name(self.name, STATE))
        self.notifier.remove_fds(store_name(self.name, PROGRESS))
        self.keys = {}
        for file in (self.state, self.progress):
            if file is not None:
                with contextlib.suppress(OSError):
                    os.close(file.fd)


@dataclass
class KeptDevice:
    """A device found in the store at start: its record, decoded with the kept fds."""

    name: str
    keeping: DeviceKeeping
    record: DeviceRecord
    #: A frontend's connection stored before any record named it (the process died right
    #: after it connected): nothing of it was read, so it is served as a new one.
    fresh: socket.socket | None = None


@dataclass
class Found:
    """What the store passed back: devices to carry on, and what could not be."""

    devices: list[KeptDevice] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


def split(passed: Sequence[PassedFd]) -> tuple[list[PassedFd], list[PassedFd]]:
    """The passed fds this daemon stored, and the rest (socket activation)."""
    kept = [p for p in passed if p.name.startswith(PREFIX)]
    return kept, [p for p in passed if not p.name.startswith(PREFIX)]


def restore_devices(notifier: Notifier, passed: Sequence[PassedFd]) -> Found:
    """Read every device's last committed record from the fds the store passed back.

    A device whose record cannot be read, or whose fds are not all there, is lost: logged
    loudly, its fds closed and dropped from the store (its VM's balloon stays dead until the
    VM restarts). fds a device stored that its record no longer names are dropped."""
    by_device: dict[str, dict[str, int]] = {}
    for item in passed:
        device, _, key = item.name[len(PREFIX) :].partition("/")
        slots = by_device.setdefault(device, {})
        if key in slots:  # stored twice under one name: keep the first
            _drop(notifier, item.name, [item.fd])
            continue
        slots[key] = item.fd
    found = Found()
    for device, slots in sorted(by_device.items()):
        if STATE not in slots or StateFile(slots[STATE]).latest is None:
            # Died while the device was being added: it served nothing yet.
            log.info("the device was not set up yet: it starts afresh", extra={"device": device})
            for key, fd in slots.items():
                _drop(notifier, store_name(device, key), [fd])
            continue
        try:
            found.devices.append(_restore(notifier, device, slots))
        except (RecordError, OSError) as error:
            log.critical(
                "cannot carry this device on after the last process died; its VM's balloon "
                "stays dead until the VM restarts: %s",
                error,
                extra={"device": device},
            )
            for key, fd in slots.items():
                _drop(notifier, store_name(device, key), [fd])
            found.lost.append(device)
    return found


def _restore(notifier: Notifier, device: str, slots: dict[str, int]) -> KeptDevice:
    state_fd = slots.get(STATE)
    if state_fd is None:
        raise RecordError(f"{store_name(device, STATE)} is not in the fd store")
    state = StateFile(state_fd)
    data = state.read()
    progress = None
    if PROGRESS in slots:
        progress = StateFile(slots[PROGRESS])
        if progress.latest is not None:
            later = progress.read()
            base = record.progress_base(later)
            if base == state.sequence:
                data = record.apply_progress(data, later)
                log.debug("record %d and the progress after it", base, extra={"device": device})
            elif base is None or base > state.sequence:
                raise RecordError("its progress document is not one this version reads")
    table = record.fd_slots(data)
    fds = []
    for slot in table:
        if slot.key is None or slot.key not in slots:
            raise RecordError(f"{slot.role}: {store_name(device, str(slot.key))} is not kept")
        fds.append(slots[slot.key])
    decoded = record.decode(data, fds)
    if decoded.name != device:
        raise RecordError(f"the record kept as {device!r} is device {decoded.name!r}")
    named = {slot.key for slot in table} | {STATE, PROGRESS}
    keys = {(fd, slot.role): str(slot.key) for fd, slot in zip(fds, table, strict=True)}
    fresh = None
    for key in sorted(set(slots) - named, key=_serial):
        fd = slots[key]
        if fresh is None and decoded.connection is None and _connected(fd):
            fresh = socket.socket(fileno=fd)
            keys[(fd, CONNECTION_SOCKET)] = key
            continue
        _drop(notifier, store_name(device, key), [fd])
    keeping = DeviceKeeping(notifier, device, state, keys=keys, progress=progress)
    return KeptDevice(device, keeping, decoded, fresh)


#: The role of a connection's socket in a device record.
CONNECTION_SOCKET = "connection.socket"


def _serial(key: str) -> int:
    return int(key) if key.isdigit() else -1


def _connected(fd: int) -> bool:
    """Whether ``fd`` is a connected Unix stream socket (a frontend's connection)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        probe = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if (
            probe.family != socket.AF_UNIX
            or probe.type != socket.SOCK_STREAM
            or probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        ):
            return False
        try:
            return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""  # not at EOF
        except BlockingIOError:
            return True  # connected, nothing sent yet
        except OSError:
            return False
    finally:
        probe.detach()


def _drop(notifier: Notifier, name: str, fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    notifier.remove_fds(name)

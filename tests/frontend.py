"""A vhost-user frontend simulator: plays QEMU and a virtio-balloon guest driver.

Guest RAM is real memfd memory in two regions, split like QEMU's x86 machines (below and
above 4 GiB). The simulator maps it too, builds split rings in it by hand, and talks to a
real daemon over a real Unix socket, passing fds with SCM_RIGHTS, in the order QEMU 11
does (see shared/qemu-11.1-session.log).
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import select
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from balloond import wire
from balloond.wire import ProtocolFeature, Request

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
#: Where the fake QEMU "maps" guest RAM: only used as frontend virtual addresses.
UADDR_BASE = 0x7F00_0000_0000

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


@dataclass
class Region:
    gpa: int
    size: int
    fd: int
    map: mmap.mmap
    uaddr: int

    @property
    def spec(self) -> wire.MemoryRegion:
        return wire.MemoryRegion(self.gpa, self.size, self.uaddr, 0)

    def blocks(self) -> int:
        """Bytes the memfd really holds (``st_blocks`` is in 512-byte units)."""
        return os.fstat(self.fd).st_blocks * 512


class GuestRam:
    """Guest RAM as memfds: ``low`` bytes at gpa 0 and ``high`` bytes at gpa 4 GiB."""

    def __init__(self, low: int = 64 * MiB, high: int = 64 * MiB, *, hugetlb: bool = False):
        self.regions: list[Region] = []
        flags = os.MFD_HUGETLB if hugetlb else 0
        for index, (gpa, size) in enumerate(((0, low), (4 * GiB, high))):
            if not size:
                continue
            fd = os.memfd_create(f"guest-ram-{index}", flags)
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            self.regions.append(Region(gpa, size, fd, mapping, UADDR_BASE + gpa))
        self._next_free = 0  # bump allocator for ring structures, in the low region

    def close(self) -> None:
        for region in self.regions:
            region.map.close()
            os.close(region.fd)

    def region(self, gpa: int, length: int = 1) -> Region:
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                return region
        raise ValueError(f"gpa {gpa:#x} is not guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        region = self.region(gpa, length)
        return region.map[gpa - region.gpa : gpa - region.gpa + length]

    def write(self, gpa: int, data: bytes) -> None:
        region = self.region(gpa, len(data))
        region.map[gpa - region.gpa : gpa - region.gpa + len(data)] = data

    def uaddr(self, gpa: int) -> int:
        region = self.region(gpa)
        return region.uaddr + gpa - region.gpa

    def alloc(self, size: int, align: int = PAGE) -> int:
        """Carve ``size`` bytes for ring structures from the start of the low region."""
        start = -(-self._next_free // align) * align
        self._next_free = start + size
        return start

    def blocks(self) -> int:
        return sum(r.blocks() for r in self.regions)


class Ring:
    """The driver's side of one split ring, in guest RAM."""

    def __init__(self, ram: GuestRam, index: int, size: int = 128) -> None:
        self.ram, self.index, self.size = ram, index, size
        self.desc = ram.alloc(16 * size)
        self.avail = ram.alloc(6 + 2 * size)
        self.used = ram.alloc(6 + 8 * size)
        for start, length in ((self.desc, 16 * size), (self.avail, 6 + 2 * size)):
            ram.write(start, bytes(length))  # a driver zeroes its rings
        ram.write(self.used, bytes(6 + 8 * size))
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.used_seen = 0
        self.free_desc = 0

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)

    def addr(self) -> wire.VringAddr:
        ram = self.ram
        return wire.VringAddr(
            self.index, 0, ram.uaddr(self.desc), ram.uaddr(self.used), ram.uaddr(self.avail), 0
        )

    def write_desc(self, slot: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * slot, DESC.pack(addr, length, flags, nxt))

    def add_chain(
        self,
        buffers: Sequence[tuple[int, int]],
        *,
        writable: bool,
        indirect: bool = False,
    ) -> int:
        """Make a chain of ``(gpa, length)`` buffers available; returns its head."""
        flags = F_WRITE if writable else 0
        head = self.free_desc % self.size
        if indirect:
            table = self.ram.alloc(16 * len(buffers), 16)
            for i, (addr, length) in enumerate(buffers):
                last = i == len(buffers) - 1
                entry = DESC.pack(addr, length, flags | (0 if last else F_NEXT), i + 1)
                self.ram.write(table + 16 * i, entry)
            self.write_desc(head, table, 16 * len(buffers), F_INDIRECT)
            self.free_desc += 1
        else:
            for i, (addr, length) in enumerate(buffers):
                slot = (head + i) % self.size
                last = i == len(buffers) - 1
                nxt = (slot + 1) % self.size
                self.write_desc(slot, addr, length, flags | (0 if last else F_NEXT), nxt)
            self.free_desc += len(buffers)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put ``head`` on the available ring and bump its index."""
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, U16.pack(self.avail_idx))

    def notify(self) -> None:
        os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return U16.unpack(self.ram.read(self.used + 2, 2))[0]

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Wait for the call eventfd until ``count`` more used elements appeared."""
        target = (self.used_seen + count) & 0xFFFF
        deadline = _deadline(timeout)
        while (seen := self.used_idx()) != target:
            # EVENT_IDX, as Linux's virtqueue_enable_cb does: ask for an interrupt once the
            # device passes what we have seen now, then look again before sleeping (the
            # device may have passed it already).
            self.ram.write(self.avail + 4 + 2 * self.size, U16.pack(seen))
            if self.used_idx() != seen:
                continue
            remaining = deadline - _now()
            if remaining <= 0:
                raise TimeoutError(f"ring {self.index}: used index {seen}, waiting for {target}")
            ready, _, _ = select.select([self.call], [], [], remaining)
            if ready:
                os.eventfd_read(self.call)
        elements = []
        for i in range(count):
            slot = self.used + 4 + 8 * ((self.used_seen + i) % self.size)
            elements.append(USED_ELEM.unpack(self.ram.read(slot, 8)))
        self.used_seen = target
        return elements


def _now() -> float:
    import time

    return time.monotonic()


def _deadline(timeout: float) -> float:
    return _now() + timeout


class Frontend:
    """The vhost-user side of QEMU, over a blocking Unix socket."""

    PROTOCOL_FEATURES = (
        1 << ProtocolFeature.MQ
        | 1 << ProtocolFeature.REPLY_ACK
        | 1 << ProtocolFeature.BACKEND_REQ
        | 1 << ProtocolFeature.CONFIG
        | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
        | 1 << ProtocolFeature.STATUS
    )

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reply_ack = False
        self.backend_channel: socket.socket | None = None

    @classmethod
    def over(cls, sock: socket.socket, timeout: float = 5.0) -> Frontend:
        """A frontend on a connected socket: a QEMU that listens, the backend connecting."""
        frontend = cls.__new__(cls)
        frontend.sock = sock
        sock.settimeout(timeout)
        frontend.reply_ack = False
        frontend.backend_channel = None
        return frontend

    def close(self) -> None:
        self.sock.close()
        if self.backend_channel is not None:
            self.backend_channel.close()

    # --- raw messages -------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        self.sock.sendmsg([data], ancillary)

    def send(
        self,
        request: Request,
        payload: wire.Payload = None,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> None:
        if need_reply is None:
            need_reply = self.reply_ack and request in _ACKED
        self.send_raw(wire.encode_request(request, payload, need_reply=need_reply), fds)

    def recv_reply(self, request: Request) -> bytes:
        header = wire.decode_header(self._recv_exact(wire.HEADER_SIZE), reply=True)
        if header.request != request:
            raise AssertionError(f"reply to {header.request}, expected {request.name}")
        return self._recv_exact(header.size)

    def _recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("backend closed the connection")
            data += chunk
        return data

    def call(
        self, request: Request, payload: wire.Payload = None, fds: Sequence[int] = ()
    ) -> bytes | None:
        """Send a request; read its reply, or its REPLY_ACK ack when one is due."""
        self.send(request, payload, fds)
        if request in _HAS_REPLY:
            return self.recv_reply(request)
        if self.reply_ack and request in _ACKED:
            ack = self.recv_reply(request)
            assert ack == wire.encode_u64(0), f"{request.name} failed: {ack!r}"
        return None

    def u64(self, request: Request) -> int:
        reply = self.call(request)
        assert reply is not None
        return int.from_bytes(reply, "little")

    def get_config(self, size: int = 16) -> bytes:
        reply = self.call(Request.GET_CONFIG, wire.ConfigSpace(0, size, 0, bytes(size)))
        assert reply is not None
        return reply[12:]

    def set_config(self, data: bytes, offset: int = 0) -> None:
        self.call(Request.SET_CONFIG, wire.ConfigSpace(offset, len(data), 0, data))

    def closed_by_backend(self, timeout: float = 5.0) -> bool:
        """True once the backend has closed the connection (EOF)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # --- QEMU's start sequence ------------------------------------------------------------

    def negotiate(self, *, protocol_features: int | None = None) -> int:
        """The connection preamble; returns the features the backend offers."""
        features = self.u64(Request.GET_FEATURES)
        offered = self.u64(Request.GET_PROTOCOL_FEATURES)
        wanted = self.PROTOCOL_FEATURES if protocol_features is None else protocol_features
        acked = offered & wanted
        self.call(Request.SET_PROTOCOL_FEATURES, acked)
        self.reply_ack = bool(acked & (1 << ProtocolFeature.REPLY_ACK))
        self.u64(Request.GET_QUEUE_NUM)
        self.call(Request.SET_OWNER)
        if acked & (1 << ProtocolFeature.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.call(Request.SET_BACKEND_REQ_FD, None, [theirs.fileno()])
            theirs.close()
            self.backend_channel = ours
        return features

    def set_mem_table(self, ram: GuestRam) -> None:
        table = wire.MemoryTable(tuple(r.spec for r in ram.regions))
        self.call(Request.SET_MEM_TABLE, table, [r.fd for r in ram.regions])

    def start_ring(self, ring: Ring, *, base: int = 0, enable: bool = True) -> None:
        self.call(Request.SET_VRING_NUM, wire.VringState(ring.index, ring.size))
        self.call(Request.SET_VRING_BASE, wire.VringState(ring.index, base))
        self.call(Request.SET_VRING_ADDR, ring.addr())
        self.call(Request.SET_VRING_KICK, wire.VringFile(ring.index, False), [ring.kick])
        self.call(Request.SET_VRING_CALL, wire.VringFile(ring.index, False), [ring.call])
        if enable:
            self.call(Request.SET_VRING_ENABLE, wire.VringState(ring.index, 1))

    def stop_ring(self, ring: Ring) -> int:
        """A VM pause: disable the ring, then GET_VRING_BASE; returns the next avail index."""
        self.call(Request.SET_VRING_ENABLE, wire.VringState(ring.index, 0))
        reply = self.call(Request.GET_VRING_BASE, wire.VringState(ring.index, 0))
        assert reply is not None
        index, num = struct.unpack("=II", reply)
        assert index == ring.index
        return num


_HAS_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)
#: Requests QEMU sends with NEED_REPLY once REPLY_ACK is negotiated.
_ACKED = frozenset(
    {
        Request.SET_MEM_TABLE,
        Request.SET_VRING_KICK,
        Request.SET_VRING_CALL,
        Request.SET_VRING_ERR,
        Request.SET_VRING_ENABLE,
        Request.SET_BACKEND_REQ_FD,
        Request.ADD_MEM_REG,
        Request.REM_MEM_REG,
        Request.SET_STATUS,
        Request.SET_CONFIG,
    }
)


class Guest:
    """A balloon driver on top of a frontend: negotiates, sets up queues like Linux."""

    def __init__(self, frontend: Frontend, ram: GuestRam, *, features: int | None = None):
        self.frontend = frontend
        self.ram = ram
        offered = frontend.negotiate()
        self.features = offered if features is None else features & offered
        self.rings: dict[str, Ring] = {}
        # Linux's compact numbering: inflate, deflate, then stats and reporting if present.
        names = ["inflate", "deflate"]
        if self.features & (1 << 1):
            names.append("stats")
        if self.features & (1 << 5):
            names.append("reporting")
        for index, name in enumerate(names):
            self.rings[name] = Ring(ram, index)

    def start(self) -> None:
        """DRIVER_OK: features, memory table, then every ring (QEMU's order)."""
        frontend = self.frontend
        frontend.call(Request.SET_FEATURES, self.features | (1 << 30))
        frontend.set_mem_table(self.ram)
        for ring in self.rings.values():
            frontend.start_ring(ring, enable=False)
        for ring in self.rings.values():
            frontend.call(Request.SET_VRING_ENABLE, wire.VringState(ring.index, 1))

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()

    def report(
        self, ranges: Sequence[tuple[int, int]], *, indirect: bool = False, timeout: float = 10.0
    ) -> tuple[int, int]:
        """Report free ranges and wait for the buffer to come back: (head, used length)."""
        ring = self.rings["reporting"]
        head = ring.add_chain(ranges, writable=True, indirect=indirect)
        ring.notify()
        [(used_head, length)] = ring.wait_used(1, timeout)
        assert used_head == head
        return used_head, length


@contextlib.contextmanager
def simulated_vm(path: str, *, timeout: float = 5.0) -> Iterator[Guest]:
    """A guest of 128 MiB in two regions, connected to the backend at ``path`` and started
    (every ring running); everything closed at the end."""
    ram = GuestRam(64 * MiB, 64 * MiB)
    frontend = Frontend(path, timeout=timeout)
    try:
        guest = Guest(frontend, ram)
        try:
            guest.start()
            yield guest
        finally:
            guest.close()
    finally:
        frontend.close()
        ram.close()

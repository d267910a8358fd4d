"""vhost-user wire format: request codes, header flags, payload structs.

Every message is a 12-byte header (``u32 request, u32 flags, u32 size``, native byte order)
followed by ``size`` bytes of payload; file descriptors travel beside it as SCM_RIGHTS.
This module only turns bytes into typed values and back. It validates everything it
decodes (sizes, flags, reserved bits, fd counts, region counts) and never owns an fd: a
caller that gets :class:`~balloond.errors.FrontendError` still holds, and must close,
the fds it received.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from balloond.errors import FrontendError


class Request(IntEnum):
    """Frontend-to-backend request codes (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(IntEnum):
    """Backend-to-frontend request codes, sent on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class HeaderFlags(IntFlag):
    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class ProtocolFeature(IntEnum):
    """Bit numbers of ``VHOST_USER_PROTOCOL_F_*``."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


#: Feature bit 30: the frontend may negotiate protocol features; rings start disabled.
VHOST_USER_F_PROTOCOL_FEATURES = 30

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
#: The largest payload we accept. Our largest legitimate message, SET_MEM_TABLE with 8
#: regions, is 264 bytes; GET_CONFIG carries at most 256 bytes of config.
MAX_PAYLOAD_SIZE = 4096
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
#: The flag bits a frontend may set; version bits must read exactly 1.
_VERSION_MASK = 0x3
_KNOWN_FLAGS = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY
#: The same as plain ints, and the flags' members by value: a header is decoded and a reply
#: encoded per config request (one per inflate or deflate buffer), and an IntFlag's
#: arithmetic or an enum's lookup by value costs some 30 times an int's.
_VERSION, _REPLY = int(HeaderFlags.VERSION), int(HeaderFlags.REPLY)
_NEED_REPLY, _UNKNOWN_FLAGS = int(HeaderFlags.NEED_REPLY), ~int(_KNOWN_FLAGS)
_HEADER_FLAGS = {int(f): f for f in (HeaderFlags.VERSION, _KNOWN_FLAGS)}

_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")
_VRING_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")
_MEM_TABLE_HEAD = struct.Struct("=II")
_CONFIG_HEAD = struct.Struct("=III")

_VRING_FILE_INDEX_MASK = 0xFF
_VRING_FILE_NOFD = 0x100


@dataclass(frozen=True)
class Header:
    request: int
    flags: HeaderFlags
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & _NEED_REPLY)


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and one number (size, base, enable)."""

    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``; the addresses are frontend (QEMU) virtual addresses."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: a ring index and whether an fd came with it."""

    index: int
    nofd: bool


@dataclass(frozen=True)
class MemoryRegion:
    """``VhostUserMemoryRegion``; each region's fd arrives beside the message."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class ConfigSpace:
    """``VhostUserConfig``: a window of the device config space."""

    offset: int
    size: int
    flags: int
    data: bytes


Payload = int | VringState | VringAddr | VringFile | MemoryTable | MemoryRegion | ConfigSpace | None


@dataclass(frozen=True)
class Message:
    """One decoded frontend request. ``fds`` belong to whoever handles the message."""

    request: Request
    flags: HeaderFlags
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & _NEED_REPLY)


def decode_header(data: bytes, *, reply: bool = False) -> Header:
    """Decode a header: a request from the frontend, or with ``reply`` a reply to us."""
    if len(data) != HEADER_SIZE:
        raise FrontendError(f"short message header: {len(data)} bytes")
    request, flags, size = HEADER.unpack(data)
    if flags & _VERSION_MASK != _VERSION:
        raise FrontendError(f"unsupported protocol version in flags {flags:#x}")
    if reply and flags != _VERSION | _REPLY:
        raise FrontendError(f"reply with flags {flags:#x}")
    if not reply and flags & _UNKNOWN_FLAGS:
        raise FrontendError(f"unknown header flags {flags:#x}")
    if size > MAX_PAYLOAD_SIZE:
        raise FrontendError(f"payload of {size} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return Header(request, _HEADER_FLAGS.get(flags) or HeaderFlags(flags), size)


def _exact(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise FrontendError(f"{what}: payload is {len(body)} bytes, expected {size}")


def _none(body: bytes) -> None:
    _exact(body, 0, "request without payload")
    return None


def _u64(body: bytes) -> int:
    _exact(body, _U64.size, "u64 payload")
    value: int = _U64.unpack(body)[0]
    return value


def _vring_state(body: bytes) -> VringState:
    _exact(body, _VRING_STATE.size, "vring state")
    return VringState(*_VRING_STATE.unpack(body))


def _vring_addr(body: bytes) -> VringAddr:
    _exact(body, _VRING_ADDR.size, "vring address")
    return VringAddr(*_VRING_ADDR.unpack(body))


def _vring_file(body: bytes) -> VringFile:
    value = _u64(body)
    if value & ~(_VRING_FILE_INDEX_MASK | _VRING_FILE_NOFD):
        raise FrontendError(f"reserved bits set in vring file value {value:#x}")
    return VringFile(value & _VRING_FILE_INDEX_MASK, bool(value & _VRING_FILE_NOFD))


def _region(body: bytes) -> MemoryRegion:
    region = MemoryRegion(*_REGION.unpack(body))
    if region.memory_size == 0:
        raise FrontendError("memory region of size 0")
    for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
        if getattr(region, name) + region.memory_size > 1 << 64:
            raise FrontendError(f"memory region {name} + size overflows")
    return region


def _mem_table(body: bytes) -> MemoryTable:
    if len(body) < _MEM_TABLE_HEAD.size:
        raise FrontendError("SET_MEM_TABLE payload too short")
    count, _padding = _MEM_TABLE_HEAD.unpack_from(body)
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise FrontendError(f"SET_MEM_TABLE with {count} regions (1 to {MAX_MEM_REGIONS})")
    _exact(body, _MEM_TABLE_HEAD.size + count * _REGION.size, "SET_MEM_TABLE")
    regions = tuple(
        _region(body[start : start + _REGION.size])
        for start in range(_MEM_TABLE_HEAD.size, len(body), _REGION.size)
    )
    return MemoryTable(regions)


def _single_region(body: bytes) -> MemoryRegion:
    _exact(body, _U64.size + _REGION.size, "memory region message")
    return _region(body[_U64.size :])


def _config(body: bytes) -> ConfigSpace:
    if len(body) < _CONFIG_HEAD.size:
        raise FrontendError("config message payload too short")
    offset, size, flags = _CONFIG_HEAD.unpack_from(body)
    if size > MAX_CONFIG_SIZE:
        raise FrontendError(f"config window of {size} bytes exceeds {MAX_CONFIG_SIZE}")
    _exact(body, _CONFIG_HEAD.size + size, "config message")
    return ConfigSpace(offset, size, flags, bytes(body[_CONFIG_HEAD.size :]))


Decoder = Callable[[bytes], Payload]

#: How each supported request's payload is decoded. Requests missing here belong to
#: protocol features this backend never offers, and end the connection.
_DECODERS: dict[Request, Decoder] = {
    Request.GET_FEATURES: _none,
    Request.SET_FEATURES: _u64,
    Request.SET_OWNER: _none,
    Request.RESET_OWNER: _none,
    Request.SET_MEM_TABLE: _mem_table,
    Request.SET_VRING_NUM: _vring_state,
    Request.SET_VRING_ADDR: _vring_addr,
    Request.SET_VRING_BASE: _vring_state,
    Request.GET_VRING_BASE: _vring_state,
    Request.SET_VRING_KICK: _vring_file,
    Request.SET_VRING_CALL: _vring_file,
    Request.SET_VRING_ERR: _vring_file,
    Request.GET_PROTOCOL_FEATURES: _none,
    Request.SET_PROTOCOL_FEATURES: _u64,
    Request.GET_QUEUE_NUM: _none,
    Request.SET_VRING_ENABLE: _vring_state,
    Request.SET_BACKEND_REQ_FD: _none,
    Request.GET_CONFIG: _config,
    Request.SET_CONFIG: _config,
    Request.RESET_DEVICE: _none,
    Request.GET_MAX_MEM_SLOTS: _none,
    Request.ADD_MEM_REG: _single_region,
    Request.REM_MEM_REG: _single_region,
    Request.SET_STATUS: _u64,
    Request.GET_STATUS: _none,
}
#: The requests decoded, by value (``Request(value)`` is a slow call, and raises for others).
_REQUESTS: dict[int, Request] = {int(r): r for r in _DECODERS}


def _expected_fds(request: Request, payload: Payload) -> tuple[int, int]:
    """The (minimum, maximum) number of fds a request may carry."""
    if isinstance(payload, MemoryTable):
        return len(payload.regions), len(payload.regions)
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        assert isinstance(payload, VringFile)
        return (0, 0) if payload.nofd else (1, 1)
    if request in (Request.ADD_MEM_REG, Request.SET_BACKEND_REQ_FD):
        return 1, 1
    if request is Request.REM_MEM_REG:
        # QEMU sends none; the specification lets a frontend send the region's fd.
        return 0, 1
    return 0, 0


def decode_message(header: Header, body: bytes, fds: tuple[int, ...]) -> Message:
    """Decode one request. Raises FrontendError; ``fds`` are never closed here."""
    request = _REQUESTS.get(header.request)
    if request is None:
        raise FrontendError(f"unsupported request {header.request}")
    decoder = _DECODERS[request]
    if len(body) != header.size:
        raise FrontendError(f"{request.name}: truncated payload")
    try:
        payload = decoder(body)
    except FrontendError as error:
        raise FrontendError(f"{request.name}: {error}") from None
    low, high = _expected_fds(request, payload)
    if not low <= len(fds) <= high:
        raise FrontendError(f"{request.name}: {len(fds)} fds attached, expected {low}-{high}")
    return Message(request, header.flags, payload, fds)


# --- encoding: replies, and the requests a test frontend sends ---------------------------


def encode_header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


def encode_reply(request: Request, payload: bytes) -> bytes:
    return HEADER.pack(request, _VERSION | _REPLY, len(payload)) + payload


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def encode_vring_state(state: VringState) -> bytes:
    return _VRING_STATE.pack(state.index, state.num)


def encode_vring_addr(addr: VringAddr) -> bytes:
    return _VRING_ADDR.pack(
        addr.index,
        addr.flags,
        addr.desc_user_addr,
        addr.used_user_addr,
        addr.avail_user_addr,
        addr.log_guest_addr,
    )


def encode_vring_file(file: VringFile) -> bytes:
    return encode_u64(file.index | (_VRING_FILE_NOFD if file.nofd else 0))


def encode_region(region: MemoryRegion) -> bytes:
    return _REGION.pack(
        region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
    )


def encode_mem_table(table: MemoryTable) -> bytes:
    head = _MEM_TABLE_HEAD.pack(len(table.regions), 0)
    return head + b"".join(encode_region(r) for r in table.regions)


def encode_single_region(region: MemoryRegion) -> bytes:
    return encode_u64(0) + encode_region(region)


def encode_config(config: ConfigSpace) -> bytes:
    return _CONFIG_HEAD.pack(config.offset, len(config.data), config.flags) + config.data


def encode_payload(payload: Payload) -> bytes:
    """Encode any payload value; the inverse of the decoders above."""
    if payload is None:
        return b""
    if isinstance(payload, int):
        return encode_u64(payload)
    if isinstance(payload, VringState):
        return encode_vring_state(payload)
    if isinstance(payload, VringAddr):
        return encode_vring_addr(payload)
    if isinstance(payload, VringFile):
        return encode_vring_file(payload)
    if isinstance(payload, MemoryTable):
        return encode_mem_table(payload)
    if isinstance(payload, MemoryRegion):
        return encode_single_region(payload)
    return encode_config(payload)


def encode_request(request: Request, payload: Payload = None, *, need_reply: bool = False) -> bytes:
    body = encode_payload(payload)
    flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return encode_header(request, flags, len(body)) + body


def encode_backend_request(request: BackendRequest, payload: bytes, *, need_reply: bool) -> bytes:
    flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return encode_header(request, flags, len(payload)) + payload

"""The vhost-user byte stream, with fds, through the server's real framing.

A run writes a stream of messages (valid encodings of random requests, and random
headers and bodies) into one end of a real Unix socketpair, cut into chunks at random
places, with fds (fresh memfds, one inode each) attached to random chunks; some chunks
carry more fds than a message may (the kernel truncates them). ``Connection._receive``,
the server's own reader, takes messages off the other end until the stream ends or
breaks the protocol.

Invariants: what the reader returns is exactly what decoding each message's bytes alone
gives, with exactly the fds sent with its bytes, in order (a chunk's fds belong to the
message holding its first byte); a message that does not decode, or arrives with
truncated fds, stops the stream with ``FrontendError`` at that message, and an end in the
middle of a message with ``ConnectionClosed``, never anything else; a decoded payload
encodes back to its bytes; and every fd received is either in a returned message or
closed (the process holds no new fd after the run).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct
from dataclasses import dataclass

from balloond import wire
from balloond.errors import FrontendError
from balloond.server import Connection, ConnectionClosed
from balloond.wire import Request
from fuzz.source import Source, choice, number
from fuzz.world import open_fds, require

_LOOP: asyncio.AbstractEventLoop | None = None


@dataclass(frozen=True)
class Expected:
    """What decoding one message's bytes alone gives, and the fds sent with them."""

    message: wire.Message | None  # None: FrontendError
    inodes: tuple[int, ...]
    truncated: bool


def _message(source: Source) -> bytes:
    """One message's bytes: mostly a valid request, sometimes anything."""
    kind = source.int(0, 3)
    if kind == 0:
        request = number(source, [int(r) for r in Request], 0, 2**32 - 1)
        flags = number(source, (1, 9), 0, 2**32 - 1)
        body = source.bytes(64)
        size = len(body) if source.int(0, 3) else number(source, (4097, 0), 0, 2**32 - 1)
        return struct.pack("=III", request, flags, size) + body
    request = choice(source, sorted(Request))
    payload: wire.Payload = None
    if request in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_STATUS):
        payload = source.int(0, 2**64 - 1)
    elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        payload = wire.VringFile(source.int(0, 0xFF), source.int(0, 1) == 1)
    elif request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE):
        payload = wire.VringState(source.int(0, 300), source.int(0, 2**32 - 1))
    elif request in (Request.GET_CONFIG, Request.SET_CONFIG):
        data = source.bytes(20)
        payload = wire.ConfigSpace(source.int(0, 300), len(data), source.int(0, 3), data)
    elif request is Request.SET_MEM_TABLE:
        payload = wire.MemoryTable(
            tuple(
                wire.MemoryRegion(source.int(0, 2**40), source.int(0, 2**30), 0, 0)
                for _ in range(source.int(1, 9))
            )
        )
    elif request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        payload = wire.MemoryRegion(source.int(0, 2**40), source.int(1, 2**30), 0, 0)
    return wire.encode_request(request, payload, need_reply=source.int(0, 1) == 1)


def _expected(data: bytes, chunks: list[tuple[int, int]]) -> list[Expected]:
    """Cut ``data`` into messages as a reader that takes each header, then its body, must;
    give each message the fds of the chunks (``(start, fd count)``) that start inside it."""
    result: list[Expected] = []
    position, fd_number = 0, 0
    starts = {start: count for start, count in chunks}
    inode_at: list[tuple[int, int]] = []  # (chunk start, index of its first fd)
    for start, count in chunks:
        inode_at.append((start, fd_number))
        fd_number += count
    while position + wire.HEADER_SIZE <= len(data):
        head = data[position : position + wire.HEADER_SIZE]
        try:
            header = wire.decode_header(head)
        except FrontendError:
            end = position + wire.HEADER_SIZE
            result.append(Expected(None, _inodes(position, end, inode_at, starts), False))
            return result
        end = position + wire.HEADER_SIZE + header.size
        if end > len(data):
            break  # the stream ends inside this message
        inodes = _inodes(position, end, inode_at, starts)
        truncated = any(starts[s] > wire.MAX_MEM_REGIONS for s in starts if position <= s < end)
        try:
            message: wire.Message | None = wire.decode_message(
                header, data[position + wire.HEADER_SIZE : end], tuple(range(len(inodes)))
            )
        except FrontendError:
            message = None
        result.append(Expected(message, inodes, truncated))
        if message is None or truncated:
            return result
        position = end
    if any(count > wire.MAX_MEM_REGIONS for start, count in chunks if start >= position):
        # The reader reads what is left before it sees the end: too many fds there.
        result.append(Expected(None, (), True))
    return result


def _inodes(
    start: int, end: int, inode_at: list[tuple[int, int]], starts: dict[int, int]
) -> tuple[int, ...]:
    """Fd numbers (in sending order) of chunks starting in ``[start, end)``."""
    found: list[int] = []
    for chunk_start, first in inode_at:
        if start <= chunk_start < end:
            found.extend(range(first, first + starts[chunk_start]))
    return tuple(found)


def run(source: Source) -> None:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    data = b"".join(_message(source) for _ in range(source.int(1, 6)))
    if source.int(0, 3) == 0:  # an end in the middle of a message
        data = data[: source.int(0, len(data))]
    cuts = sorted({source.int(1, max(1, len(data) - 1)) for _ in range(source.int(0, 8))})
    bounds = [0, *(c for c in cuts if 0 < c < len(data)), len(data)]
    chunks = [
        # (a stream socket sends nothing, fds included, for an empty write)
        (bounds[i], number(source, (0, 0, 1, 2, 9), 0, 10) if bounds[i + 1] > bounds[i] else 0)
        for i in range(len(bounds) - 1)
    ]
    before = open_fds()
    inodes: list[int] = []
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for i, (start, count) in enumerate(chunks):
            end = bounds[i + 1]
            fds = [os.memfd_create("sent") for _ in range(count)]
            inodes.extend(os.fstat(fd).st_ino for fd in fds)
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            )
            writer.sendmsg([data[start:end]], ancillary)
            for fd in fds:
                os.close(fd)
        writer.close()
        reader.setblocking(False)
        expected = _expected(data, chunks)
        got = _LOOP.run_until_complete(_read_all(reader))
    finally:
        writer.close()
        reader.close()
    _compare(expected, got, inodes)
    leaked = open_fds() - before
    require(not leaked, f"fds left open by the reader: {sorted(leaked)}")


async def _read_all(sock: socket.socket) -> list[wire.Message | BaseException]:
    connection = Connection(sock, None, None, None)  # type: ignore[arg-type]
    got: list[wire.Message | BaseException] = []
    while True:
        try:
            got.append(await connection._receive())
        except (FrontendError, ConnectionClosed) as error:
            got.append(error)
            return got


def _compare(expected: list[Expected], got: list[wire.Message | BaseException], inodes) -> None:
    for index, outcome in enumerate(got):
        if isinstance(outcome, BaseException):
            if index < len(expected):
                want = expected[index]
                require(
                    isinstance(outcome, FrontendError) and (want.message is None or want.truncated),
                    f"message {index}: the reader raised {outcome!r}, decoding it alone gives "
                    f"{want.message}",
                )
            else:
                require(
                    isinstance(outcome, ConnectionClosed),
                    f"after {index} messages the stream ended, the reader raised {outcome!r}",
                )
            require(index == len(got) - 1, "the reader went on after an error")
            return
        require(index < len(expected), f"message {index} read past the stream's messages")
        want = expected[index]
        require(
            want.message is not None and not want.truncated,
            f"message {index} decoded as {outcome}, yet it should fail",
        )
        assert want.message is not None
        received = tuple(os.fstat(fd).st_ino for fd in outcome.fds)
        for fd in outcome.fds:
            os.close(fd)
        require(
            received == tuple(inodes[i] for i in want.inodes),
            f"message {index}: fds {received} received, {want.inodes} sent with it",
        )
        require(
            (outcome.request, outcome.flags, outcome.payload)
            == (want.message.request, want.message.flags, want.message.payload),
            f"message {index}: {outcome} differs from decoding its bytes alone",
        )
        again = wire.encode_payload(outcome.payload)
        require(
            len(again) == len(wire.encode_payload(want.message.payload)),
            f"message {index}: payload does not encode back to its size",
        )
    raise AssertionError("the reader stopped without an error or the end of the stream")

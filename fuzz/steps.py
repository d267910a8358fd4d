"""Random steps for :class:`fuzz.world.World`, drawn from a :class:`fuzz.source.Source`.

Each step logs itself as the line of Python that replays it (``world.kick(3)``), so a
failing run reads as a script and a minimal one becomes a regression test as it is.
Plausible values come more often than wild ones: a frontend that breaks the protocol ends
its connection, and the interesting states lie behind a working one.
"""

from __future__ import annotations

from collections.abc import Callable

from balloond import wire
from balloond.balloon import Balloon
from balloond.protocol import SUPPORTED_PROTOCOL_FEATURES
from balloond.wire import Request
from fuzz.guest import (
    HIGH_GPA,
    HIGH_SIZE,
    LOW_SIZE,
    MAX_RING,
    PAGE,
    RING_AREA,
    RINGS,
    UADDR_BASE,
    GiB,
    MiB,
)
from fuzz.source import Exhausted, Source, choice, flag, number, weighted
from fuzz.world import (
    FD_KINDS,
    PROTOCOL_FEATURES,
    VERSION_1,
    World,
)


def _ring(source: Source) -> int:
    return number(source, range(RINGS), 0, 300)


def _size(source: Source) -> int:
    return choice(source, (1, 2, 4, 8, 16, 32, 64))


def _features(source: Source) -> int:
    if source.int(0, 7) == 0:
        return source.int(0, 2**64 - 1)
    offered = Balloon().device_features | 1 << PROTOCOL_FEATURES
    bits = source.int(0, 2**40 - 1) & offered
    return bits | 1 << VERSION_1 | (1 << PROTOCOL_FEATURES if source.int(0, 3) else 0)


def _gpa(source: Source) -> int:
    special = (
        0, PAGE, 2 * MiB, 4 * MiB, LOW_SIZE - PAGE, LOW_SIZE - 2 * MiB, LOW_SIZE, 3 * GiB,
        HIGH_GPA, HIGH_GPA + PAGE, HIGH_GPA + HIGH_SIZE - PAGE, HIGH_GPA + HIGH_SIZE,
        2**64 - PAGE, RING_AREA,
    )  # fmt: skip
    base = number(source, special, 0, 2**64 - 1)
    if source.int(0, 3) == 0:
        base += source.int(-PAGE, PAGE)
    elif source.int(0, 1):
        base += PAGE * source.int(0, 64)
    return base % 2**64


def _length(source: Source) -> int:
    return number(source, (PAGE, 2 * PAGE, 2 * MiB, 0, 1, 4 * MiB, 2**32 - 1), 0, 2**32 - 1)


def _frame(source: Source) -> int:
    special = (0, 1, 0x700, (LOW_SIZE >> 12) - 1, LOW_SIZE >> 12, HIGH_GPA >> 12,
               (HIGH_GPA + HIGH_SIZE) >> 12, 2**32 - 1)  # fmt: skip
    near = source.int(0, 8) if source.int(0, 1) else 0
    return (number(source, special, 0, 2**32 - 1) + near) % 2**32


def _desc(source: Source) -> tuple[int, int, int, int]:
    return (_gpa(source), _length(source), source.int(0, 7), number(source, (0, 1, 2), 0, 0xFFFF))


def _fd_kind(source: Source, usual: str) -> str:
    return usual if source.int(0, 3) else choice(source, FD_KINDS)


def _step_boot(world: World, source: Source) -> None:
    features, sizes = _features(source), {i: _size(source) for i in range(5)}
    world.log(f"world.boot({features:#x}, {sizes})")
    world.boot(features, sizes)


def _step_start_ring(world: World, source: Source) -> None:
    index, size, enable = source.int(0, RINGS - 1), _size(source), source.int(0, 4) > 0
    world.log(f"world.start_ring({index}, {size}, enable={enable})")
    world.start_ring(index, size, enable=enable)


def _step_stop_ring(world: World, source: Source) -> None:
    index = source.int(0, RINGS - 1)
    world.log(f"world.stop_ring({index})")
    world.stop_ring(index)


def _step_mem_table(world: World, source: Source) -> None:
    layout = choice(source, ("truth", "low", "split", "random"))
    regions: tuple[tuple[int, int, int, int, str], ...] = ()
    if layout == "random":
        regions = tuple(
            (_gpa(source), _length(source) or PAGE, number(source, (UADDR_BASE,), 0, 2**64 - 1),
             number(source, (0, PAGE, MiB), 0, 2**64 - 1), _fd_kind(source, "low"))
            for _ in range(source.int(1, 3))
        )  # fmt: skip
    world.log(f"world.set_mem_table({layout!r}, {regions})")
    world.set_mem_table(layout, regions)


def _step_request(world: World, source: Source) -> None:
    """One request with a payload drawn for its kind: mostly plausible, sometimes wild."""
    request = choice(source, sorted(REQUESTS))
    payload, fds = REQUESTS[request](world, source)
    need_reply = flag(source)
    world.log(f"world.request(Request.{request.name}, {payload!r}, {fds}, need_reply={need_reply})")
    world.request(request, payload, fds, ring=getattr(payload, "index", 0), need_reply=need_reply)


def _step_raw(world: World, source: Source) -> None:
    """Any header, any body, any fds: the decoder decides."""
    request = number(source, [int(r) for r in Request], 0, 2**32 - 1)
    flags = number(source, (1, 9, 5, 0, 2), 0, 2**32 - 1)
    body = source.bytes(280)
    fds = tuple(choice(source, FD_KINDS) for _ in range(source.int(0, 3)))
    world.log(f"world.request({request}, None, {fds}, body={body!r}, flags={flags:#x})")
    world.request(request, None, fds, body=body, flags=flags)


def _step_chain(world: World, source: Source) -> None:
    index = number(source, range(RINGS), 0, RINGS - 1)
    kind = choice(source, ("report", "inflate", "deflate", "stats"))
    indirect = flag(source)
    if kind == "report":
        buffers = tuple((_gpa(source), _length(source)) for _ in range(source.int(1, 8)))
        world.log(f"world.add_chain({index}, 'report', {buffers}, indirect={indirect})")
        world.add_chain(index, "report", buffers, indirect=indirect)
    elif kind == "stats":
        entries = tuple(
            (source.int(0, 17), source.int(0, 2**64 - 1)) for _ in range(source.int(0, 12))
        )
        cut = source.int(0, 130)
        world.log(f"world.stats({index}, {entries}, cut={cut})")
        world.stats(index, entries, cut)
    else:
        frames = tuple(_frame(source) for _ in range(source.int(1, 64)))
        cut = source.int(0, 260)
        world.log(f"world.{kind}({index}, {frames}, cut={cut}, indirect={indirect})")
        getattr(world, kind)(index, frames, cut, indirect)


def _step_garbage(world: World, source: Source) -> None:
    index = source.int(0, RINGS - 1)
    head = number(source, (0, 1, 2, 63, 64), 0, 0xFFFF)
    descriptors = tuple(
        (source.int(0, MAX_RING - 1), *_desc(source)) for _ in range(source.int(0, 4))
    )
    table = tuple(_desc(source) for _ in range(source.int(0, 6)))
    world.log(f"world.garbage({index}, {head}, {descriptors}, {table})")
    world.garbage(index, head, descriptors, table)


def _step_republish(world: World, source: Source) -> None:
    index = source.int(0, RINGS - 1)
    ring = world.rings[index]
    heads = sorted(ring.outstanding.elements()) or [0]
    head = choice(source, heads)
    world.log(f"world.garbage({index}, {head}, ())")
    world.garbage(index, head, ())


def _step_jump(world: World, source: Source) -> None:
    index, count = source.int(0, RINGS - 1), number(source, (1, 2, 65), 0, 70)
    world.log(f"world.jump({index}, {count})")
    world.jump(index, count)


def _step_scribble(world: World, source: Source) -> None:
    index = source.int(0, RINGS - 1)
    where = choice(source, ("avail_flags", "used_event", "avail_event"))
    value = source.int(0, 0xFFFF)
    world.log(f"world.scribble({index}, {where!r}, {value})")
    world.scribble(index, where, value)


def _step_kick(world: World, source: Source) -> None:
    index = number(source, range(RINGS), 0, 300)
    world.log(f"world.kick({index})")
    world.kick(index)


def _step_turn(world: World, source: Source) -> None:
    world.log("world.turn()")
    world.turn()


def _step_complete(world: World, source: Source) -> None:
    which, fail = source.int(0, 63), source.int(0, 7) == 0
    world.log(f"world.complete({which}, fail={fail})")
    world.complete(which, fail)


def _step_quiesce(world: World, source: Source) -> None:
    world.log("world.quiesce()")
    world.quiesce()


def _step_request_stats(world: World, source: Source) -> None:
    world.log("world.request_stats()")
    world.request_stats()


def _step_set_target(world: World, source: Source) -> None:
    pages = number(source, (0, 1, 256, 2048), 0, 2**20)
    world.log(f"world.set_target({pages})")
    world.set_target(pages)


def _step_poison(world: World, source: Source) -> None:
    """The driver writes ``poison_val`` (it poisons free pages, or stops)."""
    value = number(source, (0xAA, 0), 0, 2**32 - 1)
    world.log(f"world.poison({value:#x})")
    world.poison(value)


def _step_reconnect(world: World, source: Source) -> None:
    world.log("world.reconnect()")
    world.reconnect()


def _vring_state(world: World, source: Source, usual: int) -> tuple[wire.Payload, tuple[str, ...]]:
    return wire.VringState(_ring(source), number(source, (usual, 0, 1), 0, 2**32 - 1)), ()


def _vring_file(kind: str) -> Callable[[World, Source], tuple[wire.Payload, tuple[str, ...]]]:
    def draw(world: World, source: Source) -> tuple[wire.Payload, tuple[str, ...]]:
        nofd = source.int(0, 5) == 0
        return wire.VringFile(_ring(source), nofd), () if nofd else (_fd_kind(source, kind),)

    return draw


def _region(source: Source) -> wire.MemoryRegion:
    if source.int(0, 2):
        return wire.MemoryRegion(HIGH_GPA, HIGH_SIZE, UADDR_BASE + HIGH_GPA, 0)
    return wire.MemoryRegion(_gpa(source), _length(source) or 1, _gpa(source), _gpa(source) % MiB)


def _config(source: Source) -> wire.ConfigSpace:
    offset = number(source, (0, 4, 12, 16), 0, 2**32 - 1)
    data = source.bytes(20)
    return wire.ConfigSpace(offset, len(data), 0, data)


def _config_window(source: Source) -> wire.ConfigSpace:
    offset, size = number(source, (0, 4, 16), 0, 2**32 - 1), source.int(0, 24)
    return wire.ConfigSpace(offset, size, 0, bytes(size))


def _vring_addr(world: World, source: Source) -> tuple[wire.Payload, tuple[str, ...]]:
    index = _ring(source)
    if index < RINGS and source.int(0, 3):
        return world.rings[index].uaddr(), ()
    uaddr = [(UADDR_BASE if source.int(0, 1) else 0) + _gpa(source) & (2**64 - 1) for _ in range(3)]
    return wire.VringAddr(index, source.int(0, 1), uaddr[0], uaddr[1], uaddr[2], 0), ()


REQUESTS: dict[Request, Callable[[World, Source], tuple[wire.Payload, tuple[str, ...]]]] = {
    Request.GET_FEATURES: lambda w, s: (None, ()),
    Request.SET_FEATURES: lambda w, s: (_features(s), ()),
    Request.SET_OWNER: lambda w, s: (None, ()),
    Request.RESET_OWNER: lambda w, s: (None, ()),
    Request.RESET_DEVICE: lambda w, s: (None, ()),
    Request.GET_PROTOCOL_FEATURES: lambda w, s: (None, ()),
    Request.SET_PROTOCOL_FEATURES: lambda w, s: (
        s.int(0, 2**64 - 1) & (SUPPORTED_PROTOCOL_FEATURES if s.int(0, 5) else 2**64 - 1),
        (),
    ),
    Request.GET_QUEUE_NUM: lambda w, s: (None, ()),
    Request.GET_MAX_MEM_SLOTS: lambda w, s: (None, ()),
    Request.ADD_MEM_REG: lambda w, s: (_region(s), (_fd_kind(s, "high"),)),
    Request.REM_MEM_REG: lambda w, s: (_region(s), ()),
    Request.SET_VRING_NUM: lambda w, s: (
        wire.VringState(_ring(s), number(s, (1, 16, 64, 3, 0, 32768, 65536), 0, 2**32 - 1)),
        (),
    ),
    Request.SET_VRING_BASE: lambda w, s: _vring_state(w, s, 0),
    Request.GET_VRING_BASE: lambda w, s: _vring_state(w, s, 0),
    Request.SET_VRING_ADDR: _vring_addr,
    Request.SET_VRING_KICK: _vring_file("kick"),
    Request.SET_VRING_CALL: _vring_file("call"),
    Request.SET_VRING_ERR: _vring_file("err"),
    Request.SET_VRING_ENABLE: lambda w, s: _vring_state(w, s, 1),
    Request.GET_CONFIG: lambda w, s: (_config_window(s), ()),
    Request.SET_CONFIG: lambda w, s: (_config(s), ()),
    Request.SET_BACKEND_REQ_FD: lambda w, s: (None, (_fd_kind(s, "socket"),)),
    Request.SET_STATUS: lambda w, s: (number(s, (0, 15, 0x8F, 256), 0, 2**64 - 1), ()),
    Request.GET_STATUS: lambda w, s: (None, ()),
}

#: (weight, step): the guest and the server's duties are most of what happens.
STEPS: tuple[tuple[int, Callable[[World, Source], None]], ...] = (
    (10, _step_chain),
    (8, _step_kick),
    (6, _step_complete),
    (3, _step_boot),
    (3, _step_start_ring),
    (2, _step_stop_ring),
    (4, _step_request),
    (1, _step_mem_table),
    (1, _step_raw),
    (2, _step_garbage),
    (1, _step_republish),
    (1, _step_jump),
    (1, _step_scribble),
    (2, _step_turn),
    (1, _step_quiesce),
    (1, _step_request_stats),
    (1, _step_set_target),
    (1, _step_poison),
    (1, _step_reconnect),
)


#: Only what a running guest and the server do: no request of the frontend.
GUEST_STEPS: tuple[tuple[int, Callable[[World, Source], None]], ...] = (
    (10, _step_chain),
    (6, _step_kick),
    (6, _step_complete),
    (1, _step_turn),
    (1, _step_request_stats),
)


def step(
    world: World,
    source: Source,
    choices: tuple[tuple[int, Callable[[World, Source], None]], ...] = STEPS,
) -> None:
    """One step drawn from ``source``: a request, a guest action, or a server duty."""
    action = weighted(source, choices)
    action(world, source)


def run(source: Source, *, log: Callable[[str], None] | None = None, steps: int = 200) -> World:
    """One whole run: a world, steps until ``source`` runs dry (or ``steps``), the drain."""
    world = World(log)
    try:
        for _ in range(steps):
            step(world, source)
    except Exhausted:
        pass
    except BaseException:
        world.abandon()
        raise
    try:
        world.finish()
    except BaseException:
        world.abandon()
        raise
    return world

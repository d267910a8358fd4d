"""The vhost-user state machine without sockets: messages in, replies and ring activity out."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from balloond import wire
from balloond.balloon import TURN_CHAINS, Balloon
from balloond.discard import Discarder
from balloond.errors import FrontendError
from balloond.protocol import VhostUserBackend
from balloond.wire import Request
from tests.frontend import GuestRam, Ring

FEATURES = 1 << 32 | 1 << 30 | 1 << 1 | 1 << 5


@pytest.fixture
def engine() -> Iterator[tuple[VhostUserBackend, GuestRam, Ring]]:
    ram = GuestRam(low=8 << 20, high=0)
    ring = Ring(ram, 0, size=64)
    backend = VhostUserBackend(Balloon())
    yield backend, ram, ring
    backend.close()
    ring.close()
    ram.close()


def send(
    backend: VhostUserBackend,
    request: Request,
    payload: wire.Payload = None,
    fds: tuple[int, ...] = (),
    *,
    need_reply: bool = False,
) -> wire.Message:
    data = wire.encode_request(request, payload, need_reply=need_reply)
    header = wire.decode_header(data[: wire.HEADER_SIZE])
    message = wire.decode_message(header, data[wire.HEADER_SIZE :], fds)
    return message


def step(backend: VhostUserBackend, name: str, ram: GuestRam, ring: Ring) -> tuple[int, ...]:
    """Apply one named step of a frontend script; returns the rings it activated."""
    steps: dict[str, tuple[Request, wire.Payload, tuple[int, ...]]] = {
        "features": (Request.SET_FEATURES, FEATURES, ()),
        "features-no-enable-bit": (Request.SET_FEATURES, FEATURES & ~(1 << 30), ()),
        "memory": (
            Request.SET_MEM_TABLE,
            wire.MemoryTable((ram.regions[0].spec,)),
            (os.dup(ram.regions[0].fd),),
        ),
        "num": (Request.SET_VRING_NUM, wire.VringState(0, ring.size), ()),
        "addr": (Request.SET_VRING_ADDR, ring.addr(), ()),
        "kick": (Request.SET_VRING_KICK, wire.VringFile(0, False), (os.dup(ring.kick),)),
        "enable": (Request.SET_VRING_ENABLE, wire.VringState(0, 1), ()),
        "disable": (Request.SET_VRING_ENABLE, wire.VringState(0, 0), ()),
        "get-base": (Request.GET_VRING_BASE, wire.VringState(0, 0), ()),
        "reset": (Request.RESET_DEVICE, None, ()),
    }
    request, payload, fds = steps[name]
    return backend.handle(send(backend, request, payload, fds)).activated


SETUP = ["memory", "num", "addr"]


def start(backend: VhostUserBackend, ram: GuestRam, ring: Ring) -> None:
    """Ring 0 started and enabled, as QEMU does at DRIVER_OK."""
    for name in ["features", *SETUP, "kick", "enable"]:
        step(backend, name, ram, ring)


#: (frontend script, whether ring 0 is active at the end)
SCRIPTS = [
    (["features", *SETUP, "kick"], False),  # bit 30: rings start disabled
    (["features", *SETUP, "kick", "enable"], True),
    (["features", *SETUP, "enable", "kick"], True),  # enable may come first
    (["features-no-enable-bit", *SETUP, "kick"], True),  # no bit 30: enabled at start
    ([*SETUP, "kick", "enable"], False),  # no SET_FEATURES yet: the driver is not ready
    ([*SETUP, "kick", "enable", "features"], True),
    (["features", *SETUP, "kick", "enable", "disable"], False),
    (["features", *SETUP, "kick", "enable", "disable", "enable"], True),
    (["features", *SETUP, "kick", "enable", "get-base"], False),
    (["features", *SETUP, "kick", "enable", "get-base", "kick"], True),  # cont
    (["features", *SETUP, "kick", "enable", "reset"], False),
]


@pytest.mark.parametrize(("script", "active"), SCRIPTS, ids=[" ".join(s) for s, _ in SCRIPTS])
def test_ring_activity_follows_the_frontend_script(
    engine: tuple[VhostUserBackend, GuestRam, Ring], script: list[str], active: bool
) -> None:
    backend, ram, ring = engine
    activated: list[int] = []
    for name in script:
        activated.extend(step(backend, name, ram, ring))
    assert (0 in backend.watched_kicks().values()) == active
    if active:
        assert activated[-1] == 0, "the last activation is reported so the ring is processed"


def test_get_vring_base_answers_the_next_available_index(
    engine: tuple[VhostUserBackend, GuestRam, Ring],
) -> None:
    backend, ram, ring = engine
    start(backend, ram, ring)
    frames = ram.alloc(4)
    ram.write(frames, (0x700).to_bytes(4, "little"))  # inflate one page at 7 MiB
    for _ in range(3):
        ring.add_chain([(frames, 4)], writable=False)
    jobs = backend.kicked(0).jobs
    assert [job.requested for job in jobs] == [4096] * 3
    for job in jobs:
        backend.complete(job, Discarder().discard(job.ranges))
    assert ring.used_idx() == 0, "pushed, not yet published"
    backend.signals()
    assert ring.used_idx() == 3
    outcome = backend.handle(send(backend, Request.GET_VRING_BASE, wire.VringState(0, 0)))
    assert outcome.reply == wire.encode_reply(
        Request.GET_VRING_BASE, wire.encode_vring_state(wire.VringState(0, 3))
    )


def test_reply_ack_only_when_negotiated_and_asked(
    engine: tuple[VhostUserBackend, GuestRam, Ring],
) -> None:
    backend, _, _ = engine
    ask = send(backend, Request.SET_OWNER, need_reply=True)
    assert backend.handle(ask).reply is None  # REPLY_ACK not negotiated yet
    backend.handle(send(backend, Request.SET_PROTOCOL_FEATURES, 1 << 3))
    assert backend.handle(ask).reply == wire.encode_reply(Request.SET_OWNER, wire.encode_u64(0))
    assert backend.handle(send(backend, Request.SET_OWNER)).reply is None


def test_ring_setup_on_a_started_ring_is_a_protocol_breach(
    engine: tuple[VhostUserBackend, GuestRam, Ring],
) -> None:
    backend, ram, ring = engine
    for name in ["features", *SETUP, "kick"]:
        step(backend, name, ram, ring)
    for name in ("num", "addr"):
        with pytest.raises(FrontendError, match="started ring"):
            step(backend, name, ram, ring)


def test_kick_before_memory_is_a_protocol_breach(
    engine: tuple[VhostUserBackend, GuestRam, Ring],
) -> None:
    backend, ram, ring = engine
    for name in ("features", "num", "addr"):
        step(backend, name, ram, ring)
    with pytest.raises(FrontendError, match="not in guest memory"):
        step(backend, "kick", ram, ring)


def _inflate_chains(ram: GuestRam, ring: Ring, count: int) -> None:
    frames = ram.alloc(4)
    ram.write(frames, (0x700).to_bytes(4, "little"))  # one page at 7 MiB
    for _ in range(count):
        ring.add_chain([(frames, 4)], writable=False)


def test_no_ring_or_memory_change_while_a_job_is_out(
    engine: tuple[VhostUserBackend, GuestRam, Ring],
) -> None:
    backend, ram, ring = engine
    start(backend, ram, ring)
    _inflate_chains(ram, ring, 1)
    [job] = backend.kicked(0).jobs
    # A job out names this ring and a region's fd: changing either now would lose its chain
    # or punch a hole in a closed (maybe reused) fd. Config requests are fine.
    for name in ("get-base", "disable", "memory", "reset"):
        with pytest.raises(RuntimeError, match="in flight"):
            step(backend, name, ram, ring)
    config = wire.ConfigSpace(0, 16, 0, bytes(16))
    assert backend.handle(send(backend, Request.GET_CONFIG, config)).reply is not None
    backend.complete(job, Discarder().discard(job.ranges))
    with pytest.raises(RuntimeError, match="unpublished"):
        step(backend, "get-base", ram, ring)
    backend.signals()
    assert ring.used_idx() == 1
    outcome = backend.handle(send(backend, Request.GET_VRING_BASE, wire.VringState(0, 0)))
    assert outcome.reply == wire.encode_reply(
        Request.GET_VRING_BASE, wire.encode_vring_state(wire.VringState(0, 1))
    )


def test_kicks_while_quiescent_wait_for_the_request(
    engine: tuple[VhostUserBackend, GuestRam, Ring],
) -> None:
    backend, ram, ring = engine
    start(backend, ram, ring)
    backend.quiesce()
    _inflate_chains(ram, ring, 2)
    assert backend.kicked(0).jobs == ()  # remembered, not processed: nothing new goes out
    activated = backend.handle(send(backend, Request.GET_FEATURES)).activated
    assert activated == (0,), "the ring kicked meanwhile is processed after the request"
    assert len(backend.kicked(0).jobs) == 2


def test_a_quiescent_ring_stopped_by_the_request_is_not_processed(
    engine: tuple[VhostUserBackend, GuestRam, Ring],
) -> None:
    backend, ram, ring = engine
    start(backend, ram, ring)
    backend.quiesce()
    _inflate_chains(ram, ring, 2)
    backend.kicked(0)
    outcome = backend.handle(send(backend, Request.GET_VRING_BASE, wire.VringState(0, 0)))
    assert outcome.activated == ()
    # The chains were never popped: the frontend's base tells the next start to begin there.
    assert outcome.reply == wire.encode_reply(
        Request.GET_VRING_BASE, wire.encode_vring_state(wire.VringState(0, 0))
    )


# --- turns: a budget that runs out strands nothing ----------------------------------------

EVENT_IDX = 1 << 29


def _linux_adds(ram: GuestRam, ring: Ring, frames: int, count: int) -> tuple[list[int], bool]:
    """Make ``count`` inflate chains available as Linux does with EVENT_IDX; returns their
    heads and whether the driver kicks (``vring_need_event`` against ``avail_event``)."""
    old = ring.avail_idx
    heads = [ring.add_chain([(frames, 4)], writable=False) for _ in range(count)]
    new = ring.avail_idx
    avail_event = int.from_bytes(ram.read(ring.used + 4 + 8 * ring.size, 2), "little")
    return heads, (new - avail_event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _serve(backend: VhostUserBackend, index: int) -> list[int]:
    """What the server does for one kick: turns until none is left over (``more``), every
    job completed and published. Returns the number of jobs of each turn."""
    turns: list[int] = []
    while True:
        processed = backend.kicked(index)
        turns.append(len(processed.jobs))
        for job in processed.jobs:
            backend.complete(job, Discarder().discard(job.ranges))
        backend.signals()
        if not processed.more:
            return turns


@pytest.mark.parametrize(
    "count",
    [1, TURN_CHAINS - 1, TURN_CHAINS, TURN_CHAINS + 1, 2 * TURN_CHAINS, 3 * TURN_CHAINS + 1, 64],
)
def test_a_turn_that_stops_early_is_resumed_and_strands_no_chain(
    engine: tuple[VhostUserBackend, GuestRam, Ring], count: int
) -> None:
    backend, ram, ring = engine
    backend.handle(send(backend, Request.SET_FEATURES, FEATURES | EVENT_IDX))
    for name in [*SETUP, "kick", "enable"]:
        step(backend, name, ram, ring)
    frames = ram.alloc(4)
    ram.write(frames, (0x700).to_bytes(4, "little"))
    for batch in range(6):  # each batch after the last one's chains all came back
        heads, kicks = _linux_adds(ram, ring, frames, count)
        if kicks:
            turns = _serve(backend, 0)
            assert max(turns) <= TURN_CHAINS, f"a turn took {max(turns)} chains"
            assert sum(turns) == count
        used = ring.used_idx()
        assert used == ring.avail_idx, (
            f"batch {batch} of {count}: {(ring.avail_idx - used) & 0xFFFF} chains stranded "
            f"(the driver {'kicked' if kicks else 'did not kick'})"
        )
        returned = [head for head, _ in ring.wait_used(count, timeout=0)]
        assert sorted(returned) == sorted(heads), "each chain back exactly once"

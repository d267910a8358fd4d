"""Property tests over the three places untrusted bytes enter the engine, with hypothesis.

The targets and their invariants live in ``fuzz/`` (shared with the atheris harness,
``python -m fuzz``; see docs/fuzzing.md): the vhost-user byte stream with fds through the
server's own framing (``fuzz/streams.py``), the protocol engine over sequences of
requests, guest actions and job completions against a real ``VhostUserBackend(Balloon())``
with memfd guest memory and eventfds (``fuzz/world.py`` and the modules it uses), and the ring
walker against a reference over arbitrary rings (``fuzz/rings.py``). Hypothesis draws
each target's choices; a failure shrinks to a short script of ``world.…`` calls (see the
notes it prints), which pastes into a regression test below as it is.

The regression tests at the end are bugs the properties and the campaign found, fixed in
balloond/ since; each would fail again if one came back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from balloond.wire import Request
from fuzz import rings, steps, streams
from fuzz.guest import HIGH_GPA, MiB
from fuzz.known import known
from fuzz.source import Exhausted
from fuzz.world import Violation, World, world


def common(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


#: Virtio feature bits: VERSION_1, PROTOCOL_FEATURES (vhost-user), INDIRECT_DESC,
#: STATS_VQ, PAGE_REPORTING: what Linux's balloon negotiates with balloond.
LINUX = 1 << 32 | 1 << 30 | 1 << 28 | 1 << 1 | 1 << 5


class Draws:
    """A :class:`fuzz.source.Source` over hypothesis's ``data`` (shrinks to simple values)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def int(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def bytes(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """A hostile guest makes the device warn on every step; keep the output readable."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@common(300)
@given(st.data())
def test_any_byte_stream_with_fds_frames_like_its_messages_alone(data: st.DataObject) -> None:
    streams.run(Draws(data))


@common(100)
@given(st.data())
def test_any_ring_walks_like_the_reference_and_returns_each_chain_once(
    data: st.DataObject,
) -> None:
    rings.run(Draws(data))


@common(60)
@given(st.data())
def test_any_sequence_of_requests_guest_actions_and_completions_keeps_the_invariants(
    data: st.DataObject,
) -> None:
    try:
        steps.run(Draws(data), log=note, steps=60)
    except Exhausted:
        pass
    except AssertionError as error:
        if known(error) is None:
            raise
        # A bug already reported, with its own failing test below: explore past it.


@common(40)
@given(st.data())
def test_a_linux_like_guest_keeps_the_invariants(data: st.DataObject) -> None:
    """The same, from a booted device with Linux's features: deep states come sooner."""
    w = World(note)
    try:
        source = Draws(data)
        poisons = data.draw(st.booleans(), label="guest poisons free pages")
        w.boot(LINUX | (1 << 4 if poisons else 0), {0: 16, 1: 16, 2: 8, 3: 32})
        if poisons:
            w.poison(0xAA)
        for _ in range(40):
            steps.step(w, source)
        w.finish()
    except AssertionError as error:
        w.abandon()
        if known(error) is None:
            raise
    except BaseException:
        w.abandon()
        raise


@common(40)
@given(st.data())
def test_a_running_guest_discards_only_what_it_reports_or_inflates(data: st.DataObject) -> None:
    """Only the guest and the server at work (reports, inflates, deflates, statistics of
    any buffers, kicks, completions in any order), poisoning free pages or not."""
    w = World(note)
    try:
        source = Draws(data)
        poisons = data.draw(st.booleans(), label="guest poisons free pages")
        w.boot(LINUX | (1 << 4 if poisons else 0), {0: 16, 1: 16, 2: 8, 3: 32})
        if poisons:
            w.poison(0xAA)
        for _ in range(30):
            steps.step(w, source, steps.GUEST_STEPS)
        w.finish()
    except AssertionError as error:
        w.abandon()
        if known(error) is None:
            raise
    except BaseException:
        w.abandon()
        raise


# --- the oracle has teeth: a booted guest's work is seen and checked ------------------------


def test_reported_and_inflated_memory_is_what_the_engine_asks_to_discard() -> None:
    with world() as w:
        w.boot(LINUX, {0: 16, 1: 16, 2: 8, 3: 32})
        w.add_chain(3, "report", ((2 * MiB, 2 * MiB), (HIGH_GPA, 2 * MiB)), indirect=True)
        w.inflate(0, (0x700, 0x701, 0x703, 1 << 31))  # the last is outside guest RAM
        w.deflate(1, (0x700,))
        w.stats(2, ((4, 1 << 30),))
        for index in range(4):
            w.kick(index)
        assert sorted((job.queue, job.head) for job, _ in w.jobs) == [(0, 0), (3, 0)]
        w.complete(0)
        w.complete(0)
    assert sorted(w.discarded) == [
        (2 * MiB, 2 * MiB),
        (0x700 << 12, 2 << 12),
        (0x703 << 12, 1 << 12),
        (HIGH_GPA, 2 * MiB),
    ]


def test_a_discard_outside_what_the_guest_reported_is_caught() -> None:
    """The world's check itself: a job naming memory the chain did not report fails."""
    w = World()
    try:
        w.boot(LINUX, {0: 16, 1: 16, 2: 8, 3: 32})
        w.add_chain(3, "report", ((2 * MiB, 2 * MiB),))
        w.kick(3)
        [(_, allowed)] = w.jobs
        allowed["spans"] = [(2 * MiB, 1 * MiB)]  # as if the guest had reported only half
        with pytest.raises(Violation, match="not all of it reported"):
            w.complete(0)
    finally:
        w.abandon()


# --- bugs found (fixed: each fails if it comes back) ----------------------------------------


@pytest.mark.parametrize("then", ["stop", "next_stats", "refresh"])
def test_a_held_stats_buffer_survives_a_memory_table_change(then: str) -> None:
    with world() as w:
        w.boot(LINUX, {0: 16, 1: 16, 2: 8, 3: 32})
        w.stats(2, ((4, 1 << 30),))
        w.kick(2)  # the device holds the guest's statistics buffer
        w.set_mem_table("truth")  # the same table again (QEMU: any memory hotplug)
        if then == "stop":
            w.stop_ring(2)  # SET_VRING_ENABLE 0: un-popping a head not held
        elif then == "next_stats":
            w.stats(2, ((4, 1 << 29),))
            w.kick(2)  # the old buffer goes back: pushing a head not held
        else:
            w.request_stats()  # balloond stats --refresh: the same


def test_a_stop_after_a_malformed_stats_chain_returns_each_chain_once() -> None:
    with world() as w:
        w.boot(LINUX, {0: 16, 1: 16, 2: 8, 3: 32})
        w.stats(2, ((4, 1 << 30),))  # head 0: held by the device
        w.add_chain(2, "report", ((2 * MiB, 4096),))  # head 1: device-writable, malformed here
        w.kick(2)  # pops 0 (held) and 1 (completed unused at once)
        w.stop_ring(2)  # answers 1: chain 1 was popped and returned, chain 0 never


def test_new_features_under_a_held_stats_buffer_return_it() -> None:
    with world() as w:
        w.boot(LINUX, {0: 16, 1: 16, 2: 8, 3: 32})
        w.stats(2, ((4, 1 << 30),))
        w.kick(2)  # the device holds the guest's statistics buffer on ring 2
        w.request(Request.SET_FEATURES, LINUX & ~(1 << 1))  # no STATS_VQ: 2 is reporting now
        w.stop_ring(2)  # answers 1: chain 0 popped, never returned


def test_an_indirect_table_as_long_as_the_ring_is_walked() -> None:
    with world() as w:
        w.boot(LINUX, {0: 16, 1: 16, 2: 8, 3: 32})
        report = tuple((2 * MiB + i * 4096, 4096) for i in range(32))
        w.add_chain(3, "report", report, indirect=True)  # what Linux sends, capacity 32
        w.kick(3)
        device = w.backend.device
        assert device.state.counters.bad_chains == 0  # type: ignore[attr-defined]
        assert len(w.jobs) == 1

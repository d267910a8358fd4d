"""A backend carried on from its state record (``VhostUserBackend.restore`` and ``resume``):
what the successor process of a reload, or of a death, does with the rings it finds.

The engine of ``tests/test_record.py`` holds a statistics buffer and has an inflate job out
when its record is captured; the successor gets the record's fds through real SCM_RIGHTS."""

from __future__ import annotations

import os
import struct

from balloond.balloon import Balloon, BalloonOptions
from balloond.discard import Discarder
from balloond.protocol import VhostUserBackend
from balloond.record import DeviceRecord, capture, decode, encode, restore_state
from tests.frontend import MiB, Ring
from tests.test_record import Engine, pass_fds

PAGE = 4096


def used_heads(engine: Engine, ring: Ring) -> list[int]:
    """The heads of the used ring's elements, up to its used index."""
    return [
        struct.unpack("<II", engine.ram.read(ring.used + 4 + 8 * i, 8))[0]
        for i in range(ring.used_idx())
    ]


def successor(record: DeviceRecord) -> tuple[VhostUserBackend, Balloon]:
    data, fds = encode(record)
    restored = restore_state(decode(data, pass_fds(fds)))
    balloon = Balloon(BalloonOptions(deflate_on_oom=True), state=restored.balloon)
    return VhostUserBackend.restore(balloon, restored.backend, restored.regions), balloon


def test_a_chain_held_in_the_record_is_handled_again_and_returned_once() -> None:
    """The process died with an inflate job out (its discard not run): the successor makes
    the job again from the head the record holds, frees the pages, and returns the chain
    once; the statistics buffer stays held; nothing else comes back twice."""
    engine = Engine()
    inflate, _, stats, reporting = engine.rings
    try:
        before = (inflate.used_idx(), stats.used_idx(), reporting.used_idx())
        assert before == (1, 0, 1)
        engine.ram.write(9 * MiB, b"\xaa" * (2 * PAGE))  # the pages the held chain names
        record = capture(engine.backend, engine.balloon, "vm0", socket=engine.conn.fileno())
        backend, balloon = successor(record)
        try:
            processed = backend.resume()
            assert [job.head for job in processed.jobs] == [engine.out.head]
            for job in processed.jobs:
                backend.complete(job, Discarder().discard(job.ranges))
            backend.signals()
            assert engine.ram.read(9 * MiB, 2 * PAGE) == bytes(2 * PAGE), "discarded again"
            assert inflate.used_idx() == 2
            heads = used_heads(engine, inflate)
            assert len(set(heads)) == 2 and engine.out.head in heads, heads
            assert stats.used_idx() == 0 and balloon.state.stats_head is not None
            assert reporting.used_idx() == 1
            assert sorted(backend.call_fds()) == sorted(
                v.call_fd for v in backend.state.vrings.values() if v.call_fd is not None
            )
        finally:
            backend.close()
    finally:
        engine.close()


def test_a_used_index_far_behind_the_record_gives_that_ring_up() -> None:
    """Guest memory's used index more than a ring's worth behind the record: the ring was
    not what the record says (corrupt, or another ring), and only that ring is given up,
    with its error eventfd signalled."""
    engine = Engine()
    inflate = engine.rings[0]
    try:
        record = capture(engine.backend, engine.balloon, "vm0", socket=engine.conn.fileno())
        backend, _ = successor(record)
        try:
            engine.ram.write(inflate.used + 2, struct.pack("<H", 0x8000))
            backend.resume()
            assert backend.state.vrings[0].broken is not None
            assert os.eventfd_read(engine.errs[0]) == 1
            assert backend.active_rings() == [1, 2, 3]
        finally:
            backend.close()
    finally:
        engine.close()


def test_a_report_held_with_the_stats_buffers_head_number_is_handled_again() -> None:
    """Heads are per ring: a report held under head 0 while the statistics ring holds its
    buffer under head 0 too is still handled again and returned (a successor once left it
    out, and the guest's reporting waited for it for good)."""
    engine = Engine()
    inflate, _, stats, reporting = engine.rings
    try:
        reporting.free_desc = 0  # head 0 again: the first report came back already
        engine.ram.write(12 * MiB, b"\xbb" * PAGE)
        head = reporting.add_chain([(12 * MiB, 2 * MiB)], writable=True)
        assert head == engine.balloon.state.stats_head == 0
        assert len(engine.backend.kicked(reporting.index).jobs) == 1  # out when it dies
        record = capture(engine.backend, engine.balloon, "vm0", socket=engine.conn.fileno())
        backend, balloon = successor(record)
        try:
            processed = backend.resume()
            held = sorted((job.queue, job.head) for job in processed.jobs)
            assert held == sorted([(inflate.index, engine.out.head), (reporting.index, 0)])
            for job in processed.jobs:
                backend.complete(job, Discarder().discard(job.ranges))
            backend.signals()
            assert reporting.used_idx() == 2 and used_heads(engine, reporting) == [0, 0]
            assert engine.ram.read(12 * MiB, PAGE) == bytes(PAGE), "discarded again"
            assert stats.used_idx() == 0 and balloon.state.stats_head == 0
        finally:
            backend.close()
    finally:
        engine.close()

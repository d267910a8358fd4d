"""The virtio-balloon device: features, config space, and its queues.

The device knows virtio, not vhost-user. Queue roles follow the negotiated features
(compact indices: inflate 0, deflate 1, then stats, free page hinting and reporting, each
only when negotiated). Free page reports and inflated frames become :class:`DiscardJob`
values; their chains go back to the guest (used length 0) once the server has run the
job. Nothing a guest writes can stop a queue for long: a malformed chain is completed with
length 0 and counted.

All of the device's state is one :class:`BalloonState` of plain values.
"""

from __future__ import annotations

import array
import bisect
import logging
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from balloond.device import VIRTIO_F_VERSION_1, DiscardJob
from balloond.discard import DiscardResult
from balloond.discard import coalesce as coalesce_frames
from balloond.errors import GuestError, OperatorError
from balloond.logs import RateLimit
from balloond.memory import GuestMemory, SkippedRange, span_words
from balloond.virtqueue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Chain,
    Virtqueue,
)

log = logging.getLogger(__name__)


class BalloonFeature(IntEnum):
    """Bit numbers of ``VIRTIO_BALLOON_F_*``."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    PAGE_REPORTING = 5


class QueueRole(Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE = "free_page"
    REPORTING = "reporting"


#: Balloon page frame numbers are always in 4 KiB units, whatever the guest's page size.
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT
CONFIG = struct.Struct("<IIII")
CONFIG_SIZE = CONFIG.size
_OFFSET_ACTUAL = 4
_OFFSET_POISON_VAL = 12
#: A stats entry: ``{le16 tag; le64 val}``, packed.
STAT_ENTRY = struct.Struct("<HQ")
#: Descriptors one turn on a queue may read, and chains it may take (see
#: :meth:`Balloon.process`): four chains are about 1 ms of work at most (a 32-entry report
#: planned, or an inflate buffer planned and discarded), so a config request that arrives
#: behind a kick of many chains is read within about that.
TURN_DESCRIPTORS = 256
TURN_CHAINS = 4
#: Linux sends at most 256 frames per inflate/deflate buffer; accept some slack, no more.
MAX_PFNS_PER_CHAIN = 4096
#: Statistics read from a buffer, at most: Linux sends 16 tags (10 bytes each); room for a
#: newer guest's, and not a byte more whatever the buffer's size.
MAX_STATS_BYTES = 32 * 10

#: Statistics tags (``VIRTIO_BALLOON_S_*``) by name; values are bytes where the name says
#: so, pages for the scan/reclaim counters, counts otherwise. 10-15 arrived in Linux 6.12.
STAT_NAMES: dict[int, str] = {
    0: "swap_in_bytes",
    1: "swap_out_bytes",
    2: "major_faults",
    3: "minor_faults",
    4: "free_bytes",
    5: "total_bytes",
    6: "available_bytes",
    7: "disk_caches_bytes",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
    10: "oom_kills",
    11: "alloc_stalls",
    12: "async_scan_pages",
    13: "direct_scan_pages",
    14: "async_reclaim_pages",
    15: "direct_reclaim_pages",
}


def queue_roles(features: int) -> dict[int, QueueRole]:
    """Queue index to role for the negotiated ``features`` (indices are compact)."""
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    for bit, role in (
        (BalloonFeature.STATS_VQ, QueueRole.STATS),
        (BalloonFeature.FREE_PAGE_HINT, QueueRole.FREE_PAGE),
        (BalloonFeature.PAGE_REPORTING, QueueRole.REPORTING),
    ):
        if features & (1 << bit):
            roles.append(role)
    return dict(enumerate(roles))


@dataclass(frozen=True)
class BalloonOptions:
    deflate_on_oom: bool = False
    #: Offer VIRTIO_BALLOON_F_REPORTING (QEMU's ``free-page-reporting`` property).
    free_page_reporting: bool = True


#: Upper bounds (seconds) of the report latency histogram's buckets; the last is +Inf.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5, 5.0)  # fmt: skip


@dataclass
class Histogram:
    """Observations in fixed buckets: ``counts[i]`` are those <= ``LATENCY_BOUNDS[i]`` and
    above the bound before (the last count is above every bound)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BOUNDS, value)] += 1  # the first bound >= value
        self.total += value


@dataclass
class Counters:
    """Totals since the device was created, for status and metrics."""

    reports: int = 0
    reported_bytes: int = 0
    inflated_bytes: int = 0
    deflated_bytes: int = 0
    #: Bytes given back to the host, in all; and the part of it the balloon inflated.
    discarded_bytes: int = 0
    balloon_discarded_bytes: int = 0
    #: Bytes that could not be discarded, by reason.
    skipped_bytes: dict[str, int] = field(default_factory=dict)
    #: Bytes reported but deliberately kept (page poisoning in use).
    kept_bytes: int = 0
    discard_errors: int = 0
    bad_chains: int = 0
    stats_updates: int = 0
    #: Seconds from the kick that brought a report to its buffer's return to the guest.
    report_latency: Histogram = field(default_factory=Histogram)


@dataclass
class BalloonState:
    """The whole device state, serialisable as plain values."""

    ram_size: int = 0
    #: ``num_pages``: how many 4 KiB pages the host asks the guest to give up.
    num_pages: int = 0
    #: ``actual``: how many the guest says it has given up.
    actual: int = 0
    poison_val: int = 0
    features: int | None = None
    #: The stats buffer the device holds (its chain head), if any.
    stats_head: int | None = None
    #: Latest value per stats tag, and when they arrived (``clock()`` time).
    stats: dict[int, int] = field(default_factory=dict)
    stats_time: float | None = None
    #: Huge-page backing: which 4 KiB pieces of each backing page are ballooned so far
    #: (gpa of the backing page -> bitmask of its pieces). A backing page is freed when
    #: all of its pieces are, however many inflate buffers that takes. Valid only while
    #: the driver that inflated them runs: void when the inflate or deflate queue stops
    #: (a pause, a reset and a reboot look alike), on a reset, on new features and when
    #: the memory table changes. Forgetting costs some reclaim; remembering a piece the
    #: guest owns again would free its live data.
    partial_pages: dict[int, int] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)


class Balloon:
    """A virtio-balloon device; fits :class:`balloond.device.VirtioDevice`."""

    max_queues = len(QueueRole)

    def __init__(
        self,
        options: BalloonOptions | None = None,
        *,
        state: BalloonState | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options or BalloonOptions()
        self.state = state or BalloonState()
        self.clock = clock
        self._queues: dict[int, Virtqueue] = {}
        self._roles_of = 0
        self._roles = queue_roles(0)
        #: When the current turn on a queue began (``clock()``): a kick's arrival.
        self._turn_started = 0.0
        #: What a guest can make us log, it may make us log at most this often.
        self._guest_log = RateLimit(clock=clock)
        features = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << BalloonFeature.STATS_VQ
            | 1 << BalloonFeature.PAGE_POISON
        )
        if self.options.free_page_reporting:
            features |= 1 << BalloonFeature.PAGE_REPORTING
        if self.options.deflate_on_oom:
            features |= 1 << BalloonFeature.DEFLATE_ON_OOM
        self.device_features = features

    # --- negotiation and config -----------------------------------------------------------

    def has(self, feature: BalloonFeature) -> bool:
        return self.state.features is not None and bool(self.state.features & (1 << feature))

    @property
    def roles(self) -> dict[int, QueueRole]:
        """Queue index to role, for the features in the state now (worked out again only
        when they change: asked several times per chain)."""
        features = self.state.features or 0
        if features != self._roles_of:
            self._roles, self._roles_of = queue_roles(features), features
        return self._roles

    @property
    def poisoning(self) -> bool:
        """Whether freed guest pages hold a non-zero pattern we must not replace by zeros."""
        return self.has(BalloonFeature.PAGE_POISON) and self.state.poison_val != 0

    def set_features(self, features: int) -> None:
        if self.state.stats_head is not None:
            # New features may give the queues new roles: the buffer held under the old
            # ones goes back to the guest now.
            queue = self._stats_queue()
            if queue is not None:
                queue.push(self.state.stats_head, 0)
            self.state.stats_head = None
        self.state.features = features
        names = [f.name for f in BalloonFeature if features & (1 << f)]
        log.info("driver features: %s (%#x)", ", ".join(names) or "none", features)
        self._forget_guest_pages("the driver set its features")

    def read_config(self) -> bytes:
        s = self.state
        return CONFIG.pack(s.num_pages, s.actual, 0, s.poison_val)

    def write_config(self, offset: int, data: bytes) -> None:
        """Take ``actual`` and ``poison_val`` from a config write; ignore the rest.

        QEMU writes the whole config, filled from the guest's last read, so its
        ``num_pages`` may be stale: the host owns that field.
        """
        current = bytearray(self.read_config())
        end = min(len(current), offset + len(data))
        if offset >= end:
            return
        current[offset:end] = data[: end - offset]
        _, actual, _, poison_val = CONFIG.unpack(current)
        if actual != self.state.actual:
            log.debug("guest balloon actual %d -> %d pages", self.state.actual, actual)
        self.state.actual = actual
        self.state.poison_val = poison_val

    def set_target(self, target_bytes: int, ram_bytes: int) -> None:
        """Ask the guest to shrink to ``target_bytes`` of its ``ram_bytes`` of RAM."""
        if ram_bytes <= 0:
            raise OperatorError("the guest has not shared its memory yet")
        if not 0 <= target_bytes <= ram_bytes:
            raise OperatorError(
                f"target {target_bytes} bytes is outside 0..{ram_bytes} (the guest's RAM)"
            )
        self.state.ram_size = ram_bytes
        self.state.num_pages = (ram_bytes - target_bytes) >> VIRTIO_BALLOON_PFN_SHIFT

    def reset(self) -> None:
        """A driver reset keeps the host's target and the poison value (a pause looks alike);
        what the old driver had ballooned is the new one's memory again."""
        self.state.features = None
        self.state.stats_head = None
        self._forget_guest_pages("the device was reset")

    def memory_changed(self) -> None:
        self._forget_guest_pages("the memory table changed")

    def _forget_guest_pages(self, why: str) -> None:
        """Drop every record that names guest pages ballooned by the driver so far."""
        if self.state.partial_pages:
            log.info(
                "forgetting ballooned pieces of %d huge pages: %s",
                len(self.state.partial_pages),
                why,
            )
            self.state.partial_pages.clear()

    # --- queues ----------------------------------------------------------------------------

    def start_queue(self, index: int, queue: Virtqueue) -> None:
        self._queues[index] = queue

    def stop_queue(self, index: int) -> None:
        queue = self._queues.pop(index, None)
        role = self.roles.get(index)
        if role in (QueueRole.INFLATE, QueueRole.DEFLATE):
            # The driver may be going away (a reset, a reboot, a kexec): the pieces it
            # ballooned are no longer known to be the balloon's.
            self._forget_guest_pages(f"the {role.value} queue stopped")
        if queue is None or role is not QueueRole.STATS:
            return
        if self.state.stats_head is not None:
            # Un-pop the held stats buffer: the next available index the frontend gets
            # back points at it again, so the guest's buffer is not lost over a restart.
            queue.unpop(self.state.stats_head)
            self.state.stats_head = None

    def process(self, index: int) -> Sequence[DiscardJob]:
        queue = self._queues.get(index)
        role = self.roles.get(index)
        if queue is None:
            return ()
        self._turn_started = self.clock()
        jobs: list[DiscardJob] = []
        # A turn is at most TURN_CHAINS chains (and never more than a ring's worth) and
        # TURN_DESCRIPTORS descriptors read (a chain may be as long as the ring): the caller
        # comes back while chains are pending (``pending()`` after the turn), so a guest that
        # keeps its rings full delays the other VMs, and the config requests, by one short
        # turn at most.
        budget = queue.descriptors_read + TURN_DESCRIPTORS
        for _ in range(min(TURN_CHAINS, queue.state.size)):
            if queue.descriptors_read >= budget:
                break
            chain = queue.pop()
            if chain is None:
                if queue.publish_avail_event():
                    continue
                return jobs
            if role is QueueRole.STATS and self.state.stats_head is not None:
                # Whatever the guest offers next, the buffer held so far goes back first:
                # the held buffer is always the last popped, so a stop can un-pop it.
                queue.push(self.state.stats_head, 0)
                self.state.stats_head = None
            self._take(index, role, queue, chain, jobs)
        # The budget ran out. Ask to be kicked for the next chain all the same: if the guest
        # made none available past the ones taken, a later one comes only with a kick, and
        # with EVENT_IDX the guest kicks only past ``avail_event``. (If some are pending,
        # the caller's next turn takes them.)
        queue.publish_avail_event()
        return jobs

    def resume(self, index: int) -> Sequence[DiscardJob]:
        """Carrying on from a state record: the chains queue ``index`` holds (popped and not
        returned by the process before), but the statistics buffer, are handled again.
        Discarding is idempotent; each chain still goes back exactly once."""
        queue = self._queues.get(index)
        if queue is None:
            return ()
        self._turn_started = self.clock()
        role = self.roles.get(index)
        jobs: list[DiscardJob] = []
        # Heads are per ring: only the statistics ring's held buffer is left alone.
        held = {self.state.stats_head} if role is QueueRole.STATS else set()
        for head in sorted(queue.state.in_flight - held):
            self._take(index, role, queue, queue.chain(head), jobs)
        return jobs

    def _take(
        self,
        index: int,
        role: QueueRole | None,
        queue: Virtqueue,
        chain: Chain,
        jobs: list[DiscardJob],
    ) -> None:
        """Handle one chain: a job for ``jobs``, or the chain goes back (malformed ones
        unused and counted)."""
        if chain.error is not None:
            self._bad_chain(queue, chain, chain.error)
            return
        try:
            job = self._handle(index, role, queue, chain)
        except GuestError as error:
            self._bad_chain(queue, chain, str(error))
            return
        if job is not None:
            jobs.append(job)

    def complete(self, job: DiscardJob, result: DiscardResult) -> None:
        counters = self.state.counters
        counters.discarded_bytes += result.discarded_bytes
        if self.roles.get(job.queue) is QueueRole.INFLATE:
            counters.balloon_discarded_bytes += result.discarded_bytes
        for failure in result.failures:
            counters.discard_errors += 1
            self._guest_log(log, logging.WARNING, "discard failed: %s", failure)
        queue = self._queues.get(job.queue)
        if queue is not None:
            queue.push(job.head, 0)
            if self.roles.get(job.queue) is QueueRole.REPORTING:
                counters.report_latency.observe(self.clock() - job.started)

    def _bad_chain(self, queue: Virtqueue, chain: Chain, reason: str) -> None:
        self.state.counters.bad_chains += 1
        self._guest_log(
            log, logging.WARNING, "malformed chain %d completed unused: %s", chain.head, reason
        )
        queue.push(chain.head, 0)

    def _handle(
        self, index: int, role: QueueRole | None, queue: Virtqueue, chain: Chain
    ) -> DiscardJob | None:
        if role is QueueRole.REPORTING:
            return self._report(index, queue, chain)
        if role is QueueRole.INFLATE:
            return self._inflate(index, queue, chain)
        if role is QueueRole.DEFLATE:
            if self.state.partial_pages:  # which frames only matters to the huge pages
                frames = self._frames(queue.memory, chain)
                self._forget_partial(queue.memory, frames)
                count = len(frames)
            else:
                count = self._frame_count(chain)
                for buffer in chain.readable:  # a list outside RAM is a bad chain, as ever
                    queue.memory.check(buffer.addr, buffer.length)
            self.state.counters.deflated_bytes += count * BALLOON_PAGE_SIZE
            queue.push(chain.head, 0)
            return None
        if role is QueueRole.STATS:
            self._stats(queue, chain)
            return None
        # A queue without a role (free page hinting is never offered): give it back.
        queue.push(chain.head, 0)
        return None

    def _plan(
        self, index: int, memory: GuestMemory, chain: Chain, spans: array.array[int]
    ) -> DiscardJob | None:
        """Turn guest ranges (``(gpa, length)`` word pairs, sorted) into a discard job; count
        what is skipped."""
        requested = sum(spans[1::2])
        ranges, skipped = memory.discard_plans(spans)
        if skipped:
            self._count_skipped(skipped)
        if not ranges:
            return None
        return DiscardJob(index, chain.head, ranges, requested, self._turn_started)

    def _count_skipped(self, skipped: Sequence[SkippedRange]) -> None:
        table = self.state.counters.skipped_bytes
        for piece in skipped:
            table[piece.reason] = table.get(piece.reason, 0) + piece.length

    # --- free page reporting ---------------------------------------------------------------

    def _report(self, index: int, queue: Virtqueue, chain: Chain) -> DiscardJob | None:
        if chain.readable:
            raise GuestError("free page report with device-readable buffers")
        counters = self.state.counters
        counters.reports += 1
        spans = span_words(chain.writable)  # Buffers are (addr, length) pairs
        reported = sum(spans[1::2])
        counters.reported_bytes += reported
        if self.poisoning:
            # Freed pages would come back zeroed, not holding the guest's poison pattern.
            counters.kept_bytes += reported
            del spans[:]
        job = self._plan(index, queue.memory, chain, spans)
        if job is None:
            queue.push(chain.head, 0)
            counters.report_latency.observe(self.clock() - self._turn_started)
        return job

    # --- inflate and deflate ---------------------------------------------------------------

    def _frame_count(self, chain: Chain) -> int:
        """How many le32 page frame numbers a chain carries (checked, not read)."""
        if chain.writable:
            raise GuestError("inflate/deflate chain with device-writable buffers")
        length = chain.readable_length
        if length % 4 or length > 4 * MAX_PFNS_PER_CHAIN:
            raise GuestError(f"frame list of {length} bytes")
        return length // 4

    def _frames(self, memory: GuestMemory, chain: Chain) -> array.array[int]:
        """The le32 page frame numbers a chain carries."""
        self._frame_count(chain)
        frames = array.array("I", b"".join(memory.read(b.addr, b.length) for b in chain.readable))
        if sys.byteorder == "big":
            frames.byteswap()  # le32 on the wire
        return frames

    def _inflate(self, index: int, queue: Virtqueue, chain: Chain) -> DiscardJob | None:
        frames = self._frames(queue.memory, chain)
        self.state.counters.inflated_bytes += len(frames) * BALLOON_PAGE_SIZE
        # Inflated pages are the balloon's, not free pages: poisoning does not apply (the
        # guest poisons them again when it frees them after a deflate).
        job = self._plan(index, queue.memory, chain, self._ballooned_spans(queue.memory, frames))
        if job is None:
            queue.push(chain.head, 0)
        return job

    def _ballooned_spans(self, memory: GuestMemory, frames: Sequence[int]) -> array.array[int]:
        """The guest ranges the inflated ``frames`` let us free now, as sorted word pairs.

        On 4 KiB backing that is every frame (made natively). On huge-page
        backing a frame only marks its piece of a backing page; the page is freed once all
        its pieces are ballooned.
        """
        if memory.largest_page <= BALLOON_PAGE_SIZE:
            return coalesce_frames(frames, VIRTIO_BALLOON_PFN_SHIFT)  # every frame, as it is
        small: list[int] = []
        whole: list[tuple[int, int]] = []
        partial = self.state.partial_pages
        for pfn in frames:
            gpa = pfn << VIRTIO_BALLOON_PFN_SHIFT
            page = memory.host_page(gpa)
            if page is None or page[1] <= BALLOON_PAGE_SIZE:
                small.append(pfn)  # outside RAM or unfreeable pages are skipped and counted
                continue
            start, size = page
            mask = partial.get(start, 0) | 1 << ((gpa - start) >> VIRTIO_BALLOON_PFN_SHIFT)
            if mask == (1 << (size >> VIRTIO_BALLOON_PFN_SHIFT)) - 1:
                partial.pop(start, None)
                whole.append((start, size))
            else:
                partial[start] = mask
        return span_words(coalesce(small) + whole)

    def _forget_partial(self, memory: GuestMemory, frames: Sequence[int]) -> None:
        """Deflated frames are the guest's again: drop them from huge-page accumulation."""
        partial = self.state.partial_pages
        if not partial:
            return
        for pfn in frames:
            gpa = pfn << VIRTIO_BALLOON_PFN_SHIFT
            page = memory.host_page(gpa)
            if page is None or page[0] not in partial:
                continue
            start = page[0]
            mask = partial[start] & ~(1 << ((gpa - start) >> VIRTIO_BALLOON_PFN_SHIFT))
            if mask:
                partial[start] = mask
            else:
                del partial[start]

    # --- statistics ------------------------------------------------------------------------

    def _stats(self, queue: Virtqueue, chain: Chain) -> None:
        """Keep the guest's stats buffer; its contents are the latest statistics."""
        if chain.writable:
            raise GuestError("stats chain with device-writable buffers")
        data = _read_at_most(queue.memory, chain, MAX_STATS_BYTES)
        usable = len(data) - len(data) % STAT_ENTRY.size
        stats = dict(STAT_ENTRY.iter_unpack(data[:usable]))
        self.state.stats_head = chain.head
        self.state.stats = stats
        self.state.stats_time = self.clock()
        self.state.counters.stats_updates += 1

    def _stats_queue(self) -> Virtqueue | None:
        index = next((i for i, r in self.roles.items() if r is QueueRole.STATS), None)
        return self._queues.get(index) if index is not None else None

    @property
    def stats_queue_running(self) -> bool:
        """Whether the guest's statistics queue is negotiated and running (not paused)."""
        return self._stats_queue() is not None

    def request_stats(self) -> bool:
        """Give the held stats buffer back so the guest refills it.

        False if there is nothing to give back: no running stats queue, or a request is
        already out (the guest has the buffer).
        """
        queue = self._stats_queue()
        if queue is None or self.state.stats_head is None:
            return False
        head, self.state.stats_head = self.state.stats_head, None
        queue.push(head, 0)
        return True


def _read_at_most(memory: GuestMemory, chain: Chain, limit: int) -> bytes:
    """The first ``limit`` bytes of a chain's device-readable buffers, however long they are."""
    parts: list[bytes] = []
    for buffer in chain.readable:
        if limit <= 0:
            break
        take = min(buffer.length, limit)
        parts.append(memory.read(buffer.addr, take))
        limit -= take
    return b"".join(parts)


def coalesce(frames: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted, merged ``(gpa, length)`` spans of the 4 KiB frames named (duplicates once)."""
    words = coalesce_frames(frames, VIRTIO_BALLOON_PFN_SHIFT)
    return list(zip(words[0::2], words[1::2], strict=True))

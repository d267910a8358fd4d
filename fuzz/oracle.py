"""What a discard job may name: computed from the chain when it is popped, checked when
the job runs. A mixin of :class:`fuzz.world.World`.

When a job comes out of ``kicked``, every descriptor reachable from its head (through
NEXT and INDIRECT, nothing validated) is read as the backend sees guest memory, through
the memory table the frontend declared: a superset of what a correct device may take from
the chain. A report may discard only its device-writable buffers, an inflate only the
4 KiB frames its device-readable buffers list (in the device's order). When the job runs,
the recording discarder checks each range against that, against the declared table and
its file, and against the backend's own mapping.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from balloond.device import DiscardJob
from balloond.discard import DiscardResult
from fuzz.guest import (
    DESC,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    MAX_RING,
    PAGE,
    KiB,
    Violation,
    require,
    roles,
)

if TYPE_CHECKING:
    from fuzz.world import World


class DiscardOracle:
    def _named(self: World, desc: int, size: int, head: int) -> list[tuple[int, int, int]]:
        """Every descriptor reachable from ``head`` (through NEXT and INDIRECT, nothing
        validated), read through the declared memory table: a superset of what the device
        may take from the chain, in the order it walks them."""
        found: list[tuple[int, int, int]] = []
        seen: set[tuple[int, int]] = set()
        pending = [(desc, size, head)]
        budget = 4 * MAX_RING + 64
        while pending and budget > 0:
            table, count, index = pending.pop(0)
            while index < count and (table, index) not in seen and budget > 0:
                seen.add((table, index))
                budget -= 1
                raw = self.declared_read(table + DESC.size * index, DESC.size)
                if raw is None:
                    break
                addr, length, flags, nxt = DESC.unpack(raw)
                if flags & F_INDIRECT:
                    pending.append((addr, length // DESC.size, 0))
                else:
                    found.append((addr, length, flags))
                if not flags & F_NEXT:
                    break
                index = nxt
        return found

    def _allowed(self: World, job: DiscardJob) -> dict[str, object]:
        """What the chain of a new job named, computed when it was popped."""
        role = roles(self.features).get(job.queue)
        require(
            role in ("inflate", "reporting"),
            f"a discard job from queue {job.queue}, whose role is {role}",
        )
        require(
            not (role == "reporting" and self.poisoning),
            "a free page report discarded while the guest poisons free pages",
        )
        vring = self.backend.state.vrings[job.queue]
        assert vring.ring is not None
        named = self._named(vring.ring.desc, vring.ring.size, job.head)
        if role == "reporting":
            spans = [(addr, length) for addr, length, flags in named if flags & F_WRITE]
            return {"role": role, "spans": spans}
        data = b""
        for addr, length, flags in named:
            if flags & F_WRITE:
                continue
            chunk = self.declared_read(addr, min(length, 64 * KiB))
            if chunk is None:
                break
            data += chunk
        usable = len(data) - len(data) % 4
        frames = {pfn for (pfn,) in struct.iter_unpack("<I", data[:usable])}
        return {"role": role, "frames": frames}

    def discard(self: World, job: DiscardJob, allowed: dict[str, object]) -> DiscardResult:
        """The recording discarder: checks every range a job names, frees nothing."""
        regions = {r.fd: r for r in self.backend.memory}
        total = 0
        for r in job.ranges:
            try:
                r.check()
            except ValueError as error:
                raise Violation(f"job for chain {job.head}: {error}") from None
            region = regions.get(r.fd)
            require(region is not None, f"{r}: fd {r.fd} is no region of the memory table")
            assert region is not None
            spec = region.spec
            require(
                (spec, self._fd_name(r.fd)) in self.declared,
                f"{r}: region {spec} is not in the declared table",
            )
            start = r.offset - spec.mmap_offset
            require(
                spec.mmap_offset <= r.offset and start + r.length <= spec.memory_size,
                f"{r} is not inside region {spec}",
            )
            require(r.offset + r.length <= os.fstat(r.fd).st_size, f"{r} is past its file")
            require(
                r.address == region.address + start,
                f"{r}: address does not match the offset in the mapping",
            )
            gpa = spec.guest_phys_addr + start
            self._named_covers(allowed, gpa, r.length, job)
            self.discarded.append((gpa, r.length))
            total += r.length
        return DiscardResult(total, total, len(job.ranges))

    def _named_covers(self: World, allowed: dict[str, object], gpa: int, length: int, job) -> None:
        if allowed["role"] == "reporting":
            spans = allowed["spans"]
            assert isinstance(spans, list)
            cursor = gpa
            for addr, size in sorted(spans):
                if addr <= cursor < addr + size:
                    cursor = addr + size
            require(
                cursor >= gpa + length,
                f"report {job.head} discards {gpa:#x}+{length:#x}, not all of it reported "
                f"(reported: {[(hex(a), hex(s)) for a, s in spans]})",
            )
        else:
            frames = allowed["frames"]
            assert isinstance(frames, set)
            for page in range(gpa, gpa + length, PAGE):
                require(
                    page >> 12 in frames,
                    f"inflate {job.head} discards frame {page >> 12:#x}, which it did not list",
                )

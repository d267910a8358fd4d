"""What a virtio device offers the transport, independent of vhost-user.

The vhost-user backend (``protocol``) drives any object that fits :class:`VirtioDevice`:
it negotiates features, forwards config accesses, hands over started virtqueues and tells
the device when one was kicked. The device answers with completed chains pushed straight
onto its queues and, for work that must leave the event loop (discarding memory),
:class:`DiscardJob` values that the server runs in a worker thread and hands back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from balloond.discard import DiscardRange, DiscardResult
from balloond.virtqueue import Virtqueue

VIRTIO_F_VERSION_1 = 32


class DiscardJob(NamedTuple):
    """Memory to give back before chain ``head`` of queue ``queue`` may be returned (a
    tuple: one is made per chain, in half a frozen dataclass's time)."""

    queue: int
    head: int
    ranges: Sequence[DiscardRange]
    #: Guest bytes the chain named (reported or ballooned), discardable or not.
    requested: int
    #: When the kick that brought the chain was handled (the device's clock).
    started: float = 0.0


class VirtioDevice(Protocol):
    #: Feature bits offered to the driver (virtio bits only, VERSION_1 included).
    device_features: int
    #: The most queues this device can use (the reply to GET_QUEUE_NUM).
    max_queues: int

    def read_config(self) -> bytes:
        """The whole device config space, as the driver would read it now."""
        ...

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space."""
        ...

    def set_features(self, features: int) -> None:
        """The driver acknowledged ``features`` (a subset of ``device_features``)."""
        ...

    def start_queue(self, index: int, queue: Virtqueue) -> None:
        """Queue ``index`` is started and enabled; the device may use it."""
        ...

    def stop_queue(self, index: int) -> None:
        """Queue ``index`` stops; give back anything held so the driver can resume."""
        ...

    def process(self, index: int) -> Sequence[DiscardJob]:
        """Consume what the driver made available on queue ``index``: at most one ring's
        worth of chains per call, so that a busy driver cannot hold the caller."""
        ...

    def resume(self, index: int) -> Sequence[DiscardJob]:
        """Carrying on from a state record: handle again the chains queue ``index`` holds
        (but a buffer the device keeps on purpose), as :meth:`process` would."""
        ...

    def complete(self, job: DiscardJob, result: DiscardResult) -> None:
        """A job's memory was given back (or not: ``result`` says); return its chain."""
        ...

    def reset(self) -> None:
        """The driver reset the device; queues are already stopped."""
        ...

    def memory_changed(self) -> None:
        """The memory table changed: anything known about guest pages by address is void."""
        ...

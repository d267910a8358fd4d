"""Prometheus metrics: every device of the daemon, served over HTTP from the event loop.

The only importer of ``prometheus_client``. It reads state and nothing calls into it: the
collector gets a callable that returns the devices' status dicts, exactly as
``balloond status --json`` shows them (:meth:`balloond.service.Device.status`), and turns
each scrape's snapshot into metric families. Nothing is counted twice: the device's own
counters (:class:`balloond.balloon.Counters`) are the one account, and Prometheus reads them.

Names follow Prometheus conventions: ``balloond_`` prefix, ``_total`` on counters, the unit
in the name (``_bytes``, ``_seconds``), a ``device`` label on every per-device metric. A value
balloond does not know (no VM connected, a statistic the guest never sent) is absent, not 0.
The device counters start over when a new QEMU connects (Prometheus sees a counter reset).
docs/metrics.md lists every metric.

Serve on localhost (``--metrics-listen 127.0.0.1:9848``) and let a local agent or a reverse
proxy carry it further: the endpoint has no authentication and names every VM on the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from balloond import __version__
from balloond.balloon import LATENCY_BOUNDS, Counters
from balloond.errors import OperatorError

log = logging.getLogger(__name__)

#: What one scrape reads: the status dict of every device.
Snapshot = Callable[[], list[dict[str, Any]]]

#: Kinds of dropped connections shown (as 0) before the first one happens.
ERROR_KINDS = ("protocol", "host", "internal")


@dataclass(frozen=True)
class CounterSpec:
    """A device counter: the :class:`~balloond.balloon.Counters` field it reads."""

    name: str
    field: str
    help: str


COUNTERS = (
    CounterSpec("balloond_reports_total", "reports", "Free page reports received."),
    CounterSpec(
        "balloond_reported_bytes_total",
        "reported_bytes",
        "Bytes of guest memory the guest reported free.",
    ),
    CounterSpec(
        "balloond_discarded_bytes_total",
        "discarded_bytes",
        "Bytes of guest memory whose host backing was dropped (reported or inflated); an "
        "upper bound on what the host got back, since ranges the host never backed count too.",
    ),
    CounterSpec(
        "balloond_balloon_discarded_bytes_total",
        "balloon_discarded_bytes",
        "The part of balloond_discarded_bytes_total that the balloon inflated.",
    ),
    CounterSpec(
        "balloond_kept_bytes_total",
        "kept_bytes",
        "Reported bytes deliberately kept because the guest poisons free pages.",
    ),
    CounterSpec(
        "balloond_inflated_bytes_total",
        "inflated_bytes",
        "Bytes the guest handed to the balloon (inflate queue).",
    ),
    CounterSpec(
        "balloond_deflated_bytes_total",
        "deflated_bytes",
        "Bytes the guest took back from the balloon (deflate queue).",
    ),
    CounterSpec(
        "balloond_discard_errors_total",
        "discard_errors",
        "Ranges the host kernel refused to discard.",
    ),
    CounterSpec(
        "balloond_bad_chains_total",
        "bad_chains",
        "Malformed descriptor chains the guest queued (completed unused).",
    ),
    CounterSpec(
        "balloond_stats_updates_total",
        "stats_updates",
        "Statistics buffers received from the guest.",
    ),
)


@dataclass(frozen=True)
class StatSpec:
    """How one guest statistic (a name in ``balloond.balloon.STAT_NAMES``) is exported."""

    stat: str
    counter: bool
    help: str

    @property
    def name(self) -> str:
        return f"balloond_guest_{self.stat}" + ("_total" if self.counter else "")


#: Linux's virtio_balloon statistics: memory sizes are gauges, event counts since the guest
#: booted are counters. Tags balloond has no name for are not exported (status shows them).
STATS = (
    StatSpec("swap_in_bytes", True, "Bytes the guest swapped in since it booted."),
    StatSpec("swap_out_bytes", True, "Bytes the guest swapped out since it booted."),
    StatSpec("major_faults", True, "Major page faults in the guest since it booted."),
    StatSpec("minor_faults", True, "Minor page faults in the guest since it booted."),
    StatSpec("free_bytes", False, "Memory the guest has free (unused)."),
    StatSpec("total_bytes", False, "Memory the guest's kernel manages (its MemTotal)."),
    StatSpec(
        "available_bytes",
        False,
        "Memory the guest could use without swapping (its MemAvailable).",
    ),
    StatSpec("disk_caches_bytes", False, "Memory the guest uses for its disk caches."),
    StatSpec("hugetlb_allocations", True, "Successful huge page allocations in the guest."),
    StatSpec("hugetlb_failures", True, "Failed huge page allocations in the guest."),
    StatSpec("oom_kills", True, "Processes the guest's OOM killer killed (Linux >= 6.12)."),
    StatSpec("alloc_stalls", True, "Allocation stalls in the guest (Linux >= 6.12)."),
    StatSpec("async_scan_pages", True, "Pages kswapd scanned in the guest (Linux >= 6.12)."),
    StatSpec("direct_scan_pages", True, "Pages direct reclaim scanned (Linux >= 6.12)."),
    StatSpec("async_reclaim_pages", True, "Pages kswapd reclaimed in the guest (Linux >= 6.12)."),
    StatSpec("direct_reclaim_pages", True, "Pages direct reclaim reclaimed (Linux >= 6.12)."),
)


class BalloondCollector(Collector):
    """Turns one snapshot of every device into metric families, once per scrape.

    Concurrency: :meth:`collect` runs on the thread that created the collector, which must
    be the event loop's, the thread that changes the devices' state: a snapshot is then
    taken between two steps of the loop and sees every device as of one moment (a thread
    reading the state while the loop changes it could see a counter of a report and not
    its bytes, or a dict that changes size under it). This is checked: a collect from any
    other thread raises RuntimeError, so serve with :class:`MetricsServer`, not with
    prometheus_client's threaded ``start_http_server``.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._thread = threading.get_ident()

    def collect(self) -> Iterator[Metric]:
        if threading.get_ident() != self._thread:
            raise RuntimeError("balloond metrics are collected on the event loop thread only")
        devices = sorted(self.snapshot(), key=lambda status: str(status["device"]))
        families = Families()
        families.gauge("balloond_devices", "Devices (VM sockets) the daemon serves.").add_metric(
            [], len(devices)
        )
        families.gauge(
            "balloond_build_info", "balloond's version (the value is always 1).", ["version"]
        ).add_metric([__version__], 1)
        for status in devices:
            _device_metrics(families, status)
        yield from families


def _device_metrics(families: Families, status: dict[str, Any]) -> None:
    """Add one device's metrics to ``families``."""
    device = str(status["device"])
    labels = [device]

    def gauge(name: str, help: str, value: float | None) -> None:
        family = families.gauge(name, help, ["device"])
        if value is not None:
            family.add_metric(labels, value)

    def counter(name: str, help: str, value: float) -> None:
        families.counter(name, help, ["device"]).add_metric(labels, value)

    connected = bool(status["connected"])
    gauge("balloond_connected", "1 while a VM (its QEMU) is connected, else 0.", int(connected))
    counter("balloond_connections_total", "VM connections (QEMUs) served.", status["connections"])
    errors = {kind: 0 for kind in ERROR_KINDS} | dict(status["errors"])
    dropped = families.counter(
        "balloond_connection_errors_total",
        "VM connections dropped on an error, by kind: protocol (the frontend broke the "
        "vhost-user protocol) or internal (a bug of balloond's).",
        ["device", "kind"],
    )
    for kind, count in sorted(errors.items()):
        dropped.add_metric([device, kind], count)
    gauge(
        "balloond_guest_ram_bytes",
        "Guest RAM of the connected VM (its memory table).",
        status["ram_bytes"] if connected else None,
    )
    gauge(
        "balloond_host_resident_bytes",
        "Guest memory the host holds: the allocated blocks of the guest's memory files.",
        status["host_resident_bytes"],
    )
    gauge(
        "balloond_target_bytes",
        "The memory size the balloon should leave the guest (guest RAM minus the balloon target).",
        status.get("target_bytes"),
    )
    gauge(
        "balloond_balloon_target_bytes",
        "Memory the host asks the guest to give up (the balloon's num_pages).",
        status.get("balloon_target_bytes"),
    )
    gauge(
        "balloond_balloon_actual_bytes",
        "Memory the guest says it has given up (the balloon's actual).",
        status.get("actual_bytes"),
    )
    poisoning = status.get("page_poisoning")
    gauge(
        "balloond_page_poisoning",
        "1 when the guest poisons free pages, so that its reports are kept, not freed.",
        None if poisoning is None else int(poisoning),
    )
    gauge(
        "balloond_guest_stats_age_seconds",
        "Seconds since the guest last sent statistics.",
        status.get("stats_age_seconds"),
    )
    stats = status.get("stats") or {}
    for stat in STATS:
        value = stats.get(stat.stat)
        family: CounterMetricFamily | GaugeMetricFamily
        if stat.counter:
            family = families.counter(stat.name, stat.help, ["device"])
        else:
            family = families.gauge(stat.name, stat.help, ["device"])
        if value is not None:
            family.add_metric(labels, value)

    # Before the first VM connects there is no balloon yet: its counters are all 0.
    counters = status.get("counters") or asdict(Counters())
    for spec in COUNTERS:
        counter(spec.name, spec.help, counters[spec.field])
    skipped = families.counter(
        "balloond_skipped_bytes_total",
        "Reported or inflated bytes that could not be freed, by reason (outside guest RAM, "
        "not aligned to the backing page).",
        ["device", "reason"],
    )
    for reason, amount in sorted(counters["skipped_bytes"].items()):
        skipped.add_metric([device, reason], amount)
    latency = counters["report_latency"]
    families.histogram(
        "balloond_report_latency_seconds",
        "Seconds from the kick that brought a free page report to its buffer's return to "
        "the guest.",
        ["device"],
    ).add_metric(labels, histogram_buckets(latency["counts"]), latency["total"])


def histogram_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Prometheus buckets from per-bucket counts: cumulative, ``le`` labels, ``+Inf`` last.

    ``counts[i]`` counts the observations in (LATENCY_BOUNDS[i-1], LATENCY_BOUNDS[i]], the
    last one those above every bound; a Prometheus bucket counts everything up to its bound.
    """
    if len(counts) != len(LATENCY_BOUNDS) + 1:
        raise ValueError(f"{len(counts)} histogram counts for {len(LATENCY_BOUNDS)} bounds")
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*map(floatToGoString, LATENCY_BOUNDS), "+Inf"), counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


class Families:
    """The metric families of one scrape, by name, in the order they were first asked for.

    A family is declared even when no device has a value for it (Prometheus then sees its
    HELP and TYPE and no samples), so that the set of families does not depend on the VMs.
    """

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = GaugeMetricFamily(name, help, labels=list(labels))
        assert isinstance(family, GaugeMetricFamily)
        return family

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
        # prometheus_client names a counter family without its _total.
        key = name.removesuffix("_total")
        family = self._families.get(key)
        if family is None:
            family = self._families[key] = CounterMetricFamily(name, help, labels=list(labels))
        assert isinstance(family, CounterMetricFamily)
        return family

    def histogram(self, name: str, help: str, labels: Iterable[str]) -> HistogramMetricFamily:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = HistogramMetricFamily(name, help, labels=list(labels))
        assert isinstance(family, HistogramMetricFamily)
        return family


def register(registry: CollectorRegistry, snapshot: Snapshot) -> BalloondCollector:
    """Register the devices' metrics and the process's own on ``registry``.

    Call it on the event loop thread (see :class:`BalloondCollector`). ``snapshot`` returns
    every device's status dict, e.g. ``lambda: [d.status() for d in
    service.devices.values()]``. The process metrics are prometheus_client's ``process_*``
    (CPU, memory, fds, start time, from /proc/self) and ``python_info``.
    """
    collector = BalloondCollector(snapshot)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return collector


def new_registry(snapshot: Snapshot) -> CollectorRegistry:
    """A registry of its own (never prometheus_client's global one) holding what
    :func:`register` registers; so that no other module needs prometheus_client."""
    registry = CollectorRegistry()
    register(registry, snapshot)
    return registry


# --- the HTTP endpoint ------------------------------------------------------------------------

#: Longest request head (request line and headers) accepted.
MAX_REQUEST = 8192
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``127.0.0.1:9848``, ``[::1]:9848``, ``localhost:9848``) as (host, port);
    OperatorError for anything else."""
    example = "give HOST:PORT, e.g. 127.0.0.1:9848 or [::1]:9848"
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise OperatorError(f"bad metrics address {text!r}: {example}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise OperatorError(f"bad metrics address {text!r}: {host!r} is not IPv6") from None
    elif ":" in host:
        raise OperatorError(f"bad metrics address {text!r}: put an IPv6 address in [brackets]")
    elif not _HOSTNAME.fullmatch(host):
        raise OperatorError(f"bad metrics address {text!r}: {host!r} is not a host; {example}")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise OperatorError(f"bad metrics address {text!r}: the port is a number 1-65535")
    return host, int(port_text)


class MetricsServer:
    """Answers ``GET /metrics`` (and ``HEAD``) over HTTP/1.x with ``registry``'s metrics.

    Concurrency: each client is one task on the event loop. The registry is collected in
    that task, synchronously, on the loop thread (what :class:`BalloondCollector` needs): the
    scrape's metric families are then a snapshot of plain values that nothing else holds,
    and only rendering them as text, the larger part of the cost, runs in a worker thread
    (``asyncio.to_thread``), so that a scrape of many devices does not stall the loop that
    serves their VMs. One request per connection (``Connection: close``): at most
    ``max_clients`` connections at once (another one gets 503 and is closed), and each must
    send its request and take its answer within ``timeout`` seconds or it is cut, so a
    client that stalls holds no more than one slot for that long. The text format is the
    Prometheus one, or OpenMetrics when the Accept header asks for it.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_clients: int = 8,
        timeout: float = 10.0,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.max_clients = max_clients
        self.timeout = timeout
        self._server: asyncio.Server | None = None
        self._clients = 0

    async def start(self) -> list[tuple[str, int]]:
        """Listen; the addresses bound, as (host, port). OperatorError if it cannot."""
        if self._server is None:
            try:
                self._server = await asyncio.start_server(
                    self._client, self.host, self.port, limit=MAX_REQUEST
                )
            except OSError as error:
                raise OperatorError(
                    f"cannot serve metrics on {self.host}:{self.port}: {error.strerror or error}"
                ) from None
            log.info(
                "metrics on %s", ", ".join(f"http://{_url(a)}/metrics" for a in self.addresses)
            )
        return self.addresses

    @property
    def clients(self) -> int:
        """Connections being served now."""
        return self._clients

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    async def serve(self) -> None:
        """Serve until cancelled (starting first if :meth:`start` was not awaited)."""
        await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            self._server.close()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= self.max_clients:
            log.debug("metrics client refused: %d connections open", self._clients)
            writer.write(_response(503, b"too many connections\n"))
            writer.close()  # a few bytes: the socket buffer takes them, and close() sends them
            return
        # The slot is held until the connection is gone, the answer flushed or the client cut.
        self._clients += 1
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(await self.answer(head))
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            log.debug("metrics client dropped: %s", type(error).__name__)
            writer.transport.abort()
        except ConnectionError as error:
            log.debug("metrics client dropped: %s", error)
            writer.transport.abort()
        finally:
            self._clients -= 1

    async def answer(self, head: bytes) -> bytes:
        """The whole HTTP response to one request head."""
        try:
            lines = head.decode("ascii").split("\r\n")
            method, target, version = lines[0].split(" ")
        except (UnicodeDecodeError, ValueError):
            return _response(400, b"bad request\n")
        if not version.startswith("HTTP/1."):
            return _response(400, b"HTTP/1.x only\n")
        if method not in ("GET", "HEAD"):
            return _response(405, b"GET or HEAD only\n", [("Allow", "GET, HEAD")])
        if target.partition("?")[0] != "/metrics":
            return _response(404, b"the metrics are at /metrics\n")
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        try:
            snapshot = Collected(list(self.registry.collect()))  # here, on the loop thread
            body = await asyncio.to_thread(encoder, snapshot)
        except Exception:
            log.exception("metrics could not be collected")
            return _response(500, b"metrics could not be collected\n")
        response = _response(200, body, [("Content-Type", content_type)])
        return response[: -len(body)] if method == "HEAD" and body else response


class Collected(CollectorRegistry):
    """A registry of metric families already collected: what the encoder renders off the
    loop (an encoder only calls ``collect()``)."""

    def __init__(self, families: list[Metric]) -> None:
        super().__init__()
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _response(status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    fields = {"Content-Type": "text/plain; charset=utf-8", **dict(headers)}
    fields |= {"Content-Length": str(len(body)), "Connection": "close"}
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _url(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> None:
    """Serve ``registry`` on http://HOST:PORT/metrics until cancelled."""
    await MetricsServer(registry, host, port).serve()

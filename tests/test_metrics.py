"""Prometheus metrics: a real daemon service with a simulated guest, scraped over real HTTP,
parsed with prometheus_client's parsers, checked by Prometheus's own promtool, and the
Grafana dashboard's queries checked against what a scrape really holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from balloond import __version__, metrics
from balloond.balloon import LATENCY_BOUNDS, STAT_ENTRY, STAT_NAMES
from balloond.discard import Discarder
from balloond.errors import OperatorError
from balloond.service import Device, DeviceSpec, Service, ServiceOptions
from tests.frontend import Frontend, GiB, Guest, GuestRam, MiB, Ring

HUGE = 2 * MiB
PAGE = 4096
ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "balloond.json"
DOCS = ROOT / "docs" / "metrics.md"
T = TypeVar("T")


class Served:
    """A real Service with its devices and the metrics endpoint on their own event loop
    thread, as ``balloond serve --metrics-listen 127.0.0.1:0`` runs them."""

    def __init__(self, tmp_path: Path, names: tuple[str, ...], timeout: float) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="daemon", daemon=True)
        self.thread.start()
        self.service = Service(ServiceOptions(), discarder=Discarder())
        self.paths = {name: str(tmp_path / f"{name}.sock") for name in names}
        for name, path in self.paths.items():
            self.add(DeviceSpec(name, socket_path=path))
        self.registry = CollectorRegistry()
        self.collector = self.call(
            lambda: metrics.register(
                self.registry, lambda: [d.status() for d in self.service.devices.values()]
            )
        )
        self.server = metrics.MetricsServer(self.registry, "127.0.0.1", 0, timeout=timeout)
        [(_, self.port)] = self.wait(self.server.start())
        self.task = self.call(lambda: self.loop.create_task(self.server.serve()))

    def add(self, spec: DeviceSpec) -> Device:
        return self.call(lambda: self.service.add(spec))

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the loop thread (where the daemon's state lives)."""

        async def run() -> T:
            return function()

        return self.wait(run())

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def device(self, name: str = "vm0") -> Device:
        return self.service.devices[name]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def scrape_text(self, accept: str | None = None) -> str:
        request = urllib.request.Request(self.url)
        if accept is not None:
            request.add_header("Accept", accept)
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
            return str(response.read().decode())

    def scrape(self) -> Scrape:
        return Scrape(self.scrape_text())

    def close(self) -> None:
        async def stop() -> None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            await self.service.close()

        self.wait(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class Scrape:
    """One scrape, parsed: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def __getitem__(self, name: str) -> float:
        value = self.get(name, device="vm0")
        assert value is not None, f"{name}{{device='vm0'}} is not in the scrape"
        return value

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def with_name(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (n, labels), value in self.samples.items() if n == name}


@pytest.fixture
def make_served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(names: tuple[str, ...] = ("vm0",), timeout: float = 10.0) -> Served:
        served = Served(tmp_path, names, timeout)
        made.append(served)
        return served

    yield make
    for served in made:
        served.close()


@pytest.fixture
def served(make_served: Callable[..., Served]) -> Served:
    return make_served()


@pytest.fixture
def guest(served: Served, ram: GuestRam) -> Iterator[Guest]:
    frontend = Frontend(served.paths["vm0"])
    driver = Guest(frontend, ram)
    driver.start()
    wait_for(lambda: served.call(lambda: served.device().server.connection is not None))
    yield driver
    driver.close()
    frontend.close()


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def send_stats(guest: Guest, values: dict[int, int]) -> None:
    data = b"".join(STAT_ENTRY.pack(tag, value) for tag, value in values.items())
    buffer = guest.ram.alloc(len(data), 8)
    guest.ram.write(buffer, data)
    ring = guest.rings["stats"]
    ring.add_chain([(buffer, len(data))], writable=False)
    ring.notify()


def inflate(guest: Guest, gpa: int, length: int) -> None:
    frames = list(range(gpa // PAGE, (gpa + length) // PAGE))
    buffer = guest.ram.alloc(4 * len(frames), 8)
    guest.ram.write(buffer, struct.pack(f"<{len(frames)}I", *frames))
    ring: Ring = guest.rings["inflate"]
    head = ring.add_chain([(buffer, 4 * len(frames))], writable=False)
    ring.notify()
    assert ring.wait_used(1) == [(head, 0)]


def exercise(served: Served, guest: Guest, ram: GuestRam) -> None:
    """What the scrape tests check: reports (one partly outside guest RAM), an inflate, a
    target and guest statistics."""
    ram.write(16 * MiB, b"\x11" * 2 * HUGE)
    guest.report([(16 * MiB, HUGE), (16 * MiB + HUGE, HUGE)])
    guest.report([(4 * GiB + HUGE, HUGE), (64 * MiB, HUGE)])  # the second is not guest RAM
    inflate(guest, 32 * MiB, MiB)
    served.call(lambda: served.device().control.set_target(128 * MiB - 32 * MiB))
    send_stats(guest, {4: 100 * MiB, 6: 90 * MiB, 2: 7, 99: 5})
    wait_for(lambda: served.scrape().get("balloond_stats_updates_total", device="vm0") == 1)


# --- what a scrape shows ----------------------------------------------------------------------


def test_a_scrape_shows_the_guest_s_reports_and_discards(
    served: Served, guest: Guest, ram: GuestRam
) -> None:
    exercise(served, guest, ram)
    scrape = served.scrape()
    assert scrape["balloond_connected"] == 1
    assert scrape["balloond_connections_total"] == 1
    assert scrape["balloond_reports_total"] == 2
    assert scrape["balloond_reported_bytes_total"] == 4 * HUGE
    # Three reported 2 MiB blocks and the inflated MiB lie in guest RAM and were freed.
    assert scrape["balloond_discarded_bytes_total"] == 3 * HUGE + MiB
    assert scrape["balloond_balloon_discarded_bytes_total"] == MiB
    assert scrape["balloond_inflated_bytes_total"] == MiB
    assert scrape["balloond_deflated_bytes_total"] == 0
    assert scrape["balloond_kept_bytes_total"] == 0
    assert scrape["balloond_discard_errors_total"] == 0
    assert scrape["balloond_bad_chains_total"] == 0
    skipped = scrape.with_name("balloond_skipped_bytes_total")
    assert skipped == {frozenset({("device", "vm0"), ("reason", "outside guest RAM")}): HUGE}
    assert scrape.get("balloond_connection_errors_total", device="vm0", kind="protocol") == 0
    # What the guest wrote was freed; its rings and buffers are what the memfds still hold.
    assert scrape["balloond_host_resident_bytes"] == ram.blocks() < HUGE


def test_the_report_latency_histogram_counts_every_report(
    served: Served, guest: Guest, ram: GuestRam
) -> None:
    exercise(served, guest, ram)
    scrape = served.scrape()
    buckets = {
        dict(labels)["le"]: value
        for labels, value in scrape.with_name("balloond_report_latency_seconds_bucket").items()
    }
    assert list(buckets) == [*(str(float(b)) for b in LATENCY_BOUNDS), "+Inf"]
    assert list(buckets.values()) == sorted(buckets.values()), "buckets are cumulative"
    assert buckets["+Inf"] == scrape["balloond_report_latency_seconds_count"] == 2
    assert 0 < scrape["balloond_report_latency_seconds_sum"] < 5


def test_target_actual_and_memory_size(served: Served, guest: Guest, ram: GuestRam) -> None:
    exercise(served, guest, ram)
    scrape = served.scrape()
    assert scrape["balloond_guest_ram_bytes"] == 128 * MiB
    assert scrape["balloond_target_bytes"] == 96 * MiB
    assert scrape["balloond_balloon_target_bytes"] == 32 * MiB
    assert scrape["balloond_balloon_actual_bytes"] == 0
    assert scrape["balloond_page_poisoning"] == 0


def test_guest_statistics_appear_once_the_guest_sends_them(
    served: Served, guest: Guest, ram: GuestRam
) -> None:
    before = served.scrape()
    for spec in metrics.STATS:
        assert spec.name in before.families or spec.name.removesuffix("_total") in (
            before.families
        ), f"{spec.name} is declared"
        assert before.get(spec.name, device="vm0") is None, f"{spec.name} before any stats"
    assert before.get("balloond_guest_stats_age_seconds", device="vm0") is None
    exercise(served, guest, ram)
    scrape = served.scrape()
    assert scrape["balloond_guest_free_bytes"] == 100 * MiB
    assert scrape["balloond_guest_available_bytes"] == 90 * MiB
    assert scrape["balloond_guest_major_faults_total"] == 7
    assert scrape.get("balloond_guest_total_bytes", device="vm0") is None, "not sent"
    assert scrape.get("balloond_guest_swap_in_bytes_total", device="vm0") is None, "not sent"
    assert not [name for name in scrape.names() if "99" in name], "unnamed tags stay out"
    assert 0 <= scrape["balloond_guest_stats_age_seconds"] < 5
    assert scrape["balloond_stats_updates_total"] == 1


def test_a_disconnected_vm_keeps_its_counters_and_loses_its_memory_gauges(
    served: Served, guest: Guest, ram: GuestRam
) -> None:
    exercise(served, guest, ram)
    guest.frontend.close()
    wait_for(lambda: served.scrape().get("balloond_connected", device="vm0") == 0)
    scrape = served.scrape()
    for gone in ("balloond_host_resident_bytes", "balloond_guest_ram_bytes"):
        assert scrape.get(gone, device="vm0") is None, f"{gone} without a VM"
    assert scrape["balloond_reported_bytes_total"] == 4 * HUGE
    assert scrape["balloond_connections_total"] == 1


def test_devices_without_a_vm(make_served: Callable[..., Served]) -> None:
    served = make_served(("vm-a", "vm-b"))
    scrape = served.scrape()
    assert scrape.get("balloond_devices") == 2
    assert scrape.get("balloond_build_info", version=__version__) == 1
    for name in ("vm-a", "vm-b"):
        assert scrape.get("balloond_connected", device=name) == 0
        assert scrape.get("balloond_reported_bytes_total", device=name) == 0
        assert scrape.get("balloond_report_latency_seconds_count", device=name) == 0
        for unknown in ("balloond_host_resident_bytes", "balloond_target_bytes"):
            assert scrape.get(unknown, device=name) is None
    served.wait(served.service.remove("vm-b"))
    scrape = served.scrape()
    assert scrape.get("balloond_devices") == 1
    assert scrape.get("balloond_connected", device="vm-b") is None


def test_process_metrics_are_served(served: Served) -> None:
    scrape = served.scrape()
    resident = scrape.get("process_resident_memory_bytes")
    assert resident is not None and resident > 1 * MiB
    assert scrape.with_name("python_info")


def test_openmetrics_when_asked(served: Served) -> None:
    text = served.scrape_text("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert families["balloond_reported_bytes"].type == "counter"
    assert families["balloond_report_latency_seconds"].type == "histogram"


# --- Prometheus's own checks ------------------------------------------------------------------


def test_promtool_finds_nothing_to_complain_about(
    served: Served, guest: Guest, ram: GuestRam
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is missing: install Debian's prometheus package "
            "(apt-get install --no-install-recommends prometheus)"
        )
    exercise(served, guest, ram)
    text = served.scrape_text()
    assert "balloond_guest_free_bytes{" in text and "reason=" in text, "a scrape with data"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        f"promtool check metrics: rc {result.returncode}\n{result.stdout}{result.stderr}"
    )


def test_every_metric_is_documented_and_every_documented_metric_served(
    served: Served, guest: Guest, ram: GuestRam
) -> None:
    exercise(served, guest, ram)
    scrape = served.scrape()
    served_names = {
        name + ("_total" if family.type == "counter" else "")
        for name, family in scrape.families.items()
    }
    table = [line for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    documented = {line.split("`")[1] for line in table}
    assert served_names - documented == set(), "served, not in docs/metrics.md"
    assert documented - served_names == set(), "in docs/metrics.md, not served"


# --- the collector without HTTP ---------------------------------------------------------------


def test_histogram_buckets_are_cumulative() -> None:
    counts = [0] * (len(LATENCY_BOUNDS) + 1)
    counts[0], counts[3], counts[-1] = 2, 1, 4
    buckets = metrics.histogram_buckets(counts)
    assert buckets[0] == ("0.0001", 2)
    assert buckets[2] == ("0.0005", 2)
    assert buckets[3] == ("0.001", 3)
    assert buckets[-2] == ("5.0", 3)
    assert buckets[-1] == ("+Inf", 7)
    with pytest.raises(ValueError):
        metrics.histogram_buckets([1, 2])


def test_every_guest_statistic_has_a_metric() -> None:
    assert sorted(spec.stat for spec in metrics.STATS) == sorted(STAT_NAMES.values())
    names = [spec.name for spec in metrics.STATS]
    assert len(set(names)) == len(names)
    for spec in metrics.STATS:
        assert spec.name.endswith("_total") == spec.counter


def test_new_registry_is_not_the_global_one() -> None:
    from prometheus_client import REGISTRY, generate_latest

    snapshot = [{"device": "vm0", "connected": False, "ram_bytes": 0}]
    snapshot[0] |= {"host_resident_bytes": None, "connections": 0, "errors": {}}
    registry = metrics.new_registry(lambda: snapshot)
    assert registry is not REGISTRY
    scrape = Scrape(generate_latest(registry).decode())
    assert scrape["balloond_connected"] == 0
    assert scrape.get("process_open_fds") is not None
    assert "balloond_connected" not in generate_latest(REGISTRY).decode()


def test_collecting_off_the_loop_thread_is_refused() -> None:
    registry = CollectorRegistry()
    collector = metrics.register(registry, list)
    assert list(collector.collect())  # the creating thread may collect
    failure: list[BaseException] = []

    def other() -> None:
        try:
            list(collector.collect())
        except RuntimeError as error:
            failure.append(error)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert failure and "event loop thread" in str(failure[0])


# --- the HTTP endpoint ------------------------------------------------------------------------


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_only_get_and_head_of_metrics_are_answered(served: Served) -> None:
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{served.port}/", timeout=5)
    assert error.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(served.url, data=b"x", timeout=5)
    assert error.value.code == 405
    assert error.value.headers["Allow"] == "GET, HEAD"
    head = raw_request(served.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    assert length > 1000
    assert raw_request(served.port, b"GET /metrics\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_request(served.port, b"GET /metrics SPDY/3\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_request(served.port, b"\xff\xfe\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    query = raw_request(served.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert query.startswith(b"HTTP/1.1 200 OK\r\n") and b"balloond_devices 1.0" in query


def test_a_silent_client_is_cut_after_the_timeout(make_served: Callable[..., Served]) -> None:
    served = make_served(timeout=0.3)
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 3
    assert served.scrape().get("balloond_devices") == 1, "the endpoint goes on"


def test_connections_beyond_the_limit_are_refused(make_served: Callable[..., Served]) -> None:
    served = make_served()
    limit = served.server.max_clients
    idle = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(limit)]
    try:
        wait_for(lambda: served.server.clients == limit)
        refused = raw_request(served.port, b"")
        assert refused.startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: served.server.clients == 0)
    assert served.scrape().get("balloond_devices") == 1


async def test_a_taken_port_is_an_operator_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = metrics.MetricsServer(CollectorRegistry(), "127.0.0.1", port)
        with pytest.raises(OperatorError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await server.start()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9848", ("127.0.0.1", 9848)),
        ("[::1]:9848", ("::1", 9848)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[fe80::1]:80", ("fe80::1", 80)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "9848",
        ":9848",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1:٩٨",
        "::1:9848",
        "[::1:9848",
        "[nothost]:9848",
        "-bad-:9848",
        "a b:9848",
        "",
    ],
)
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(OperatorError, match="bad metrics address"):
        metrics.parse_listen(text)


def test_parse_listen_says_how_to_write_ipv6() -> None:
    with pytest.raises(OperatorError, match=r"IPv6 address in \[brackets\]"):
        metrics.parse_listen("::1:9848")


# --- the Grafana dashboard --------------------------------------------------------------------

_METRIC = re.compile(r"\b(?:balloond|process|python)_[a-z0-9_]+\b")


def _queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36  # Grafana 9
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["device"]["type"] == "query"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            metric_names = _METRIC.findall(target["expr"])
            assert metric_names, target["expr"]
            per_device = [n for n in metric_names if n not in ("balloond_devices",)]
            if any(n.startswith("balloond_") for n in per_device):
                assert 'device=~"$device"' in target["expr"], target["expr"]
            assert '"$instance"' in target["expr"], target["expr"]


def test_every_dashboard_query_names_a_served_metric(
    served: Served, guest: Guest, ram: GuestRam
) -> None:
    exercise(served, guest, ram)
    served_names = served.scrape().names()
    queries = _queries(json.loads(DASHBOARD.read_text()))
    used = {name for query in queries for name in _METRIC.findall(query)}
    assert {"balloond_host_resident_bytes", "balloond_discarded_bytes_total"} <= used
    assert used - served_names == set()

"""One daemon for the host: two real guests served by one ``balloond serve``, each seen in
``balloond status`` (with the memory the host holds for it) and in the logs; and balloond
connecting to a QEMU that listens (``server=on``), for managers that start QEMU first."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kit import devices
from kit.guest import Guest
from tests.e2e.conftest import Balloond, BootGuest

pytestmark = pytest.mark.e2e

MIB = 1 << 20
GUEST_MIB = 1024


def wait_until(
    daemon: Balloond, name: str, check: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(daemon.command("status", name, "--json"))
        if check(status):
            return status
        assert time.monotonic() < deadline, f"{name}: not within {timeout:.0f} s: {status}"
        time.sleep(0.5)


def frees_memory(daemon: Balloond, name: str, guest: Guest, mib: int = 384) -> int:
    """The guest touches and frees ``mib`` MiB; returns how much of it the host-resident
    guest memory in ``balloond status`` fell by (from its peak, after reporting settled)."""
    settled = wait_until(daemon, name, lambda s: s["host_resident_bytes"] is not None, 30)
    guest.check(f"workload hold {mib} 7 /tmp/h", timeout=120)  # the host now holds it...
    held = wait_until(
        daemon, name, lambda s: s["host_resident_bytes"] >= settled["host_resident_bytes"], 30
    )["host_resident_bytes"]
    guest.check("workload release /tmp/h", timeout=120)  # ...and the guest frees it
    target = held - 0.8 * mib * MIB
    after = wait_until(daemon, name, lambda s: s["host_resident_bytes"] <= target, 40)
    return int(held - after["host_resident_bytes"])


def resident_bytes(daemon: Balloond, name: str) -> int:
    resident: int = json.loads(daemon.command("status", name, "--json"))["host_resident_bytes"]
    return resident


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> dict[tuple[str, str], float]:
    """One Prometheus scrape, parsed: (sample name, device) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, sample.labels.get("device", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_one_daemon_serves_two_guests(tmp_path: Path, boot_guest: BootGuest) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="balloond-e2e-"))
    daemon = Balloond(sockets / "vm.sock", tmp_path / "balloond.log")
    other = sockets / "other.sock"
    guests: list[Guest] = []
    port = free_port()
    try:
        daemon.start("--socket-path", f"web={other}", "--metrics-listen", f"127.0.0.1:{port}")
        guests.append(boot_guest(daemon.device_args(), name="vm", memory_mib=GUEST_MIB))
        guests.append(
            boot_guest(devices.vhost_user_balloon(other), name="web", memory_mib=GUEST_MIB)
        )
        listed = json.loads(daemon.command("status", "--json"))
        assert [d["device"] for d in listed["devices"]] == ["vm", "web"]
        assert all(d["connected"] for d in listed["devices"]), listed
        assert all(d["ram_bytes"] == GUEST_MIB * MIB for d in listed["devices"])
        for name, guest in (("vm", guests[0]), ("web", guests[1])):
            returned = frees_memory(daemon, name, guest)
            assert returned >= 0.8 * 384 * MIB, f"{name}: {returned / MIB:.0f} MiB came back"
        shown = daemon.command("status")
        assert "device       vm" in shown and "device       web" in shown
        assert "on the host" in shown
        # Host memory may still move (the last reports): the scrape lies between two statuses.
        earlier = {name: resident_bytes(daemon, name) for name in ("vm", "web")}
        scraped = scrape(port)
        later = {name: resident_bytes(daemon, name) for name in ("vm", "web")}
        for name in ("vm", "web"):
            low, high = sorted((earlier[name], later[name]))
            resident = scraped[("balloond_host_resident_bytes", name)]
            assert low - 8 * MIB <= resident <= high + 8 * MIB, (name, earlier, resident, later)
            assert scraped[("balloond_connected", name)] == 1
            assert scraped[("balloond_reports_total", name)] > 0
            assert scraped[("balloond_guest_ram_bytes", name)] == GUEST_MIB * MIB
        lines = [json.loads(line) for line in daemon.log().splitlines()]
        connected = {line.get("device") for line in lines if line["event"] == "frontend connected"}
        assert connected == {"vm", "web"}, "each device's log lines name it"
    finally:
        for guest in guests:
            guest.close()
        status = daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    assert status == 0, daemon.log()[-3000:]


def test_balloond_connects_to_a_listening_qemu(tmp_path: Path, boot_guest: BootGuest) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="balloond-e2e-"))
    daemon = Balloond(sockets / "unused.sock", tmp_path / "balloond.log")
    qemu_socket = sockets / "qemu.sock"
    guest: Guest | None = None
    try:
        # balloond first: it waits for QEMU to listen, and QEMU (server=on) waits for it.
        daemon.start("--connect", f"vmc={qemu_socket}")
        waiting = json.loads(daemon.command("status", "vmc", "--json"))
        assert (waiting["mode"], waiting["connected"]) == ("connect", False)
        guest = boot_guest(
            devices.vhost_user_balloon(qemu_socket, server=True), name="vmc", memory_mib=GUEST_MIB
        )
        wait_until(daemon, "vmc", lambda s: s["connected"] and s["counters"]["reports"] > 0, 60)
        returned = frees_memory(daemon, "vmc", guest)
        assert returned >= 0.8 * 384 * MIB, f"{returned / MIB:.0f} MiB came back"
    finally:
        if guest is not None:
            guest.close()
        status = daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    assert status == 0, daemon.log()[-3000:]

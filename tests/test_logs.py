"""Logs as an operator reads them: JSON lines off a terminal, each naming its device; what a
guest can trigger at will is rate-limited."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balloond.logs import RateLimit
from tests.conftest import start_balloond
from tests.frontend import F_NEXT, F_WRITE, Frontend, Guest, GuestRam, MiB


def serve(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return start_balloond("--control-socket", str(tmp_path / "control.sock"), *args)


def stop(process: subprocess.Popen[str]) -> list[dict[str, object]]:
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=15)
    assert process.returncode == 0, rest
    return [json.loads(line) for line in rest.splitlines()]


def test_json_lines_name_their_device(tmp_path: Path) -> None:
    process = serve(tmp_path, "--socket-path", f"web={tmp_path / 'a.sock'}")
    ram = GuestRam(low=32 * MiB, high=0)
    frontend = Frontend(str(tmp_path / "a.sock"))
    guest = Guest(frontend, ram)
    guest.start()
    guest.close()
    frontend.close()
    ram.close()
    lines = stop(process)
    events = {str(line["event"]): line for line in lines}
    connected = events["frontend connected"]
    assert connected["device"] == "web" and connected["level"] == "info"
    features = next(line for line in lines if str(line["event"]).startswith("driver features"))
    assert "PAGE_REPORTING" in str(features["event"]) and features["device"] == "web"
    assert any(str(line["event"]).startswith("ring 3 started") for line in lines)
    assert all("timestamp" in line for line in lines)


def test_a_guest_cannot_flood_the_log(tmp_path: Path) -> None:
    process = serve(tmp_path, "--socket-path", str(tmp_path / "vm.sock"))
    ram = GuestRam(low=64 * MiB, high=0)
    frontend = Frontend(str(tmp_path / "vm.sock"))
    guest = Guest(frontend, ram)
    guest.start()
    ring = guest.rings["reporting"]
    began = time.monotonic()
    for _ in range(20):  # 20 rounds of 100 looping chains: 2000 malformed chains
        for slot in range(100):
            ring.write_desc(slot, 32 * MiB, 2 * MiB, F_WRITE | F_NEXT, slot)  # loops to itself
            ring.publish(slot)
        ring.notify()
        ring.wait_used(100)
    guest.close()
    frontend.close()
    ram.close()
    lines = stop(process)
    malformed = [line for line in lines if "malformed chain" in str(line["event"])]
    minutes = 1 + int((time.monotonic() - began) // 60)  # the limit is 10 a minute
    assert 1 <= len(malformed) <= 10 * minutes, f"{len(malformed)} lines for 2000 bad chains"


def test_rate_limit_counts_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limit = RateLimit(burst=3, interval=60.0, clock=lambda: now[0])
    logger = logging.getLogger("test.ratelimit")
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for index in range(10):
            limit(logger, logging.WARNING, "bad chain %d", index)
        now[0] = 61.0
        limit(logger, logging.WARNING, "bad chain %d", 10)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "bad chain 0",
        "bad chain 1",
        "bad chain 2",
        "bad chain 10 (7 similar messages suppressed)",
    ]


def test_log_format_console_is_key_value(tmp_path: Path) -> None:
    process = serve(tmp_path, "--log-format", "console", "--socket-path", str(tmp_path / "v.sock"))
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=15)
    assert process.returncode == 0
    assert "[info     ] shutting down" in rest
    with pytest.raises(json.JSONDecodeError):
        json.loads(rest.splitlines()[0])


def test_under_journald_each_line_carries_its_priority(tmp_path: Path) -> None:
    """systemd connects stderr to the journal and says so in $JOURNAL_STREAM: a line that
    starts with <N> gets priority N (journalctl -p warning finds balloond's warnings)."""
    log_path, control = tmp_path / "journal", tmp_path / "c.sock"
    with open(log_path, "w") as log:
        info = os.fstat(log.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        process = subprocess.Popen(
            [sys.executable, "-m", "balloond", "serve", "--socket-path", str(tmp_path / "v.sock"),
             "--control-socket", str(control)],
            stderr=log, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 15
    while not control.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    rogue = Frontend(str(tmp_path / "v.sock"))
    rogue.send_raw(b"\xff" * 12)  # a protocol breach: logged as an error
    assert rogue.closed_by_backend()
    rogue.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    lines = log_path.read_text().splitlines()
    assert all(line[:3] in ("<6>", "<4>", "<3>") for line in lines), lines
    errors = [json.loads(line[3:]) for line in lines if line.startswith("<3>")]
    assert len(errors) == 1 and "broke the protocol" in errors[0]["event"], lines

"""`runtime run --metrics HOST:PORT` (SPEC §8): scraped during a run, in one process and
with `--processes 2` (one endpoint adding up the workers)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

import pytest
from conftest import write_app
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(60)

APP = """
namespace: m
entries:
  - {name: db, kind: queue.driver.DRIVER, FIELDS}
  - name: jobs
    kind: queue.queue
    driver: db
    dead_letter: {queue: dead, max_attempts: 1}
  - {name: dead, kind: queue.queue, driver: db}
  - name: h
    kind: function.lua
    modules: [time]
    source: |
      local time = require("time")
      return function(body)
        time.sleep(0.002)
        if body.n % 10 == 0 then error("bad " .. body.n) end
      end
  - {name: c, kind: queue.consumer, queue: jobs, func: h, concurrency: 2, lifecycle: {auto_start: true}}
"""


def app_yaml(driver: str, fields: str) -> str:
    return APP.replace("DRIVER", driver).replace("FIELDS", fields)


def start(root: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "run", str(root), "--metrics", "127.0.0.1:0",
                             "--log-level", "info", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    port = _port(proc.stderr)
    return proc, port


def _port(stderr: IO[str]) -> int:
    lines = []
    for line in stderr:
        lines.append(line)
        m = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", line)
        if m:
            return int(m.group(1))
    raise AssertionError("no metrics address logged:\n" + "".join(lines))


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_for_metric(port: int, name: str, labels: dict[str, str], value: float, timeout: float = 30) -> dict:
    key = (name, tuple(sorted(labels.items())))
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(port)
        if got.get(key) == value:
            return got
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}: {got.get(key)}"
        time.sleep(0.05)  # scraping a server in another process: nothing to wait on


def finish(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return out


def inputs(root: Path, n: int) -> str:
    path = root / "in.jsonl"
    path.write_text("\n".join(json.dumps({"n": i}) for i in range(n)))
    return f"m:jobs=@{path}"


def test_metrics_are_served_during_a_run(tmp_path: Path) -> None:
    root = write_app(tmp_path, {"app.yaml": app_yaml("memory", "lifecycle: {auto_start: true}")})
    proc, port = start(root, "--publish", inputs(root, 100))
    try:
        got = wait_for_metric(port, "runtime_consumer_processed_total", {"consumer": "m:c"}, 100)
        c = {"consumer": "m:c"}
        assert got[("runtime_consumer_acked_total", tuple(c.items()))] == 90
        assert got[("runtime_consumer_dead_lettered_total", tuple(c.items()))] == 10
        assert got[("runtime_consumer_nacked_total", tuple(c.items()))] == 0
        assert got[("runtime_consumer_workers", tuple(c.items()))] == 2
        assert got[("runtime_handler_duration_seconds_count", tuple(c.items()))] == 100
        assert got[("runtime_handler_duration_seconds_sum", tuple(c.items()))] >= 100 * 0.002
        fast = got[("runtime_handler_duration_seconds_bucket", (("consumer", "m:c"), ("le", "0.001")))]
        assert fast < 100, "every handler sleeps 2 ms"
        assert got[("runtime_queue_ready", (("queue", "m:dead"),))] == 10
        assert got[("runtime_queue_ready", (("queue", "m:jobs"),))] == 0
        assert ("runtime_queue_delayed", (("queue", "m:jobs"),)) in got
        assert got[("runtime_driver_reconnects_total", (("driver", "m:db"),))] == 0
    finally:
        out = finish(proc)
    assert "m:c acked=90" in out


def test_one_endpoint_adds_up_the_worker_processes(tmp_path: Path) -> None:
    fields = "path: q.sqlite3, synchronous: normal, poll_interval: 20ms"
    root = write_app(tmp_path, {"app.yaml": app_yaml("sqlite", fields)})
    proc, port = start(root, "--processes", "2", "--publish", inputs(root, 200))
    try:
        got = wait_for_metric(port, "runtime_consumer_processed_total", {"consumer": "m:c"}, 200)
        assert got[("runtime_consumer_workers", (("consumer", "m:c"),))] == 4, "2 threads in each of 2 processes"
        assert got[("runtime_consumer_acked_total", (("consumer", "m:c"),))] == 180
        assert got[("runtime_handler_duration_seconds_count", (("consumer", "m:c"),))] == 200
        assert got[("runtime_queue_ready", (("queue", "m:dead"),))] == 20
        assert got[("runtime_worker_restarts_total", ())] == 0
    finally:
        out = finish(proc)
    assert "m:c acked=180" in out


def test_a_bad_metrics_address_is_a_usage_error(tmp_path: Path) -> None:
    root = write_app(tmp_path, {"app.yaml": app_yaml("memory", "lifecycle: {auto_start: true}")})
    out = subprocess.run([sys.executable, "-m", "runtime", "run", str(root), "--metrics", "nowhere"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "HOST:PORT" in out.stderr

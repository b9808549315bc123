"""Several processes on one SQLite queue (SPEC §7.0, §7.2, §8 `--processes`): competing
`runtime run` processes, `--processes N` with supervision, a crash test with SIGKILL, and a
handler slower than the visibility timeout. Every process here is one the test started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until, write_app

from runtime.drivers.sqlite import SqliteDriver
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(120)

APP = """
namespace: d
entries:
  - name: db
    kind: queue.driver.sqlite
    path: queues.sqlite3
    synchronous: normal
    visibility_timeout: "{vt}"
    poll_interval: 20ms
  - name: jobs
    kind: queue.queue
    driver: db
    retry: {{initial_delay: 0}}
  - name: done
    kind: queue.queue
    driver: db
    queue_name: "done_${{env:RUN|0}}"
  - name: h
    kind: function.lua
    modules: [queue, time]
    source: |
      local queue = require("queue")
      local time = require("time")
      return function(body)
        if body.sleep then time.sleep(body.sleep) end
        local t = os.clock() while os.clock() - t < {work} do end
        local ok, err = queue.publish("done", {{ n = body.n, attempt = queue.message():attempt() }})
        if not ok then error(tostring(err)) end
      end
  - name: c
    kind: queue.consumer
    queue: jobs
    func: h
    concurrency: {concurrency}
    prefetch: {prefetch}
    lifecycle: {{auto_start: true, stop_timeout: 10s}}
"""


def make_app(root: Path, *, vt: str = "30s", work: float = 0.001, concurrency: int = 4, prefetch: int = 50) -> Path:
    return write_app(root, {"app.yaml": APP.format(vt=vt, work=work, concurrency=concurrency, prefetch=prefetch)})


def driver(root: Path) -> SqliteDriver:
    d = SqliteDriver("test:db", {"path": str(root / "queues.sqlite3"), "synchronous": "normal"})
    d.open()
    return d


def publish(root: Path, bodies: list[dict[str, Any]]) -> None:
    d = driver(root)
    d.declare("jobs", {})
    for i in range(0, len(bodies), 500):
        d.publish("jobs", [Message(json.dumps(b).encode(), {"timestamp": 0.0}, f"m{b['n']}")
                           for b in bodies[i:i + 500]])
    d.close()


def done(root: Path, run: int) -> list[dict[str, Any]]:
    d = driver(root)
    d.declare(f"done_{run}", {})
    c = d.consume(f"done_{run}", "test:reader", 10000)
    out: list[dict[str, Any]] = []
    while True:
        got = c.fetch(10000, 0)
        if not got:
            break
        out += [json.loads(x.message.body) for x in got]
    c.close()  # read without taking: they go back
    d.close()
    return out


def done_count(root: Path, run: int) -> int:
    d = driver(root)
    d.declare(f"done_{run}", {})
    n = d.stats(f"done_{run}").ready or 0
    d.close()
    return n


def runtime(root: Path, *args: str, run: int = 0, **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, RUN=str(run))
    return subprocess.Popen([sys.executable, "-m", "runtime", "run", str(root), "--log-level", "warn", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_memory_queues_refuse_processes_above_one(tmp_path: Path) -> None:
    write_app(tmp_path, {"app.yaml": """
        namespace: m
        entries:
          - {name: mem, kind: queue.driver.memory}
          - {name: q, kind: queue.queue, driver: mem}
          - {name: f, kind: function.lua, source: "return function() end"}
          - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
    """})
    out = subprocess.run([sys.executable, "-m", "runtime", "run", str(tmp_path), "--processes", "2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "app.yaml:" in out.stdout and "m:c" in out.stdout and "queue.driver.memory" in out.stdout


def test_processes_2_share_the_queue_each_message_once_and_both_work(tmp_path: Path) -> None:
    root = make_app(tmp_path, work=0.002, concurrency=2, prefetch=10)
    publish(root, [{"n": i} for i in range(1500)])
    p = runtime(root, "--processes", "2", "--until-idle")
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, err
    assert "d:c acked=1500 nacked=0 dead_lettered=0 processed=1500" in out
    workers = [int(m) for m in re.findall(r"^worker \d+ pids=\S+ processed=(\d+)$", out, re.M)]
    assert len(workers) == 2 and sum(workers) == 1500 and min(workers) > 0, out
    counts = Counter(r["n"] for r in done(root, 0))
    assert len(counts) == 1500 and set(counts.values()) == {1}


def test_two_runtime_run_processes_compete_for_one_queue(tmp_path: Path) -> None:
    root = make_app(tmp_path, work=0.004, concurrency=1, prefetch=5)
    publish(root, [{"n": i} for i in range(600)])
    procs = [runtime(root, "--until-idle") for _ in range(2)]
    outs = [p.communicate(timeout=100) for p in procs]
    processed = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        processed.append(int(re.search(r"processed=(\d+)", out).group(1)))  # type: ignore[union-attr]
    assert sum(processed) == 600 and min(processed) > 0, processed
    counts = Counter(r["n"] for r in done(root, 0))
    assert len(counts) == 600 and set(counts.values()) == {1}


def test_a_handler_slower_than_the_visibility_timeout_is_not_handed_to_another_process(tmp_path: Path) -> None:
    root = make_app(tmp_path, vt="1s", work=0, concurrency=2, prefetch=1)
    publish(root, [{"n": i, "sleep": 2.5} for i in range(4)])
    p = runtime(root, "--processes", "2", "--until-idle")
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, err
    seen = done(root, 0)
    assert sorted(r["n"] for r in seen) == [0, 1, 2, 3], "a lease ran out while its handler ran"
    assert {r["attempt"] for r in seen} == {1}


def test_processes_parent_restarts_a_worker_killed_with_sigkill(tmp_path: Path) -> None:
    root = make_app(tmp_path, work=0.003, concurrency=2, prefetch=10)
    publish(root, [{"n": i} for i in range(2000)])
    p = runtime(root, "--processes", "2", "--until-idle", "--log-level", "info")
    assert p.stderr is not None
    pid = None
    lines = []
    for line in p.stderr:
        lines.append(line)
        m = re.search(r"worker process 0 started \(pid (\d+)\)", line)
        if m:
            pid = int(m.group(1))
            break
    assert pid is not None, lines
    wait_until(lambda: done_count(root, 0) >= 300, 60, "progress before the kill")
    os.kill(pid, signal.SIGKILL)
    out, err = p.communicate(timeout=100)
    err = "".join(lines) + err
    assert p.returncode == 0, err
    assert re.search(rf"worker process 0 \(pid {pid}\) died with exit code -9; restarting", err), err
    assert len(re.findall(r"worker process 0 started", err)) == 2
    counts = Counter(r["n"] for r in done(root, 0))
    assert set(counts) == set(range(2000)), "a message was lost"
    duplicates = sum(v - 1 for v in counts.values())
    assert duplicates <= 10 + 2, "more duplicates than the killed worker could have held"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_five_times_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """10,000 messages, handlers of about 1 ms, concurrency 4, prefetch 50: killed with
    SIGKILL five times at different points, then run to idle. Every id was processed at
    least once; an id processed twice had been taken by a killed process."""
    total = 10_000
    root = make_app(tmp_path, vt="2s", work=0.001, concurrency=4, prefetch=50)
    publish(root, [{"n": i} for i in range(total)])
    processed_before = 0
    for run, fraction in enumerate((0.1, 0.25, 0.45, 0.6, 0.8), start=1):
        p = runtime(root, run=run)
        target = int(total * fraction)
        wait_until(lambda p=p, run=run, target=target, before=processed_before:
                   before + done_count(root, run) >= target or p.poll() is not None, 120,
                   f"run {run} to reach {target}")
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        processed_before += done_count(root, run)
    final = runtime(root, "--until-idle", run=99)
    out, err = final.communicate(timeout=200)
    assert final.returncode == 0, err
    per_run = {run: [r["n"] for r in done(root, run)] for run in (1, 2, 3, 4, 5, 99)}
    counts = Counter(n for ns in per_run.values() for n in ns)
    assert set(counts) == set(range(total)), f"missing: {sorted(set(range(total)) - set(counts))[:10]}"
    killed = {n for run in (1, 2, 3, 4, 5) for n in per_run[run]}
    final_counts = Counter(per_run[99])
    assert max(final_counts.values()) == 1, "the clean run processed a message twice"
    duplicates = [n for n, c in counts.items() if c > 1]
    assert all(n in killed for n in duplicates)
    assert len(duplicates) <= 5 * (50 + 4), len(duplicates)
    assert all(counts[n] <= 6 for n in duplicates)

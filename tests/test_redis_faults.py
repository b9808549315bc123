"""Faults on real Redis servers the tests own (SPEC §7.0, §7.4): the server stopped and
restarted mid-stream (its append-only file keeps the data), stopped for good, `kill -9` of
one of two consuming processes, a message that kills its worker every time, and
`runtime run --processes 2`. Every server and process here is one the test started."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import wait_until, write_app
from redis_support import RedisServer, private_server

from runtime import App
from runtime.drivers.redis import RedisDriver
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(90)

APP = """
namespace: r
entries:
  - name: rd
    kind: queue.driver.redis
    url: "redis://127.0.0.1:{port}/0"
    claim_interval: 300ms
    claim_min_idle: "{min_idle}"
    read_timeout: 1s
    dial_timeout: 500ms
    lifecycle: {{restart: {{initial_delay: 100ms, max_delay: 500ms}}}}
  - name: jobs
    kind: queue.queue
    driver: rd
    retry: {{initial_delay: 50ms, max_delay: 200ms}}
    dead_letter: {{queue: dead, max_attempts: 3}}
  - name: done
    kind: queue.queue
    driver: rd
  - name: dead
    kind: queue.queue
    driver: rd
  - name: h
    kind: function.lua
    modules: [queue, time]
    source: |
      local queue = require("queue")
      local time = require("time")
      return function(body)
        if body.spin then while true do end end
        if body.sleep then time.sleep(body.sleep) end
        local ok, err = queue.publish("done", {{ n = body.n, attempt = queue.message():attempt() }})
        if not ok then error(tostring(err)) end
      end
  - name: c
    kind: queue.consumer
    queue: jobs
    func: h
    concurrency: {concurrency}
    prefetch: {prefetch}
    lifecycle: {{auto_start: true, stop_timeout: 5s}}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from private_server(tmp_path)


def make_app(root: Path, server: RedisServer, *, min_idle: str = "2s", concurrency: int = 4,
             prefetch: int = 32) -> Path:
    return write_app(root, {"app.yaml": APP.format(port=server.port, min_idle=min_idle, concurrency=concurrency,
                                                   prefetch=prefetch)})


def publish(server: RedisServer, bodies: list[dict[str, Any]]) -> None:
    d = RedisDriver("test:pub", {"url": server.url})
    d.open()
    try:
        d.declare("jobs", {})
        for i in range(0, len(bodies), 500):
            d.publish("jobs", [Message(json.dumps(b).encode(), {"timestamp": 0.0}, f"m{b['n']}")
                               for b in bodies[i:i + 500]])
    finally:
        d.close()


def done(server: RedisServer, queue: str = "done") -> list[dict[str, Any]]:
    with server.client() as r:
        return [json.loads(fields[b"b"]) for _, fields in r.xrange(f"runtime:{queue}")]


def done_count(server: RedisServer) -> int:
    with server.client() as r:
        return int(r.xlen("runtime:done"))


def runtime(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runtime", "run", str(root), "--log-level", "info", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_server_stopped_and_restarted_mid_stream_nothing_is_lost(
        tmp_path: Path, server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    total = 3000
    publish(server, [{"n": i} for i in range(total)])
    app = App.load(make_app(tmp_path / "app", server))
    caplog.set_level(logging.INFO, logger="runtime")
    app.start()
    try:
        wait_until(lambda: done_count(server) >= 600, 30, "progress before the stop")
        server.stop()  # SIGTERM: the server writes its AOF and exits
        wait_until(lambda: bool(app.reconnecting()), 10, "the consumer to notice")
        time.sleep(0.5)  # down for a while: the consumer keeps trying
        assert app.running
        server.start()
        assert app.wait_idle(60), f"not idle after the restart: {app.stats()}"
        seen = Counter(r["n"] for r in done(server))
        assert set(seen) == set(range(total)), f"lost: {sorted(set(range(total)) - set(seen))[:10]}"
        assert "connection lost" in caplog.text and "connection is back" in caplog.text
        assert app.stats()["consumers"]["r:c"]["dead_lettered"] == 0
    finally:
        app.stop(10)


def test_server_stopped_for_good_the_app_logs_and_waits(tmp_path: Path, server: RedisServer) -> None:
    publish(server, [{"n": i, "sleep": 0.01} for i in range(200)])
    p = runtime(make_app(tmp_path / "app", server, concurrency=2, prefetch=4))
    try:
        wait_until(lambda: done_count(server) >= 20, 30, "progress before the stop")
        server.stop()
        time.sleep(3.0)  # a while without a server: the process must live on, waiting
        assert p.poll() is None, "the app exited when its server went away"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    assert "connection lost" in err and "reconnecting" in err, err
    assert "Traceback" not in err, err


def test_kill9_of_one_of_two_processes_the_other_finishes_its_messages(tmp_path: Path, server: RedisServer) -> None:
    total = 2000
    root = make_app(tmp_path / "app", server, min_idle="1m", concurrency=2, prefetch=16)
    publish(server, [{"n": i, "sleep": 0.002} for i in range(total)])
    victim = runtime(root)
    survivor = runtime(root, "--until-idle")
    try:
        wait_until(lambda: done_count(server) >= 400, 60, "progress before the kill")
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=10)
        assert victim.returncode == -signal.SIGKILL
        out, err = survivor.communicate(timeout=60)  # claims the dead pid's entries at once (not after 1m)
    finally:
        for p in (victim, survivor):
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    assert survivor.returncode == 0, err
    assert "claimed" in err, err
    counts = Counter(r["n"] for r in done(server))
    assert set(counts) == set(range(total)), "a message was lost"
    assert sum(v - 1 for v in counts.values()) <= 16 + 2 + 2, "more duplicates than the victim could have held"


def test_a_message_that_kills_its_worker_every_time_reaches_the_dead_letter_queue(
        tmp_path: Path, server: RedisServer) -> None:
    root = make_app(tmp_path / "app", server, min_idle="1m", concurrency=1, prefetch=1)
    publish(server, [{"n": 0, "spin": True}])
    with server.client() as r:
        def delivered(pid: int) -> int:
            rows = r.xpending_range("runtime:jobs", "runtime", "-", "+", 1)
            return int(rows[0]["times_delivered"]) if rows and rows[0]["consumer"].endswith(f":{pid}".encode()) else 0

        for attempt in (1, 2, 3):  # each run takes it (the last one's entry at once), spins, and is killed
            p = runtime(root)
            try:
                wait_until(lambda p=p, a=attempt: delivered(p.pid) == a, 30, f"delivery {attempt}")
                time.sleep(0.2)  # it is in the handler
            finally:
                p.kill()
                p.communicate(timeout=10)
        p = runtime(root, "--until-idle")
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "dead_lettered=1" in out, out
    dead = done(server, "dead")
    assert [d["n"] for d in dead] == [0]
    with server.client() as r:
        (_, fields), = r.xrange("runtime:dead")
        headers = msgpack.unpackb(fields[b"h"])
    assert headers["x_attempts"] == 3 and headers["x_original_queue"] == "r:jobs"
    assert "4 times" in headers["x_dead_letter_reason"]


def test_processes_2_share_the_queue_and_a_slow_handler_is_not_claimed(tmp_path: Path, server: RedisServer) -> None:
    root = make_app(tmp_path / "app", server, min_idle="1s", concurrency=2, prefetch=2)
    publish(server, [{"n": i, "sleep": 2.5} for i in range(4)] + [{"n": i} for i in range(4, 400)])
    p = runtime(root, "--processes", "2", "--until-idle", "--log-level", "warn")
    out, err = p.communicate(timeout=80)
    assert p.returncode == 0, err
    assert "r:c acked=400 nacked=0 dead_lettered=0 processed=400" in out, out
    workers = [int(m) for m in re.findall(r"^worker \d+ pids=\S+ processed=(\d+)$", out, re.M)]
    assert len(workers) == 2 and sum(workers) == 400 and min(workers) > 0, out
    seen = done(server)
    assert Counter(r["n"] for r in seen) == Counter(range(400)), "a message was lost or handled twice"
    assert {r["attempt"] for r in seen} == {1}, "a slow handler's entry was claimed while it ran"


def test_threads_are_closed(server: RedisServer) -> None:
    """A driver leaves no thread behind after close (the suite turns warnings into errors)."""
    before = set(threading.enumerate())
    d = RedisDriver("test:t", {"url": server.url})
    d.open()
    d.declare("q", {})
    d.consume("q", "c", 1).close()
    d.close()
    assert set(threading.enumerate()) - before == set()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_server_restarts_and_kill9s_while_two_processes_consume(tmp_path: Path, server: RedisServer) -> None:
    """10,000 messages, two `runtime run` processes; the server is stopped and started again
    three times and one process is killed with SIGKILL (and started again) twice, all
    mid-stream. Then one run to idle: every message handled at least once, none dead-lettered,
    and nothing left in the stream, the pending lists or the sorted set."""
    total = 10_000
    root = make_app(tmp_path / "app", server, min_idle="2s", concurrency=2, prefetch=16)
    publish(server, [{"n": i, "sleep": 0.001} for i in range(total)])
    procs = [runtime(root), runtime(root)]
    try:
        for step, target in enumerate((1500, 3000, 4500, 6000, 7500)):
            wait_until(lambda t=target: done_count(server) >= t, 90, f"{target} done")
            if step % 2 == 0:
                server.stop()
                time.sleep(0.5)  # down for a while
                server.start()
            else:
                victim = procs.pop(0)
                os.kill(victim.pid, signal.SIGKILL)
                victim.communicate(timeout=10)
                procs.append(runtime(root))
        final = runtime(root, "--until-idle")
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate(timeout=10)
    wait_until(lambda: done_count(server) >= total, 60, "all done")
    counts = Counter(r["n"] for r in done(server))
    assert set(counts) == set(range(total)), f"lost: {sorted(set(range(total)) - set(counts))[:10]}"
    assert done(server, "dead") == []
    with server.client() as r:
        assert r.xpending("runtime:jobs", "runtime")["pending"] == 0
        assert r.xlen("runtime:jobs") == 0 and r.zcard("runtime:jobs:delayed") == 0

"""samples/redis end to end on the machine's server (a key prefix of its own, deleted
afterwards): the jobs file to the end with its dead letters, then a `kill -9` mid-stream and
the recovery by a second `runtime run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import redis
from redis_support import delete_prefix, gate_shared, shared_prefix

from runtime.drivers.redis import RedisDriver
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "redis"
JOBS = [json.loads(line) for line in (SAMPLE / "jobs.jsonl").read_text().splitlines()]
FAILING = {j["id"] for j in JOBS if j.get("fail")}


@pytest.fixture
def prefix() -> object:
    gate_shared()
    p = shared_prefix()
    yield p
    delete_prefix(p)


def run(prefix: str, *args: str, publish: bool = True) -> subprocess.Popen[str]:
    extra = ["--publish", f"redis:jobs=@{SAMPLE / 'jobs.jsonl'}"] if publish else []
    return subprocess.Popen([sys.executable, "-m", "runtime", "run", str(SAMPLE), *extra, *args],
                            env=dict(os.environ, REDIS_PREFIX=prefix), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def dead_letters(r: redis.Redis, prefix: str) -> list[tuple[int, dict[str, object]]]:
    return [(json.loads(f[b"b"])["id"], msgpack.unpackb(f[b"h"])) for _, f in r.xrange(f"{prefix}failed")]


def test_the_sample_runs_to_the_end_with_its_dead_letters(prefix: str) -> None:
    p = run(prefix, "--until-idle", "--log-level", "error")
    out, err = p.communicate(timeout=80)
    assert p.returncode == 0, err
    assert "redis:worker acked=4990 nacked=20 dead_lettered=10 processed=5020" in out, out
    with redis.Redis("127.0.0.1", 6379, socket_timeout=5) as r:
        assert r.xlen(f"{prefix}jobs") == 0 and r.zcard(f"{prefix}jobs:delayed") == 0
        dead = dead_letters(r, prefix)
    assert {i for i, _ in dead} == FAILING
    assert all(h["x_attempts"] == 3 and h["x_original_queue"] == "redis:jobs" for _, h in dead)


def publish_jobs(prefix: str) -> None:
    d = RedisDriver("test:pub", {"url": "redis://127.0.0.1:6379/0", "key_prefix": prefix})
    d.open()
    try:
        d.declare("jobs", {})
        for i in range(0, len(JOBS), 1000):
            d.publish("jobs", [Message.new(json.dumps(j).encode()) for j in JOBS[i:i + 1000]])
    finally:
        d.close()


def test_kill9_mid_stream_then_a_second_run_recovers_at_once(prefix: str) -> None:
    publish_jobs(prefix)  # all of them first: the kill must not cut the publishing short
    p = run(prefix, "--log-level", "warn", publish=False)
    with redis.Redis("127.0.0.1", 6379, socket_timeout=5) as r:
        deadline = time.monotonic() + 30
        while r.xlen(f"{prefix}jobs") == 0 or r.xlen(f"{prefix}jobs") > 4000:
            assert time.monotonic() < deadline and p.poll() is None, "no progress"
            time.sleep(0.02)  # watching another process's progress: nothing to wait on
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=10)
        held = r.xpending(f"{prefix}jobs", "runtime")["pending"]
        assert held > 0, "the killed process held nothing: the test shows nothing"
        t0 = time.monotonic()
        second = run(prefix, "--until-idle", "--log-level", "info", publish=False)
        out, err = second.communicate(timeout=80)
        assert second.returncode == 0, err
        assert "claimed" in err and "left by a stopped or stalled consumer" in err, err
        assert time.monotonic() - t0 < 8, "waited for claim_min_idle (10 s) instead of claiming the dead pid's at once"
        assert r.xlen(f"{prefix}jobs") == 0 and r.xpending(f"{prefix}jobs", "runtime")["pending"] == 0
        assert {i for i, _ in dead_letters(r, prefix)} == FAILING

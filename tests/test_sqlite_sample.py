"""samples/durable end to end: the SQLite driver under the real consumer pool and Lua, a
`runtime run` process killed with SIGKILL mid-stream, and the recovery by a new App."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from runtime import App
from runtime.drivers.sqlite import SqliteDriver
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "durable"
JOBS = [json.loads(line) for line in (SAMPLE / "jobs.jsonl").read_text().splitlines()]
FAILING = {j["id"] for j in JOBS if j.get("fail")}


def copy_sample(tmp_path: Path, visibility_timeout: str = "1s") -> Path:
    root = tmp_path / "durable"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns(".runtime"))
    yaml = (root / "app.yaml").read_text()
    assert "visibility_timeout: 5s" in yaml
    (root / "app.yaml").write_text(yaml.replace("visibility_timeout: 5s", f"visibility_timeout: {visibility_timeout}"))
    return root


def counts(db: Path) -> dict[tuple[str, int], int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT queue, state, count(*) FROM rq_messages GROUP BY 1, 2").fetchall()
    conn.close()
    return {(q, s): n for q, s, n in rows}


def dead_letter_ids(app: App) -> tuple[set[int], set[object]]:
    bound = app.router.queues["durable:failed"]
    c = bound.driver.consume(bound.name, "test:drain", 100)
    ids: set[int] = set()
    attempts: set[object] = set()
    try:
        while got := c.fetch(100, 0):
            for d in got:
                ids.add(json.loads(d.message.body)["id"])
                attempts.add(d.message.headers.get("x_attempts"))
                c.ack(d)
    finally:
        c.close()
    return ids, attempts


def test_sample_runs_to_the_end(tmp_path: Path) -> None:
    root = copy_sample(tmp_path)
    app = App.load(root)
    app.start()
    try:
        for job in JOBS[:1000]:
            app.publish("durable:jobs", job)
        assert app.wait_idle(60)
        stats = app.stats()
        failing = {i for i in FAILING if i <= 1000}
        assert stats["consumers"]["durable:worker"]["acked"] == 1000 - len(failing)
        assert stats["consumers"]["durable:worker"]["dead_lettered"] == len(failing)
        assert stats["queues"]["durable:jobs"]["message_count"] == 0
        assert dead_letter_ids(app) == (failing, {3})
    finally:
        app.stop(10)
    assert (root / ".runtime" / "queues.sqlite3").is_file()


def test_kill_9_mid_stream_then_recovery(tmp_path: Path) -> None:
    root = copy_sample(tmp_path)
    db = root / ".runtime" / "queues.sqlite3"
    # The jobs are in the database before the first process starts (as a producer elsewhere
    # would have left them).
    d = SqliteDriver("test:producer", {"path": str(db)})
    d.open()
    d.declare("jobs", {})
    d.publish("jobs", [Message.new(json.dumps(job).encode()) for job in JOBS])
    d.close()
    total = len(JOBS)
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "run", str(root), "--log-level", "error",
                             "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Mid-stream: some jobs done, most still to do.
        assert wait_for(lambda: sum(n for (q, _), n in counts(db).items() if q == "jobs") < total - 500, 30)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    left = counts(db)
    assert left.get(("jobs", 0), 0) > 1000, f"killed too late to be mid-stream: {left}"
    taken = left.get(("jobs", 1), 0)
    assert taken > 0, f"the killed process held nothing: {left}"

    app = App.load(root)
    app.start()
    try:
        assert app.wait_idle(60)
        assert app.stats()["queues"]["durable:jobs"]["message_count"] == 0
        ids, attempts = dead_letter_ids(app)
        assert ids == FAILING and attempts == {3}
    finally:
        app.stop(10)
    assert counts(db) == {}

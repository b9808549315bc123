"""`runtime inspect` and `runtime dlq list|replay|purge` (SPEC §8), through the CLI in a
subprocess, on a sqlite app whose dead-letter queue a run has filled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import write_app

from runtime import App, admin
from runtime.drivers.sqlite import SqliteConsumer

pytestmark = pytest.mark.timeout(60)
RUNTIME = [sys.executable, "-m", "runtime"]

APP = """
namespace: s
entries:
  - {name: db, kind: queue.driver.sqlite, path: q.sqlite3, synchronous: normal}
  - {name: mem, kind: queue.driver.memory}
  - name: jobs
    kind: queue.queue
    driver: db
    dead_letter: {queue: dead, max_attempts: 2}
    retry: {initial_delay: 0}
  - {name: dead, kind: queue.queue, driver: db}
  - {name: scratch, kind: queue.queue, driver: mem}
  - name: h
    kind: function.lua
    source: |
      return function(body)
        if body.n % 5 == 0 then error("bad order " .. body.n) end
      end
  - {name: c, kind: queue.consumer, queue: jobs, func: h, lifecycle: {auto_start: true}}
"""


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUNTIME, *args], capture_output=True, text=True, timeout=60,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    root = write_app(tmp_path, {"app.yaml": APP})
    (root / "in.jsonl").write_text("\n".join(json.dumps({"n": i}) for i in range(20)))
    out = cli("run", str(root), "--until-idle", "--log-level", "error", "--publish", f"s:jobs=@{root / 'in.jsonl'}")
    assert out.returncode == 0, out.stderr
    assert "s:c acked=16 nacked=4 dead_lettered=4" in out.stdout
    return root


def queues(root: Path) -> dict[str, Any]:
    out = cli("inspect", str(root), "--json")
    assert out.returncode == 0, out.stderr
    return {r["queue"]: r for r in json.loads(out.stdout)["queues"]}


def test_inspect_shows_counts_and_dead_letters_and_says_what_it_cannot_see(app_dir: Path) -> None:
    q = queues(app_dir)
    assert (q["s:jobs"]["ready"], q["s:jobs"]["in_flight"], q["s:jobs"]["delayed"]) == (0, 0, 0)
    assert q["s:jobs"]["dead_letter_queue"] == "s:dead" and q["s:jobs"]["dead_letters"] == 4
    assert q["s:dead"]["ready"] == 4
    assert q["s:scratch"]["in_process_only"] is True and q["s:scratch"]["ready"] is None
    table = cli("inspect", str(app_dir))
    assert table.returncode == 0
    assert "s:jobs" in table.stdout and "nothing to see from outside" in table.stdout


def test_dlq_list_shows_each_dead_letter_and_leaves_it(app_dir: Path) -> None:
    out = cli("dlq", "list", str(app_dir), "s:dead", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 4
    assert {r["reason"].split(": ", 1)[1] for r in rows} == {f"bad order {n}" for n in (0, 5, 10, 15)}
    assert {r["attempts"] for r in rows} == {2} and {r["original_queue"] for r in rows} == {"s:jobs"}
    assert all(r["time"] for r in rows)
    assert queues(app_dir)["s:dead"]["ready"] == 4, "listing takes nothing away"
    assert len(json.loads(cli("dlq", "list", str(app_dir), "s:dead", "--json", "--limit", "2").stdout)) == 2


def test_dlq_replay_moves_a_dead_letter_back_with_attempts_reset(app_dir: Path) -> None:
    rows = json.loads(cli("dlq", "list", str(app_dir), "s:dead", "--json").stdout)
    target = rows[1]["id"]
    out = cli("dlq", "replay", str(app_dir), "s:dead", "--id", target)
    assert out.returncode == 0, out.stderr
    assert f"{target}  -> s:jobs" in out.stdout
    q = queues(app_dir)
    assert q["s:dead"]["ready"] == 3 and q["s:jobs"]["ready"] == 1
    app = App.load(app_dir)
    with admin.connect(app, [app.registry.entries["s:jobs"]]) as conn:  # type: ignore[list-item]
        c = conn.drivers["s:db"].consume("jobs", "test", 10)
        [d] = c.fetch(10, 1.0)
        assert d.message.id == target and d.attempt == 1
        assert not [k for k in d.message.headers if k.startswith("x_")]
        assert "timestamp" in d.message.headers
        c.close()
    left = [r["id"] for r in json.loads(cli("dlq", "list", str(app_dir), "s:dead", "--json").stdout)]
    assert left == [r["id"] for r in rows if r["id"] != target], "the others kept their order"


def test_a_replay_that_dies_midway_duplicates_rather_than_loses(app_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    app = App.load(app_dir)

    def crash(self: Any, d: Any) -> None:
        raise RuntimeError("killed between publish and ack")

    monkeypatch.setattr(SqliteConsumer, "_ack", crash)
    with pytest.raises(RuntimeError):
        admin.replay(app, "s:dead", None, 1)
    monkeypatch.undo()
    q = queues(app_dir)
    assert q["s:jobs"]["ready"] == 1, "published to the original queue"
    # Still in the dead-letter queue: the one whose ack failed stays leased (in flight) until
    # its visibility timeout, as after a real crash, then comes back.
    assert q["s:dead"]["ready"] + q["s:dead"]["in_flight"] == 4


def test_dlq_purge_asks_unless_yes(app_dir: Path) -> None:
    refused = cli("dlq", "purge", str(app_dir), "s:dead", "--all")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert queues(app_dir)["s:dead"]["ready"] == 4
    usage = cli("dlq", "purge", str(app_dir), "s:dead")
    assert usage.returncode == 2 and "--all" in usage.stderr
    done = cli("dlq", "purge", str(app_dir), "s:dead", "--all", "--yes")
    assert done.returncode == 0 and "purged 4 dead letters" in done.stdout
    assert queues(app_dir)["s:dead"]["ready"] == 0


def test_dlq_tools_on_a_memory_queue_say_there_is_nothing_to_see(app_dir: Path) -> None:
    out = cli("dlq", "list", str(app_dir), "s:scratch")
    assert out.returncode == 1 and "nothing to see from outside" in out.stderr
    unknown = cli("dlq", "list", str(app_dir), "s:nope")
    assert unknown.returncode == 1 and "not found" in unknown.stderr

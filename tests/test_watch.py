"""`runtime run --watch` (SPEC §8) and App.reload: a valid change restarts only the
services it affects, gracefully, with no message lost; an invalid change is reported with
file:line and the app carries on unchanged."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import drain, write_app

from runtime import App
from runtime.drivers.sqlite import SqliteDriver
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(90)

HANDLER = """
local queue = require("queue")
local time = require("time")
return function(body)
  time.sleep(SLEEP)
  local ok, err = queue.publish("done", { n = body.n, v = VERSION })
  if not ok then error(tostring(err)) end
end
"""

APP = """
namespace: w
entries:
  - {name: db, kind: queue.driver.DRIVER, FIELDS}
  - {name: jobs, kind: queue.queue, driver: db}
  - {name: other, kind: queue.queue, driver: db}
  - {name: done, kind: queue.queue, driver: db, driver_options: {memory: {max_length: 100000}}}
  - {name: h, kind: function.lua, modules: [queue, time], source: "file://h.lua"}
  - {name: h2, kind: function.lua, modules: [queue, time], source: "file://h2.lua"}
  - {name: c, kind: queue.consumer, queue: jobs, func: h, concurrency: 2, lifecycle: {auto_start: true}}
  - {name: c2, kind: queue.consumer, queue: other, func: h2, lifecycle: {auto_start: true}}
"""


def handler(version: int, sleep: float = 0.0) -> str:
    return HANDLER.replace("VERSION", str(version)).replace("SLEEP", str(sleep))


def make(root: Path, driver: str, fields: str, sleep: float = 0.0) -> Path:
    return write_app(root, {"app.yaml": APP.replace("DRIVER", driver).replace("FIELDS", fields),
                            "h.lua": handler(1, sleep), "h2.lua": handler(100)})


def test_reload_restarts_only_what_changed_and_loses_nothing(tmp_path: Path) -> None:
    root = make(tmp_path, "memory", "lifecycle: {auto_start: true}", sleep=0.002)
    app = App.load(root)
    app.start()
    try:
        before = {s: id(svc) for s, svc in app._consumers.items()}
        for i in range(300):
            app.publish("w:jobs", {"n": i})
        (root / "h.lua").write_text(handler(2, 0.002))
        restarted = app.reload(App.load(root).registry)
        assert restarted == ["w:c"], "only the consumer whose handler changed"
        assert id(app._consumers["w:c2"]) == before["w:c2"]
        assert app.wait_idle(30)
        done = [v for _, v in drain(app, "w:done")]
        counts = Counter(d["n"] for d in done)
        assert set(counts) == set(range(300)) and set(counts.values()) == {1}, "lost or doubled across the reload"
        assert {d["v"] for d in done} <= {1, 2} and done[-1]["v"] == 2
        assert app.stats()["consumers"]["w:c"]["acked"] == 300, "counts add up across the restart"
        app.publish("w:other", {"n": 1})
        assert app.wait_idle(10)
        assert [v["v"] for _, v in drain(app, "w:done")] == [100]
    finally:
        app.stop()


def test_reload_into_a_handler_that_fails_to_start_goes_back(tmp_path: Path) -> None:
    root = make(tmp_path, "memory", "lifecycle: {auto_start: true}")
    app = App.load(root)
    app.start()
    try:
        (root / "h.lua").write_text('error("broken at load")')
        broken = App.load(root)  # valid syntax: only starting it finds the error
        with pytest.raises(Exception, match="broken at load"):
            app.reload(broken.registry)
        app.publish("w:jobs", {"n": 7})
        assert app.wait_idle(10)
        assert [v for _, v in drain(app, "w:done")] == [{"n": 7, "v": 1}]
    finally:
        app.stop()


def _lines(stream: IO[str], sink: list[str], seen: threading.Condition) -> None:
    for line in stream:
        with seen:
            sink.append(line)
            seen.notify_all()


def _wait_line(lines: list[str], seen: threading.Condition, pattern: str, start: int = 0, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    with seen:
        while True:
            for i in range(start, len(lines)):
                if re.search(pattern, lines[i]):
                    return i
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no log line matching {pattern!r}:\n{''.join(lines)}"
            seen.wait(remaining)


def _sqlite(root: Path) -> SqliteDriver:
    d = SqliteDriver("test:db", {"path": str(root / "q.sqlite3"), "synchronous": "normal"})
    d.open()
    for q in ("jobs", "done"):
        d.declare(q, {})
    return d


def _done(d: SqliteDriver, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while (d.stats("done").ready or 0) < n:
        assert time.monotonic() < deadline, f"only {d.stats('done').ready} of {n} done"
        time.sleep(0.05)  # another process's queue: nothing to wait on here
    c = d.consume("done", "test", 10000)
    got = [json.loads(x.message.body) for x in c.fetch(10000, 0)]
    for x in c.deliveries():
        c.ack(x)
    c.close()
    return got


def test_watch_in_a_terminal_run(tmp_path: Path) -> None:
    root = make(tmp_path, "sqlite", "path: q.sqlite3, synchronous: normal, poll_interval: 20ms")
    d = _sqlite(root)
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "run", str(root), "--watch", "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Condition()
    assert proc.stderr is not None
    reader = threading.Thread(target=_lines, args=(proc.stderr, lines, seen), daemon=True)
    reader.start()
    try:
        _wait_line(lines, seen, r"started \d+ services")
        d.publish("jobs", [Message(json.dumps({"n": i}).encode(), {}, f"a{i}") for i in range(5)])
        assert {r["v"] for r in _done(d, 5)} == {1}

        (root / "h.lua").write_text(handler(2))
        at = _wait_line(lines, seen, r"reloaded: restarted w:c$")
        d.publish("jobs", [Message(json.dumps({"n": i}).encode(), {}, f"b{i}") for i in range(5)])
        assert {r["v"] for r in _done(d, 5)} == {2}

        (root / "h.lua").write_text("return function(body) if then end")
        bad = _wait_line(lines, seen, r"invalid; still running the previous version", at)
        assert re.search(r"h\.lua:1: .*syntax error", "".join(lines[bad:bad + 3])), "".join(lines[bad:])
        d.publish("jobs", [Message(json.dumps({"n": i}).encode(), {}, f"c{i}") for i in range(5)])
        assert {r["v"] for r in _done(d, 5)} == {2}, "the app carried on unchanged"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        reader.join(5)
        d.close()
    assert proc.returncode == 0
    assert "w:c acked=15" in out

"""`runtime run` in a subprocess (SPEC §8): until-idle, --publish, logs, signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLES, write_app

RUN = [sys.executable, "-m", "runtime", "run"]


def run(*args: str, cwd: Path = REPO, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_seed_app_until_idle_with_jsonl(tmp_path):
    out = run("--until-idle", "--publish", "app.queue:tasks=@tasks.jsonl", cwd=SAMPLES / "seed")
    assert out.returncode == 0, out.stderr
    assert "app.queue:task_consumer acked=20 nacked=0 dead_lettered=0 processed=20" in out.stdout
    assert out.stderr.count("Processing") == 20
    assert "[app.queue:task_handler task_handler.lua:21] Processing task_id=task-1" in out.stderr


def test_pipeline_sample_until_idle():
    out = run(str(SAMPLES / "pipeline"), "--until-idle", "--log-level", "warn", env={"ORDERS": "200"})
    assert out.returncode == 0, out.stderr
    assert "shop:fulfil_consumer acked=180 nacked=0 dead_lettered=0" in out.stdout
    assert "shop:validate_consumer acked=180 nacked=40 dead_lettered=20" in out.stdout


def test_json_log_format_lines(tmp_path):
    out = run(str(SAMPLES / "seed"), "--until-idle", "--log-format", "json",
              "--publish", 'app.queue:tasks={"id": "a-1", "action": "process"}')
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines()]
    lua = [r for r in records if r.get("entry") == "app.queue:task_handler"]
    assert lua == [{**lua[0], "msg": "Processing", "task_id": "a-1", "line": 21, "level": "info"}]
    assert {"ts", "logger"} <= set(lua[0])


@pytest.mark.parametrize("publish, code, phrase", [
    ("app.queue:tasks", 2, "expected QUEUE_ID=JSON"),
    ("app.queue:tasks={not json", 1, "invalid JSON"),
    ("app.queue:nope={}", 1, "queue 'app.queue:nope' not found"),
    ("app.queue:tasks=@missing.jsonl", 1, "cannot read file"),
])
def test_publish_errors(publish, code, phrase):
    out = run(str(SAMPLES / "seed"), "--until-idle", "--publish", publish)
    assert out.returncode == code
    assert phrase in out.stdout + out.stderr


def test_bad_jsonl_line_is_located(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n\n{"id": 2,,}\n')
    out = run(str(SAMPLES / "seed"), "--until-idle", "--publish", f"app.queue:tasks=@{tmp_path / 'in.jsonl'}")
    assert out.returncode == 1
    assert "in.jsonl:3: --publish: invalid JSON" in out.stdout


def test_missing_app_and_usage_errors(tmp_path):
    assert run(str(tmp_path / "nope")).returncode == 1
    assert run("--no-such-option").returncode == 2


def _app(tmp_path: Path, handler: str, consumer_extra: str = "") -> Path:
    return write_app(tmp_path, {"app.yaml": f"""
        namespace: t
        entries:
          - name: mem
            kind: queue.driver.memory
            lifecycle: {{auto_start: true}}
          - name: q
            kind: queue.queue
            driver: mem
          - name: h
            kind: function.lua
            source: file://h.lua
            modules: [time, logger]
          - name: c
            kind: queue.consumer
            queue: q
            func: h
            lifecycle: {{auto_start: true{consumer_extra}}}
    """, "h.lua": handler})


def test_handler_that_cannot_load_refuses_to_start(tmp_path):
    app = _app(tmp_path, "return 42")
    out = run(str(app), "--until-idle")
    assert out.returncode == 1
    assert "queue.consumer t:c cannot start" in out.stdout and "h.lua" in out.stdout
    assert "must return a function" in out.stdout


def _start(app: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([*RUN, str(app), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until it says it has started
        if "started" in line:
            return proc
    raise AssertionError(f"never started: {proc.wait(10)} {proc.stdout.read() if proc.stdout else ''}")


def _wait_line(proc: subprocess.Popen, phrase: str) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if phrase in line:
            return
    raise AssertionError(f"{phrase!r} never appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_exit_0(tmp_path, sig):
    proc = _start(_app(tmp_path, "return function() end"), "--publish", "t:q=1", "--publish", "t:q=2")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "t:c acked=" in out


BUSY = """
local logger = require("logger")
return function(n)
  logger.info("busy")
  local t = os.clock() while os.clock() - t < 5 do end
end
"""


def test_handler_overrunning_stop_timeout_exits_3_and_returns_message(tmp_path):
    proc = _start(_app(tmp_path, BUSY), "--publish", "t:q=1", "--stop-timeout", "0.2")
    _wait_line(proc, "busy")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "did not stop in time: t:c#0" in err
    assert "t:c acked=0 nacked=0 dead_lettered=0" in out


def test_second_signal_forces_exit_130(tmp_path):
    proc = _start(_app(tmp_path, BUSY, ", stop_timeout: 60s"), "--publish", "t:q=1")
    _wait_line(proc, "busy")
    proc.send_signal(signal.SIGINT)
    _wait_line(proc, "stopping")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130


def test_progress_is_shown_on_a_terminal(tmp_path):
    import pty
    app = _app(tmp_path, "local time = require('time') return function() time.sleep(0.01) end")
    master, slave = pty.openpty()
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(str(i) for i in range(150)))
    proc = subprocess.Popen([*RUN, str(app), "--until-idle", "--publish", f"t:q=@{jsonl}"],
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=30)
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "consumers" in screen and "in flight" in screen and "t:c" in screen
    assert "t:c acked=150" in out

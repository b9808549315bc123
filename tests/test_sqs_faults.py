"""Crash recovery on SQS (SPEC §7.0, §7.5): a `runtime run` process killed with SIGKILL
mid-stream holds leased messages; they come back after the visibility timeout, with the
lost delivery counted, and the next run processes them. On the local endpoint (moto's
server in this process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqs_support
from conftest import wait_until, write_app

from runtime.drivers.sqs import SqsDriver
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(90)
REPO = Path(__file__).resolve().parent.parent
JOBS = 40

WORK = """
local queue = require("queue")
local time = require("time")
return function(job)
    time.sleep(0.25)
    local m = queue.message()
    queue.publish("t:done", {id = job.id, attempt = m:attempt()})
    return true
end
"""


def app_files(jobs: str, done: str) -> dict[str, str]:
    return {"app.yaml": f"""
version: "1.0"
namespace: t
entries:
{sqs_support.aws_yaml()}
  - name: sqs
    kind: queue.driver.sqs
    config: aws
    endpoint: ${{env:SQS_ENDPOINT}}
    lifecycle: {{auto_start: true}}
  - name: jobs
    kind: queue.queue
    driver: sqs
    queue_name: {jobs}
  - name: done
    kind: queue.queue
    driver: sqs
    queue_name: {done}
  - name: work
    kind: function.lua
    source: file://work.lua
    modules: [queue, time]
  - name: worker
    kind: queue.consumer
    queue: jobs
    func: work
    concurrency: 4
    prefetch: 8
    driver_options:
      sqs: {{visibility_timeout: 2, wait_time: 1}}
    lifecycle: {{auto_start: true}}
""", "work.lua": WORK}


def test_kill9_then_the_next_run_gets_the_held_messages_after_the_visibility_timeout(tmp_path: Path) -> None:
    jobs, done = f"jobs{uuid.uuid4().hex[:8]}", f"done{uuid.uuid4().hex[:8]}"
    root = write_app(tmp_path / "app", app_files(jobs, done))
    driver = SqsDriver("test:sqs", sqs_support.driver_options())
    driver.open()
    try:
        driver.declare(jobs, {})
        driver.declare(done, {})
        driver.publish(jobs, [Message.new(json.dumps({"id": i}).encode()) for i in range(JOBS)])
        env = dict(os.environ, **sqs_support.env())
        first = subprocess.Popen([sys.executable, "-m", "runtime", "run", str(root), "--log-level", "warn"],
                                 env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: (driver.stats(done).ready or 0) >= 4 and (driver.stats(jobs).in_flight or 0) > 0,
                       30, "the first run to be mid-stream")
        finally:
            first.send_signal(signal.SIGKILL)
            first.communicate(timeout=10)
        held = driver.stats(jobs).in_flight or 0
        assert held > 0, "the killed process held nothing: the test shows nothing"
        second = subprocess.run([sys.executable, "-m", "runtime", "run", str(root), "--until-idle",
                                 "--log-level", "warn"], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 0, second.stderr
        st = driver.stats(jobs)
        assert (st.ready, st.in_flight, st.delayed) == (0, 0, 0)
        consumer = driver.consume(done, "test:done", 100)
        records = []
        while True:
            got = consumer.fetch(100, 1.0)
            if not got:
                break
            for d in got:
                records.append(json.loads(d.message.body))
                consumer.ack(d)
        consumer.close()
        assert {r["id"] for r in records} == set(range(JOBS)), "a job was lost"
        assert any(r["attempt"] >= 2 for r in records), "the delivery lost to the crash was not counted"
    finally:
        for q in (jobs, done):
            driver.delete_queue(q)
        driver.close()

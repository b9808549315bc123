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
from typing import Any

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


def test_an_unreachable_endpoint_is_unavailable_and_consumers_resume(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from test_amqp_faults import Proxy

    from runtime import App
    from runtime.errors import DriverUnavailable

    host, port = sqs_support.endpoint().rsplit("/", 1)[-1].split(":")
    proxy = Proxy((host, int(port)))
    jobs, done = f"jobs{uuid.uuid4().hex[:8]}", f"done{uuid.uuid4().hex[:8]}"
    files = app_files(jobs, done)
    files["app.yaml"] = files["app.yaml"].replace("${env:SQS_ENDPOINT}", f"http://127.0.0.1:{proxy.port}")
    files["app.yaml"] = files["app.yaml"].replace("lifecycle: {auto_start: true}\n  - name: jobs",
                                                  "lifecycle: {auto_start: true, restart: {initial_delay: 100ms, "
                                                  "max_delay: 500ms}}\n  - name: jobs", 1)
    for key, value in sqs_support.env().items():
        os.environ.setdefault(key, value)
    app = App.load(write_app(tmp_path / "app", files))
    app.start()
    try:
        with caplog.at_level(logging.INFO, "runtime"):
            app.publish("t:jobs", {"id": 1})
            assert wait_for_done(app, 1)
            proxy.cut()
            with pytest.raises(DriverUnavailable):
                app.publish("t:jobs", {"id": 2})
            proxy.restore()
            deadline = __import__("time").monotonic() + 20
            while True:  # the publisher retries, as an application would
                try:
                    app.publish("t:jobs", {"id": 2})
                    break
                except DriverUnavailable:
                    assert __import__("time").monotonic() < deadline, "the endpoint did not come back"
            assert wait_for_done(app, 2), "the consumer did not resume"
        text = [r.getMessage() for r in caplog.records]
        assert any("connection lost" in t for t in text) and any("connection is back" in t for t in text), text
        assert sum("connection lost" in t for t in text) <= 3, text  # not one per failed request
    finally:
        app.stop(10)
        proxy.close()
        d = SqsDriver("test:sqs", sqs_support.driver_options())
        d.open()
        for q in (jobs, done):
            d.declare(q, {})
            d.delete_queue(q)
        d.close()


def wait_for_done(app: Any, n: int, timeout: float = 20.0) -> bool:
    from conftest import wait_for

    return wait_for(lambda: app.consumer_stats()["t:worker"]["acked"] >= n, timeout, every=0.05)

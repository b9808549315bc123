"""End to end: 100,000 messages through a 2-stage pipeline with random failures, and an
app stopped mid-stream that loses nothing."""

from __future__ import annotations

import pytest
from conftest import drain, wait_for, write_app

from runtime import App

PIPELINE = """
namespace: e2e
entries:
  - name: mem
    kind: queue.driver.memory
    lifecycle: {auto_start: true}
  - name: stage1
    kind: queue.queue
    driver: mem
    driver_options: {memory: {max_length: 200000}}
  - name: stage2
    kind: queue.queue
    driver: mem
    codec: msgpack
    driver_options: {memory: {max_length: 200000}}
  - name: done
    kind: queue.queue
    driver: mem
    driver_options: {memory: {max_length: 200000}}
  # Failures happen before any side effect, so a message that reaches `done` was acked once.
  - name: h1
    kind: function.lua
    modules: [queue]
    source: |
      local queue = require("queue")
      return function(m)
        local r = math.random()
        if r < 0.03 then return nil, "random failure" end
        if r < 0.05 then error("random raise") end
        local ok, err = queue.publish("stage2", m)
        if not ok then return nil, err end
      end
  - name: h2
    kind: function.lua
    modules: [queue]
    source: |
      local queue = require("queue")
      return function(m)
        if math.random() < 0.05 then return false end
        local ok, err = queue.publish("done", {n = m.n})
        if not ok then return nil, err end
      end
  - name: c1
    kind: queue.consumer
    queue: stage1
    func: h1
    concurrency: 2
    prefetch: 50
    lifecycle: {auto_start: true}
  - name: c2
    kind: queue.consumer
    queue: stage2
    func: h2
    concurrency: 2
    prefetch: 50
    lifecycle: {auto_start: true}
"""


def _drain(app: App, queue_id: str) -> list:
    return [value for _, value in drain(app, queue_id)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_100k_messages_through_a_failing_pipeline_are_each_acked_once(tmp_path, caplog):
    caplog.set_level("ERROR")  # the thousands of expected failures log warnings
    write_app(tmp_path, {"app.yaml": PIPELINE})
    n = 100_000
    app = App.load(tmp_path)
    with app:
        for i in range(n):
            app.publish("e2e:stage1", {"n": i})
        assert app.wait_idle(240)
        stats = app.stats()
    c1, c2 = stats["consumers"]["e2e:c1"], stats["consumers"]["e2e:c2"]
    assert c1["acked"] == n and c2["acked"] == n
    assert c1["nacked"] > 0 and c2["nacked"] > 0  # the failures really happened
    assert c1["processed"] == n + c1["nacked"]
    for qid in ("e2e:stage1", "e2e:stage2"):
        assert stats["queues"][qid]["message_count"] == 0
    done = _drain(app, "e2e:done")
    assert sorted(m["n"] for m in done) == list(range(n))  # every id once, none twice


SINGLE = """
namespace: s
entries:
  - name: mem
    kind: queue.driver.memory
    lifecycle: {auto_start: true}
  - name: q
    kind: queue.queue
    driver: mem
    driver_options: {memory: {max_length: 100000}}
  - name: h
    kind: function.lua
    modules: [time]
    source: |
      local time = require("time")
      return function(m)
        local t = os.clock() while os.clock() - t < 0.0002 do end
      end
  - name: c
    kind: queue.consumer
    queue: q
    func: h
    concurrency: 4
    prefetch: 100
    lifecycle: {auto_start: true, stop_timeout: 5s}
"""


@pytest.mark.timeout(120)
def test_stop_mid_stream_loses_nothing(tmp_path):
    write_app(tmp_path, {"app.yaml": SINGLE})
    n = 20_000
    app = App.load(tmp_path)
    app.start()
    for i in range(n):
        app.publish("s:q", {"n": i})
    # Wait until processing is well under way (but not finished), then stop.
    assert wait_for(lambda: app.stats()["consumers"]["s:c"]["acked"] >= 500, 60)
    app.stop()
    stats = app.stats()
    acked = stats["consumers"]["s:c"]["acked"]
    queued = stats["queues"]["s:q"]
    assert 0 < acked < n
    assert queued["in_flight"] == 0
    assert acked + queued["ready"] == n
    # Every message still queued is one that was never acked: ids are all distinct.
    remaining = _drain(app, "s:q")
    assert len({m["n"] for m in remaining}) == len(remaining) == n - acked

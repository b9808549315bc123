"""Service lifecycle (SPEC §3): start order, auto_start pulling in dependencies, processes
and their restart policy, stop in reverse order."""

from __future__ import annotations

import logging

import pytest
from conftest import write_app

from runtime import App, ConfigError
from runtime.lifecycle.graph import start_order


def test_start_order_follows_dependencies(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: a
        entries:
          - name: c
            kind: queue.consumer
            queue: q
            func: f
            lifecycle: {auto_start: true, depends_on: [other]}
          - name: q
            kind: queue.queue
            driver: mem
          - name: mem
            kind: queue.driver.memory
          - name: other
            kind: queue.driver.memory
          - name: unused
            kind: queue.driver.memory
          - name: f
            kind: function.lua
            source: "return function() end"
    """})
    app = App.load(tmp_path)
    order = start_order(app.registry)
    assert "a:unused" not in order  # not auto_start, nobody needs it
    assert order.index("a:mem") < order.index("a:q") < order.index("a:c")
    assert order.index("a:other") < order.index("a:c") and order.index("a:f") < order.index("a:c")
    with app:
        # mem was pulled in by the consumer although it is not auto_start itself
        assert app.service_ids() == [i for i in order if i in ("a:mem", "a:other", "a:c")]
        assert app.stats()["queues"]["a:q"]["consumer_count"] == 1


PROCESS_APP = """
namespace: p
entries:
  - name: mem
    kind: queue.driver.memory
  - name: out
    kind: queue.queue
    driver: mem
  - name: proc
    kind: process.lua
    modules: [queue]
    source: |
      -- A restart gets a fresh Lua state, so runs are counted in the `out` queue.
      local queue = require("queue")
      return { main = function(n, fail_until)
        queue.publish("out", {n = n})
        local runs = queue.info("out").ready
        if runs < fail_until then error("failing run " .. runs) end
        return runs
      end }
  - name: svc
    kind: process.service
    process: proc
    args: [7, {fail_until}]
    lifecycle:
      auto_start: true
      depends_on: [mem]
      {restart}
"""


def _process_app(tmp_path, fail_until: int, restart: str) -> App:
    write_app(tmp_path, {"app.yaml": PROCESS_APP.replace("{fail_until}", str(fail_until))
              .replace("{restart}", restart)})
    return App.load(tmp_path)


def test_process_runs_main_with_args_once(tmp_path):
    app = _process_app(tmp_path, 0, "")
    with app:
        assert app.wait_idle(10)
        assert app.stats()["queues"]["p:out"]["ready"] == 1


def test_process_error_follows_restart_policy(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="runtime")
    app = _process_app(tmp_path, 3, "restart: {max_attempts: 5, initial_delay: 10ms, max_delay: 20ms}")
    with app:
        assert app.wait_idle(10)
        assert app.stats()["queues"]["p:out"]["ready"] == 3  # two failed runs, then success
    text = caplog.text
    assert "failed (attempt 1), restarting" in text and "failed (attempt 2), restarting" in text
    assert "process p:svc finished" in text


def test_process_gives_up_after_max_attempts(tmp_path, caplog):
    app = _process_app(tmp_path, 100, "restart: {max_attempts: 2, initial_delay: 1ms, max_delay: 1ms}")
    with app:
        assert app.wait_idle(10)
        assert app.stats()["queues"]["p:out"]["ready"] == 3  # first run + 2 restarts
    assert "failed after 3 attempts" in caplog.text


def test_process_without_restart_policy_fails_once(tmp_path, caplog):
    app = _process_app(tmp_path, 100, "")
    with app:
        assert app.wait_idle(10)
        assert app.stats()["queues"]["p:out"]["ready"] == 1
    assert "failing run 1" in caplog.text


def test_process_with_bad_chunk_refuses_start(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: p
        entries:
          - name: proc
            kind: process.lua
            source: "return { other = function() end }"
          - name: svc
            kind: process.service
            process: proc
            lifecycle: {auto_start: true}
    """})
    app = App.load(tmp_path)
    with pytest.raises(ConfigError, match="has no function 'main'"):
        app.start()
    assert app.service_ids() == []


def test_long_running_process_is_cancelled_on_stop(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: p
        entries:
          - name: proc
            kind: process.lua
            modules: [time]
            source: |
              local time = require("time")
              return { main = function()
                while true do
                  local ok, err = time.sleep(60)
                  if not ok then return "stopped: " .. err:kind() end
                end
              end }
          - name: svc
            kind: process.service
            process: proc
            lifecycle: {auto_start: true, stop_timeout: 5s}
    """})
    app = App.load(tmp_path)
    app.start()
    assert not app.wait_idle(0.05)  # the process is still running
    app.stop()  # returns promptly: time.sleep is cut short with Canceled
    assert app.idle()


def test_publish_when_not_running_is_unavailable(tmp_path):
    app = _process_app(tmp_path, 0, "")
    from runtime.errors import QueueUnavailable
    with pytest.raises(QueueUnavailable):
        app.publish("p:out", {"x": 1})


def test_restarted_app_finds_its_memory_queues_again(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: r
        entries:
          - name: mem
            kind: queue.driver.memory
            lifecycle: {auto_start: true}
          - name: q
            kind: queue.queue
            driver: mem
          - name: h
            kind: function.lua
            source: "return function() end"
          - name: c
            kind: queue.consumer
            queue: q
            func: h
    """})
    app = App.load(tmp_path)
    app.start()
    for i in range(5):
        app.publish("r:q", i)
    app.stop()
    assert app.stats()["queues"]["r:q"]["ready"] == 5
    app.start()  # same App: same driver, same contents
    assert app.stats()["queues"]["r:q"]["ready"] == 5
    app.publish("r:q", 6)
    app.stop()
    assert app.stats()["queues"]["r:q"]["ready"] == 6

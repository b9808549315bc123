"""Handler limits (SPEC §2 limits): `timeout` and `memory_limit` on functions and consumers."""

from __future__ import annotations

import logging
import time

import pytest
from conftest import write_app

from runtime import App, LuaHandlerError

RUNAWAYS = {
    "tight loop": "while true do end",
    "loop in pcall": "pcall(function() while true do end end) while true do end",
    "pcall retried forever": "while true do pcall(function() while true do end end) end",
    "loop in a coroutine": "coroutine.wrap(function() while true do end end)()",
    "coroutine.resume": "local co = coroutine.create(function() while true do end end) "
                        "while true do coroutine.resume(co) end",
    "xpcall handler": "xpcall(function() error('x') end, function() while true do end end)",
    "recursion in pcall": "local function f() pcall(f) end while true do f() end",
    "sleep past the limit": "time.sleep(30)",
    "string work": "local s = '' while true do s = s .. 'x' if #s > 1000 then s = '' end end",
    # The runtime's own modules are JIT-compiled in a limited state; the user's code never is,
    # nested functions and callbacks handed to C functions included.
    "nested closure": "local function outer() local function spin() while true do end end spin() end outer()",
    "sort comparator": "table.sort({3, 1, 2, 5, 4}, function(a, b) while true do end end)",
    "gsub callback": "string.gsub('aaa', 'a', function() while true do end end)",
    "hot loop then spin": "local n = 0 for i = 1, 1e6 do n = n + i end while n > 0 do n = n + 1 end",
}


def _function_app(tmp_path, body: str, limits: str) -> App:
    write_app(tmp_path, {"app.yaml": f"""
        namespace: t
        entries:
          - name: f
            kind: function.lua
            source: file://f.lua
            modules: [time]
            {limits}
    """, "f.lua": f"local time = require('time')\nreturn function()\n  {body}\n  return 'finished'\nend\n"})
    return App.load(tmp_path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(RUNAWAYS))
def test_time_limit_stops_runaway_code(tmp_path, name):
    app = _function_app(tmp_path, RUNAWAYS[name], "timeout: 200ms")
    t0 = time.monotonic()
    with pytest.raises(LuaHandlerError) as info:
        app.call("t:f")
    elapsed = time.monotonic() - t0
    assert "exceeded its time limit of 0.2s" in str(info.value)
    assert "f.lua:" in str(info.value)  # where it was stopped
    assert elapsed < 2.0
    # the state is still usable: a later call that finishes in time works
    assert _function_app(tmp_path, "", "timeout: 1s").call("t:f") == "finished"


@pytest.mark.timeout(30)
def test_time_limit_stops_a_loop_in_an_imported_library(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: lib, kind: library.lua, source: file://lib.lua}
          - {name: f, kind: function.lua, source: file://f.lua, imports: {lib: t:lib}, timeout: 200ms}
    """, "lib.lua": "local M = {} function M.spin() local x = 0 while true do x = x + 1 end end return M",
        "f.lua": "local lib = require('lib') return function() lib.spin() end"})
    with pytest.raises(LuaHandlerError, match="exceeded its time limit"):
        App.load(tmp_path).call("t:f")


def test_code_within_the_limit_is_unaffected(tmp_path):
    app = _function_app(tmp_path, "local s = 0 for i = 1, 1e5 do s = s + i end time.sleep(0.01)", "timeout: 5s")
    assert app.call("t:f") == "finished"


@pytest.mark.timeout(60)
def test_memory_limit_turns_bombs_into_errors(tmp_path):
    for bomb in ("local s = string.rep('x', 2^30)",
                 "local t = {} for i = 1, 1e9 do t[i] = i end",
                 "local t = {} while true do t[#t + 1] = string.rep('y', 1000) .. #t end"):
        app = _function_app(tmp_path, bomb, "memory_limit: 16MB")
        with pytest.raises(LuaHandlerError, match="not enough memory"):
            app.call("t:f")
        # a fresh state serves the next call
        assert _function_app(tmp_path, "local s = string.rep('x', 1024 * 1024)", "memory_limit: 16MB") \
            .call("t:f") == "finished"


def test_memory_limit_allows_normal_work(tmp_path):
    app = _function_app(tmp_path, "local t = {} for i = 1, 10000 do t[i] = {i} end", "memory_limit: 64MB")
    assert app.call("t:f") == "finished"
    assert app.call("t:f") == "finished"


def _consumer_app(tmp_path, handler: str, consumer_extra: str, function_extra: str = "") -> App:
    write_app(tmp_path, {"app.yaml": f"""
        namespace: t
        entries:
          - name: mem
            kind: queue.driver.memory
            lifecycle: {{auto_start: true}}
          - name: q
            kind: queue.queue
            driver: mem
            dead_letter: {{queue: dlq, max_attempts: 2}}
          - name: dlq
            kind: queue.queue
            driver: mem
          - name: h
            kind: function.lua
            source: file://h.lua
            modules: [time]
            {function_extra}
          - name: c
            kind: queue.consumer
            queue: q
            func: h
            concurrency: 2
            lifecycle: {{auto_start: true}}
            {consumer_extra}
    """, "h.lua": handler})
    return App.load(tmp_path)


HANDLER = """
local time = require("time")
return function(body)
  if body.kind == "spin" then while true do end end
  if body.kind == "sleep" then time.sleep(60) end
  if body.kind == "bomb" then local t = {} while true do t[#t + 1] = string.rep("z", 4096) .. #t end end
  return true
end
"""


@pytest.mark.timeout(60)
def test_consumer_timeout_nacks_dead_letters_and_goes_on(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="runtime.consumer")
    app = _consumer_app(tmp_path, HANDLER, "timeout: 100ms", "timeout: 30s")  # the consumer's wins
    with app:
        app.publish("t:q", {"kind": "spin"})
        app.publish("t:q", {"kind": "sleep"})
        for i in range(20):
            app.publish("t:q", {"kind": "ok", "i": i})
        assert app.wait_idle(30)
        stats = app.stats()
    c = stats["consumers"]["t:c"]
    assert c["acked"] == 20 and c["dead_lettered"] == 2 and c["nacked"] == 2
    assert stats["queues"]["t:dlq"]["ready"] == 2
    assert "exceeded its time limit of 0.1s" in caplog.text and "h.lua:4" in caplog.text


@pytest.mark.timeout(60)
def test_consumer_memory_limit_kills_the_call_not_the_process(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="runtime.consumer")
    app = _consumer_app(tmp_path, HANDLER, "memory_limit: 32MB")
    with app:
        app.publish("t:q", {"kind": "bomb"})
        for i in range(20):
            app.publish("t:q", {"kind": "ok", "i": i})
        assert app.wait_idle(30)
        stats = app.stats()
    c = stats["consumers"]["t:c"]
    assert c["acked"] == 20 and c["dead_lettered"] == 1
    assert "ran out of memory" in caplog.text


@pytest.mark.timeout(30)
def test_time_limit_covers_top_level_code(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: f
            kind: function.lua
            source: "while true do end return function() end"
            timeout: 100ms
    """})
    with pytest.raises(LuaHandlerError, match="top-level code exceeded its time limit"):
        App.load(tmp_path).call("t:f")


@pytest.mark.timeout(30)
def test_consumer_with_runaway_top_level_code_refuses_to_start(tmp_path):
    from runtime import ConfigError
    app = _consumer_app(tmp_path, "while true do end return function() end", "timeout: 100ms")
    with pytest.raises(ConfigError, match="top-level code exceeded its time limit"):
        app.start()
    assert app.service_ids() == []

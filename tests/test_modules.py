"""The logger, errors, time and queue modules (SPEC §5) as Lua code sees them."""

from __future__ import annotations

import io
import json
import logging

import pytest

from runtime import LuaErrorValue
from runtime.logs import JsonFormatter, TextFormatter


@pytest.fixture
def lua_records(caplog):
    caplog.set_level(logging.DEBUG, logger="runtime.lua")
    return caplog


def test_logger_dot_and_colon_styles_carry_entry_line_fields(run_lua, lua_records):
    run_lua("""
local logger = require("logger")
return function()
  logger.info("dot style", {task_id = 7})
  logger:warn("colon style", {ok = true})
  logger:with({request = "r1"}):named("child"):error("child record", {extra = 1})
  logger.debug("no fields")
  print("printed", 1, nil, true)
end""")
    recs = [r for r in lua_records.records if r.name.startswith("runtime.lua")]
    assert [(r.getMessage(), r.levelname) for r in recs] == [
        ("dot style", "INFO"), ("colon style", "WARNING"), ("child record", "ERROR"),
        ("no fields", "DEBUG"), ("printed\t1\tnil\ttrue", "INFO")]
    assert [r.lua_line for r in recs] == [3, 4, 5, 6, 7]
    assert all(r.entry == "t:f" and r.lua_file.endswith("f.lua") for r in recs)
    assert recs[0].fields == {"task_id": 7}
    assert recs[2].fields == {"request": "r1", "extra": 1} and recs[2].name == "runtime.lua.child"


def test_logger_is_filtered_by_level_on_the_lua_side(run_lua, caplog):
    caplog.set_level(logging.WARNING, logger="runtime.lua")
    run_lua('local l = require("logger") return function() l.debug("hidden") l.warn("shown") end')
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("runtime.lua")]
    assert msgs == ["shown"]


def test_log_fields_never_fail(run_lua, lua_records):
    run_lua("""
local logger = require("logger")
return function()
  local t = {} t.self = t
  logger.info("odd fields", {f = function() end, cyc = t, nan = 0/0, bin = "\\255"})
  logger.info({not_a = "string"}, "not a table")
end""")
    recs = [r for r in lua_records.records if r.name == "runtime.lua"]
    assert recs[0].fields["cyc"] == {"self": "<cycle>"}
    assert recs[0].fields["f"].startswith("function") and recs[0].fields["nan"] is None
    assert recs[0].fields["bin"] == "\ufffd"
    assert recs[1].getMessage().startswith("table:") and recs[1].fields == {"fields": "not a table"}


def _record(**extra):
    rec = logging.LogRecord("runtime.lua", logging.INFO, "f.lua", 3, "Processing", None, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_log_format():
    rec = _record(entry="app:h", lua_line=3, lua_file="h.lua", fields={"task_id": "t-1", "msg": "x"})
    out = json.loads(JsonFormatter().format(rec))
    assert out["level"] == "info" and out["logger"] == "runtime.lua" and out["msg"] == "Processing"
    assert out["entry"] == "app:h" and out["line"] == 3 and out["task_id"] == "t-1"
    assert out["field_msg"] == "x" and out["ts"].endswith("+00:00")


def test_text_log_format():
    rec = _record(entry="app:h", lua_line=3, lua_file="h.lua", fields={"task_id": "t-1", "n": 2})
    line = TextFormatter().format(rec)
    assert "INFO" in line and "[app:h h.lua:3] Processing task_id=t-1 n=2" in line


def test_cli_log_format_json_end_to_end(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    out = subprocess.run(
        [sys.executable, "-m", "runtime", "call", str(REPO / "samples/functions"), "demo:greet",
         '"ada"', "--log-format", "json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"greeting": "Hello, Ada!", "calls": 1}
    record = json.loads(out.stderr.strip().splitlines()[-1])
    assert record["entry"] == "demo:greet" and record["name"] == "ada" and record["line"] == 21


def test_errors_module(run_lua):
    out = run_lua("""return function()
  local e = errors.new("plain")
  local k = errors.new({message = "gone", kind = errors.NOT_FOUND, retryable = true, details = {id = 1}})
  local w = errors.wrap(k, "loading user")
  local d = w:details() d.id = 99 -- a copy: the error stays unchanged
  return {
    plain = {tostring(e), e:kind(), e:message(), e:retryable()},
    wrapped = {tostring(w), w:kind(), w:retryable(), w:details().id},
    is = {errors.is(w, errors.NOT_FOUND), errors.is(w, errors.INVALID), errors.is("x", errors.NOT_FOUND)},
    kinds = {errors.NOT_FOUND, errors.ALREADY_EXISTS, errors.INVALID, errors.PERMISSION_DENIED,
             errors.UNAVAILABLE, errors.INTERNAL, errors.CANCELED, errors.CONFLICT, errors.TIMEOUT,
             errors.RATE_LIMITED, errors.UNKNOWN},
    readonly = select(2, pcall(function() e.kind = 1 end)),
  }
end""")
    assert out["plain"] == ["plain", "Unknown", "plain", False]
    assert out["wrapped"] == ["loading user: gone", "NotFound", True, 1]
    assert out["is"] == [True, False, False]
    assert out["kinds"] == ["NotFound", "AlreadyExists", "Invalid", "PermissionDenied", "Unavailable",
                            "Internal", "Canceled", "Conflict", "Timeout", "RateLimited", "Unknown"]
    assert "read-only" in out["readonly"]


def test_time_module(run_lua):
    out = run_lua("""
local time = require("time")
return function()
  local t0 = time.now()
  local ok1 = time.sleep(0.01)
  local ok2 = time.sleep("5ms")
  local bad, err = time.sleep("soon")
  local neg, err2 = time.sleep(-1)
  local raised = pcall(time.sleep, {})
  return {ok1, ok2, bad == nil, err:kind(), err2:kind(), raised, time.now() - t0 >= 0.015, type(t0)}
end""")
    assert out == [True, True, True, "Invalid", "Invalid", False, True, "number"]


@pytest.mark.parametrize("call, kind, phrase", [
    ('queue.publish("nope", {id = 1})', "NotFound", "queue 'nope' not found"),
    ('queue.publish("t:q", function() end)', "Invalid", "function"),
    ('queue.publish("t:q", {0/0})', "Invalid", "NaN"),
    ('queue.publish("t:q", {math.huge})', "Invalid", "inf"),
    ('queue.publish("t:q", {1, 2, x = 1})', "Invalid", "mixed keys"),
    ('queue.publish("t:q", {[1] = 1, [5] = 2})', "Invalid", "sparse"),
    ('queue.publish("t:q", deep(2000))', "Invalid", "deeper than 128"),
    ('queue.publish("t:q", cyclic())', "Invalid", "cycle"),
    ('queue.publish("t:q", coroutine.create(function() end))', "Invalid", "thread"),
    ('queue.publish("t:q", {}, {x_retry = 1})', "Invalid", "reserved"),
    ('queue.publish("t:q", {}, {[1] = "a"})', "Invalid", "must be strings"),
    ('queue.publish("t:q", {}, {h = {}})', "Invalid", "string, number or boolean"),
    ('queue.publish("t:q", {id = 1})', "Unavailable", "not running"),
    ('queue.publish("q", {id = 1})', "Unavailable", "t:q"),  # bare name: caller's namespace
    ('queue.info("nope")', "NotFound", "not found"),
    ('queue.info("t:q")', "Unavailable", "not running"),
    ("queue.message()", "Invalid", "only available inside a consumer handler"),
])
def test_queue_module_errors_are_values(lua_fn, call, kind, phrase):
    app = lua_fn(f"""
local queue = require("queue")
local function deep(n) local t = {{}} for i = 1, n do t = {{t}} end return t end
local function cyclic() local t = {{}} t.t = t return t end
return function() return {call} end
""", extra_yaml="""
  - name: drv
    kind: queue.driver.memory
  - name: q
    kind: queue.queue
    driver: drv
""")
    value, err = app.call("t:f")
    assert value is None and isinstance(err, LuaErrorValue)
    assert err.kind == kind and phrase in err.message


@pytest.mark.parametrize("call, phrase", [
    ("queue.publish(42, {})", "queue ID string expected"),
    ('queue.publish("t:q", {}, "headers")', "table of headers expected"),
    ("queue.info(nil)", "queue ID string expected"),
])
def test_queue_module_wrong_argument_types_raise(run_lua, call, phrase):
    ok, err = run_lua('local queue = require("queue") '
                      f'return function() return pcall(function() return {call} end) end')
    assert ok is False and phrase in err


def test_ten_megabyte_body_is_encoded_without_error(lua_fn):
    app = lua_fn("""
local queue = require("queue")
return function() return queue.publish("t:q", {blob = string.rep("x", 10 * 1024 * 1024)}) end
""", extra_yaml="""
  - name: drv
    kind: queue.driver.memory
  - name: q
    kind: queue.queue
    driver: drv
""")
    value, err = app.call("t:f")
    assert err.kind == "Unavailable"  # validated and encoded; only the delivery is missing


def test_log_output_stream_is_configurable():
    from runtime.logs import configure_logging
    buf = io.StringIO()
    configure_logging("warn", "text", buf)
    logging.getLogger("runtime.lua").info("hidden")
    logging.getLogger("runtime.lua").warning("visible")
    assert "visible" in buf.getvalue() and "hidden" not in buf.getvalue()
    configure_logging("info", "text")

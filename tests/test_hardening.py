"""Hardening II: no Lua code and no message can crash, freeze or outrun the host.

Classes 2-8 of the issue (class 1, the C stack, is tests/test_c_stack.py; the fuzz and the
long run are tests/test_hostile_fuzz.py). Whatever could abort or deadlock the interpreter
before its fix runs in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, drain, write_app
from hostile import MODULE_LOOPS

from runtime import App, LuaHandlerError
from runtime.errors import ConfigError, InvalidMessage

CLI = [sys.executable, "-m", "runtime"]


def run_python(code: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO)


# -- 2. memory_limit never aborts or deadlocks -----------------------------------------------

MEMORY_APP = """
namespace: t
entries:
  - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}
  - {name: q, kind: queue.queue, driver: d, dead_letter: {queue: dlq, max_attempts: 1}}
  - {name: dlq, kind: queue.queue, driver: d}
  - name: f
    kind: function.lua
    source: file://f.lua
    modules: [json, queue]
    memory_limit: 1MB
  - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
"""
MEMORY_HANDLER = """
local json, queue = require('json'), require('queue')
local cache = {}
return function(body)
  if type(body) == 'table' and body.fill then
    for i = 1, 2500 do cache[#cache + 1] = string.rep('z', 300) .. i end
    return true
  end
  if type(body) == 'table' and body.header then return queue.message():header('big') ~= nil end
  return true
end
"""
# Each publishes one value that does not fit (at one push point), then a good message.
PUSH_POINTS = {
    "body": "app.publish('t:q', 'x' * (2 << 20))",
    "header": "app.publish('t:q', {'header': True}, headers={'big': 'h' * (2 << 20)})",
    "after-fill": "app.publish('t:q', {'fill': True}); app.publish('t:q', 'y' * 700_000)",
    "msgpack-value": None,  # the same body through the msgpack codec: a Python value to convert
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", list(PUSH_POINTS))
def test_a_value_too_large_for_the_limit_is_a_memory_error_of_that_delivery(tmp_path, point):
    yaml = MEMORY_APP
    bad = PUSH_POINTS[point]
    if point == "msgpack-value":
        yaml = yaml.replace("driver: d, dead_letter", "driver: d, codec: msgpack, dead_letter")
        bad = "app.publish('t:q', ['x' * 1000] * 3000)"
    write_app(tmp_path, {"app.yaml": yaml, "f.lua": MEMORY_HANDLER})
    proc = run_python(f"""
        import json, sys
        from runtime import App
        app = App.load({str(tmp_path)!r}).start()
        {bad}
        app.publish('t:q', 'good')
        idle = app.wait_idle(30)
        dlq = app.router.queues['t:dlq']
        dead = [d.message.headers['x_dead_letter_reason']
                for d in dlq.driver.consume(dlq.name, 'test', 100).fetch(100, 0)]
        print(json.dumps({{'idle': idle, 'stats': app.stats()['consumers']['t:c'], 'dead': dead}}))
        app.stop()
    """, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["idle"]
    assert out["dead"] == ["not enough memory"]
    assert out["stats"]["dead_lettered"] == 1
    assert out["stats"]["acked"] == (2 if point == "after-fill" else 1)
    assert "ran out of memory (memory_limit 1048576 bytes)" in proc.stderr


@pytest.mark.timeout(60)
def test_app_call_with_an_argument_too_large_for_the_limit(tmp_path):
    write_app(tmp_path, {"app.yaml": MEMORY_APP, "f.lua": MEMORY_HANDLER})
    proc = run_python(f"""
        from runtime import App, LuaHandlerError
        app = App.load({str(tmp_path)!r})
        for arg in ('x' * (2 << 20), ['y' * 1000] * 3000, {{'k' + str(i): i for i in range(100_000)}}):
            try:
                app.call('t:f', arg)
            except LuaHandlerError as exc:
                print('refused:', str(exc).splitlines()[0])
            print('next:', app.call('t:f', 1))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines == ["refused: t:f: not enough memory", "next: True"] * 3


def _outcomes(app_dir: Path, calls: list[tuple[str, list[Any]]]) -> list[str]:
    """App.call each (func, args) in a subprocess (a memory-limited state could abort the
    interpreter before the fix); the result or the exception type and first line of each."""
    proc = run_python(f"""
        import json
        from runtime import App
        app = App.load({str(app_dir)!r})
        for func, args in json.loads({json.dumps(json.dumps(calls))}):
            try:
                print(json.dumps(app.call(func, *args)), flush=True)
            except Exception as exc:
                print(type(exc).__name__ + ": " + str(exc).splitlines()[0], flush=True)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_memory_errors_inside_a_call_leave_the_process_usable(tmp_path):
    # Result conversion and the chunk's own top level also run under the limit.
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: big_result, kind: function.lua, memory_limit: 1MB,
             source: "return function() local t = {} for i = 1, 1e6 do t[i] = i end return t end"}
          - {name: big_chunk, kind: function.lua, memory_limit: 1MB,
             source: "local s = string.rep('x', 2^24) return function() return #s end"}
          - {name: ok, kind: function.lua, memory_limit: 1MB, source: "return function(x) return x end"}
    """})
    out = _outcomes(tmp_path, [("t:big_result", []), ("t:ok", [1]), ("t:big_chunk", []), ("t:ok", [2])])
    assert out[:2] == ["LuaHandlerError: t:big_result: not enough memory", "1"]
    assert out[2].startswith("LuaHandlerError: t:big_chunk: cannot load function.lua from ")
    assert out[2].endswith("app.yaml: not enough memory") and out[3] == "2"


def test_the_smallest_memory_limit_runs_a_handler(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: f, kind: function.lua, memory_limit: 64KB, source: "return function(x) return x * 2 end"}
    """})
    assert _outcomes(tmp_path, [("t:f", [21])]) == ["42"]


@pytest.mark.parametrize("field, value, phrase", [
    ("memory_limit", "0", "at least 64KB"),
    ("memory_limit", "'0.5'", "not a whole number of bytes"),
    ("memory_limit", "1", "at least 64KB"),
    ("memory_limit", "'1KB'", "at least 64KB"),
    ("memory_limit", "0.5", "not a size"),
    ("timeout", "0", "more than 0"),
    ("timeout", ".inf", "finite"),
    ("timeout", ".nan", "finite"),
    ("timeout", "'inf'", "finite"),
    ("timeout", "1e300", "ten years"),
])
@pytest.mark.parametrize("kind", ["function", "consumer"])
def test_limit_values_that_do_not_limit_are_config_errors(tmp_path, field, value, phrase, kind):
    f_extra = f"\n    {field}: {value}" if kind == "function" else ""
    c_extra = f"\n    {field}: {value}" if kind == "consumer" else ""
    (tmp_path / "app.yaml").write_text(f"""namespace: t
entries:
  - {{name: d, kind: queue.driver.memory}}
  - {{name: q, kind: queue.queue, driver: d}}
  - name: f
    kind: function.lua
    source: "return function() end"{f_extra}
  - name: c
    kind: queue.consumer
    queue: q
    func: f{c_extra}
""")
    with pytest.raises(ConfigError) as info:
        App.load(tmp_path)
    text = str(info.value)
    assert phrase in text
    assert f"app.yaml:{8 if kind == 'function' else 12}: entry t:{kind[0]}: field '{field}'" in text


# -- 3. timeout cannot be bypassed ------------------------------------------------------------

def _limited_app(tmp_path: Path, body: str, timeout: str = "300ms", extra: str = "") -> App:
    write_app(tmp_path, {"app.yaml": f"""
        namespace: t
        entries:
          - {{name: d, kind: queue.driver.memory}}
          - {{name: q, kind: queue.queue, driver: d}}
          - name: f
            kind: function.lua
            source: file://f.lua
            modules: [json, logger, queue, time]
            timeout: {timeout}
            {extra}
    """, "f.lua": "local json, logger, queue, time = require('json'), require('logger'), require('queue'), "
                  "require('time')\nreturn function()\n" + body + "\nend\n"})
    return App.load(tmp_path)


def _call_in_thread(app: App, func: str, limit: float) -> tuple[bool, Any]:
    """(finished in time, the exception or result)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(app.call(func))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    return (not t.is_alive()), (box[0] if box else None)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", [n for n in MODULE_LOOPS if n != "queue.message"])
def test_no_module_function_swallows_the_time_limit(tmp_path, name):
    app = _limited_app(tmp_path, MODULE_LOOPS[name])
    done, outcome = _call_in_thread(app, "t:f", 0.3 + 2)
    assert done, f"{name} ran past the limit"
    if name == "returned_tostring":  # app.call exports the table itself: a value, no __tostring
        assert outcome == (None, [])
    else:
        assert isinstance(outcome, LuaHandlerError) and "exceeded its time limit of 0.3s" in str(outcome)


@pytest.mark.timeout(30)
def test_top_level_code_looping_in_a_module_function_fails_within_the_limit(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: f, kind: function.lua, modules: [json], timeout: 300ms,
             source: "local json = require('json') while true do json.decode('[[[') end return function() end"}
    """})
    done, outcome = _call_in_thread(App.load(tmp_path), "t:f", 2.3)
    assert done and isinstance(outcome, LuaHandlerError)
    assert "top-level code exceeded its time limit" in str(outcome)


# -- 4. no environment read from Lua ----------------------------------------------------------

def test_env_placeholders_in_lua_source_are_not_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDENING_SECRET", "s3cret")
    monkeypatch.setenv("HARDENING_NAME", "t")
    write_app(tmp_path, {"app.yaml": """
        namespace: "${env:HARDENING_NAME}"
        entries:
          - name: inline
            kind: function.lua
            meta: {owner: "${env:HARDENING_SECRET}"}
            source: "return function() return '${env:HARDENING_SECRET|}' .. '${env:HARDENING_SECRET}' end"
          - name: block
            kind: function.lua
            source: |
              return function() return "${env:HARDENING_SECRET|x}" end
          - {name: file, kind: function.lua, source: file://f.lua}
    """, "f.lua": "return function() return '${env:HARDENING_SECRET}' end"})
    app = App.load(tmp_path)  # definition fields still expand: the namespace came from the environment
    assert app.call("t:inline") == "${env:HARDENING_SECRET|}${env:HARDENING_SECRET}"
    assert app.call("t:block") == "${env:HARDENING_SECRET|x}"
    assert app.call("t:file") == "${env:HARDENING_SECRET}"
    assert app.registry.get("t:inline").meta == {"owner": "s3cret"}  # type: ignore[union-attr]


# -- 5. entries are isolated ------------------------------------------------------------------

def test_app_call_entries_do_not_share_module_or_library_instances(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: lib, kind: library.lua, source: "return {mode = 'safe'}"}
          - name: a
            kind: function.lua
            modules: [json]
            imports: {lib: lib}
            source: |
              local lib, json = require('lib'), require('json')
              return function() lib.mode = 'evil' json.encode = function() return 'forged' end return lib.mode end
          - name: b
            kind: function.lua
            modules: [json]
            imports: {lib: lib}
            source: |
              local lib, json = require('lib'), require('json')
              return function() return lib.mode, json.encode({1}) end
    """})
    app = App.load(tmp_path)
    assert app.call("t:a") == "evil"
    assert app.call("t:b") == ("safe", "[1]")


# -- 6. only the runtime's errors leave the API -----------------------------------------------

@pytest.mark.parametrize("source", [
    "local s = string.rep('x', 2^24) return function() end",  # a memory error skips the message handler
    "local t = {} for i = 1, 1e7 do t[i] = i end return function() end",
])
def test_app_call_raises_only_runtime_errors(tmp_path, source):
    # Before: a raw lupa LuaError ("attempt to call global 'safe_tostring'", a helper of
    # sandbox.lua used before its definition).
    write_app(tmp_path, {"app.yaml": f"""
        namespace: t
        entries:
          - {{name: f, kind: function.lua, memory_limit: 1MB, source: "{source}"}}
    """})
    [outcome] = _outcomes(tmp_path, [("t:f", [])])
    assert outcome.startswith("LuaHandlerError: ") and "not enough memory" in outcome


def test_app_call_wraps_any_failure_in_a_runtime_error(tmp_path, monkeypatch):
    from runtime.lua.sandbox import LuaSandbox

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("lupa exploded")

    write_app(tmp_path, {"app.yaml": "namespace: t\nentries:\n  - {name: f, kind: function.lua, "
                                     "source: 'return function() end'}\n"})
    app = App.load(tmp_path)
    monkeypatch.setattr(LuaSandbox, "call", broken)
    with pytest.raises(LuaHandlerError, match="internal error: RuntimeError: lupa exploded"):
        app.call("t:f")


# -- 7. operator input is checked, not trusted ------------------------------------------------

SIMPLE_APP = """
namespace: t
entries:
  - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}
  - {name: q, kind: queue.queue, driver: d}
  - {name: f, kind: function.lua, source: "return function() end"}
  - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
"""


@pytest.mark.parametrize("payload, phrase", [
    ("[" * 5_000 + "]" * 5_000, "nested too deeply"),
    ("@deep.jsonl", "nested too deeply"),
    (str(2**60), "cannot travel unchanged"),
    ('{"a": [1, 18014398509481985]}', "cannot travel unchanged"),
])
def test_publish_input_that_cannot_travel_is_a_clean_config_error(tmp_path, payload, phrase):
    write_app(tmp_path, {"app.yaml": SIMPLE_APP})
    if payload.startswith("@"):
        (tmp_path / "deep.jsonl").write_text("1\n" + "[" * 100_000 + "]" * 100_000 + "\n")
        payload = "@" + str(tmp_path / "deep.jsonl")
    proc = subprocess.run([*CLI, "run", str(tmp_path), "--until-idle", "--publish", f"t:q={payload}"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert phrase in proc.stdout


def test_a_fifo_named_yaml_does_not_hang_check(tmp_path):
    write_app(tmp_path, {"app.yaml": SIMPLE_APP})
    os.mkfifo(tmp_path / "pipe.yaml")
    proc = subprocess.run([*CLI, "check", str(tmp_path)], capture_output=True, text=True, timeout=20, cwd=REPO)
    assert proc.returncode == 1
    assert "pipe.yaml" in proc.stdout + proc.stderr and "not a regular file" in proc.stdout + proc.stderr


def test_a_fifo_behind_file_include_does_not_hang(tmp_path):
    write_app(tmp_path, {"app.yaml": "namespace: t\nentries:\n  - {name: f, kind: function.lua, source: file://p.lua}\n"})
    os.mkfifo(tmp_path / "p.lua")
    proc = subprocess.run([*CLI, "check", str(tmp_path)], capture_output=True, text=True, timeout=20, cwd=REPO)
    assert proc.returncode == 1 and "not a regular file" in proc.stdout + proc.stderr


def test_a_yaml_symlink_out_of_the_app_is_not_loaded(tmp_path):
    outside = tmp_path / "outside"
    app_dir = tmp_path / "app"
    write_app(outside, {"evil.yaml": "namespace: evil\nentries:\n  - {name: f, kind: function.lua, "
                                     "source: \"return function() return 'outside' end\"}\n"})
    write_app(app_dir, {"app.yaml": SIMPLE_APP})
    (app_dir / "linked.yaml").symlink_to(outside / "evil.yaml")
    with pytest.raises(ConfigError, match="linked.yaml: is a symlink to a file outside the application directory"):
        App.load(app_dir)


def test_a_yaml_symlink_inside_the_app_is_loaded(tmp_path):
    write_app(tmp_path, {"defs/real.yml": SIMPLE_APP})
    (tmp_path / "alias.yaml").symlink_to(tmp_path / "defs" / "real.yml")
    with pytest.raises(ConfigError, match="duplicate entry ID"):  # read twice: through the link too
        App.load(tmp_path)


def test_an_alias_bomb_in_service_args_is_a_config_error(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    write_app(tmp_path, {"procs.yaml": (
        "namespace: t\nentries:\n"
        "  - {name: p, kind: process.lua, source: \"return {main = function(...) return select('#', ...) end}\"}\n"
        "  - name: s\n    kind: process.service\n    process: p\n    lifecycle: {auto_start: true}\n"
        "    args:\n      - {" + ", ".join(levels) + "}\n")})
    with pytest.raises(ConfigError, match=r"procs.yaml:\d+: entry t:s: field 'args' expands to more than"):
        App.load(tmp_path)


def test_a_cyclic_alias_in_service_args_is_a_config_error(tmp_path):
    write_app(tmp_path, {"procs.yaml": (
        "namespace: t\nentries:\n"
        "  - {name: p, kind: process.lua, source: \"return {main = function() end}\"}\n"
        "  - name: s\n    kind: process.service\n    process: p\n    args: &loop [1, *loop]\n")})
    with pytest.raises(ConfigError, match=r"procs.yaml:\d+: invalid YAML: found unconstructable recursive node"):
        App.load(tmp_path)  # the YAML loader refuses it already


# -- 8. integrity -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["X_attempts", "X_DEAD_LETTER_REASON", "x_Original_Queue"])
def test_reserved_header_prefix_ignores_case_in_lua(tmp_path, name):
    write_app(tmp_path, {"app.yaml": SIMPLE_APP.replace("return function() end", "file://f.lua")
                         .replace("{name: f, kind: function.lua,", "{name: f, kind: function.lua, modules: [queue],"),
                         "f.lua": f"local queue = require('queue')\nreturn function() "
                                  f"local ok, err = queue.publish('t:q', 1, {{{name} = 1}}) return err:kind(), "
                                  f"err:message() end"})
    kind, message = App.load(tmp_path).call("t:f")
    assert kind == "Invalid" and "reserved" in message


def test_reserved_header_prefix_ignores_case_from_python(tmp_path):
    write_app(tmp_path, {"app.yaml": SIMPLE_APP})
    with App.load(tmp_path) as app, pytest.raises(InvalidMessage, match="reserved"):
        app.publish("t:q", 1, headers={"X_attempts": 1})


def test_text_log_lines_cannot_be_forged_from_lua(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}
          - {name: q, kind: queue.queue, driver: d, dead_letter: {queue: dlq, max_attempts: 1}}
          - {name: dlq, kind: queue.queue, driver: d}
          - {name: f, kind: function.lua, modules: [logger], source: file://f.lua}
          - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
    """, "f.lua": """
        local logger = require('logger')
        return function(body)
          logger.info("hello\\n2026-01-01T00:00:00.000+00:00 ERROR [runtime.security] forged\\r\\27[2K", {k = "a\\nb"})
          error("boom\\n2026-01-01T00:00:00.000+00:00 INFO  [runtime] forged too")
        end
    """})
    proc = subprocess.run([*CLI, "run", str(tmp_path), "--until-idle", "--publish", "t:q=1"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert "hello" in proc.stderr and "boom" in proc.stderr
    for line in proc.stderr.splitlines():
        assert "forged" not in line or not line.startswith("2026-01-01"), line
        assert "\x1b" not in line


def test_two_queue_entries_cannot_share_a_queue(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: d, kind: queue.driver.memory}
          - {name: open, kind: queue.queue, driver: d, queue_name: jobs}
          - {name: guarded, kind: queue.queue, driver: d, queue_name: jobs}
          - {name: jobs, kind: queue.queue, driver: d}
          - {name: d2, kind: queue.driver.memory}
          - {name: other, kind: queue.queue, driver: d2, queue_name: jobs}
    """})
    with pytest.raises(ConfigError) as info:
        App.load(tmp_path)
    text = str(info.value)
    assert "entry t:guarded: queue_name 'jobs' on driver t:d is already used by t:open" in text
    assert "entry t:jobs: queue_name 'jobs' on driver t:d is already used by t:open" in text
    assert "t:other" not in text  # another driver: another queue
    assert len(info.value.problems) == 2


@pytest.mark.parametrize("value", [2**53 + 1, -(2**53) - 1, 2**64, {"a": [1, 10**20]}, [{"k": -(2**60)}]])
def test_integers_that_lua_would_round_are_refused(tmp_path, value):
    write_app(tmp_path, {"app.yaml": SIMPLE_APP})
    with App.load(tmp_path) as app, pytest.raises(InvalidMessage, match="cannot travel unchanged"):
        app.publish("t:q", value)


def test_values_that_can_travel_are_kept_exactly(tmp_path, start):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}
          - {name: q, kind: queue.queue, driver: d}
          - {name: out, kind: queue.queue, driver: d}
          - {name: f, kind: function.lua, modules: [queue], source: file://f.lua}
          - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
    """, "f.lua": "local queue = require('queue')\nreturn function(body) assert(queue.publish('t:out', body)) end"})
    app = start(App.load(tmp_path))
    body = {"neg_zero": -0.0, "max_int": 2**53, "min_int": -(2**53), "big_float": 1e300, "tiny": 5e-324,
            "list": [-0.0, 0.5]}
    app.publish("t:q", body)
    assert app.wait_idle(10)
    [(_, got)] = drain(app, "t:out")
    assert got == body
    assert math.copysign(1.0, got["neg_zero"]) == -1.0 and math.copysign(1.0, got["list"][0]) == -1.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ending, expected", [
    ("return nil, setmetatable({}, {__tostring = function() while true do end end})", "exceeded its time limit"),
    ("error(setmetatable({}, {__tostring = function() while true do end end}))", "exceeded its time limit"),
    ("return nil, setmetatable({}, {__tostring = function() while true do json.decode('[1') end end})",
     "exceeded its time limit"),
    ("return nil, setmetatable({}, {__tostring = function() return 'custom reason' end})", "custom reason"),
])
def test_turning_a_handler_result_into_text_keeps_the_deadline(tmp_path, start, ending, expected):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}
          - {name: q, kind: queue.queue, driver: d, dead_letter: {queue: dlq, max_attempts: 1}}
          - {name: dlq, kind: queue.queue, driver: d}
          - {name: f, kind: function.lua, modules: [json], source: file://f.lua, timeout: 300ms}
          - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
    """, "f.lua": "local json = require('json')\nreturn function(body)\n  if body == 'good' then return true end\n  "
                  + ending + "\nend\n"})
    app = start(App.load(tmp_path))
    app.publish("t:q", "bad")
    app.publish("t:q", "good")
    assert app.wait_idle(0.3 + 2 + 1)
    stats = app.stats()["consumers"]["t:c"]
    assert (stats["acked"], stats["dead_lettered"]) == (1, 1)
    [(msg, _)] = drain(app, "t:dlq")
    assert expected in msg.headers["x_dead_letter_reason"]


@pytest.mark.timeout(60)
def test_the_process_answers_sigterm_after_hostile_messages(tmp_path):
    # Before: msg:header() of a 2 MB header in a 1 MB state left every thread waiting for the
    # GIL, and SIGTERM was never handled.
    import signal

    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}
          - {name: q, kind: queue.queue, driver: d, dead_letter: {queue: dlq, max_attempts: 1}}
          - {name: dlq, kind: queue.queue, driver: d}
          - {name: f, kind: function.lua, modules: [queue, logger], memory_limit: 1MB, timeout: 1s,
             source: file://f.lua}
          - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
          - {name: p, kind: process.lua, modules: [queue], source: file://p.lua}
          - {name: s, kind: process.service, process: p, lifecycle: {auto_start: true}}
    """, "f.lua": """
        local queue, logger = require('queue'), require('logger')
        return function(body)
          if body == 'good' then logger.warn('GOOD MESSAGE HANDLED') return true end
          if body == 'header' then return queue.message():header('big') ~= nil end
          if body == 'loop' then while true do end end
          if body == 'recurse' then local function f() return coroutine.wrap(f)() end return f() end
          return true
        end
    """, "p.lua": """
        local queue = require('queue')
        return {main = function()
          assert(queue.publish('t:q', 'header', {big = string.rep('h', 2 * 1024 * 1024)}))
          assert(queue.publish('t:q', 'loop'))
          assert(queue.publish('t:q', 'recurse'))
          assert(queue.publish('t:q', 'good'))
        end}
    """})
    proc = subprocess.Popen([*CLI, "run", str(tmp_path), "--log-level", "warn"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    seen: list[str] = []
    failures = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if sum("consumer t:c: message" in ln for ln in seen) >= 3 and any("GOOD MESSAGE" in ln for ln in seen):
                failures.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert failures.wait(30), "".join(seen)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert proc.returncode == 0, "".join(seen)
    assert "t:c acked=1 nacked=0 dead_lettered=3" in out


@pytest.mark.timeout(30)
def test_app_call_exports_its_result_under_the_deadline(tmp_path):
    # A table key's __tostring runs while the result is made safe for Python: before, after
    # the deadline had been switched off (a wedged caller).
    app = _limited_app(tmp_path, "local k = setmetatable({}, {__tostring = function() while true do end end}) "
                                 "return {[k] = 1}")
    done, outcome = _call_in_thread(app, "t:f", 0.3 + 2)
    assert done
    assert isinstance(outcome, LuaHandlerError) and "exceeded its time limit of 0.3s" in str(outcome)


@pytest.mark.timeout(30)
def test_a_timed_out_handler_leaves_no_half_updated_state_behind(tmp_path, start):
    # A handler stopped by its time limit may have left module state half-updated (or a cache
    # filling its memory limit, failing the next, good message): the worker replaces its state.
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}
          - {name: q, kind: queue.queue, driver: d, dead_letter: {queue: dlq, max_attempts: 1}}
          - {name: dlq, kind: queue.queue, driver: d}
          - {name: out, kind: queue.queue, driver: d}
          - {name: f, kind: function.lua, modules: [queue], source: file://f.lua, timeout: 200ms}
          - {name: c, kind: queue.consumer, queue: q, func: f, lifecycle: {auto_start: true}}
    """, "f.lua": """
        local queue = require('queue')
        local state = {consistent = true}
        return function(body)
          if body == 'hostile' then state.consistent = false while true do end end
          assert(queue.publish('t:out', state.consistent))
        end
    """})
    app = start(App.load(tmp_path))
    for body in ("good", "hostile", "good"):
        app.publish("t:q", body)
    assert app.wait_idle(10)
    assert [value for _, value in drain(app, "t:out")] == [True, True]
    assert app.stats()["consumers"]["t:c"]["dead_lettered"] == 1

"""Running Lua entries (SPEC §4, §9): entry points, require, state, errors, conversion."""

from __future__ import annotations

import threading

import pytest
from conftest import SAMPLES, write_app

from runtime import App, LuaErrorValue, LuaHandlerError


def test_chunk_returning_function_needs_no_method(run_lua):
    assert run_lua("return function(a, b) return a + b end", 2, 3) == 5


def test_chunk_returning_table_uses_method(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: f
            kind: function.lua
            method: double
            source: |
              local M = {}
              function M.double(x) return x * 2 end
              return M
    """})
    assert App.load(tmp_path).call("t:f", 21) == 42


@pytest.mark.parametrize("lua, method, phrase", [
    ("return {}", None, "sets no 'method'"),
    ("return {x = 1}", "x", "has no function 'x'"),
    ("return 42", None, "must return a function"),
    ("error('boom at load')", None, "boom at load"),
])
def test_unusable_chunk_fails_at_first_load(tmp_path, lua, method, phrase):
    write_app(tmp_path, {"app.yaml": f"""
        namespace: t
        entries:
          - name: f
            kind: function.lua
            source: file://f.lua
            {'method: ' + method if method else ''}
    """, "f.lua": lua})
    app = App.load(tmp_path)  # validation compiles but never runs the chunk
    with pytest.raises(LuaHandlerError) as info:
        app.call("t:f")
    assert phrase in str(info.value)
    assert "f.lua" in str(info.value) and info.value.entry_id == "t:f"


def test_validation_never_runs_lua(tmp_path):
    marker = tmp_path / "ran"
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: f
            kind: function.lua
            source: file://f.lua
    """, "f.lua": "error('chunk executed during validation') return function() end"})
    App.load(tmp_path)
    assert not marker.exists()


def test_module_level_state_persists_per_lua_state(run_lua, tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: counter
            kind: function.lua
            source: |
              local n = 0
              return function() n = n + 1 return n end
    """})
    app = App.load(tmp_path)
    assert [app.call("t:counter") for _ in range(3)] == [1, 2, 3]
    # Another thread has its own Lua state, so its own count.
    seen = []
    t = threading.Thread(target=lambda: seen.append(app.call("t:counter")))
    t.start()
    t.join(10)
    assert seen == [1]
    assert app.call("t:counter") == 4


def test_lua_error_carries_file_line_and_traceback(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: f
            kind: function.lua
            source: file://handler.lua
    """, "handler.lua": "local function inner()\n  error('kaboom')\nend\nreturn function() inner() end\n"})
    with pytest.raises(LuaHandlerError) as info:
        App.load(tmp_path).call("t:f")
    err = info.value
    assert "handler.lua:2: kaboom" in err.lua_message
    assert "stack traceback" in err.lua_traceback
    assert "handler.lua:4" in err.lua_traceback
    assert "lua_modules" not in err.lua_traceback  # the host's frames are hidden


def test_inline_source_error_lines_are_yaml_lines(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: f
            kind: function.lua
            source: |
              return function()
                error("inline failure")
              end
    """})
    with pytest.raises(LuaHandlerError, match=r"app\.yaml:7: inline failure"):
        App.load(tmp_path).call("t:f")


def test_raised_error_value_keeps_its_message(run_lua):
    with pytest.raises(LuaHandlerError, match="custom failure"):
        run_lua("""return function()
          error(errors.new({message = "custom failure", kind = errors.CONFLICT}))
        end""")


def test_conversion_python_to_lua_and_back(run_lua):
    out = run_lua("""return function(t)
      return {kind = type(t), list_len = #t.list, nested = t.nested.deep[2], n = t.n, s = t.s,
              echo = t, b = "\\255\\254", multi = {1, 2, 3}, f = function() end}
    end""", {"list": [1, 2, 3], "nested": {"deep": ["a", "b"]}, "n": 1.5, "s": "héllo"})
    assert out["kind"] == "table" and out["list_len"] == 3 and out["nested"] == "b"
    assert out["n"] == 1.5 and out["s"] == "héllo"
    assert out["echo"] == {"list": [1, 2, 3], "nested": {"deep": ["a", "b"]}, "n": 1.5, "s": "héllo"}
    assert out["b"] == b"\xff\xfe"  # not valid UTF-8: returned as bytes
    assert out["f"].startswith("function")


def test_results_none_one_many(run_lua):
    assert run_lua("return function() end") is None
    assert run_lua("return function() return nil end") is None
    assert run_lua("return function() return 1, 'two', nil end") == (1, "two", None)


def test_error_values_convert(run_lua):
    value, err = run_lua("""return function()
      return nil, errors.new({message = "nope", kind = errors.NOT_FOUND, details = {id = 3}})
    end""")
    assert value is None
    assert err == LuaErrorValue(kind="NotFound", message="nope", retryable=False, details={"id": 3})


def test_python_objects_are_refused_as_arguments(run_lua):
    with pytest.raises(LuaHandlerError, match="cannot pass a value of type object"):
        run_lua("return function(x) return x end", object())


def test_cyclic_result_is_cut(run_lua):
    out = run_lua("return function() local t = {} t.me = t return t end")
    assert out == {"me": "<cycle>"}


def test_unknown_function_id(run_lua, tmp_path):
    app = App.load(SAMPLES / "functions")
    with pytest.raises(LuaHandlerError, match="no Lua entry"):
        app.call("demo:missing")


def test_library_imports_and_sample_functions():
    app = App.load(SAMPLES / "functions")
    assert app.call("demo:greet", "  ada lovelace ") == {"greeting": "Hello, Ada Lovelace!", "calls": 1}
    assert app.call("demo:greet", {"name": "bob"})["calls"] == 2
    assert app.call("demo:stats", [2, 4, 9]) == {"count": 3, "sum": 15, "mean": 5, "min": 2, "max": 9}
    value, err = app.call("demo:greet", "")
    assert value is None and err.kind == "Invalid"


def test_each_entry_has_its_own_library_instance(tmp_path):
    # Hardening II (entries are isolated): app.call of two entries on one thread no longer
    # shares one Lua state, so a library's state is per entry, as with consumers' workers.
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: lib
            kind: library.lua
            source: "local M = {n = 0} function M.inc() M.n = M.n + 1 return M.n end return M"
          - name: a
            kind: function.lua
            imports: {counter: lib}
            source: "local c = require('counter') return function() return c.inc() end"
          - name: b
            kind: function.lua
            imports: {counter: t:lib}
            source: "local c = require('counter') return function() return c.inc() end"
    """})
    app = App.load(tmp_path)
    assert (app.call("t:a"), app.call("t:b"), app.call("t:a")) == (1, 1, 2)


def test_require_only_listed_modules(run_lua):
    out = run_lua("""return function()
      local got = {}
      for _, name in ipairs({"json", "logger", "queue", "time", "string", "table", "math", "os",
                             "coroutine", "errors", "io", "socket"}) do
        local ok, err = pcall(require, name)
        got[name] = ok and type(err) or err
      end
      return got
    end""", modules="[json]")
    assert out["json"] == "table"
    for name in ("string", "table", "math", "os", "coroutine", "errors"):
        assert out[name] == "table"
    for name in ("logger", "queue", "time", "io", "socket"):
        assert f"module '{name}' not found" in out[name]


def test_sandbox_has_exactly_the_listed_globals(run_lua):
    names = run_lua("""return function()
      local names = {}
      for k in pairs(_G) do names[#names + 1] = k end
      table.sort(names)
      return names, _G == _G._G, os.time() > 0, type(os.date()), type(os.clock()), os.difftime(2, 1)
    end""")
    globals_, self_ref, time_ok, date_type, clock_type, diff = names
    assert set(globals_) == {
        "assert", "error", "ipairs", "next", "pairs", "pcall", "xpcall", "select", "tonumber",
        "tostring", "type", "unpack", "rawequal", "rawget", "rawset", "setmetatable",
        "getmetatable", "_G", "_VERSION", "string", "table", "math", "coroutine", "os", "require",
        "errors", "print"}
    assert self_ref and time_ok and date_type == "string" and clock_type == "number" and diff == 1


def test_globals_do_not_leak_between_entries(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: t
        entries:
          - name: a
            kind: function.lua
            source: "return function() shared_global = 'from a'; string.evil = true end"
          - name: b
            kind: function.lua
            source: "return function() return shared_global, string.evil end"
    """})
    app = App.load(tmp_path)
    app.call("t:a")
    assert app.call("t:b") == (None, None)

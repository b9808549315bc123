"""No C-stack exhaustion from Lua (hardening II, class 1).

Every way Lua re-enters Lua through C (tests/hostile.py REENTRY, taken from LuaJIT's lib_*.c)
recursing forever must end in a clean error, in LuaJIT states and Lua 5.4 states alike, with
or without limits. Before the guard, LuaJIT died with SIGSEGV, so the calls run in a
subprocess; they run on its main thread, whose default 8 MiB stack is smaller than the
worker threads' (the guard must not depend on the margin).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import REPO
from hostile import LUA54_ONLY, REENTRY

from runtime.lua.threads import LUA_THREAD_STACK, start_lua_thread

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from hostile import LUA54_ONLY, REENTRY
    from runtime import App, LuaHandlerError
    limits = json.loads(sys.argv[1])
    for name, body in REENTRY.items():
        d = Path(tempfile.mkdtemp())
        (d / "app.yaml").write_text(
            "namespace: t\\nentries:\\n"
            "  - {name: ok, kind: function.lua, source: 'return function(x) return x + 1 end'}\\n"
            "  - name: f\\n    kind: function.lua\\n    source: file://f.lua\\n"
            + "".join(f"    {line}\\n" for line in limits))
        (d / "f.lua").write_text("return function()\\n" + body + "\\nend\\n")
        app = App.load(d)
        print("start", name, flush=True)
        try:
            app.call("t:f")
            outcome = "returned"
        except LuaHandlerError as exc:
            outcome = str(exc).splitlines()[0]
        print(json.dumps({"path": name, "outcome": outcome, "next": app.call("t:ok", 41)}), flush=True)
""")

MODES = {
    "luajit": [],
    "luajit+timeout": ["timeout: 20s"],
    "lua54 (memory_limit)": ["memory_limit: 64MB"],
    "lua54+timeout": ["timeout: 20s", "memory_limit: 64MB"],
}
C_PATHS = {"gsub_function", "gsub_method", "gsub_table", "format_tostring", "format_method", "sort_comparator",
           "sort_lt", "os_time_index", "coroutine_wrap", "coroutine_resume", "xpcall_handler", "mixed",
           "gsub_in_coroutines", "handler_yield_chain"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(MODES))
def test_every_c_reentry_path_ends_in_a_clean_error(mode):
    # The limits are not what stops the recursion: 20s is far more than any path needs.
    limits = MODES[mode]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(limits), str(REPO / "tests")],
                          capture_output=True, text=True, timeout=100, cwd=REPO)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    started = [ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("start ")]
    last = started[-1] if started else "?"
    assert proc.returncode == 0, f"exit {proc.returncode} on path {last}: {proc.stderr[-2000:]}"
    assert [ln["path"] for ln in lines] == list(REENTRY)
    lua54 = "lua54" in mode
    for ln in lines:
        assert ln["next"] == 42  # the state (or a fresh one) serves the next call
        if ln["path"] in LUA54_ONLY:
            if lua54:
                assert "stack overflow" in ln["outcome"], ln
            continue
        assert ln["outcome"] != "returned", ln
        if ln["path"] in C_PATHS:
            assert "C stack overflow" in ln["outcome"], ln
        elif ln["path"] in ("tostring_nontail", "index_vm", "call_metamethod"):
            assert "stack overflow" in ln["outcome"], ln


def test_c_stack_error_names_the_path(run_lua):
    from runtime import LuaHandlerError
    with pytest.raises(LuaHandlerError, match=r"f\.lua:\d+: C stack overflow: more than \d+ nested .*table\.sort"):
        run_lua("return function()\n" + REENTRY["sort_comparator"] + "\nend")


def test_guarded_functions_keep_their_behaviour(run_lua):
    assert run_lua("""return function()
        local s = ("hello"):gsub("l", function(c) return c:upper() end)
        local t = {3, 1, 2} table.sort(t, function(a, b) return a > b end)
        local o = setmetatable({}, {__tostring = function() return "obj" end})
        local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
        local first = co(1)
        local ok, e = pcall(string.gsub, "x", ".", function() error("inner") end)
        local xok, xe = xpcall(function() error("boom", 0) end, function(m) return "handled " .. m end)
        return s, t[1] .. t[2] .. t[3], string.format("%s-%d", o, 5), first, co(21), ok, e:match("inner") ~= nil,
            xok, xe, os.time({year = 2020, month = 1, day = 1, hour = 12}) > 0
    end""") == ("heLLo", "321", "obj-5", 2, 42, False, True, False, "handled boom", True)


def test_guard_count_is_restored_after_errors(run_lua):
    # 1000 caught errors inside guarded calls must not add up to a false overflow.
    assert run_lua("""return function()
        local n = 0
        for i = 1, 1000 do
            if not pcall(string.gsub, "x", ".", function() error("e") end) then n = n + 1 end
            if not pcall(table.sort, {1, 2}, function() error("e") end) then n = n + 1 end
            local co = coroutine.create(function() error("e") end)
            if not coroutine.resume(co) then n = n + 1 end
            xpcall(error, function() error("in handler") end)
        end
        return n
    end""") == 3000


def test_lua_threads_get_a_large_stack_and_the_default_is_restored():
    before = threading.stack_size()
    seen: list[int] = []

    def probe() -> None:
        seen.append(threading.stack_size())

    start_lua_thread(probe, name="probe").join()
    assert threading.stack_size() == before
    assert LUA_THREAD_STACK >= 32 * 1024 * 1024

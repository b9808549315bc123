"""Hostile Lua handlers, by class (the hardening issue): a grammar shared by the tests that
run them in a subprocess (tests/test_c_stack.py, tests/test_hostile_fuzz.py).

Each recursion "path" is a way Lua re-enters Lua through C (LuaJIT's lib_*.c: string.gsub
with a function or table replacement, string.format's __tostring, table.sort's comparator and
__lt, os.time's fields, coroutine.resume/wrap, xpcall's handler), plus paths that recurse only
in the VM, for contrast. `recursion(path)` is a chunk body that recurses through it forever.
"""

from __future__ import annotations

import random

# Each takes the name of the recursive function `f` and calls it again through one path.
REENTRY: dict[str, str] = {
    "gsub_function": "local function f(s) return (string.gsub(s or 'x', '.', f)) end return f('x')",
    "gsub_method": "local function f(s) return ((s or 'x'):gsub('.', f)) end return f('x')",
    "gsub_table": "local t t = setmetatable({}, {__index = function(_, k) return (k:gsub('.', t)) end}) "
                  "return (('x'):gsub('.', t))",
    "format_tostring": "local mt = {} mt.__tostring = function(o) return string.format('%s', o) end "
                       "return string.format('%s', setmetatable({}, mt))",
    "format_method": "local mt = {} mt.__tostring = function(o) return ('%s'):format(o) end "
                     "return ('%s'):format(setmetatable({}, mt))",
    "sort_comparator": "local function f() table.sort({3, 2, 1}, function(a, b) f() return a < b end) end f()",
    "sort_lt": "local mt = {} mt.__lt = function(a, b) table.sort({setmetatable({}, mt), setmetatable({}, mt)}) "
               "return false end table.sort({setmetatable({}, mt), setmetatable({}, mt)})",
    "os_time_index": "local function f() return os.time(setmetatable({}, {__index = function() return f() end})) end "
                     "return f()",
    "coroutine_wrap": "local function f() return coroutine.wrap(f)() end return f()",
    "coroutine_resume": "local function f() local ok, e = coroutine.resume(coroutine.create(f)) "
                        "if not ok then error(e, 0) end end f()",
    "xpcall_handler": "local function h(e) local _, r = xpcall(error, h, e) return r end "
                      "error(select(2, xpcall(error, h, 'x')), 0)",
    "tostring_nontail": "local mt = {} mt.__tostring = function(o) return 'x' .. tostring(o) end "
                        "return tostring(setmetatable({}, mt))",
    "pcall": "local function f() return 1 + select(2, pcall(f)) end return f()",
    "index_vm": "local t t = setmetatable({}, {__index = function(_, k) return t[k] end}) return t.x",
    "call_metamethod": "local c c = setmetatable({}, {__call = function(self) return 1 + c() end}) return c()",
    "mixed": "local function f() return coroutine.wrap(function() return (string.gsub('x', '.', function() "
             "table.sort({1, 2}, function(a, b) f() return a < b end) end)) end)() end return f()",
    "gsub_in_coroutines": "local function f(n) if n % 2 == 0 then return coroutine.wrap(f)(n + 1) end "
                          "return (string.gsub('x', '.', function() return f(n + 1) end)) end return f(0)",
    "error_tostring": "local mt = {} mt.__tostring = function(e) error(e) end error(setmetatable({}, mt))",
    # coroutines suspended inside an xpcall handler at depth 1, each resumed from 150 levels
    # of gsub deeper than the last (a count restored to a saved value would lose them all)
    "handler_yield_chain": "local function deep(n, g) if n == 0 then return g() end "
                           "return (string.gsub('x', '.', function() return deep(n - 1, g) end)) end "
                           "local cos, i, step = {}, 0 "
                           "for k = 1, 300 do local co = coroutine.create(function() "
                           "xpcall(error, function(e) coroutine.yield() return e end) step() end) "
                           "coroutine.resume(co) cos[k] = co end "
                           "step = function() i = i + 1 if cos[i] then deep(150, function() "
                           "local ok, e = coroutine.resume(cos[i]) if not ok then error(e, 0) end end) end end "
                           "step() return i",
    # Lua 5.4 honours metamethods in more library functions (LuaJIT reads raw there and returns)
    "ipairs_index": "local t t = setmetatable({}, {__index = function(_, i) for _ in ipairs(t) do end end}) "
                    "for _ in ipairs(t) do end",
    "concat_index": "local t t = setmetatable({}, {__index = function() return table.concat(t, ',', 1, 1) end}) "
                    "return table.concat(t, ',', 1, 1)",
    "unpack_index": "local t t = setmetatable({}, {__index = function() return unpack(t, 1, 1) end}) "
                    "return unpack(t, 1, 1)",
    "insert_newindex": "local t t = setmetatable({}, {__newindex = function() table.insert(t, 1) end}) "
                       "table.insert(t, 1)",
    "pairs_metamethod": "local t t = setmetatable({}, {__pairs = function() for _ in pairs(t) do end end}) "
                        "for _ in pairs(t) do end",
}
# Paths that only Lua 5.4 takes through C: in LuaJIT they end normally (raw reads) or fail
# with an ordinary error.
LUA54_ONLY = {"ipairs_index", "concat_index", "unpack_index", "insert_newindex", "pairs_metamethod"}

# Loops around each module function: a handler that never returns, calling the function
# over and over (under a time limit it must still stop).
MODULE_LOOPS: dict[str, str] = {
    "json.decode": "local s = string.rep('[', 100) while true do json.decode(s) end",
    "json.decode_ok": "while true do json.decode('{\"a\": [1, 2, 3]}') end",
    "json.encode": "local t = {a = {1, 2, 3}} while true do json.encode(t) end",
    "json.encode_index": "local t = setmetatable({}, {__index = function() while true do end end}) "
                         "t[1] = nil json.encode(setmetatable({1}, {__index = function() while true do end end}))"
                         " while true do json.encode(t) end",
    "logger.info": "while true do logger.debug('x', {a = 1}) end",
    "logger_tostring": "local o = setmetatable({}, {__tostring = function() while true do end end}) "
                       "while true do logger.info(o) end",
    "print_tostring": "local o = setmetatable({}, {__tostring = function() while true do end end}) print(o)",
    "errors.new": "local o = setmetatable({}, {__tostring = function() while true do end end}) "
                  "while true do errors.new({message = o}) end",
    "queue.info": "while true do queue.info('t:q') end",
    "queue.message": "while true do local m = queue.message() m:headers() m:header('a') m:id() end",
    "time.now": "while true do time.now() end",
    "time.sleep": "while true do time.sleep(0) end",
    "pcall_decode": "while true do pcall(json.decode, string.rep('{', 600)) end",
    "returned_tostring": "return nil, setmetatable({}, {__tostring = function() while true do end end})",
    "raised_tostring": "error(setmetatable({}, {__tostring = function() while true do end end}))",
    "string.rep_loop": "local s = '' while true do s = string.rep('ab', 100) .. s:sub(1, 10) end",
}


# -- the grammar: a hostile handler is a class member, optionally wrapped -------------------

WRAPPERS: dict[str, str] = {
    "plain": "{body}",
    "in_pcall_loop": "while true do pcall(function() {body} end) end",  # only the limit can end it
    "in_coroutine": "return coroutine.wrap(function() {body} end)()",
    "in_xpcall": "local ok, e = xpcall(function() {body} end, function(m) return m end) error(e, 0)",
}

# Memory: values too large for a 1MB handler at each point where the host pushes into Lua,
# and bombs inside the handler. (kind, body or publish spec)
OVERSIZED: dict[str, str] = {
    "bomb_rep": "local s = string.rep('x', 2^26) return #s",
    "bomb_table": "local t = {} for i = 1, 1e8 do t[i] = {i} end",
    "bomb_concat": "local t = {} for i = 1, 1e6 do t[i] = string.rep('y', 100) end return table.concat(t)",
    "big_header": "local m = queue.message() return m:header('big') ~= nil",  # published with a 2MB header
    "big_body": "return true",  # published as a 2MB body
    # fills the chunk's module-level cache until the limit stops it (the state is replaced)
    "fill_cache": "while true do CACHE[#CACHE + 1] = string.rep('z', 300) .. #CACHE end",
}


def hostile_case(rng: random.Random, memory: bool) -> tuple[str, str]:
    """One hostile handler body drawn from the grammar: (label, body)."""
    roll = rng.random()
    if memory and roll < 0.3:
        name = rng.choice(sorted(OVERSIZED))
        return f"oversized:{name}", OVERSIZED[name]
    wrapper = rng.choice(sorted(WRAPPERS))
    if roll < 0.65:
        name = rng.choice(sorted(n for n in REENTRY if memory or n not in LUA54_ONLY))
        body = REENTRY[name]
        label = f"reentry:{name}"
    else:
        name = rng.choice(sorted(MODULE_LOOPS))
        body = MODULE_LOOPS[name]
        label = f"loop:{name}"
        if name in ("returned_tostring",) and wrapper != "plain":
            wrapper = "plain"
    if wrapper == "in_pcall_loop" and label.startswith("loop:"):
        wrapper = "plain"
    return f"{label}/{wrapper}", WRAPPERS[wrapper].format(body=body)


PRELUDE = ("local json, logger, queue, time = require('json'), require('logger'), require('queue'), "
           "require('time')\nCACHE = {}\n")


def handler_source(bodies: list[str]) -> str:
    """A handler dispatching on body.h to hostile body number h; anything else is good."""
    lines = [PRELUDE, "local H = {}"]
    for i, body in enumerate(bodies, 1):
        lines.append(f"H[{i}] = function(body)\n{body}\nend")
    lines.append("return function(body)\n"
                 "  if type(body) == 'table' and body.h then return H[body.h](body) end\n"
                 "  return true\nend\n")
    return "\n".join(lines)


def app_yaml(consumers: dict[str, str], concurrency: int = 1, dlq_consumer: bool = False,
             max_attempts: int = 1) -> str:
    """Queues q_<name> (dead letters to dlq after `max_attempts`), functions f_<name> (source
    file f_<name>.lua) with the limits given, and consumers c_<name>."""
    out = ["namespace: t", "entries:",
           "  - {name: d, kind: queue.driver.memory, lifecycle: {auto_start: true}}",
           "  - {name: dlq, kind: queue.queue, driver: d}"]
    for name, limits in consumers.items():
        out += [f"  - {{name: q_{name}, kind: queue.queue, driver: d, "
                f"dead_letter: {{queue: dlq, max_attempts: {max_attempts}}}}}",
                f"  - {{name: f_{name}, kind: function.lua, source: file://f_{name}.lua, "
                f"modules: [json, logger, queue, time]{', ' + limits if limits else ''}}}",
                f"  - {{name: c_{name}, kind: queue.consumer, queue: q_{name}, func: f_{name}, "
                f"concurrency: {concurrency}, prefetch: 4, lifecycle: {{auto_start: true}}}}"]
    if dlq_consumer:
        out += ["  - {name: check_dlq, kind: function.lua, source: file://check_dlq.lua, modules: [queue, logger]}",
                "  - {name: c_dlq, kind: queue.consumer, queue: dlq, func: check_dlq, concurrency: 1, "
                "lifecycle: {auto_start: true}}"]
    return "\n".join(out) + "\n"


CHECK_DLQ = """local queue, logger = require('queue'), require('logger')
return function(body)
  local reason = queue.message():header('x_dead_letter_reason')
  if type(reason) ~= 'string' or reason == '' then logger.error('DEAD LETTER WITHOUT A REASON') end
  if type(body) ~= 'table' or body.h == nil then logger.error('GOOD MESSAGE DEAD-LETTERED: ' .. tostring(reason)) end
  return true
end
"""


def run_fuzz(app_dir: str, seed: int, n: int, limit: float) -> int:
    """Build the fuzz app in `app_dir` (n hostile handlers per state kind) and run it: each
    hostile message is followed by a good one, which must be handled within limit + 2 s.
    Prints one JSON line per case; exit status 0 when the process survived them all."""
    import json
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from runtime import App

    rng = random.Random(seed)
    modes = {"luajit": f"timeout: {limit}", "lua54": f"timeout: {limit}, memory_limit: 1MB"}
    cases: dict[str, list[tuple[str, str]]] = {}
    root = Path(app_dir)
    for mode in modes:
        cases[mode] = [hostile_case(rng, memory=(mode == "lua54")) for _ in range(n)]
        (root / f"f_{mode}.lua").write_text(handler_source([body for _, body in cases[mode]]))
    (root / "app.yaml").write_text(app_yaml(modes))
    app = App.load(root).start()
    try:
        for mode in modes:
            queue = f"t:q_{mode}"
            for index, (label, _) in enumerate(cases[mode], 1):
                before = app.stats()["consumers"][f"t:c_{mode}"]
                body: dict[str, object] = {"h": index}
                headers = None
                if label.startswith("oversized:big_body"):
                    body["pad"] = "x" * (2 << 20)
                if label.startswith("oversized:big_header"):
                    headers = {"big": "h" * (2 << 20)}
                started = time.monotonic()
                app.publish(queue, body, headers)
                app.publish(queue, {"good": index})
                deadline = started + limit + 2
                while True:
                    now = app.stats()["consumers"][f"t:c_{mode}"]
                    done = now["acked"] > before["acked"] and now["processed"] >= before["processed"] + 2
                    if done or time.monotonic() > deadline:
                        break
                    time.sleep(0.002)
                print(json.dumps({"mode": mode, "case": label, "elapsed": time.monotonic() - started,
                                  "good_acked": now["acked"] - before["acked"],
                                  "bad_dead_lettered": now["dead_lettered"] - before["dead_lettered"]}), flush=True)
    finally:
        app.stop(5)
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "fuzz":
        sys.exit(run_fuzz(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))

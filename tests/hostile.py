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
}

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


def recursion(path: str) -> str:
    return REENTRY[path]


def hostile_handlers(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` hostile handler bodies drawn from the grammar: (class:name, body)."""
    out = []
    for _ in range(n):
        cls = rng.choice(["reentry", "loop"])
        if cls == "reentry":
            name = rng.choice(sorted(REENTRY))
            out.append((f"reentry:{name}", REENTRY[name]))
        else:
            name = rng.choice(sorted(MODULE_LOOPS))
            out.append((f"loop:{name}", MODULE_LOOPS[name]))
    return out

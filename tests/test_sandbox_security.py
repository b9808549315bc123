"""Adversarial tests: sandboxed Lua code tries every way out of the sandbox (SPEC §4, §5).

Each test runs user Lua code that attempts an escape and asserts that the attempt FAILS,
with no side effect on the host. Every test has two canaries (see the `canary` fixture):

* a file outside the application directory whose content must stay unchanged and must
  never show up in anything Lua or the runtime hands back;
* an environment variable (RUNTIME_CANARY_SECRET) whose value must never show up either.

All calls go through `Apps.call`, which also checks that what comes back to Python is made
of plain Python values only (never a lupa object), scans results and error texts for the
canaries, and re-checks the canary file and the tmp folder (no file appeared or vanished).

The Lua functions report what they observed as a table; the assertions are on that table.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime import App, ConfigError, LuaErrorValue, LuaHandlerError
from runtime.errors import RuntimeHostError

pytestmark = pytest.mark.timeout(30)

SECRET_VAR = "RUNTIME_CANARY_SECRET"
SECRET = "s3cret"
CANARY_MARK = "CANARY-FILE-7f3a9c"
CANARY_TEXT = f'return function() return "{CANARY_MARK}" end\n'
ALL_MODULES = ("json", "logger", "queue", "time")

# What the spec lets a handler's environment hold (§4), plus _VERSION (harmless).
SPEC_GLOBALS = {
    "assert", "error", "ipairs", "next", "pairs", "pcall", "xpcall", "select", "tonumber",
    "tostring", "type", "unpack", "rawequal", "rawget", "rawset", "setmetatable", "getmetatable",
    "_G", "string", "table", "math", "coroutine", "os", "require", "errors", "print",
}
ALLOWED_GLOBALS = SPEC_GLOBALS | {"_VERSION"}

# Text that would mean a Python object, exception or traceback reached Lua (or its errors).
PY_LEAK = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]*\.py\"|\.pyx?\b|<class '|<built-in|object at 0x"
    r"|_lupa|lupa\.|PyObject|site-packages|__class__"
    r"|\b(?:Unicode\w*|Type|Value|Attribute|Overflow|Key|Index|Recursion|Runtime|Lookup)Error\b"
)

# Lua helpers prepended to every Lua file the tests write. They only use base functions.
PRELUDE = r"""
local function deep_types(v, acc, seen)
  acc = acc or {}
  seen = seen or {}
  local tv = type(v)
  acc[tv] = true
  if tv == "table" and not seen[v] then
    seen[v] = true
    for k, x in next, v do
      deep_types(k, acc, seen)
      deep_types(x, acc, seen)
    end
    local mt = getmetatable(v)
    if type(mt) == "table" then
      acc["metatable"] = true
      deep_types(mt, acc, seen)
    elseif mt ~= nil then
      acc["metatable:" .. type(mt)] = true
    end
  end
  return acc
end
local function types_of(...)
  local out = {}
  for i = 1, select("#", ...) do out[i] = type((select(i, ...))) end
  return out
end
local function str(v)
  local ok, s = pcall(tostring, v)
  if ok and type(s) == "string" then return s end
  return "<tostring failed>"
end
"""


# ------------------------------------------------------------------------------------------
# Canaries and app helpers


@dataclass
class Canary:
    root: Path
    path: Path
    content: bytes
    mtime_ns: int
    written: set[Path] = field(default_factory=set)

    def scan(self, obj: Any) -> None:
        text = obj if isinstance(obj, str) else repr(obj)
        assert SECRET not in text, f"the secret environment variable leaked: {text[:500]!r}"
        assert CANARY_MARK not in text, f"the canary file's content leaked: {text[:500]!r}"

    def verify(self) -> None:
        assert self.path.read_bytes() == self.content, "the canary file was modified"
        assert self.path.stat().st_mtime_ns == self.mtime_ns, "the canary file was touched"
        assert os.environ.get(SECRET_VAR) == SECRET, "the canary environment variable changed"
        found = {p for p in self.root.rglob("*") if not p.is_dir()}
        expected = self.written | {self.path}
        assert found == expected, f"files appeared or vanished: +{found - expected} -{expected - found}"


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(SECRET_VAR, SECRET)
    path = tmp_path / "canary.lua"
    path.write_text(CANARY_TEXT, encoding="utf-8")
    c = Canary(tmp_path, path, path.read_bytes(), path.stat().st_mtime_ns)
    yield c
    c.verify()


PLAIN_TYPES = {type(None), bool, int, float, str, bytes}


def assert_plain(value: Any, where: str = "result") -> None:
    """Only plain Python values (and LuaErrorValue) may come back from Lua: no lupa object."""
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    elif type(value) is dict:
        for k, v in value.items():
            assert_plain(k, f"{where} key {k!r}")
            assert_plain(v, f"{where}[{k!r}]")
    elif type(value) is LuaErrorValue:
        assert type(value.kind) is str and type(value.message) is str and type(value.retryable) is bool
        assert_plain(value.details, f"{where}.details")
    else:
        assert type(value) in PLAIN_TYPES, f"{where} is a {type(value)!r}, not a plain Python value"


def text_of(value: Any) -> str:
    """A string from an exported Lua string (which may have come back as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def assert_no_python_leak(text: Any) -> None:
    text = text_of(text)
    assert not PY_LEAK.search(text), f"Python internals visible to Lua: {text[:500]!r}"


def fn(name: str, lua: str, modules: tuple[str, ...] | list[str] = ALL_MODULES, **extra: Any) -> dict[str, Any]:
    """A function.lua entry whose source file is PRELUDE + lua."""
    return {"name": name, "kind": "function.lua", "lua": lua, "modules": list(modules), **extra}


class Apps:
    """Writes small apps under tmp_path (each in its own folder) and calls them, checking
    every result and error against the canaries."""

    def __init__(self, canary: Canary):
        self.canary = canary
        self.counter = itertools.count()

    def write(self, rel_dir: Path, name: str, content: str | bytes) -> Path:
        path = rel_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        self.canary.written.add(path)
        return path

    def make(self, *entries: dict[str, Any], raw_entries: tuple[dict[str, Any], ...] = (),
             files: dict[str, str | bytes] | None = None) -> Path:
        app_dir = self.canary.root / f"app_{next(self.counter)}"
        app_dir.mkdir()
        out = [{"name": "mem", "kind": "queue.driver.memory"},
               {"name": "q", "kind": "queue.queue", "driver": "mem"}]
        for entry in entries:
            entry = dict(entry)
            lua = entry.pop("lua")
            self.write(app_dir, f"{entry['name']}.lua", PRELUDE + lua)
            entry["source"] = f"file://{entry['name']}.lua"
            out.append(entry)
        out.extend(raw_entries)
        for rel, content in (files or {}).items():
            self.write(app_dir, rel, content)
        self.write(app_dir, "app.yaml", yaml.safe_dump({"namespace": "t", "entries": out}, sort_keys=False))
        return app_dir

    def load(self, *entries: dict[str, Any], **kw: Any) -> App:
        return App.load(self.make(*entries, **kw))

    def single(self, lua: str, modules: tuple[str, ...] | list[str] = ALL_MODULES) -> App:
        return self.load(fn("f", lua, modules))

    def call(self, app: App, func: str, *args: Any) -> Any:
        try:
            result = app.call(func, *args)
        except Exception as exc:
            self.canary.scan(str(exc))
            self.canary.verify()
            raise
        assert_plain(result)
        self.canary.scan(result)
        self.canary.verify()
        return result

    def run(self, lua: str, *args: Any, modules: tuple[str, ...] | list[str] = ALL_MODULES) -> Any:
        return self.call(self.single(lua, modules), "t:f", *args)


@pytest.fixture
def apps(canary: Canary, caplog: pytest.LogCaptureFixture) -> Any:
    # Lua log records really go through the host (bridge.log) in every test, at every level.
    caplog.set_level(logging.DEBUG, logger="runtime.lua")
    yield Apps(canary)
    canary.scan(caplog.text)


# ------------------------------------------------------------------------------------------
# Absent globals and library functions


def test_absent_globals_by_name(apps: Apps) -> None:
    obs = apps.run("""
    return function()
      return {
        io = type(io), debug = type(debug), ffi = type(ffi), jit = type(jit), package = type(package),
        load = type(load), loadstring = type(loadstring), dofile = type(dofile), loadfile = type(loadfile),
        getfenv = type(getfenv), setfenv = type(setfenv), collectgarbage = type(collectgarbage),
        newproxy = type(newproxy), module = type(module), gcinfo = type(gcinfo), bit = type(bit),
        python = type(python), _ENV = type(_ENV), arg = type(arg),
        string_dump = type(string.dump), method_dump = type(("").dump),
        os_execute = type(os.execute), os_getenv = type(os.getenv), os_remove = type(os.remove),
        os_rename = type(os.rename), os_exit = type(os.exit), os_tmpname = type(os.tmpname),
        os_setlocale = type(os.setlocale),
      }
    end
    """)
    assert obs == {k: "nil" for k in obs}
    assert len(obs) == 28


ABSENT = ["io", "debug", "ffi", "jit", "package", "load", "loadstring", "dofile", "loadfile", "getfenv",
          "setfenv", "collectgarbage", "newproxy", "module", "gcinfo", "bit", "python", "_ENV", "arg",
          "require_ffi", "lupa", "pcall_python"]


@pytest.mark.parametrize("name", ABSENT)
def test_absent_global_via_G_and_rawget(apps: Apps, name: str) -> None:
    obs = apps.run("""
    return function(name)
      return {
        index = type(_G[name]),
        raw = type(rawget(_G, name)),
        GG = type(_G._G[name]),
        required = select(2, pcall(require, name)),
      }
    end
    """, name)
    assert obs["index"] == obs["raw"] == obs["GG"] == "nil"
    assert f"module '{name}' not found" in obs["required"]


@pytest.mark.parametrize("path", ["string.dump", "os.execute", "os.getenv", "os.remove", "os.rename", "os.exit",
                                  "os.tmpname", "os.setlocale", "string.buffer", "table.new", "table.clear",
                                  "math.ffi", "coroutine.python"])
def test_absent_library_functions(apps: Apps, path: str) -> None:
    lib, name = path.split(".")
    obs = apps.run("""
    return function(lib, name)
      return { env = type(_G[lib][name]), required = type(require(lib)[name]), method = type(("")[name]) }
    end
    """, lib, name)
    assert obs == {"env": "nil", "required": "nil", "method": "nil"}


def test_environment_holds_only_the_spec_globals(apps: Apps) -> None:
    obs = apps.run("""
    local function keys(t)
      local out = {}
      for k, v in pairs(t) do out[#out + 1] = k .. ":" .. type(v) end
      table.sort(out)
      return out
    end
    return function()
      return { G = keys(_G), os = keys(os), string = keys(string), table = keys(table), math = keys(math),
               coroutine = keys(coroutine), errors = keys(errors), G_mt = type(getmetatable(_G)),
               G_is_G = rawequal(_G, _G._G) }
    end
    """)
    names = {k.split(":")[0] for k in obs["G"]}
    assert SPEC_GLOBALS <= names <= ALLOWED_GLOBALS
    assert sorted(obs["os"]) == ["clock:function", "date:function", "difftime:function", "time:function"]
    for lib in ("string", "table", "coroutine"):
        assert all(k.endswith(":function") for k in obs[lib]), obs[lib]
    assert all(k.split(":")[1] in ("function", "number") for k in obs["math"])
    assert "dump:function" not in obs["string"]
    assert {k.split(":")[1] for k in obs["errors"]} == {"function", "string"}
    assert obs["G_mt"] == "nil"
    assert obs["G_is_G"] is True


def test_everything_reachable_from_the_environment_is_plain_lua(apps: Apps) -> None:
    """Walk every value reachable from _G, the modules, an error value and a message from
    json.decode (through pairs and metatables): no userdata (a Python object), no thread."""
    obs = apps.run("""
    local json, queue, logger, time = require("json"), require("queue"), require("logger"), require("time")
    return function()
      local _, err = queue.publish("nope", {})
      local _, err2 = queue.publish("q", {})
      local roots = { _G, json, queue, logger, time, logger:with({ a = 1 }), logger:named("n"), err, err2,
                      errors.new("x"), json.decode('{"a":[1,{}]}'), require("string"), require("os"),
                      require("errors"), require("table"), require("math"), require("coroutine") }
      return deep_types(roots)
    end
    """)
    assert set(obs) <= {"table", "function", "string", "number", "boolean", "metatable:string"}, obs


# ------------------------------------------------------------------------------------------
# Side-effecting attempts on the host: files, processes, environment


def test_file_and_process_attempts_fail(apps: Apps, canary: Canary) -> None:
    victim = str(canary.path)
    pwned = str(canary.root / "pwned.txt")
    obs = apps.run("""
    return function(victim, pwned)
      local attempts = {
        io_open_read = function() return io.open(victim):read("*a") end,
        io_open_write = function() return io.open(victim, "w"):write("x") end,
        io_lines = function() for l in io.lines(victim) do return l end end,
        io_popen = function() return io.popen("cat " .. victim):read("*a") end,
        os_execute = function() return os.execute("echo pwned > " .. pwned) end,
        os_remove = function() return os.remove(victim) end,
        os_rename = function() return os.rename(victim, victim .. ".moved") end,
        os_tmpname = function() return os.tmpname() end,
        os_getenv = function() return os.getenv("RUNTIME_CANARY_SECRET") end,
        dofile = function() return dofile(victim) end,
        loadfile = function() return loadfile(victim)() end,
        require_path = function() return require(victim) end,
        require_rel = function() return require("../canary") end,
        require_name = function() return require("canary") end,
        package_loadlib = function() return package.loadlib("libc.so.6", "system") end,
        ffi_C = function() return require("ffi").C.system("echo pwned > " .. pwned) end,
      }
      local out = {}
      for name, f in pairs(attempts) do
        local ok, e = pcall(f)
        out[name] = { ok = ok, err = str(e) }
      end
      return out
    end
    """, victim, pwned)
    assert len(obs) == 16
    for name, o in obs.items():
        assert o["ok"] is False, f"{name} succeeded: {o}"
        assert_no_python_leak(o["err"])
    assert not (canary.root / "pwned.txt").exists()


def test_os_exit_is_not_reachable(apps: Apps) -> None:
    # Never call it (it would end the test process); only prove it is not there.
    obs = apps.run("""
    return function() return { type(os.exit), type(require("os").exit), type(rawget(os, "exit")) } end
    """)
    assert obs == ["nil", "nil", "nil"]


def test_env_placeholder_in_a_lua_file_is_not_substituted(apps: Apps) -> None:
    # SPEC §1: file:// contents are taken verbatim; ${env:...} in Lua must not read the environment.
    obs = apps.run("""
    return function()
      return { "${env:RUNTIME_CANARY_SECRET}", "${env:RUNTIME_CANARY_SECRET|dflt}" }
    end
    """)
    assert obs == ["${env:RUNTIME_CANARY_SECRET}", "${env:RUNTIME_CANARY_SECRET|dflt}"]


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink", "dotdot-inside"])
def test_lua_source_outside_the_app_directory_is_refused(apps: Apps, canary: Canary, how: str) -> None:
    app_dir = canary.root / f"escape_{how}"
    if how == "parent":
        source = "file://../canary.lua"
    elif how == "absolute":
        source = f"file://{canary.path}"
    elif how == "dotdot-inside":
        source = "file://sub/../../canary.lua"
    else:
        link = app_dir / "link.lua"
        app_dir.mkdir()
        link.symlink_to(canary.path)
        canary.written.add(link)
        source = "file://link.lua"
    entries = [{"name": "f", "kind": "function.lua", "source": source}]
    app_dir.mkdir(exist_ok=True)
    apps.write(app_dir, "app.yaml", yaml.safe_dump({"namespace": "t", "entries": entries}))
    with pytest.raises(ConfigError) as info:
        App.load(app_dir)
    canary.scan(str(info.value))
    assert "outside the application directory" in str(info.value)


# ------------------------------------------------------------------------------------------
# require


REFUSED_MODULES = ["ffi", "io", "debug", "jit", "package", "python", "bit", "lupa", "string.buffer", "table.new",
                   "jit.util", "jit.profile", "_G", "", "queue", "json", "logger", "time", "t:lib", "lib",
                   "\27LJ", "os.execute", "..", "/etc/passwd"]


@pytest.mark.parametrize("name", REFUSED_MODULES)
def test_require_refuses_what_the_entry_does_not_list(apps: Apps, name: str) -> None:
    lib = {"name": "lib", "kind": "library.lua", "source": "return { secret = 'lib value' }"}
    app = apps.load(fn("f", """
    return function(name)
      local ok, e = pcall(require, name)
      return { ok = ok, err = str(e), t = type(e) }
    end
    """, modules=[]), raw_entries=(lib,))
    obs = apps.call(app, "t:f", name)
    assert obs["ok"] is False
    assert obs["t"] == "string"
    assert f"module '{name}' not found" in text_of(obs["err"])


def test_require_of_non_strings_raises_a_string(apps: Apps) -> None:
    obs = apps.run("""
    return function()
      local out = {}
      for i, v in ipairs({ 1, true, {}, print, coroutine.create(print) }) do
        local ok, e = pcall(require, v)
        out[i] = { ok, type(e) }
      end
      local ok, e = pcall(require)
      out[#out + 1] = { ok, type(e) }
      return out
    end
    """)
    assert obs == [[False, "string"]] * 6


def test_require_of_standard_tables_gives_the_restricted_copies(apps: Apps) -> None:
    obs = apps.run("""
    return function()
      return { rawequal(require("os"), os), type(require("os").execute), rawequal(require("string"), string),
               type(require("string").dump), rawequal(require("errors"), errors) }
    end
    """, modules=[])
    assert obs == [True, "nil", True, "nil", True]


@pytest.mark.parametrize("module", ["io", "debug", "ffi", "jit", "package", "python", "bit", "state", "bridge",
                                    "sandbox", "host"])
def test_listing_an_unknown_module_is_a_config_error(apps: Apps, module: str) -> None:
    app_dir = apps.make(fn("f", "return function() return type(require(...)) end", modules=[module]))
    with pytest.raises(ConfigError) as info:
        App.load(app_dir)
    assert f"unknown module '{module}'" in str(info.value)


# ------------------------------------------------------------------------------------------
# Reaching the real globals / shared tables


def test_string_metatable_is_locked(apps: Apps) -> None:
    obs = apps.run("""
    return function()
      local o = {}
      o.mt_type = type(getmetatable(""))
      o.mt_value = str(getmetatable(""))
      o.index = { pcall(function() return type(getmetatable("").__index) end) }
      o.rawget = { pcall(function() return type(rawget(getmetatable(""), "__index")) end) }
      o.set_on_string = { pcall(setmetatable, "", {}) }
      o.set_mt_field = { pcall(function() getmetatable("").__index = {} end) }
      o.dunder_index = type(("").__index)
      o.dump = type(("").dump)
      o.method_works = ("abc"):upper()
      o.gsub_method = (("aXb"):gsub("X", "-"))
      return o
    end
    """)
    assert obs["mt_type"] != "table"
    assert obs["index"][0] is False or obs["index"][1] != "table"
    assert obs["rawget"][0] is False
    assert obs["set_on_string"][0] is False
    assert obs["set_mt_field"][0] is False
    assert obs["dunder_index"] == "nil"
    assert obs["dump"] == "nil"
    assert obs["method_works"] == "ABC"
    assert obs["gsub_method"] == "a-b"


def test_error_values_are_opaque(apps: Apps) -> None:
    obs = apps.run("""
    return function()
      local e = errors.new({ message = "m", kind = errors.INVALID, details = { a = 1 } })
      local o = {}
      o.mt = str(getmetatable(e))
      o.mt_type = type(getmetatable(e))
      o.set_mt = { pcall(setmetatable, e, {}) }
      o.forge = { pcall(setmetatable, {}, getmetatable(e)) }
      o.raw_index = type(rawget(e, "__index"))
      o.next = type(next(e))
      o.class = type(e.__class__)
      o.dict = type(e.__dict__)
      o.index_field = type(e.__index)
      o.tostring_field = type(e.__tostring)
      o.methods_on_other = { pcall(e.kind, {}) }
      o.write = { pcall(function() e.kind = "x" end) }
      -- rawset bypasses __newindex: it must only change this one value
      rawset(e, "kind", function() return "Evil" end)
      local other = errors.new({ message = "n", kind = errors.INVALID })
      o.other_kind = other:kind()
      o.is_error_after_rawset = errors.is(e, errors.INVALID)
      local d = e:details(); d.a = 2
      -- a fake error (a table dressed up like one) is not an error value
      local fake = setmetatable({}, { __tostring = function() return "fake" end,
                                      __index = { kind = function() return "Invalid" end } })
      o.fake_is = errors.is(fake, errors.INVALID)
      o.deep = deep_types({ e, other, fake })
      return o, e, fake
    end
    """)
    o, e, fake = obs
    assert o["mt"] == "error" and o["mt_type"] == "string"
    assert o["set_mt"][0] is False
    assert o["forge"][0] is False
    assert o["raw_index"] == o["next"] == "nil"
    assert o["class"] == o["dict"] == o["index_field"] == o["tostring_field"] == "nil"
    assert o["methods_on_other"][0] is False and isinstance(o["methods_on_other"][1], str)
    assert o["write"][0] is False
    assert o["other_kind"] == "Invalid"
    assert o["is_error_after_rawset"] is True
    assert o["fake_is"] is False
    assert "userdata" not in o["deep"]
    assert isinstance(e, LuaErrorValue) and e.kind == "Invalid" and e.details == {"a": 1}
    assert not isinstance(fake, LuaErrorValue)


@pytest.mark.parametrize("call", [
    'queue.publish("nope", {})',          # NotFound from Python (QueueNotFound)
    'queue.publish("q", {})',             # Unavailable from Python (QueueUnavailable)
    'queue.publish("t:q", { a = 1 }, { h = "v" })',
    'queue.info("nope")',
    'queue.info("q")',
    'queue.publish("q", 0/0)',            # Invalid, refused in Lua
    'queue.publish("q", {}, { x_reserved = 1 })',
    'queue.message()',
    'json.decode("{")',
    'json.encode(print)',
    'time.sleep(-1)',
    'time.sleep("forever")',
])
def test_error_values_from_module_calls_are_plain_lua(apps: Apps, call: str) -> None:
    obs = apps.run(f"""
    local json, queue, time = require("json"), require("queue"), require("time")
    return function()
      local r, err = {call}
      local o = {{}}
      o.r = type(r)
      o.t = type(err)
      o.mt = str(getmetatable(err))
      o.class = type(err.__class__)
      o.dict = type(err.__dict__)
      o.module = type(err.__module__)
      o.raw = {{ type(rawget(err, "__class__")), type(rawget(err, "__dict__")), type(rawget(err, 1)),
                type(rawget(err, "message")) }}
      o.next = type(next(err))
      o.len = #err
      o.text = tostring(err)
      o.kind = err:kind()
      o.message = err:message()
      o.retryable = type(err:retryable())
      o.details = type(err:details())
      o.deep = deep_types(err)
      o.pcall_index = {{ pcall(function() return err.__init__.__globals__ end) }}
      return o, err
    end
    """)
    o, err = obs
    assert o["r"] == "nil" and o["t"] == "table" and o["mt"] == "error"
    assert o["class"] == o["dict"] == o["module"] == "nil"
    assert o["raw"] == ["nil"] * 4
    assert o["next"] == "nil" and o["len"] == 0
    assert o["kind"] in {"NotFound", "Unavailable", "Invalid"}
    assert o["retryable"] == "boolean" and o["details"] in {"nil", "table"}
    assert_no_python_leak(o["text"])
    assert_no_python_leak(o["message"])
    assert set(o["deep"]) <= {"table", "metatable:string"}
    assert o["pcall_index"][0] is False
    assert isinstance(err, LuaErrorValue)


RAISING_CALLS = [
    'queue.publish(nil, {})',
    'queue.publish(42, {})',
    'queue.publish("q", {}, "headers")',
    'queue.publish("q", {}, errors.new("x"))',
    'queue.info(nil)',
    'queue.info({})',
    'time.sleep(nil)',
    'time.sleep({})',
    'time.sleep(print)',
    'time.sleep(true)',
    'json.decode(nil)',
    'json.decode(print)',
    'errors.new(nil)',
    'errors.new(true)',
    'errors.new("x").kind({})',
    'errors.new("x").details("not an error")',
    'require(nil)',
    'require("nope")',
    'print(setmetatable({}, { __tostring = function() error("inner") end }))',
    'error(select(2, queue.publish("nope", {})))',
    'error(select(2, queue.info("q")))',
    'error(select(2, json.decode("[")))',
    'coroutine.wrap(function() queue.publish(nil) end)()',
]


@pytest.mark.parametrize("call", RAISING_CALLS)
def test_errors_raised_by_host_modules_are_never_python_objects(apps: Apps, call: str) -> None:
    obs = apps.run(f"""
    local json, queue, time, logger = require("json"), require("queue"), require("time"), require("logger")
    return function()
      local o = {{}}
      local ok, e = pcall(function() return {call} end)
      o.ok, o.t, o.text, o.mt = ok, type(e), str(e), str(getmetatable(e))
      o.deep = deep_types(e)
      local handler_args
      local ok2, h = xpcall(function() return {call} end, function(...)
        handler_args = types_of(...)
        return ...
      end)
      o.ok2, o.handler_args, o.h = ok2, handler_args, type(h)
      return o
    end
    """)
    assert obs["ok"] is False and obs["ok2"] is False
    assert obs["t"] in ("string", "table")
    assert obs["handler_args"] == [obs["t"]]
    assert obs["h"] == obs["t"]
    if obs["t"] == "table":
        assert obs["mt"] == "error"
    assert "userdata" not in obs["deep"]
    assert_no_python_leak(obs["text"])


INVALID_UTF8_CALLS = [
    r'logger.info("\255")',
    r'logger.info("ok", { k = "\255", ["\255"] = "\254" })',
    r'logger:named("\255"):info("x")',
    r'logger:with({ ["\255"] = "\255" }):warn("\255\254")',
    r'logger.error("\237\160\128")',          # a UTF-16 surrogate encoded in UTF-8
    r'logger.debug("\192\128")',              # an overlong NUL
    r'print("\255", "\254")',
    r'queue.publish("\255", {})',
    r'queue.publish("q\255", {})',
    r'queue.publish("q", "\255")',
    r'queue.publish("q", { ["\255"] = "\255" })',
    r'queue.publish("q", {}, { ["\255"] = "\255" })',
    r'queue.publish("q", {}, { h = "\255" })',
    r'queue.info("\255")',
    r'queue.info("\244\144\128\128")',        # above U+10FFFF
    r'json.encode("\255")',
    r'json.encode({ ["\255"] = "\192\128" })',
    r'json.decode("\"\255\"")',
    r'json.decode("\255")',
    r'time.sleep("\255")',
    r'errors.new("\255")',
    r'errors.wrap(errors.new("\255"), "\254")',
    r'errors.new({ message = "\255", kind = "\255", details = { ["\255"] = "\255" } })',
]


@pytest.mark.parametrize("call", INVALID_UTF8_CALLS)
def test_invalid_utf8_given_to_host_modules(apps: Apps, call: str) -> None:
    obs = apps.run(f"""
    local json, queue, time, logger = require("json"), require("queue"), require("time"), require("logger")
    return function()
      local r = {{ pcall(function() return {call} end) }}
      local o = {{ ok = r[1], types = types_of(unpack(r, 2, 3)), deep = deep_types(r) }}
      o.texts = {{}}
      for i = 2, 3 do
        if r[i] ~= nil then o.texts[#o.texts + 1] = str(r[i]) end
      end
      return o, r[2], r[3]
    end
    """)
    o = obs[0]
    assert "userdata" not in o["deep"], o
    for t in o["types"]:
        assert t in ("nil", "string", "table", "boolean", "number")
    if o["ok"] is False:
        assert o["types"][0] in ("string", "table")
    for text in o["texts"]:
        assert_no_python_leak(text)


def test_invalid_utf8_returned_to_python_becomes_bytes(apps: Apps) -> None:
    assert apps.run(r'return function() return "\255ok", { ["\254"] = "\192\128" } end') == (
        b"\xffok", {b"\xfe": b"\xc0\x80"})


# ------------------------------------------------------------------------------------------
# Tampering with shared things: one entry must not affect another in the same Lua state

TAMPER = """
local json, queue, logger, time = require("json"), require("queue"), require("logger"), require("time")
return function()
  local evil = function() return "EVIL" end
  setmetatable(_G, { __index = function(_, k) return "EVIL:" .. tostring(k) end })
  string.upper = nil
  string.rep = evil
  string.format, string.gsub, string.find, string.sub = evil, evil, evil, evil
  string.byte, string.char, string.len, string.lower = evil, evil, evil, evil
  table.insert, table.concat, table.sort, table.remove = evil, evil, evil, evil
  math.floor, math.huge, math.max = evil, 0, evil
  os.time, os.date, os.clock = evil, evil, evil
  coroutine.wrap, coroutine.create = nil, evil
  errors.new, errors.wrap, errors.is = evil, evil, evil
  errors.NOT_FOUND, errors.INVALID = "EVIL", "EVIL"
  json.encode, json.decode = evil, evil
  logger.info, logger.with = evil, evil
  queue.publish, queue.info = evil, evil
  time.now, time.sleep = evil, evil
  pairs, ipairs, tostring, next, error, pcall, unpack = evil, evil, evil, evil, evil, evil, evil
  print, require, select, tonumber, rawget, assert = evil, evil, evil, evil, evil, evil
  type = evil
  return "tampered"
end
"""

VICTIM = """
local json, queue, logger, time = require("json"), require("queue"), require("logger"), require("time")
return function()
  local o = {}
  o.upper_method = ("x"):upper()
  o.upper_fn = type(string.upper) == "function" and string.upper("x")
  o.rep = string.rep("ab", 2)
  o.rep_method = ("ab"):rep(2)
  o.format = string.format("%d-%s", 5, "x")
  o.gsub = (string.gsub("aa", "a", "b"))
  o.find = string.find("abc", "b")
  o.sub = ("abc"):sub(2, 2)
  o.byte = string.byte("A")
  o.len = ("abc"):len()
  local t = {}
  table.insert(t, "a"); table.insert(t, "b")
  o.concat = table.concat(t, ",")
  o.floor = math.floor(1.5)
  o.huge = math.huge == 1 / 0
  o.os_time = type(os.time())
  o.wrap = type(coroutine.wrap)
  o.create = type(coroutine.create(function() end))
  o.not_found = errors.NOT_FOUND
  o.invalid = errors.INVALID
  o.new_kind = errors.new("m"):kind()
  o.is = errors.is(errors.new({ message = "m", kind = errors.INVALID }), errors.INVALID)
  o.encode = json.encode({ 1, "x\\n" })
  o.decode = json.decode("[7]")[1]
  o.logger = type(logger.info) == "function" and type(logger.with) == "function"
  local ok, err = queue.publish("nope", {})
  o.publish = tostring(err)
  o.info = select(2, queue.info("nope")):kind()
  o.now = type(time.now())
  o.sleep = select(2, time.sleep(-1)):kind()
  local n = 0
  for _ in pairs({ 1, 2, 3 }) do n = n + 1 end
  o.pairs = n
  o.tostring = tostring(12)
  o.pcall = (pcall(error, "x"))
  o.undefined = type(undefined_global_xyz)
  o.io = type(io)
  o.G_mt = type(getmetatable(_G))
  o.type = type(type)
  o.print = type(print)
  o.require = type(require)
  return o
end
"""


def test_tampering_in_one_entry_does_not_reach_another(apps: Apps) -> None:
    app = apps.load(fn("victim", VICTIM), fn("tamper", TAMPER))
    before = apps.call(app, "t:victim")
    assert apps.call(app, "t:tamper") == "tampered"
    after = apps.call(app, "t:victim")
    assert apps.call(app, "t:tamper") == "tampered"  # a second round, on an already tampered env
    again = apps.call(app, "t:victim")
    assert before == after == again
    assert before["upper_method"] == "X" and before["upper_fn"] == "X"
    assert before["rep"] == before["rep_method"] == "abab"
    assert before["not_found"] == "NotFound" and before["new_kind"] == "Unknown"
    assert before["encode"] == '[1,"x\\n"]' and before["decode"] == 7
    assert before["undefined"] == "nil" and before["io"] == "nil" and before["G_mt"] == "nil"


def test_tampering_before_the_victim_first_loads(apps: Apps) -> None:
    # The tampering entry runs first, before the victim's chunk is even loaded.
    app = apps.load(fn("tamper", TAMPER), fn("victim", VICTIM))
    assert apps.call(app, "t:tamper") == "tampered"
    obs = apps.call(app, "t:victim")
    assert obs["upper_method"] == "X" and obs["rep"] == "abab" and obs["format"] == "5-x"
    assert obs["concat"] == "a,b" and obs["floor"] == 1 and obs["huge"] is True
    assert obs["not_found"] == "NotFound" and obs["invalid"] == "Invalid" and obs["is"] is True
    assert obs["encode"] == '[1,"x\\n"]' and obs["publish"] == "queue 'nope' not found"
    assert obs["type"] == "function" and obs["print"] == "function" and obs["require"] == "function"


def test_host_modules_do_not_depend_on_the_entrys_own_globals(apps: Apps) -> None:
    """An entry that clobbers every global and standard function in its own environment
    still gets correct answers from the host modules (they hold their own references)."""
    obs = apps.run("""
    local json, queue, logger, time = require("json"), require("queue"), require("logger"), require("time")
    local errs, tostring_, type_, next_, ipairs_, error_ = errors, tostring, type, next, ipairs, error
    local new_, wrap_, INVALID = errors.new, errors.wrap, errors.INVALID
    return function()
      local evil = function() error_("EVIL called", 0) end
      for _, lib in ipairs_({ string, table, math, os, coroutine }) do
        for k in next_, lib do lib[k] = evil end
      end
      for k in next_, errs do errs[k] = evil end
      for _, name in ipairs_({ "tostring", "type", "pairs", "ipairs", "next", "select", "error", "pcall",
                               "xpcall", "setmetatable", "getmetatable", "rawget", "rawset", "rawequal",
                               "tonumber", "unpack", "assert", "print" }) do
        _G[name] = evil
      end
      local o = {}
      o.encode = json.encode({ a = "x\\n\\255", b = 1.5, c = { 1, 2 }, d = 3 })
      o.decode = json.decode('{"k":[1,2,{"z":"\\\\u00e9"}]}').k[3].z
      local _, err = queue.publish("nope", { a = 1 })
      o.publish_err, o.publish_kind = tostring_(err), err:kind()
      local _, err2 = queue.publish("q", { a = 1 }, { h = "v" })
      o.publish_q = err2:kind()
      local _, err3 = queue.publish("q", { 1, nil, 3 })
      o.publish_sparse = err3:kind()
      logger.info("still works", { a = 1 })
      logger:with({ b = 2 }):named("x"):warn("still works")
      local _, serr = time.sleep(-1)
      o.sleep = serr:kind()
      o.now = type_(time.now())
      local e = new_({ message = "m", kind = INVALID, details = { x = 1 } })
      o.err, o.err_kind, o.details = tostring_(e), e:kind(), e:details().x
      o.wrap = tostring_(wrap_(e, "ctx"))
      o.upper = ("x"):upper()
      return o
    end
    """)
    assert obs["encode"] == '{"a":"x\\n\ufffd","b":1.5,"c":[1,2],"d":3}'
    assert obs["decode"] == "é"
    assert obs["publish_err"] == "queue 'nope' not found" and obs["publish_kind"] == "NotFound"
    assert obs["publish_q"] == "Unavailable"
    assert obs["publish_sparse"] == "Invalid"
    assert obs["sleep"] == "Invalid" and obs["now"] == "number"
    assert obs["err"] == "m" and obs["err_kind"] == "Invalid" and obs["details"] == 1
    assert obs["wrap"] == "ctx: m"
    assert obs["upper"] == "X"


def test_module_tables_are_per_entry(apps: Apps) -> None:
    tamper = """
    return function()
      local j, l, q, t = require("json"), require("logger"), require("queue"), require("time")
      j.encode, l.info, q.publish, t.now = nil, nil, nil, nil
      errors.new = nil
      return { type(require("json").encode), type(errors.new) }
    end
    """
    victim = """
    return function()
      local j, l, q, t = require("json"), require("logger"), require("queue"), require("time")
      return { type(j.encode), type(l.info), type(q.publish), type(t.now), type(errors.new) }
    end
    """
    app = apps.load(fn("tamper", tamper), fn("victim", victim))
    assert apps.call(app, "t:tamper") == ["nil", "nil"]  # it only changed its own tables
    assert apps.call(app, "t:victim") == ["function"] * 5


# ------------------------------------------------------------------------------------------
# Coroutines


def test_coroutine_tricks(apps: Apps) -> None:
    obs = apps.run("""
    local json, queue, logger, time = require("json"), require("queue"), require("logger"), require("time")
    return function()
      local o = {}
      local co = coroutine.wrap(function()
        local r, err = queue.publish("nope", {})
        coroutine.yield({ type(r), type(err), tostring(err), str(getmetatable(err)) })
        local ok, e = pcall(queue.publish, nil)
        coroutine.yield({ ok, type(e) })
        coroutine.yield({ json.encode({ 1 }), type(time.now()) })
        logger.info("in a coroutine")
        return "done"
      end)
      o.a, o.b, o.c, o.d = co(), co(), co(), co()
      -- yield from inside a metamethod that a host module calls
      local co2 = coroutine.create(function()
        logger.error(setmetatable({}, { __tostring = function() coroutine.yield("from tostring"); return "m" end }))
        return "finished"
      end)
      o.e = types_of(coroutine.resume(co2))
      -- an error value raised in a coroutine
      local co3 = coroutine.create(function() local _, err = queue.info("nope"); error(err) end)
      local ok, e = coroutine.resume(co3)
      o.f = { ok, type(e), str(getmetatable(e)), e:kind() }
      o.running = type(coroutine.running())
      o.yield_out = { pcall(coroutine.yield, "x") }
      o.deep = deep_types(o)
      o.thread = coroutine.create(function() coroutine.yield() end)
      o.fn = print
      o.cdata = 1LL
      return o
    end
    """)
    assert obs["a"] == ["nil", "table", "queue 'nope' not found", "error"]
    assert obs["b"] == [False, "string"]
    assert obs["c"] == ["[1]", "number"]
    assert obs["d"] == "done"
    assert obs["e"][0] == "boolean" and obs["e"][1] == "string"
    assert obs["f"] == [False, "table", "error", "NotFound"]
    assert obs["yield_out"][0] is False
    assert "userdata" not in obs["deep"]
    # threads, functions and cdata come back to Python as their tostring(), never as objects
    assert isinstance(obs["thread"], str) and obs["thread"].startswith("thread:")
    assert isinstance(obs["fn"], str) and obs["fn"].startswith("function")
    assert obs["cdata"] == "1LL"


def test_yield_out_of_a_handler_is_an_error_and_the_state_survives(apps: Apps) -> None:
    app = apps.load(fn("y", 'return function() coroutine.yield("out") return "not reached" end'),
                    fn("ok", 'return function() return "still fine" end'))
    for _ in range(2):
        with pytest.raises(LuaHandlerError):
            apps.call(app, "t:y")
        assert apps.call(app, "t:ok") == "still fine"


def test_ffi_cdata_from_literals_gives_no_access(apps: Apps) -> None:
    # LuaJIT loads its FFI on demand to parse 64-bit literals (1LL): the cdata must be inert.
    obs = apps.run("""
    return function()
      local x = 1LL
      local o = { t = type(x), mt = str(getmetatable(x)), mt_t = type(getmetatable(x)), ffi = type(ffi) }
      for name, f in pairs({
        index_cast = function() return x.cast end,
        index_C = function() return x.C end,
        call = function() return x() end,
        rawget = function() return rawget(x, "cast") end,
        setmt = function() return setmetatable(x, {}) end,
        mt_index = function()
          local i = getmetatable(x).__index
          if type(i) ~= "table" then error("not a table") end
          return i
        end,
        require_ffi = function() return require("ffi") end,
      }) do
        o[name] = (pcall(f))
      end
      return o
    end
    """)
    assert obs["t"] == "cdata" and obs["mt_t"] != "table" and obs["ffi"] == "nil"
    for name in ("index_cast", "index_C", "call", "rawget", "setmt", "mt_index", "require_ffi"):
        assert obs[name] is False, name


# ------------------------------------------------------------------------------------------
# Bytecode


def luajit_bytecode() -> bytes:
    from lupa import luajit21
    rt = luajit21.LuaRuntime(encoding=None)
    code = rt.execute('return string.dump(function() return function() return "BYTECODE-RAN" end end)')
    assert isinstance(code, bytes) and code.startswith(b"\x1bLJ")
    return code


def test_no_way_to_load_or_make_bytecode_from_lua(apps: Apps) -> None:
    obs = apps.run(r"""
    return function()
      local o = {}
      for name, f in pairs({
        load = function() return load("\27LJ\2") end,
        loadstring = function() return loadstring("\27LJ\2") end,
        dump = function() return string.dump(print) end,
        dump_method = function() return ("").dump(function() end) end,
        require_binary = function() return require("\27LJ\2") end,
        dofile = function() return dofile("x.luac") end,
        G_load = function() return _G.load("return 1") end,
        load_via_require = function() return require("_G").load end,
      }) do
        local ok, e = pcall(f)
        o[name] = ok
      end
      return o
    end
    """)
    assert obs == {k: False for k in obs} and len(obs) == 8


def test_a_bytecode_source_file_is_refused(apps: Apps) -> None:
    app_dir = apps.make(raw_entries=({"name": "f", "kind": "function.lua", "source": "file://f.luac"},),
                        files={"f.luac": luajit_bytecode()})
    try:
        app = App.load(app_dir)
    except ConfigError as exc:
        assert "BYTECODE-RAN" not in str(exc)
        return
    with pytest.raises(LuaHandlerError):
        apps.call(app, "t:f")


def test_a_bytecode_library_is_refused(apps: Apps) -> None:
    app_dir = apps.make(
        fn("f", 'local lib = require("lib") return function() return lib() end', modules=[], imports={"lib": "t:lib"}),
        raw_entries=({"name": "lib", "kind": "library.lua", "source": "file://lib.luac"},),
        files={"lib.luac": luajit_bytecode()})
    try:
        app = App.load(app_dir)
    except ConfigError:
        return
    with pytest.raises(LuaHandlerError):
        apps.call(app, "t:f")


def test_a_text_file_with_the_bytecode_signature_is_refused(apps: Apps) -> None:
    # Valid UTF-8, so only the loader's text-only mode stands between it and the bytecode loader.
    app_dir = apps.make(raw_entries=({"name": "f", "kind": "function.lua", "source": "file://f.lua"},),
                        files={"f.lua": b"\x1bLJ\x02\x08return function() return 'BYTECODE-RAN' end"})
    try:
        app = App.load(app_dir)
    except ConfigError as exc:
        assert "mode" in str(exc) or "binary" in str(exc)
        return
    with pytest.raises(LuaHandlerError):
        apps.call(app, "t:f")


@pytest.mark.parametrize("text", ["\x1bLJ\x02\x0areturn function() return 'BYTECODE-RAN' end",
                                  "\x1bLua\x51\x00return function() return 'BYTECODE-RAN' end"])
def test_an_inline_source_starting_like_bytecode_is_refused(apps: Apps, text: str) -> None:
    app_dir = apps.make(raw_entries=({"name": "f", "kind": "function.lua", "source": text},))
    try:
        app = App.load(app_dir)
    except ConfigError as exc:
        assert "binary" in str(exc) or "unexpected symbol" in str(exc) or "syntax" in str(exc).lower()
        return
    with pytest.raises(LuaHandlerError):
        apps.call(app, "t:f")


# ------------------------------------------------------------------------------------------
# Python values handed to Lua


def test_python_arguments_become_plain_lua_tables(apps: Apps) -> None:
    obs = apps.run("""
    local function check(v, path, out)
      local tv = type(v)
      if tv ~= "table" and tv ~= "string" and tv ~= "number" and tv ~= "boolean" and tv ~= "nil" then
        out[#out + 1] = path .. " is a " .. tv
        return
      end
      if tv ~= "table" then return end
      if getmetatable(v) ~= nil then out[#out + 1] = path .. " has a metatable" end
      for _, name in ipairs({ "__class__", "__dict__", "__len__", "__getitem__", "keys", "items", "get", "copy",
                              "append", "__init__", "__globals__", "__builtins__" }) do
        if v[name] ~= nil or rawget(v, name) ~= nil then out[#out + 1] = path .. "." .. name .. " exists" end
      end
      for k, x in next, v do
        check(k, path .. "{key}", out)
        check(x, path .. "[" .. tostring(k) .. "]", out)
      end
    end
    return function(...)
      local out = {}
      local n = select("#", ...)
      for i = 1, n do check((select(i, ...)), "arg" .. i, out) end
      local d, l = ...
      return { problems = out, n = n, types = types_of(...), deep = deep_types({ ... }),
               nested = d.a[3].c, list_len = #l, tuple_first = (select(3, ...))[1],
               bytes = d.a[3].b, flag = d.t, num = d.n }
    end
    """, {"a": [1, 2, {"b": b"\xff\x00", "c": "x"}], "n": 1.5, "t": True, "none": None},
        [1, "x", None, 3], (10, 20), b"raw", "str", 7, None)
    assert obs["problems"] == []
    assert obs["n"] == 7
    assert obs["types"] == ["table", "table", "table", "string", "string", "number", "nil"]
    assert set(obs["deep"]) <= {"table", "string", "number", "boolean"}
    assert obs["nested"] == "x" and obs["bytes"] == b"\xff\x00" and obs["flag"] is True and obs["num"] == 1.5
    assert obs["tuple_first"] == 10


def _cyclic() -> list[Any]:
    a: list[Any] = []
    a.append(a)
    return a


def _foreign_lua_table() -> Any:
    from lupa import luajit21
    return luajit21.LuaRuntime().table(1, 2)


def _foreign_lua_function() -> Any:
    from lupa import luajit21
    return luajit21.LuaRuntime().eval("function() return 1 end")


def _gen() -> Any:
    yield 1


class _Obj:
    def __init__(self) -> None:
        self.secret = SECRET


REFUSED_ARGS = {
    "object": lambda: object(),
    "instance": lambda: _Obj(),
    "function": lambda: (lambda: SECRET),
    "builtin": lambda: print,
    "set": lambda: {1, 2},
    "frozenset": lambda: frozenset({1}),
    "type": lambda: type,
    "module": lambda: os,
    "exception": lambda: Exception(SECRET),
    "complex": lambda: 1 + 2j,
    "bytearray": lambda: bytearray(b"x"),
    "memoryview": lambda: memoryview(b"x"),
    "range": lambda: range(3),
    "generator": _gen,
    "decimal": lambda: Decimal("1.5"),
    "path": lambda: Path("/"),
    "ellipsis": lambda: ...,
    "lua_table_of_another_runtime": _foreign_lua_table,
    "lua_function_of_another_runtime": _foreign_lua_function,
    "object_in_list": lambda: [1, object()],
    "object_in_dict": lambda: {"k": {"deeper": [object()]}},
    "function_in_dict": lambda: {"k": os.getenv},
    "object_key": lambda: {object(): 1},
    "tuple_key": lambda: {(1, 2): 1},
    "none_key": lambda: {None: 1},
    "nan_key": lambda: {math.nan: 1},
    "cyclic_list": _cyclic,
    "too_deep": lambda: __import__("functools").reduce(lambda acc, _: [acc], range(300), []),
    "huge_int": lambda: 2**64,
    "huge_negative_int": lambda: -(2**64),
    "huge_int_in_list": lambda: [2**70],
    "huge_int_key": lambda: {2**100: 1},
    "lone_surrogate_str": lambda: "\ud800",
    "lone_surrogate_key": lambda: {"\udfff": 1},
}


@pytest.mark.parametrize("name", list(REFUSED_ARGS))
def test_python_objects_are_refused_not_handed_to_lua(apps: Apps, name: str) -> None:
    app = apps.single("""
    local calls = 0
    return function(...)
      calls = calls + 1
      return calls, deep_types({ ... })
    end
    """)
    with pytest.raises(LuaHandlerError):
        apps.call(app, "t:f", REFUSED_ARGS[name]())
    # The handler never ran with the refused value: this is its first call.
    calls, _ = apps.call(app, "t:f")
    assert calls == 1


# ------------------------------------------------------------------------------------------
# Lua values handed back to Python


def test_values_returned_to_python_are_plain(apps: Apps) -> None:
    result = apps.run("""
    return function()
      local t = { 1, 2 }
      t.self = t
      return print, coroutine.create(print), errors.new("e"), t, _G, string, 1LL, "\\0nul", 0/0, 1/0
    end
    """)
    fn_, thread, err, t, env, string_copy, cdata, nul, nan, inf = result
    assert isinstance(fn_, str) and isinstance(thread, str) and cdata == "1LL"
    assert isinstance(err, LuaErrorValue) and err.message == "e"
    assert t["self"] == "<cycle>"
    assert isinstance(env, dict) and "io" not in env and all(isinstance(k, str) for k in env)
    assert "dump" not in string_copy
    assert nul == "\0nul" and math.isnan(nan) and inf == math.inf


@pytest.mark.parametrize("lua_value", [
    '{ ["\\0bytes"] = "zz" }',
    '{ ["\\0bytes"] = {} }',
    '{ ["\\0error"] = 5 }',
    '{ ["\\0error"] = {} }',
    '{ ["\\0error"] = { kind = "Evil", message = "forged", retryable = true } }',
    '{ ["\\0error"] = { kind = "Invalid", message = {}, retryable = "x", details = print } }',
])
def test_lua_cannot_forge_host_side_values(apps: Apps, lua_value: str) -> None:
    """Tables that imitate the export markers must come back as tables (or fail as a
    LuaHandlerError), never crash the host with a raw Python exception or turn into a
    LuaErrorValue that no errors.new() made."""
    try:
        result = apps.run(f"return function() return {lua_value} end")
    except RuntimeHostError:
        return
    assert not isinstance(result, LuaErrorValue), f"Lua forged an error value: {result!r}"


@pytest.mark.parametrize("depth", [600, 5000, 30000])
def test_deeply_nested_return_values_do_not_crash_the_host(apps: Apps, depth: int) -> None:
    app = apps.single("return function(n) local t = {} for i = 1, n do t = { t } end return t end")
    try:
        result = apps.call(app, "t:f", depth)
    except RuntimeHostError:
        pass  # refusing it is fine, as a runtime error (LuaHandlerError)
    else:
        assert isinstance(result, list)
    assert apps.call(app, "t:f", 2) == [[[]]]  # the state still works


@pytest.mark.parametrize("lua_value", ["{ [{}] = 1 }", "{ [{ 1, 2 }] = { 3 } }", "{ [print] = 1, [true] = 2 }"])
def test_odd_table_keys_do_not_crash_the_host(apps: Apps, lua_value: str) -> None:
    try:
        result = apps.run(f"return function() return {lua_value} end")
    except RuntimeHostError:
        return
    assert isinstance(result, dict)


def test_error_objects_with_hostile_tostring(apps: Apps) -> None:
    app = apps.load(
        fn("a", 'return function() error(setmetatable({}, { __tostring = function() return {} end })) end'),
        fn("b", 'return function() error(setmetatable({}, { __tostring = function() error("again") end })) end'),
        fn("c", 'local t = setmetatable({}, {}); getmetatable(t).__tostring = function() error(t) end '
                'return function() error(t) end'),
        fn("ok", 'return function() return "fine" end'))
    for name in ("a", "b", "c"):
        with pytest.raises(LuaHandlerError) as info:
            apps.call(app, f"t:{name}")
        assert_no_python_leak(info.value.lua_message)
        assert apps.call(app, "t:ok") == "fine"


# ------------------------------------------------------------------------------------------
# time.sleep: invalid durations are errors, never a crash or a long sleep


@pytest.mark.parametrize("duration", ["-1", "-1e-9", "-math.huge", "0/0", "-(0/0)", '"-1s"', '"abc"', '""',
                                      '"nan"', '"-inf"', '"1x"', '"ms"', '"\\255"', '"1e400s"',
                                      '"-5ms"'])
def test_time_sleep_invalid_durations_return_errors(apps: Apps, duration: str) -> None:
    start = time.monotonic()
    obs = apps.run(f"""
    local time = require("time")
    return function()
      local ok, r, e = pcall(time.sleep, {duration})
      return {{ ok = ok, r = type(r), e = type(e), kind = e and e:kind(), mt = str(getmetatable(e)) }}
    end
    """)
    assert time.monotonic() - start < 5
    assert obs == {"ok": True, "r": "nil", "e": "table", "kind": "Invalid", "mt": "error"}


@pytest.mark.parametrize("duration", ["nil", "{}", "true", "print", "coroutine.create(print)", "1LL"])
def test_time_sleep_wrong_types_raise_plain_errors(apps: Apps, duration: str) -> None:
    obs = apps.run(f"""
    local time = require("time")
    return function()
      local ok, e = pcall(time.sleep, {duration})
      return {{ ok = ok, t = type(e), text = str(e) }}
    end
    """)
    assert obs["ok"] is False and obs["t"] == "string"
    assert_no_python_leak(obs["text"])


@pytest.mark.parametrize("duration", ["math.huge", "1e300", "2^53", '"9999999h"', '"100000000h"', "1e9"])
def test_time_sleep_huge_but_cancelled_returns_at_once(apps: Apps, duration: str) -> None:
    app = apps.single(f"""
    local time = require("time")
    return function(go)
      if not go then return "warm" end
      local ok, r, e = pcall(time.sleep, {duration})
      return {{ ok = ok, r = type(r), e = type(e), kind = e and e:kind() or str(r) }}
    end
    """)
    assert apps.call(app, "t:f", False) == "warm"  # creates this thread's Lua state
    app.stop()  # cancels time.sleep in every Lua state of the app
    start = time.monotonic()
    obs = apps.call(app, "t:f", True)
    assert time.monotonic() - start < 5
    assert obs["ok"] is True and obs["r"] == "nil" and obs["e"] == "table"
    assert obs["kind"] in ("Canceled", "Invalid")


# ------------------------------------------------------------------------------------------
# Every host-module function against hostile arguments


def test_host_module_functions_never_hand_out_python_objects(apps: Apps) -> None:
    app = apps.single(r"""
    local json, queue, logger, time = require("json"), require("queue"), require("logger"), require("time")
    return function(go)
      if not go then return "warm" end
      local e = errors.new("x")
      local targets = {
        ["json.encode"] = json.encode, ["json.decode"] = json.decode,
        ["logger.debug"] = logger.debug, ["logger.info"] = logger.info, ["logger.warn"] = logger.warn,
        ["logger.error"] = logger.error, ["logger.with"] = logger.with, ["logger.named"] = logger.named,
        ["queue.publish"] = queue.publish, ["queue.info"] = queue.info, ["queue.message"] = queue.message,
        ["time.sleep"] = time.sleep, ["time.now"] = time.now,
        ["errors.new"] = errors.new, ["errors.wrap"] = errors.wrap, ["errors.is"] = errors.is,
        ["err.kind"] = e.kind, ["err.message"] = e.message, ["err.retryable"] = e.retryable,
        ["err.details"] = e.details, require = require, print = print,
      }
      local function values()
        return { n = 14, nil, true, 0, -1, 0/0, "", "\255", "q", "nope", {}, { a = { 1 } }, function() end, e, 1LL }
      end
      local anomalies, messages, seen, calls = {}, {}, {}, 0
      local function record(name, ok, ...)
        calls = calls + 1
        local types = deep_types({ ... })
        if types.userdata or types.thread then anomalies[#anomalies + 1] = name .. " returned a userdata/thread" end
        if not ok then
          local err = ...
          local te = type(err)
          if te ~= "string" and te ~= "table" then anomalies[#anomalies + 1] = name .. " raised a " .. te end
        end
        for i = 1, select("#", ...) do
          local v = select(i, ...)
          if type(v) == "string" or (type(v) == "table" and getmetatable(v) == "error") then
            local s = str(v)
            if not seen[s] then seen[s] = true; messages[#messages + 1] = s end
          end
        end
      end
      for name, f in pairs(targets) do
        local a = values()
        for i = 1, a.n do
          record(name, pcall(f, a[i]))
          for j = 1, a.n do record(name, pcall(f, a[i], a[j])) end
        end
      end
      return { anomalies = anomalies, calls = calls, messages = messages }
    end
    """)
    assert apps.call(app, "t:f", False) == "warm"
    app.stop()  # so no time.sleep can wait
    obs = apps.call(app, "t:f", True)
    assert obs["anomalies"] == []
    assert obs["calls"] == 22 * (14 + 14 * 14)
    assert len(obs["messages"]) > 20
    for message in obs["messages"]:
        assert_no_python_leak(message)


def test_log_call_with_hostile_tostring_does_not_fail(apps: Apps, caplog: pytest.LogCaptureFixture) -> None:
    """A log call never fails: a message whose __tostring misbehaves is logged as its type."""
    caplog.set_level(logging.DEBUG, logger="runtime.lua")
    obs = apps.run("""
    local logger = require("logger")
    return function()
      local ok = pcall(logger.error, setmetatable({}, { __tostring = function() return {} end }))
      return ok
    end
    """)
    assert obs is True
    assert any(r.getMessage() == "<table>" for r in caplog.records)

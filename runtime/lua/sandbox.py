"""One sandboxed Lua state (SPEC §4): load entries into it and call them.

A :class:`LuaSandbox` is owned by one thread (a worker, or the caller of ``App.call``) and
is never shared: lupa's runtime lock would serialise the threads, and module-level Lua
state is per worker by contract.
"""

from __future__ import annotations

import ctypes
import re
import weakref
from typing import TYPE_CHECKING, Any

from ..errors import LuaHandlerError
from ..registry import LuaCodeSpec, Registry, display_path
from .bridge import Bridge, QueuePort
from .convert import from_lua, to_lua
from .engine import ENGINE, new_lua_runtime
from .paths import lua_module_source

if TYPE_CHECKING:
    from ..registry import LuaSource

ACK, NACK, SETTLED, UNDECODABLE = 0, 1, 2, 3
BATCH_MAX = 64  # the most messages one deliver_batch call takes

_TRUSTED_FRAME = re.compile(r"^\s*(\[C\]: in function 'xpcall'|lua_modules/|\[string)")


def _pad4(result: Any) -> tuple[Any, Any, Any, Any]:
    """A Lua call's results as exactly four values (lupa gives a single value unwrapped)."""
    if not isinstance(result, tuple):
        return result, None, None, None
    a, b, c, d, *_ = result + (None, None, None, None)
    return a, b, c, d


_METERED_GLUE = """
-- metered glue: how the host and a memory-limited state exchange values (see LuaSandbox._invoke).
local slot = ...
local unpack = table.unpack or unpack
local function clear(n, ...)
    for i = 1, n do slot[i] = nil end
    return ...
end
local glue = {}
function glue.call_from_slot(fn, n) return fn(clear(n, unpack(slot, 1, n))) end
function glue.call_keep_table(fn, n) -- host.call: its exported table stays in slot[1] for the host
    local ok, count, out, kind = fn(clear(n, unpack(slot, 1, n)))
    if ok then slot[1] = out return true, count end
    return ok, count, out, kind
end
function glue.deliver_from_slot(deliver, has_value, attempt, timeout)
    local body, value = slot[1], slot[2]
    slot[1], slot[2] = nil, nil
    return deliver(body, value, has_value, attempt, timeout)
end
function glue.wrap_bridge(raw) -- results that need memory come back in slot
    local out = {}
    for name, fn in pairs(raw) do
        out[name] = function(...)
            local a, b, c = fn(...)
            if a == slot then
                a, b, c = slot[1], slot[2], slot[3]
                slot[1], slot[2], slot[3] = nil, nil, nil
            end
            return a, b, c
        end
    end
    return out
end
return glue
"""


def _lua_error_text(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return "not enough memory" if isinstance(exc, MemoryError) or "not enough memory" in text else text


def _lua_error_kind(exc: Exception) -> str | None:
    return "Memory" if _lua_error_text(exc) == "not enough memory" else None


def chunk_name(source: LuaSource) -> str:
    return "@" + display_path(source.path)


def clean_traceback(tb: str) -> str:
    """The Lua traceback without the host's own frames."""
    lines = [ln for ln in tb.strip().splitlines() if ln.strip() and not _TRUSTED_FRAME.match(ln)]
    if lines and lines[0].strip() == "stack traceback:" and len(lines) == 1:
        return ""
    return "\n".join(lines)


class LuaSandbox:
    """A Lua state with the runtime's modules loaded and a sandbox per entry."""

    def __init__(self, registry: Registry, queues: QueuePort, *, timeout: float | None = None,
                 memory_limit: int | None = None, security: Any = None):
        """`timeout`: the state runs code under this time limit (chunks' top-level code too),
        so the entries' own code is never JIT-compiled (count hooks do not fire in compiled
        traces; see host.load in sandbox.lua), while the runtime's modules are.
        `memory_limit`: a Lua 5.4 state whose allocator refuses to grow past that many bytes
        (on top of what the runtime's modules use).
        `security`: the SecurityContext Lua publishes are checked against."""
        self.registry = registry
        self.bridge = Bridge(queues, security)
        self.memory_limit = memory_limit
        self.timeout = timeout
        limited = timeout is not None
        self.lua = new_lua_runtime(metered=memory_limit is not None)
        g = self.lua.globals()
        self.metered = memory_limit is not None
        self._slot = self.lua.table()
        self._limit_total = 0
        self._limit_now = 0  # the allocator's current limit: 0 (none) except while Lua code runs
        functions = self.bridge.functions()
        if self.metered:
            functions = {name: self._metered_bridge(fn) for name, fn in functions.items()}
        bridge = self.lua.table_from(functions)
        glue: Any = None
        if self.metered:
            glue_fn = g.load(_METERED_GLUE, "=metered", "t")
            glue = glue_fn(self._slot)
            bridge = glue.wrap_bridge(bridge)
        state = self.lua.table()

        def run(name: str, *args: Any) -> Any:
            fn, err, _ = self._unpack3(g.load(lua_module_source(name), f"@lua_modules/{name}.lua", "t"))
            if fn is None:
                raise RuntimeError(f"lua_modules/{name}.lua does not compile: {err}")
            return fn(*args)

        errors = run("errors")
        json = run("json", errors, run("msgpack"))
        clock = run("clock", bridge)
        state.clock = clock
        mods = self.lua.table_from({
            "errors": errors, "json": json, "state": state, "clock": clock, "limited": limited,
            "metered": memory_limit is not None,
            "logger": run("logger", bridge, json, errors, state),
            "time": run("time", bridge, errors, state),
            "queue": run("queue", bridge, json, errors, state),
        })
        self.host = run("sandbox", bridge, mods)
        self.json = json
        self._host_load = self.host.load
        self._host_call = self.host.call
        self._deliverers: dict[str, Any] = {}
        self._batchers: dict[str, Any] = {}
        # The control block of batch calls (see BATCHES in sandbox.lua), owned here so it
        # lives exactly as long as the state: [0] stop, [1] the running message's index.
        self._ctl = (ctypes.c_int32 * 2)()
        self._durs = (ctypes.c_double * (BATCH_MAX + 1))()  # [BATCH_MAX]: the call's running time
        self.batches = not self.metered and ENGINE == "luajit21"
        self._glue = glue
        if memory_limit is not None:
            g.collectgarbage("collect")  # the modules' garbage does not count against the handler
            self._limit_total = int(self.lua.get_memory_used(total=True)) + memory_limit

    # -- memory limits ---------------------------------------------------------------------
    # A Lua 5.4 state with a memory limit panics (abort) or, inside a call from Lua into
    # Python, deadlocks (lupa holds the GIL when the error unwinds) if an allocation fails
    # outside a protected call. So the limit is applied only while Lua code runs: the host
    # hands big values over through `_slot` with the limit lifted, and bridge functions leave
    # results that need memory there too (see _METERED_GLUE). An allocation over the limit
    # then always happens inside Lua code, where it is an ordinary memory error of that call.
    def _invoke(self, fn: Any, *args: Any) -> Any:
        """Call a Lua function under the memory limit; only small values (numbers, booleans,
        nil, Lua objects already in the state) may be passed or returned."""
        lua = self.lua
        self._limit_now = self._limit_total
        lua.set_max_memory(self._limit_total, total=True)
        try:
            return fn(*args)
        finally:
            self._limit_now = 0
            lua.set_max_memory(0)

    def _fill_slot(self, values: list[Any]) -> int:
        slot = self._slot
        for i, v in enumerate(values, 1):
            slot[i] = v
        return len(values)

    def _metered_bridge(self, fn: Any) -> Any:
        # The function lives inside the Lua state: it holds the sandbox only weakly, or the
        # cycle through the state (invisible to Python's collector) would keep every replaced
        # state alive.
        ref = weakref.ref(self)

        def metered(*args: Any) -> Any:
            result = fn(*args)
            values = result if isinstance(result, tuple) else (result,)
            if all(v is None or isinstance(v, (bool, int, float)) for v in values):
                return result  # pushing these allocates nothing
            sandbox = ref()
            if sandbox is None:
                return None, "Internal", "the Lua state is closed"
            lua = sandbox.lua
            lua.set_max_memory(0)
            try:
                sandbox._fill_slot(list(values))
            finally:
                if sandbox._limit_now:
                    lua.set_max_memory(sandbox._limit_now, total=True)
            return sandbox._slot
        metered.__name__ = getattr(fn, "__name__", "bridge")
        return metered

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self, entry_id: str) -> LuaCodeSpec:
        """Run the entry's chunk in this state once (its imports first). LuaHandlerError if
        the chunk fails or returns no usable entry point."""
        spec = self.registry.get(entry_id, LuaCodeSpec)
        if spec is None:
            raise LuaHandlerError(f"no Lua entry '{entry_id}' in the registry", entry_id=entry_id)
        if self.host.is_loaded(entry_id):
            return spec
        for lib in spec.imports.values():
            self.ensure_loaded(lib)
        src = spec.source
        args = [entry_id, spec.kind, src.chunk_text, chunk_name(src), self.lua.table_from(list(spec.modules)),
                self.lua.table_from(spec.imports), spec.method, self.timeout]
        if self.metered:
            result = self._metered(self._glue.call_from_slot, self._host_load, self._fill_slot(args))
        else:
            result = self._lua_call(self._host_load, *args)
        ok, msg, tb = self._unpack3(result)
        if not ok:
            where = display_path(src.path)
            raise LuaHandlerError(f"cannot load {spec.kind} from {where}: {msg}",
                                  clean_traceback(tb or ""), entry_id=entry_id)
        return spec

    @staticmethod
    def _unpack3(result: Any) -> tuple[Any, Any, Any]:
        a, b, c, _ = _pad4(result)
        return a, b, c

    # -- calling ---------------------------------------------------------------------------
    def call(self, entry_id: str, *args: Any, timeout: float | None = None) -> Any:
        """Call a function entry with Python arguments; return its results as Python.

        One result is returned as is, several as a tuple, none as None. Past `timeout`
        seconds (or the memory limit) the call fails with LuaHandlerError."""
        self.ensure_loaded(entry_id)
        try:
            lua_args = [to_lua(self.lua, a) for a in args]
        except TypeError as exc:
            raise LuaHandlerError(f"cannot pass arguments to {entry_id}: {exc}", entry_id=entry_id) from None
        if self.metered:
            result = self._metered(self._glue.call_keep_table, self._host_call,
                                   self._fill_slot([entry_id, timeout, *lua_args]))
        else:
            result = self._lua_call(self._host_call, entry_id, timeout, *lua_args)
        if not result[0]:
            _, msg, tb, _ = _pad4(result)
            raise LuaHandlerError(str(msg), clean_traceback(tb or ""), entry_id=entry_id)
        if self.metered:
            n, values = result[1], self._slot[1]
            self._slot[1] = None
        else:
            n, values = result[1], result[2]
        out = [from_lua(values[i]) for i in range(1, n + 1)]
        if n == 0:
            return None
        if n == 1:
            return out[0]
        return tuple(out)

    def deliver(self, entry_id: str, body: bytes, value: Any, has_value: bool, attempt: int,
                timeout: float | None = None) -> tuple[int, str | None, str | None, str | None]:
        """Run a loaded handler on one message. Returns (status, error, traceback, kind);
        status is ACK, NACK, SETTLED or UNDECODABLE (see sandbox.lua); kind is "Timeout" or
        "Memory" for a call over a limit. The per-message path: JSON bodies go to Lua as
        bytes and are decoded there, without the GIL."""
        deliver = self._deliverers.get(entry_id)
        if deliver is None:
            self.ensure_loaded(entry_id)
            deliver = self._deliverers[entry_id] = self.host.deliverer(entry_id)
        if has_value:
            try:
                value = to_lua(self.lua, value)
            except TypeError as exc:
                return UNDECODABLE, f"body cannot be handed to Lua: {exc}", None, None
        if self.metered:
            self._fill_slot([body, value])
            try:
                return _pad4(self._invoke(self._glue.deliver_from_slot, deliver, has_value, attempt, timeout))
            except Exception as exc:  # noqa: BLE001 - lupa's LuaError: a failure of this delivery
                return 1, _lua_error_text(exc), None, _lua_error_kind(exc)
        return _pad4(deliver(body, value, has_value, attempt, timeout))

    def deliver_batch(self, entry_id: str, deliveries: Any, start: int, timeout: float | None,
                      timed: bool) -> Any:
        """Run a loaded handler on deliveries[start:] (JSON bodies, at most BATCH_MAX) in one
        call. Returns k (that many acked; fewer than given: the rest did not start) or
        (k, status, error, traceback, kind): k acked, then message k + 1 ended as `status`.
        Only where `batches` is true (LuaJIT states without a memory limit)."""
        deliver = self._batchers.get(entry_id)
        if deliver is None:
            self.ensure_loaded(entry_id)
            deliver = self.host.batch_deliverer(entry_id, ctypes.addressof(self._ctl), ctypes.addressof(self._durs),
                                                BATCH_MAX)
            if deliver is None:
                raise RuntimeError("this Lua state cannot take batches")
            self._batchers[entry_id] = deliver
        args = [x for d in deliveries[start:] for x in (d.message.body, d.attempt)]
        self._ctl[1] = 0
        return deliver(timeout, timed, len(args) >> 1, *args)

    def running(self) -> int:
        """The 1-based index, within the batch call running now, of the message it runs
        (0 before the first); read from another thread."""
        return int(self._ctl[1])

    def ran_for(self) -> float:
        """Seconds the last batch call spent running messages (measured in Lua: time spent
        waiting for the GIL after it does not count)."""
        return float(self._durs[BATCH_MAX])

    def durations(self, n: int) -> list[float]:
        """The handler times of the first n messages of the last batch call (when timed)."""
        return list(self._durs[:n])

    def stop_batches(self) -> None:
        """No further message of a batch call starts (safe from any thread)."""
        self._ctl[0] = 1

    def _metered(self, fn: Any, *args: Any) -> Any:
        try:
            return self._invoke(fn, *args)
        except Exception as exc:  # noqa: BLE001 - lupa's LuaError: the runtime's own error instead
            return False, _lua_error_text(exc), "", _lua_error_kind(exc)

    @staticmethod
    def _lua_call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - lupa's LuaError: the runtime's own error instead
            return False, _lua_error_text(exc), "", _lua_error_kind(exc)

    def compile(self, text: str, chunkname: str) -> str | None:
        """Syntax-check Lua text without running it; the error message, or None."""
        result = self.host.compile(text, chunkname)
        if isinstance(result, tuple):
            return None if result[0] else str(result[1])
        return None if result else "unknown compile error"

    def close(self) -> None:
        self.bridge.cancel.set()
        self._ctl[0] = 1

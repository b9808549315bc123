"""One sandboxed Lua state (SPEC §4): load entries into it and call them.

A :class:`LuaSandbox` is owned by one thread (a worker, or the caller of ``App.call``) and
is never shared: lupa's runtime lock would serialise the threads, and module-level Lua
state is per worker by contract.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import LuaHandlerError
from ..registry import LuaCodeSpec, Registry, display_path
from .bridge import Bridge, QueuePort
from .convert import from_lua, to_lua
from .engine import new_lua_runtime
from .paths import lua_module_source

if TYPE_CHECKING:
    from ..registry import LuaSource

ACK, NACK, SETTLED, UNDECODABLE = 0, 1, 2, 3

_TRUSTED_FRAME = re.compile(r"^\s*(\[C\]: in function 'xpcall'|lua_modules/|\[string)")


def _pad4(result: Any) -> tuple[Any, Any, Any, Any]:
    """A Lua call's results as exactly four values (lupa gives a single value unwrapped)."""
    if not isinstance(result, tuple):
        return result, None, None, None
    a, b, c, d, *_ = result + (None, None, None, None)
    return a, b, c, d


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
        so the JIT is off (count hooks do not fire in compiled traces). `memory_limit`: a Lua 5.4 state whose allocator
        refuses to grow past that many bytes (on top of what the runtime's modules use).
        `security`: the SecurityContext Lua publishes are checked against."""
        self.registry = registry
        self.bridge = Bridge(queues, security)
        self.memory_limit = memory_limit
        self.timeout = timeout
        limited = timeout is not None
        self.lua = new_lua_runtime(metered=memory_limit is not None)
        g = self.lua.globals()
        if limited and g.jit is not None:
            g.jit.off()
        bridge = self.lua.table_from(self.bridge.functions())
        state = self.lua.table()

        def run(name: str, *args: Any) -> Any:
            fn, err, _ = self._unpack3(g.load(lua_module_source(name), f"@lua_modules/{name}.lua", "t"))
            if fn is None:
                raise RuntimeError(f"lua_modules/{name}.lua does not compile: {err}")
            return fn(*args)

        errors = run("errors")
        json = run("json", errors)
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
        if memory_limit is not None:
            self.lua.set_max_memory(memory_limit)
        self.json = json
        self._host_load = self.host.load
        self._host_call = self.host.call
        self._deliverers: dict[str, Any] = {}

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
        ok, msg, tb = self._unpack3(self._host_load(
            entry_id, spec.kind, src.chunk_text, chunk_name(src),
            self.lua.table_from(list(spec.modules)), self.lua.table_from(spec.imports), spec.method,
            self.timeout,
        ))
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
        result = self._host_call(entry_id, timeout, *lua_args)
        if not result[0]:
            _, msg, tb, _ = _pad4(result)
            raise LuaHandlerError(str(msg), clean_traceback(tb or ""), entry_id=entry_id)
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
        return _pad4(deliver(body, value, has_value, attempt, timeout))

    def compile(self, text: str, chunkname: str) -> str | None:
        """Syntax-check Lua text without running it; the error message, or None."""
        result = self.host.compile(text, chunkname)
        if isinstance(result, tuple):
            return None if result[0] else str(result[1])
        return None if result else "unknown compile error"

    def close(self) -> None:
        self.bridge.cancel.set()

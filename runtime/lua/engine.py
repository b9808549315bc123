"""Creating a raw LuaJIT state with lupa, locked down on the Python side.

The Lua side of the lock-down (the sandbox environment) is in lua_modules/sandbox.lua.
"""

from __future__ import annotations

import importlib
from typing import Any, NoReturn

try:
    _lupa: Any = importlib.import_module("lupa.luajit21")
    ENGINE = "luajit21"
except ImportError:  # pragma: no cover - platforms without a LuaJIT build of lupa
    import warnings

    _lupa = importlib.import_module("lupa.lua54")
    ENGINE = "lua54"
    warnings.warn("LuaJIT is not available in lupa here; using Lua 5.4", RuntimeWarning, stacklevel=1)


def _deny_attribute(obj: object, name: str, is_setting: bool) -> NoReturn:
    # Lua never gets Python attribute access, whatever object it might hold.
    raise AttributeError("access to Python attributes is not allowed from Lua")


def new_lua_runtime(metered: bool = False) -> Any:
    """A LuaRuntime without lupa's Python helpers (no eval, no builtins, no attributes).

    `metered`: a Lua 5.4 state whose allocator can be capped with `set_max_memory` (LuaJIT's
    cannot be capped reliably on 64-bit), for entries with a memory limit."""
    module = _lua54() if metered else _lupa
    return module.LuaRuntime(
        register_eval=False,
        register_builtins=False,
        attribute_filter=_deny_attribute,
        unpack_returned_tuples=True,
        **({"max_memory": 0} if metered else {}),
    )


def _lua54() -> Any:
    return importlib.import_module("lupa.lua54")

"""Compile-only checks of every Lua source in a registry (validation never runs Lua)."""

from __future__ import annotations

import re

from ..errors import Problem
from ..registry import LuaCodeSpec, Registry, display_path
from .engine import new_lua_runtime
from .sandbox import chunk_name

_LOCATED = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<msg>.*)$", re.S)

_CHECK = """
function(text, name)
    local f, err = load(text, name, "t")
    if f then return true end
    return false, err
end
"""


def check_lua_sources(registry: Registry) -> list[Problem]:
    lua = new_lua_runtime()
    compile_only = lua.eval(_CHECK)
    problems = []
    for spec in registry.of_type(LuaCodeSpec):
        src = spec.source
        result = compile_only(src.chunk_text, chunk_name(src))
        ok, err = (result if isinstance(result, tuple) else (result, None))
        if ok:
            continue
        text = str(err)
        m = _LOCATED.match(text)
        file, line = display_path(src.path), 0
        if m:
            line, text = int(m.group("line")), m.group("msg")
        problems.append(Problem(file, line, f"Lua syntax error in {spec.kind} {spec.id}: {text}"))
    return problems

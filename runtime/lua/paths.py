"""Where the Lua-side sources (`lua_modules/`) live, installed or in a checkout."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@cache
def lua_modules_dir() -> Path:
    """The `lua_modules` folder: inside the wheel (`runtime/_lua_modules`) or the checkout."""
    for candidate in (_PACKAGE_DIR / "_lua_modules", _PACKAGE_DIR.parent / "lua_modules"):
        if (candidate / "sandbox.lua").is_file():
            return candidate
    raise FileNotFoundError(
        f"lua_modules not found next to {_PACKAGE_DIR}: the runtime package is incomplete"
    )


@cache
def lua_module_source(name: str) -> str:
    return (lua_modules_dir() / f"{name}.lua").read_text(encoding="utf-8")

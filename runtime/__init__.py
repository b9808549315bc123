"""A Python host for Lua-scripted queue consumers, compatible with Wippy's queue system."""

from __future__ import annotations

from .app import App
from .errors import (
    ConfigError,
    DriverError,
    LuaHandlerError,
    Problem,
    QueueNotFound,
    RuntimeHostError,
    ShutdownTimeout,
)
from .lua.convert import LuaErrorValue

__all__ = [
    "App", "ConfigError", "DriverError", "LuaErrorValue", "LuaHandlerError", "Problem",
    "QueueNotFound", "RuntimeHostError", "ShutdownTimeout",
]
__version__ = "0.1.0"

"""Threads that run Lua get a large C stack (hardening: no C-stack exhaustion from Lua).

The sandbox bounds how deeply Lua re-enters Lua through C (see C STACK in
lua_modules/sandbox.lua), which keeps a call under about 2 MiB of C stack, so even a
default 8 MiB thread is safe; worker threads get LUA_THREAD_STACK as a margin on top. Only
the pages a thread touches cost memory: the rest is address space.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

LUA_THREAD_STACK = 64 * 1024 * 1024

# threading.stack_size is process-wide: set it only for the moment a thread is created.
_lock = threading.Lock()


def start_lua_thread(target: Callable[..., Any], *, name: str, args: tuple[Any, ...] = (),
                     daemon: bool = True) -> threading.Thread:
    """Create and start a thread with a LUA_THREAD_STACK stack, for code that runs Lua."""
    with _lock:
        previous = threading.stack_size()
        try:
            threading.stack_size(LUA_THREAD_STACK)
        except (ValueError, RuntimeError):  # a platform that refuses it: the sandbox's bound still holds
            pass
        try:
            thread = threading.Thread(target=target, args=args, name=name, daemon=daemon)
            thread.start()
        finally:
            threading.stack_size(previous)
    return thread

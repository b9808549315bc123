"""The application: load -> validate -> (start services) -> stop. SPEC §9."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .errors import ConfigError, Problem, QueueNotFound, QueueUnavailable
from .lua.sandbox import LuaSandbox
from .lua.syntax import check_lua_sources
from .registry import QueueSpec, Registry, display_path, load_registry


class App:
    """A loaded, validated application. Create with :meth:`App.load`."""

    def __init__(self, registry: Registry, *, strict_security: bool = False):
        self.registry = registry
        self.strict_security = strict_security
        self._local = threading.local()
        self._sandboxes: list[LuaSandbox] = []
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, strict_security: bool = False) -> App:
        """Read and validate every definition; raise ConfigError listing all problems."""
        app_dir = Path(path)
        if not app_dir.is_dir():
            what = "does not exist" if not app_dir.exists() else "is not a directory"
            raise ConfigError([Problem(display_path(app_dir), 0, f"application directory {what}")])
        registry, problems = load_registry(app_dir)
        problems += check_lua_sources(registry)
        if problems:
            raise ConfigError(problems)
        return cls(registry, strict_security=strict_security)

    # -- Lua -------------------------------------------------------------------------------
    def _sandbox(self) -> LuaSandbox:
        sandbox: LuaSandbox | None = getattr(self._local, "sandbox", None)
        if sandbox is None:
            sandbox = LuaSandbox(self.registry, _RegistryQueues(self.registry))
            self._local.sandbox = sandbox
            with self._lock:
                self._sandboxes.append(sandbox)
        return sandbox

    def call(self, func_id: str, *args: Any) -> Any:
        """Run a `function.lua` entry in this thread's Lua state and return its results.

        One result is returned as is, several as a tuple, none as None; tables become
        dicts/lists and error values :class:`runtime.LuaErrorValue`. A Lua error raises
        LuaHandlerError with the Lua traceback."""
        return self._sandbox().call(func_id, *args)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> App:
        """Start the app's `auto_start` services. (Queue services arrive with the queue
        system; until then an app has nothing to start and `queue.publish` answers
        Unavailable.)"""
        return self

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            for sandbox in self._sandboxes:
                sandbox.close()

    def __enter__(self) -> App:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _RegistryQueues:
    """The `queue` module's view of queues while no queue system is running: it knows
    which queues exist, and answers Unavailable for the rest."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def _queue(self, caller_id: str, queue_id: str) -> QueueSpec:
        full = self.registry.resolve(queue_id, caller_id.split(":", 1)[0])
        spec = self.registry.get(full, QueueSpec)
        if spec is None:
            raise QueueNotFound(f"queue '{queue_id}' not found")
        return spec

    def publish(self, caller_id: str, queue_id: str, body_json: str, headers_json: str) -> str:
        spec = self._queue(caller_id, queue_id)
        raise QueueUnavailable(f"queue '{spec.id}' is not running (the app's queues are not started)")

    def info(self, caller_id: str, queue_id: str) -> dict[str, Any]:
        spec = self._queue(caller_id, queue_id)
        raise QueueUnavailable(f"queue '{spec.id}' is not running (the app's queues are not started)")

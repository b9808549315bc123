"""The application: load -> validate -> start services -> stop. SPEC §9."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from .errors import ConfigError, LuaHandlerError, PermissionDenied, Problem, RuntimeHostError, ShutdownTimeout
from .lifecycle.security import Authorizer, policy_problems
from .lifecycle.services import ConsumerService, ProcessService
from .lifecycle.supervisor import Supervisor
from .lua.sandbox import LuaSandbox
from .lua.syntax import check_lua_sources
from .queue.driver import Driver
from .queue.router import QueueRouter
from .registry import FunctionSpec, PolicySpec, Registry, display_path, load_registry
from .registry.kinds import SecurityContext

_security_log = logging.getLogger("runtime.security")


class App:
    """A loaded, validated application. Create with :meth:`App.load`."""

    def __init__(self, registry: Registry, *, strict_security: bool = False):
        self.registry = registry
        self.strict_security = strict_security
        self.router = QueueRouter(registry)
        self.authorizer = Authorizer(registry, strict=strict_security)
        # Without policies and strict mode every check allows: skip them on the publish path.
        if strict_security or self.registry.of_type(PolicySpec):
            self.router.authorize = self._authorize_publish
        self._local = threading.local()
        # Weak: a state a worker replaced (after a memory error) must not stay alive here.
        self._sandboxes: weakref.WeakSet[LuaSandbox] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._supervisor: Supervisor | None = None
        self._consumers: dict[str, ConsumerService] = {}
        self._past_counts: dict[str, dict[str, int]] = {}  # counts of consumers stopped before
        self._drivers: dict[str, Driver] = {}  # kept across stop/start, as the memory driver's contents are

    @classmethod
    def load(cls, path: str | Path, *, strict_security: bool = False) -> App:
        """Read and validate every definition; raise ConfigError listing all problems."""
        app_dir = Path(path)
        if not app_dir.is_dir():
            what = "does not exist" if not app_dir.exists() else "is not a directory"
            raise ConfigError([Problem(display_path(app_dir), 0, f"application directory {what}")])
        registry, problems = load_registry(app_dir)
        problems += check_lua_sources(registry)
        problems += policy_problems(registry)
        if problems:
            raise ConfigError(problems)
        return cls(registry, strict_security=strict_security)

    # -- security --------------------------------------------------------------------------
    def _authorize_publish(self, security: SecurityContext | None, caller_id: str, queue_id: str) -> None:
        decision = self.authorizer.check_publish(security, queue_id)
        if decision.allowed:
            return
        actor = security.actor.id if security is not None and security.actor is not None else "(none)"
        _security_log.warning("permission denied: actor %s (in %s) may not publish to %s: %s", actor, caller_id,
                              queue_id, decision.reason,
                              extra={"fields": {"actor": actor, "action": "queue.publish", "resource": queue_id}})
        raise PermissionDenied(f"actor {actor} may not publish to queue '{queue_id}': {decision.reason}")

    # -- Lua -------------------------------------------------------------------------------
    def new_sandbox(self, *, timeout: float | None = None, memory_limit: int | None = None,
                    security: SecurityContext | None = None) -> LuaSandbox:
        """A fresh Lua state wired to this app's queues (one per worker thread); see
        LuaSandbox for `timeout` and `memory_limit`."""
        sandbox = LuaSandbox(self.registry, self.router, timeout=timeout, memory_limit=memory_limit,
                             security=security)
        with self._lock:
            self._sandboxes.add(sandbox)
        return sandbox

    def _sandbox(self, func_id: str, timeout: float | None, memory_limit: int | None) -> LuaSandbox:
        """This thread's Lua state for `App.call` of one entry: each entry has its own, so it
        sees its own module and library instances (as each consumer's workers do)."""
        cache: dict[str, LuaSandbox] | None = getattr(self._local, "sandboxes", None)
        if cache is None:
            cache = self._local.sandboxes = {}
        sandbox = cache.get(func_id)
        if sandbox is None:
            sandbox = cache[func_id] = self.new_sandbox(timeout=timeout, memory_limit=memory_limit)
        return sandbox

    def call(self, func_id: str, *args: Any) -> Any:
        """Run a `function.lua` entry in this thread's Lua state and return its results.

        One result is returned as is, several as a tuple, none as None; tables become
        dicts/lists and error values :class:`runtime.LuaErrorValue`. A Lua error, or a call
        over the function's `timeout` or `memory_limit`, raises LuaHandlerError with the Lua
        traceback. The app need not be started."""
        spec = self.registry.get(func_id, FunctionSpec)
        timeout = spec.timeout if spec else None
        memory_limit = spec.memory_limit if spec else None
        try:
            sandbox = self._sandbox(func_id, timeout, memory_limit)
            return sandbox.call(func_id, *args, timeout=timeout)
        except LuaHandlerError as exc:
            text = str(exc)
            if (memory_limit is not None and "not enough memory" in text) or \
                    (timeout is not None and "exceeded its time limit" in text):
                self._local.sandboxes.pop(func_id, None)  # a full or half-updated state is discarded
            raise
        except RuntimeHostError:
            raise
        except Exception as exc:  # noqa: BLE001 - only the runtime's errors leave the API (lupa's LuaError...)
            self._local.sandboxes.pop(func_id, None)
            raise LuaHandlerError(f"internal error: {type(exc).__name__}: {exc}", entry_id=func_id) from None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._supervisor is not None

    def start(self) -> App:
        """Start the `auto_start` services and their dependencies, in dependency order.
        Raises ConfigError (nothing left running) if a handler cannot be loaded."""
        if self._supervisor is not None:
            return self
        supervisor = Supervisor(self.registry, self.router, self.new_sandbox, self._drivers)
        supervisor.start()
        self._supervisor = supervisor
        self._consumers = {s.id: s for s in supervisor.services() if isinstance(s, ConsumerService)}
        return self

    def service_ids(self) -> list[str]:
        """IDs of the running services, in start order."""
        return [s.id for s in self._supervisor.services()] if self._supervisor else []

    def publish(self, queue_id: str, data: Any, headers: dict[str, Any] | None = None) -> str:
        """Publish `data` (encoded by the queue's codec) to a queue; returns the message id.
        Host-side publishing is the operator's and is not permission-checked."""
        return self.router.publish_value(queue_id, data, headers)

    def _idle_now(self) -> bool:
        if self._supervisor is None:
            return True
        for service in self._supervisor.services():
            if isinstance(service, (ConsumerService, ProcessService)) and not service.idle():
                return False
        return True

    def _activity(self) -> int:
        services = self._supervisor.services() if self._supervisor else []
        return sum(d.version for d in self._drivers.values()) + sum(s.activity() for s in services)

    def idle(self) -> bool:
        """Idle as `--until-idle` defines it: every consumed queue empty, nothing in flight,
        every process finished. Checked twice around an activity count, so a message moving
        between two queues during the check is not missed."""
        before = self._activity()
        if not self._idle_now():
            return False
        return self._activity() == before and self._idle_now()

    def wait_idle(self, timeout: float) -> bool:
        """True once idle, False when `timeout` seconds run out first."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown (SPEC §3). Raises ShutdownTimeout, after everything else has
        stopped, if handlers overran; their messages are back in their queues."""
        overran: list[str] = []
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            overran = supervisor.stop(timeout)
            for cid, counts in self._current_counts().items():  # stats add up across restarts
                past = self._past_counts.setdefault(cid, dict.fromkeys(counts, 0))
                for key, value in counts.items():
                    if key != "in_flight":
                        past[key] += value
            self._consumers = {}
        with self._lock:
            for sandbox in list(self._sandboxes):
                sandbox.close()
        if overran:
            raise ShutdownTimeout(f"did not stop in time: {', '.join(overran)} (their messages were returned)")

    def _current_counts(self) -> dict[str, dict[str, int]]:
        return {cid: svc.pool.stats() for cid, svc in self._consumers.items() if svc.pool is not None}

    def stats(self) -> dict[str, Any]:
        """Counts per consumer (adding up across stop/start of this App) and per queue."""
        consumers: dict[str, dict[str, int]] = {cid: dict(c, in_flight=0) for cid, c in self._past_counts.items()}
        for cid, counts in self._current_counts().items():
            total = consumers.setdefault(cid, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value if key != "in_flight" else value
        queues = {qid: bound.info() for qid, bound in self.router.queues.items()}
        return {"consumers": consumers, "queues": queues}  # in_flight: the running pool's only

    def __enter__(self) -> App:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

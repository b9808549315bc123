"""The application: load -> validate -> start services -> stop. SPEC §9."""

from __future__ import annotations

import dataclasses
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
from .queue.driver import Activity, Driver
from .queue.router import QueueRouter
from .registry import FunctionSpec, PolicySpec, QueueSpec, Registry, display_path, load_registry
from .registry.kinds import SecurityContext

_security_log = logging.getLogger("runtime.security")
IDLE_RECHECK = 0.05  # seconds: the longest idle detection waits without a wake-up
# Seconds an idle check pauses after a wake-up that found work going on, so a burst of moves
# (thousands a second) costs one check rather than one each, and the workers keep the GIL.
IDLE_CALM = 0.002


def changed_entries(old: Registry, new: Registry) -> set[str]:
    """IDs of entries added, removed or changed between two registries of one app (where
    an entry sits in its file does not count)."""
    ids = set(old.entries) | set(new.entries)
    return {i for i in ids if _comparable(old.entries.get(i)) != _comparable(new.entries.get(i))}


def _comparable(spec: Any) -> Any:
    return None if spec is None else dataclasses.replace(spec, line=0)


def _with_dependents(registry: Registry, ids: set[str]) -> set[str]:
    """`ids` and every entry that depends on one of them, transitively."""
    users: dict[str, list[str]] = {}
    for entry_id, deps in registry.dependencies.items():
        for dep in deps:
            users.setdefault(dep, []).append(entry_id)
    out, todo = set(ids), list(ids)
    while todo:
        for user in users.get(todo.pop(), ()):
            if user not in out:
                out.add(user)
                todo.append(user)
    return out


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
        self._call_sandboxes: weakref.WeakSet[LuaSandbox] = weakref.WeakSet()  # App.call's; stop cancels them
        self.activity = Activity()  # grows whenever a message moves; idle waits on it
        self.measure_durations = False  # consumers time their handlers (for metrics); set before start()
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
        LuaSandbox for `timeout` and `memory_limit`. Its owner closes it and lets it go."""
        return LuaSandbox(self.registry, self.router, timeout=timeout, memory_limit=memory_limit, security=security)

    def _sandbox(self, func_id: str, timeout: float | None, memory_limit: int | None) -> LuaSandbox:
        """This thread's Lua state for `App.call` of one entry: each entry has its own, so it
        sees its own module and library instances (as each consumer's workers do)."""
        cache: dict[str, LuaSandbox] | None = getattr(self._local, "sandboxes", None)
        if cache is None:
            cache = self._local.sandboxes = {}
        sandbox = cache.get(func_id)
        if sandbox is None:
            sandbox = cache[func_id] = self.new_sandbox(timeout=timeout, memory_limit=memory_limit)
            self._call_sandboxes.add(sandbox)
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

    def start(self, part: str = "all") -> App:
        """Start the `auto_start` services and their dependencies, in dependency order.
        Raises ConfigError (nothing left running) if a handler cannot be loaded. `part`
        "consumers" or "others" starts only that share (`runtime run --processes`)."""
        if self._supervisor is not None:
            return self
        supervisor = Supervisor(self.registry, self.router, self.new_sandbox, self._drivers, self.activity)
        supervisor.timed = self.measure_durations
        supervisor.start(part)
        self._supervisor = supervisor
        self._consumers = {s.id: s for s in supervisor.services() if isinstance(s, ConsumerService)}
        return self

    def reload(self, registry: Registry) -> list[str]:
        """Switch a running app to a new, validated registry of the same app (`--watch`):
        only the services whose definitions changed, or that depend on a changed entry (a
        Lua source, an imported library, their queue or driver), are stopped gracefully
        and started again; the rest keep running. Memory queues keep their contents.
        Returns the IDs of the services started again."""
        old = self.registry
        affected = changed_entries(old, registry)
        affected = _with_dependents(old, affected) | _with_dependents(registry, affected)
        try:
            return self._switch(registry, affected)
        except RuntimeHostError:
            # A changed handler that fails when it starts: back to the previous definitions.
            self._switch(old, affected)
            raise

    def _switch(self, registry: Registry, affected: set[str]) -> list[str]:
        self.registry = registry
        self.router.registry = registry
        self.authorizer = Authorizer(registry, strict=self.strict_security)
        self.router.authorize = self._authorize_publish if self.strict_security or registry.of_type(PolicySpec) \
            else None
        for qid in [q for q in self.router.queues if q in affected]:
            bound = self.router.queues.pop(qid)
            spec = registry.get(qid, QueueSpec)
            if spec is not None and spec.driver == bound.spec.driver and spec.driver not in affected:
                self.router.bind(spec, bound.driver)  # same driver: declared again, contents kept
        if self._supervisor is None:
            return []
        stopping = {cid: svc.pool for cid, svc in self._consumers.items() if cid in affected and svc.pool}
        try:
            restarted = self._supervisor.restart(registry, affected)
        finally:  # a restarted consumer's counts add up, as across start/stop (read once it stopped)
            self._bank_counts({cid: pool.stats() for cid, pool in stopping.items() if not pool.started})
            self._consumers = {s.id: s for s in self._supervisor.services() if isinstance(s, ConsumerService)}
        return restarted

    def service_ids(self) -> list[str]:
        """IDs of the running services, in start order."""
        return [s.id for s in self._supervisor.services()] if self._supervisor else []

    def publish(self, queue_id: str, data: Any, headers: dict[str, Any] | None = None,
                delay: float | str | None = None) -> str:
        """Publish `data` (encoded by the queue's codec) to a queue; returns the message id.
        `delay` (seconds or a duration like "5s") keeps it invisible to consumers until then.
        Host-side publishing is the operator's and is not permission-checked."""
        return self.router.publish_value(queue_id, data, headers, delay)

    def _idle_now(self) -> bool:
        if self._supervisor is None:
            return True
        for service in self._supervisor.services():
            if isinstance(service, (ConsumerService, ProcessService)) and not service.idle():
                return False
        return True

    def _activity(self) -> int:
        services = self._supervisor.services() if self._supervisor else []
        return self.activity.value + sum(s.activity() for s in services)

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
        seen = self.activity.value
        while not self.idle():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Woken by the next message move; the cap covers what moves without one here
            # (a delay running out, another process's work on a shared queue).
            seen = self.activity.wait(seen, min(remaining, IDLE_RECHECK))
            time.sleep(min(IDLE_CALM, max(0.0, deadline - time.monotonic())))
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown (SPEC §3). Raises ShutdownTimeout, after everything else has
        stopped, if handlers overran; their messages are back in their queues."""
        overran: list[str] = []
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            overran = supervisor.stop(timeout)
            self._bank_counts(self._current_counts())  # stats add up across restarts
            self._consumers = {}
        for sandbox in list(self._call_sandboxes):
            sandbox.close()  # cancels a time.sleep in App.call on another thread
        if overran:
            raise ShutdownTimeout(f"did not stop in time: {', '.join(overran)} (their messages were returned)")

    def _bank_counts(self, counts: dict[str, dict[str, int]]) -> None:
        """Keep the counts of consumers that stopped, so stats add up across restarts."""
        for cid, c in counts.items():
            past = self._past_counts.setdefault(cid, dict.fromkeys(c, 0))
            for key, value in c.items():
                if key != "in_flight":
                    past[key] += value

    def _current_counts(self) -> dict[str, dict[str, int]]:
        return {cid: svc.pool.stats() for cid, svc in self._consumers.items() if svc.pool is not None}

    def consumer_stats(self) -> dict[str, dict[str, int]]:
        """Counts per consumer, adding up across stop/start of this App (in_flight: the
        running pool's only). Asks no driver."""
        consumers: dict[str, dict[str, int]] = {cid: dict(c, in_flight=0) for cid, c in self._past_counts.items()}
        for cid, counts in self._current_counts().items():
            total = consumers.setdefault(cid, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value if key != "in_flight" else value
        return consumers

    def metrics_snapshot(self) -> dict[str, Any]:
        """What `--metrics` exports: per consumer counts, in-flight, workers and handler
        durations; per queue counts; per driver reconnects."""
        consumers: dict[str, dict[str, Any]] = {cid: dict(c, workers=0) for cid, c in self.consumer_stats().items()}
        for cid, svc in self._consumers.items():
            if svc.pool is not None:
                d = svc.pool.durations()
                consumers[cid].update(workers=len(svc.pool.workers), durations=d.counts, duration_sum=d.total)
        queues = {}
        for qid, bound in self.router.queues.items():
            try:
                queues[qid] = bound.info()
            except RuntimeHostError:
                continue  # its driver is unreachable now: no gauge rather than a failed scrape
        drivers = {did: {"reconnects": d.reconnects, "connected": d.state == "open"}
                   for did, d in self._drivers.items()}
        return {"consumers": consumers, "queues": queues, "drivers": drivers}

    def reconnecting(self) -> set[str]:
        """IDs of the consumers waiting for their driver to reconnect."""
        return {cid for cid, svc in self._consumers.items()
                if svc.pool is not None and (svc.pool.reconnecting or svc.pool.queue.driver.state == "reconnecting")}

    def stats(self) -> dict[str, Any]:
        """Counts per consumer (see consumer_stats) and per queue."""
        queues = {qid: bound.info() for qid, bound in self.router.queues.items()}
        return {"consumers": self.consumer_stats(), "queues": queues}

    def __enter__(self) -> App:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

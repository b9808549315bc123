"""Brings services up in dependency order and down in reverse, under one time budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import ConfigError, LuaHandlerError, Problem, RuntimeHostError
from ..lua.sandbox import LuaSandbox
from ..queue.driver import Activity, Driver
from ..queue.router import QueueRouter
from ..registry import ConsumerSpec, DriverSpec, EntrySpec, Registry, ServiceSpec
from .graph import start_order
from .services import ConsumerService, DriverService, ProcessService, Service

log = logging.getLogger("runtime.lifecycle")


class Supervisor:
    def __init__(self, registry: Registry, router: QueueRouter, make_sandbox: Callable[..., LuaSandbox],
                 drivers: dict[str, Driver], activity: Activity):
        self.registry = registry
        self.activity = activity
        self.drivers = drivers
        self.router = router
        self.make_sandbox = make_sandbox
        self.started: list[Service] = []
        self.timed = False  # consumers measure handler durations (--metrics)
        self.part = "all"

    def _service(self, spec: EntrySpec) -> Service | None:
        if isinstance(spec, DriverSpec):
            return DriverService(spec, self.router, self.drivers, self.activity)
        if isinstance(spec, ConsumerSpec):
            service = ConsumerService(spec, self.router, self.make_sandbox)
            service.timed = self.timed
            return service
        if isinstance(spec, ServiceSpec):
            return ProcessService(spec, self.make_sandbox)
        return None

    def restart(self, registry: Registry, affected: set[str]) -> list[str]:
        """Gracefully stop the running services in `affected`, switch to `registry`, and
        start every service of the new start order that is in `affected` (or new). Returns
        the IDs started. Nothing else is touched: other services keep running."""
        stopping = [s for s in self.started if s.id in affected]
        for service in reversed(stopping):
            service.begin_stop()
        for service in reversed(stopping):
            service.stop(service.spec.lifecycle.stop_timeout)
        self.started = [s for s in self.started if s.id not in affected]
        self.registry = registry
        running = {s.id for s in self.started}
        started = []
        for entry_id in start_order(registry, self.part):
            if entry_id in running or entry_id not in affected:
                continue
            spec = registry.entries[entry_id]
            new = self._service(spec)
            if new is None:
                continue
            try:
                new.start()
            except LuaHandlerError as exc:
                raise ConfigError([Problem(spec.file, spec.line, f"{spec.kind} {spec.id} cannot start: {exc}")]) \
                    from None
            self.started.append(new)
            started.append(entry_id)
        return started

    def start(self, part: str = "all") -> None:
        """Start every auto_start service and its dependencies (of `part`, see start_order).
        A service whose Lua cannot be loaded is a configuration error: what was started is
        stopped again and ConfigError is raised (no half-started app)."""
        self.part = part
        for entry_id in start_order(self.registry, part):
            spec = self.registry.entries[entry_id]
            service = self._service(spec)
            if service is None:
                continue
            try:
                service.start()
            except LuaHandlerError as exc:
                self.stop(timeout_override=spec.lifecycle.stop_timeout)
                raise ConfigError([Problem(spec.file, spec.line, f"{spec.kind} {spec.id} cannot start: {exc}")]) \
                    from None
            except RuntimeHostError:
                self.stop(timeout_override=spec.lifecycle.stop_timeout)  # nothing left half-started
                raise
            self.started.append(service)
            log.debug("started %s", spec.id)

    def stop(self, timeout_override: float | None = None) -> list[str]:
        """Stop in reverse start order, under one time budget: every service is asked to stop
        first, so all handlers drain at once; each then gets what is left of its own
        `stop_timeout` (or of `timeout_override`), counted from the start of the shutdown.
        Returns what overran."""
        begun = time.monotonic()
        for service in reversed(self.started):
            service.begin_stop()
        overran: list[str] = []
        while self.started:
            service = self.started.pop()
            budget = timeout_override if timeout_override is not None else service.spec.lifecycle.stop_timeout
            overran += service.stop(max(0.0, begun + budget - time.monotonic()))
        return overran

    def services(self) -> list[Service]:
        return list(self.started)

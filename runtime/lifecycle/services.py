"""The three kinds of service: a driver, a consumer, a Lua process (`process.service`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..drivers import driver_class
from ..errors import DriverUnavailable, LuaHandlerError
from ..lua.sandbox import LuaSandbox
from ..lua.threads import start_lua_thread
from ..queue.consumer import ConsumerPool
from ..queue.driver import Activity, Backoff, Driver
from ..queue.handler import LuaHandler
from ..queue.router import QueueRouter
from ..registry import ConsumerSpec, DriverSpec, EntrySpec, FunctionSpec, QueueSpec, ServiceSpec

log = logging.getLogger("runtime.lifecycle")


class Service:
    def __init__(self, spec: EntrySpec):
        self.spec = spec

    @property
    def id(self) -> str:
        return self.spec.id

    def start(self) -> None:
        raise NotImplementedError

    def begin_stop(self) -> None:
        """Ask the service to stop without waiting (so that every service's handlers get the
        whole shutdown budget at once); `stop` then waits."""

    def stop(self, timeout: float) -> list[str]:
        """Stop; return the names of what overran the timeout."""
        return []

    def idle(self) -> bool:
        return True

    def activity(self) -> int:
        """A number that changes whenever the service does work (for idle detection)."""
        return 0


class DriverService(Service):
    """Creates and opens the driver and binds every queue that names it."""

    spec: DriverSpec

    def __init__(self, spec: DriverSpec, router: QueueRouter, drivers: dict[str, Driver], activity: Activity):
        super().__init__(spec)
        self.router = router
        self.drivers = drivers  # kept by the App: a restarted app finds its memory queues again
        self.moves = activity
        self.driver: Driver | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        self.driver = self.drivers.get(self.spec.id)
        if self.driver is not None and self.driver.options != dict(self.spec.options):
            self.driver = None  # its definition changed (--watch): a new driver, the old one is closed
        if self.driver is None:
            restart = self.spec.lifecycle.restart
            backoff = Backoff(restart.initial_delay, restart.max_delay) if restart else None
            self.driver = self.drivers[self.spec.id] = driver_class(self.spec.kind)(
                self.spec.id, self.spec.options, app_dir=self.router.registry.app_dir, activity=self.moves,
                backoff=backoff)
        self._open()
        for queue in self.router.registry.of_type(QueueSpec):
            if queue.driver == self.spec.id:
                self.router.bind(queue, self.driver)

    def _open(self) -> None:
        """Open the driver; an unreachable engine is retried by the entry's restart policy."""
        assert self.driver is not None
        policy = self.spec.lifecycle.restart
        attempts = 0
        delays = self.driver.backoff.delays()
        while True:
            try:
                self.driver.open()
                return
            except DriverUnavailable as exc:
                attempts += 1
                if policy is None or (policy.max_attempts and attempts > policy.max_attempts):
                    raise
                delay = next(delays)
                log.warning("driver %s cannot connect (attempt %d), retrying in %.1fs: %s", self.id, attempts,
                            delay, exc)
                if self.stopping.wait(delay):
                    raise

    def begin_stop(self) -> None:
        self.stopping.set()

    def stop(self, timeout: float) -> list[str]:
        for bound in self.router.queues.values():
            if bound.driver is self.driver:
                bound.accepting = False
        if self.driver is not None:
            self.driver.close()
        return []


class ConsumerService(Service):
    spec: ConsumerSpec

    def __init__(self, spec: ConsumerSpec, router: QueueRouter, make_sandbox: Callable[..., LuaSandbox]):
        super().__init__(spec)
        self.router = router
        self.make_sandbox = make_sandbox
        self.pool: ConsumerPool | None = None
        self.timed = False  # measure handler durations (set by the app for --metrics)

    def start(self) -> None:
        queue = self.router.bound(self.spec.queue)
        dl = queue.spec.dead_letter
        dead_letter = self.router.queues.get(dl.queue) if dl else None
        if dl is not None and dead_letter is None:  # its driver is a start dependency: a bug if so
            raise RuntimeError(f"consumer {self.id}: dead-letter queue {dl.queue} is not running")
        func = self.router.registry.get(self.spec.func, FunctionSpec)
        timeout = self.spec.timeout if self.spec.timeout is not None else (func.timeout if func else None)
        memory = self.spec.memory_limit if self.spec.memory_limit is not None else (func.memory_limit if func else None)
        security = self.spec.lifecycle.security

        def make_sandbox() -> LuaSandbox:
            return self.make_sandbox(timeout=timeout, memory_limit=memory, security=security)

        def make_handler() -> LuaHandler:
            return LuaHandler(make_sandbox, self.spec.func, queue.codec, timeout)

        self.pool = ConsumerPool(self.spec, queue, dead_letter, make_handler)
        self.pool.timed = self.timed
        self.pool.start()

    def begin_stop(self) -> None:
        if self.pool is not None:
            self.pool.begin_stop()

    def stop(self, timeout: float) -> list[str]:
        return self.pool.stop(timeout) if self.pool is not None else []

    def activity(self) -> int:
        return sum(w.counters.processed for w in self.pool.workers) if self.pool else 0

    def idle(self) -> bool:
        if self.pool is None:
            return True
        try:
            return self.pool.stats()["in_flight"] == 0 and self.pool.queue.empty()
        except DriverUnavailable:  # the engine is away: not idle, the consumer waits for it
            return False


class ProcessService(Service):
    """Runs a process.lua's `main(args...)` once, in its own thread and Lua state, with the
    restart policy applied when it raises."""

    spec: ServiceSpec

    def __init__(self, spec: ServiceSpec, make_sandbox: Callable[..., LuaSandbox]):
        super().__init__(spec)
        self.make_sandbox = make_sandbox
        self.thread: threading.Thread | None = None
        self.sandbox: LuaSandbox | None = None
        self.finished = threading.Event()
        self.stopping = threading.Event()
        self.failures = 0
        self.result: object = None

    def start(self) -> None:
        self.sandbox = self._new_sandbox()
        self.sandbox.ensure_loaded(self.spec.process)  # a bad chunk refuses the start
        self.thread = start_lua_thread(self._run, name=self.id)

    def _new_sandbox(self) -> LuaSandbox:
        return self.make_sandbox(security=self.spec.lifecycle.security)

    def _run(self) -> None:
        policy = self.spec.lifecycle.restart
        delay = policy.initial_delay if policy else 0.0
        try:
            while not self.stopping.is_set():
                try:
                    assert self.sandbox is not None
                    self.result = self.sandbox.call(self.spec.process, *self.spec.args)
                    error = self.result[1] if isinstance(self.result, tuple) and len(self.result) > 1 else None
                    if error is not None:
                        log.warning("process %s finished with an error: %s", self.id, error)
                    else:
                        log.info("process %s finished", self.id)
                    return
                except LuaHandlerError as exc:
                    self.failures += 1
                    if self.stopping.is_set():
                        return
                    if policy is None or (policy.max_attempts and self.failures > policy.max_attempts):
                        log.error("process %s failed%s: %s", self.id,
                                  f" after {self.failures} attempts" if policy else "", exc)
                        return
                    log.warning("process %s failed (attempt %d), restarting in %gs: %s", self.id, self.failures,
                                delay, exc)
                    if self.stopping.wait(delay):
                        return
                    delay = min(delay * 2 or policy.initial_delay, policy.max_delay)
                    self.sandbox = self._new_sandbox()
        finally:
            self.finished.set()

    def begin_stop(self) -> None:
        self.stopping.set()
        if self.sandbox is not None:
            self.sandbox.bridge.cancel.set()

    def stop(self, timeout: float) -> list[str]:
        self.begin_stop()
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                return [self.id]
        return []

    def idle(self) -> bool:
        return self.finished.is_set() or self.thread is None

    def activity(self) -> int:
        return int(self.finished.is_set())


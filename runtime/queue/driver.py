"""The driver interface (DESIGN "Drivers on real engines"): a Driver per `queue.driver.*`
entry and a DriverConsumer per consumer pool.

A driver fills in a handful of primitives (the methods starting with `_`); the base classes
do the bookkeeping once for every driver:

* the in-flight map of each consumer, keyed by the delivery's opaque token, so a stale or
  second settle is refused before it reaches the engine (a late ack from an abandoned
  handler returns False and does nothing);
* the activity counter that idle detection waits on (a Condition, not a poll);
* engine errors wrapped into the error tree (`DriverUnavailable`) and reconnect with
  backoff, logged once when the connection is lost and once when it is back.

Contract, for every driver:

* Thread-safe: publish, stats and settles may be called from any thread. `fetch` of one
  DriverConsumer is called by one thread at a time (the pool serialises its refills).
* `declare(queue, options)` is idempotent and is called for every queue bound to the driver
  when it starts, before any other call names that queue.
* `publish(queue, messages, ...)` returns once the engine has accepted every message. On a
  bounded queue it waits while the queue is full, up to `timeout`, then raises
  PublishTimeout; `cancel` (an Event) cuts the wait short with Canceled. `force=True`
  (requeues and dead letters) never waits and never drops, even above a length limit.
  `delay` seconds keep the messages invisible to consumers until then.
* `DriverConsumer.fetch(max_count, wait)` waits up to `wait` seconds for at least one
  delivery and returns up to `max_count` (an empty list on timeout). Each delivery is in
  flight until settled by exactly one of ack / retry / release.
* `ack(d)` removes the message for good. `retry(d, delay)` makes it visible again after
  `delay` seconds with its attempt count raised (by the engine where it counts deliveries
  itself). `release(ds)` returns never-started deliveries at once, their attempt not
  counted. `extend(ds, seconds)` renews leases (drivers with `lease`).
* `stats(queue)` returns ready / in_flight / delayed counts (None where unknown).

Drivers move encoded bytes and never import the Lua layer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

from ..errors import DriverUnavailable, RuntimeHostError
from .message import Message

log = logging.getLogger("runtime.driver")
FLUSH_LINGER = 0.001  # seconds a background write waits for more settles to join it
ERROR_PAUSE = 0.2  # seconds before a background write is tried again after an engine error
T = TypeVar("T")


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; read by the consumer pool, idle detection and the contract tests."""

    bounded: bool = False  # a queue's max_length makes publishers wait
    ordered: bool = False  # deliveries come in publish order (a retry goes to the tail)
    exact_stats: bool = False  # stats() counts are exact (idle detection may trust them)
    native_attempts: bool = False  # the engine counts deliveries: a delivery lost to a crash counts
    native_delay: bool = False  # delayed messages wait in the engine, not in this process
    lease: bool = False  # a delivery is a lease: the driver renews it for as long as it is in flight
    shared: bool = False  # several processes may consume the same queues (--processes)
    max_batch: int = 1000  # the most messages one fetch takes
    min_wait: float = 0.0  # the shortest useful blocking wait in fetch


class Delivery(NamedTuple):
    """A message handed to a consumer: its queue, attempt number and settle token (opaque to
    everyone but the driver that made it). A named tuple: made once per message, and the
    cheapest immutable record to make."""

    queue: str
    message: Message
    attempt: int
    token: Any


@dataclass(frozen=True)
class QueueStats:
    ready: int | None
    in_flight: int | None
    delayed: int | None
    exact: bool = True


class Activity:
    """A counter that grows whenever messages move, with a Condition to wait for the next move.

    `bump()` is on the per-message path: it takes the lock only when someone is waiting."""

    def __init__(self) -> None:
        self.value = 0
        self._cond = threading.Condition()
        self._waiters = 0

    def bump(self) -> None:
        self.value += 1
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Wait until the counter differs from `seen` or `timeout` passes; the new value."""
        with self._cond:
            if self.value == seen and timeout > 0:
                self._waiters += 1
                try:
                    self._cond.wait(timeout)
                finally:
                    self._waiters -= 1
            return self.value


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    maximum: float = 30.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * random.uniform(0.9, 1.1)
            delay = min(self.maximum, delay * 2 or self.initial)


class BackgroundLoop:
    """A driver's background thread (settles, lease renewal): started on open, stopped and
    joined on close; `stop` and `wake` are the Events its loop waits on."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.wake = threading.Event()

    def start(self, target: Callable[[], None], name: str) -> None:
        self.stop.clear()
        self.thread = threading.Thread(target=target, name=name, daemon=True)
        self.thread.start()

    def join(self) -> None:
        """Stop the loop and wait for it (unless called from the loop itself)."""
        thread = self.thread
        if thread is not None:
            self.stop.set()
            self.wake.set()
            if thread is not threading.current_thread():
                thread.join()
            self.thread = None


class Driver:
    """Base class of queue drivers: one per `queue.driver.*` entry, owning its connections.

    Built from its spec with no I/O in `__init__`; `open()` connects (DriverUnavailable on
    failure) and may follow `close()`."""

    kind: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    # Engine exceptions that mean "the connection is gone": wrapped into DriverUnavailable.
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, entry_id: str, options: Mapping[str, Any] | None = None, *, app_dir: Path | None = None,
                 activity: Activity | None = None, backoff: Backoff | None = None):
        self.entry_id = entry_id
        self.options: dict[str, Any] = dict(options or {})
        self.app_dir = app_dir or Path(".")
        self.activity = activity or Activity()
        self.backoff = backoff or Backoff(float(self.options.get("reconnect_delay") or 1.0),
                                          float(self.options.get("reconnect_max_delay") or 30.0))
        self.state = "closed"  # closed | open | reconnecting
        self.reconnects = 0
        self.queues: dict[str, dict[str, Any]] = {}  # declared queue name -> its options
        self._reconnect_lock = threading.Lock()

    # -- public API (the base does the bookkeeping) ------------------------------------------
    def open(self) -> None:
        if self.state == "open":
            return
        self.engine(self._open)
        self.state = "open"
        for name, options in self.queues.items():
            self.engine(self._declare, name, options)

    def close(self) -> None:
        if self.state != "closed":
            self.state = "closed"
            self._close()

    def declare(self, queue: str, options: Mapping[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.engine(self._declare, queue, opts)
        self.queues[queue] = opts

    def publish(self, queue: str, messages: Sequence[Message], timeout: float = 30.0,
                cancel: threading.Event | None = None, *, delay: float = 0.0, force: bool = False) -> None:
        if not messages:
            return
        try:  # inline rather than through engine(): this is on every message's path
            self._publish(queue, messages, timeout, cancel, delay if delay > 0 else 0.0, force)
        except RuntimeHostError:
            raise
        except self.connection_errors as exc:
            raise self.unavailable(exc) from None
        self.activity.bump()

    def consume(self, queue: str, consumer_id: str, prefetch: int,
                options: Mapping[str, Any] | None = None) -> DriverConsumer:
        return self.engine(self._consume, queue, consumer_id, prefetch, dict(options or {}))

    def stats(self, queue: str) -> QueueStats:
        return self.engine(self._stats, queue)

    def purge(self, queue: str) -> int:
        """Delete every message of the queue that is not in flight; how many."""
        n = self.engine(self._purge, queue)
        self.activity.bump()
        return n

    # -- engine errors and reconnecting --------------------------------------------------------
    def engine(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a primitive; a lost connection becomes DriverUnavailable (and is logged once)."""
        try:
            return fn(*args)
        except RuntimeHostError:
            raise
        except self.connection_errors as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, exc: BaseException) -> DriverUnavailable:
        """A lost connection (logged once) as the error to raise."""
        self._lost(exc)
        return DriverUnavailable(f"driver {self.entry_id}: {self.describe_error(exc)}")

    def describe_error(self, exc: BaseException) -> str:
        """An engine error as text for logs and errors; drivers mask secrets here."""
        return f"{type(exc).__name__}: {exc}"

    def _lost(self, exc: BaseException) -> None:
        if self.state == "open":
            self.state = "reconnecting"
            log.warning("driver %s: connection lost (%s); reconnecting", self.entry_id, self.describe_error(exc))

    def reconnect(self, stop: threading.Event) -> bool:
        """Reopen after a lost connection, with backoff, until it works or `stop` is set.
        True once open. Several callers may come at once: one does the work."""
        with self._reconnect_lock:
            if self.state == "open":
                return True
            if self.state == "closed":
                return False
            for delay in self.backoff.delays():
                try:
                    self._close()
                except Exception:  # noqa: BLE001 - the old connection is gone anyway
                    pass
                try:
                    self._open()
                    for name, options in self.queues.items():
                        self._declare(name, options)
                except self.connection_errors as exc:
                    log.debug("driver %s: reconnect failed: %s", self.entry_id, self.describe_error(exc))
                    if stop.wait(delay):
                        return False
                    continue
                self.state = "open"
                self.reconnects += 1
                log.info("driver %s: connection is back", self.entry_id)
                return True
        return False  # pragma: no cover - delays() never ends

    # -- a helper thread for drivers that batch settles and hold leases --------------------
    def settle_and_renew(self, stop: threading.Event, wake: threading.Event, *, flush: Callable[[], None],
                         pending: Callable[[], int], consumers: Callable[[], Iterable[DriverConsumer]],
                         renew: Callable[[DriverConsumer, list[Delivery]], None], renew_every: float,
                         what: str = "settles") -> None:
        """The loop of a driver's background thread, until `stop`: soon after `wake` is set,
        write what is queued (`flush`; what arrives meanwhile joins the same write, a group
        commit), keeping it queued and retrying while the engine refuses; and every
        `renew_every` seconds renew the lease of every in-flight delivery of `consumers()`."""
        next_renewal = time.monotonic() + renew_every
        failing = False
        while not stop.is_set():
            if wake.wait(max(0.0, next_renewal - time.monotonic())) and not stop.is_set():
                wake.clear()
                if pending() < 64:
                    stop.wait(FLUSH_LINGER)
                try:
                    flush()
                    if failing:
                        failing = False
                        log.info("driver %s: pending %s written", self.entry_id, what)
                except Exception as exc:  # noqa: BLE001 - kept queued, tried again shortly
                    if not failing:
                        failing = True
                        log.warning("driver %s: cannot write %s yet (%s); retrying", self.entry_id, what,
                                    self.describe_error(exc))
                    if stop.wait(ERROR_PAUSE):
                        break
                    wake.set()
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + renew_every
                for c in list(consumers()):
                    live = c.deliveries()
                    if not live or c.closed:
                        continue
                    try:
                        renew(c, live)
                    except Exception as exc:  # noqa: BLE001 - tried again next round
                        log.warning("driver %s: cannot renew %d lease(s) of consumer %s: %s", self.entry_id,
                                    len(live), c.consumer_id, self.describe_error(exc))

    # -- primitives ---------------------------------------------------------------------------
    def _open(self) -> None:
        """Connect. Raise one of `connection_errors` (or DriverUnavailable) on failure."""

    def _close(self) -> None:
        """Disconnect and stop the driver's threads."""

    def _declare(self, queue: str, options: dict[str, Any]) -> None:
        raise NotImplementedError

    def _publish(self, queue: str, messages: Sequence[Message], timeout: float, cancel: threading.Event | None,
                 delay: float, force: bool) -> None:
        raise NotImplementedError

    def _consume(self, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]) -> DriverConsumer:
        raise NotImplementedError

    def _stats(self, queue: str) -> QueueStats:
        raise NotImplementedError

    def _purge(self, queue: str) -> int:
        raise NotImplementedError


class DriverConsumer:
    """One consumer's view of one queue: fetch deliveries, settle them."""

    def __init__(self, driver: Driver, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]):
        self.driver = driver
        self.queue = queue
        self.consumer_id = consumer_id
        self.prefetch = prefetch
        self.options = options
        self._in_flight: dict[Any, Delivery] = {}
        self._lock = threading.Lock()
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._in_flight.values())

    def fetch(self, max_count: int, wait: float) -> list[Delivery]:
        if self.closed:
            return []
        got = self.driver.engine(self._fetch, max(1, max_count), max(0.0, wait))
        if got:
            with self._lock:
                for d in got:
                    self._in_flight[d.token] = d
        return got

    def ack(self, d: Delivery) -> bool:
        # The per-message path: the in-flight check and the primitive inline, no wrappers.
        with self._lock:
            if self._in_flight.pop(d.token, None) is None:
                return False
        driver = self.driver
        try:
            self._ack(d)
        except RuntimeHostError:
            raise
        except driver.connection_errors as exc:
            raise driver.unavailable(exc) from None
        driver.activity.bump()
        return True

    def ack_many(self, deliveries: Sequence[Delivery]) -> int:
        """Ack several deliveries in one step; how many were still in flight (and are now acked)."""
        with self._lock:
            pop = self._in_flight.pop
            mine = [d for d in deliveries if pop(d.token, None) is not None]
        if not mine:
            return 0
        driver = self.driver
        try:
            self._ack_many(mine)
        except RuntimeHostError:
            raise
        except driver.connection_errors as exc:
            raise driver.unavailable(exc) from None
        driver.activity.bump()
        return len(mine)

    def retry(self, d: Delivery, delay: float = 0.0) -> bool:
        with self._lock:
            if self._in_flight.pop(d.token, None) is None:
                return False
        self.driver.engine(self._retry, d, max(0.0, delay))
        self.driver.activity.bump()
        return True

    def release(self, deliveries: Iterable[Delivery]) -> int:
        with self._lock:
            mine = [d for d in deliveries if self._in_flight.pop(d.token, None) is not None]
        if mine:
            self.driver.engine(self._release, mine)
            self.driver.activity.bump()
        return len(mine)

    def lost(self, deliveries: Iterable[Delivery], why: str) -> None:
        """Deliveries whose lease another consumer has taken: out of the in-flight map (so
        their late settle is refused), and said once in the log."""
        with self._lock:
            gone = [d for d in deliveries if self._in_flight.pop(d.token, None) is not None]
        if gone:
            log.warning("consumer %s: lost %d message(s) of %s (%s); they may be delivered again: %s",
                        self.consumer_id, len(gone), self.queue, why, ", ".join(d.message.id for d in gone[:5]))

    def extend(self, deliveries: Iterable[Delivery], seconds: float) -> None:
        live = [d for d in deliveries if d.token in self._in_flight]
        if live:
            self.driver.engine(self._extend, live, seconds)

    def close(self) -> None:
        """Stop consuming. Deliveries still in flight go back to the queue."""
        if self.closed:
            return
        left = self.deliveries()
        if left:
            try:
                self.release(left)
            except RuntimeHostError:
                log.warning("consumer %s: could not return %d message(s) to %s; the engine will redeliver them",
                            self.consumer_id, len(left), self.queue)
        self.closed = True
        self._close()

    # -- primitives ---------------------------------------------------------------------------
    def _fetch(self, max_count: int, wait: float) -> list[Delivery]:
        raise NotImplementedError

    def _ack(self, d: Delivery) -> None:
        raise NotImplementedError

    def _ack_many(self, deliveries: list[Delivery]) -> None:
        """Ack several; drivers that can do it in one engine call override this."""
        for d in deliveries:
            self._ack(d)

    def _retry(self, d: Delivery, delay: float) -> None:
        raise NotImplementedError

    def _release(self, deliveries: list[Delivery]) -> None:
        raise NotImplementedError

    def _extend(self, deliveries: list[Delivery], seconds: float) -> None:
        """Renew leases; nothing to do for drivers without `lease`."""

    def _close(self) -> None:
        """Release the consumer's engine resources."""

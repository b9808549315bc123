"""The in-memory driver (SPEC §7.1): one bounded FIFO per queue, thread-safe.

A real product part, not a test stub: `publish` waits while a queue is at `max_length` (up
to the publish timeout), requeues and dead letters never wait or drop, retries and delayed
publishes wait in a heap without holding a consumer's prefetch slot, and nothing is lost
until the process ends. One process only.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ..errors import Canceled, PublishTimeout
from ..queue.driver import Capabilities, Delivery, Driver, DriverConsumer, QueueStats
from ..queue.message import Message

DEFAULT_MAX_LENGTH = 1000
CANCEL_POLL = 0.05  # seconds between looks at a publisher's cancel flag while it waits for room
OVER_LIMIT_WARNING = 60.0  # seconds between warnings that a queue is above max_length

log = logging.getLogger("runtime.driver.memory")


class _MemoryQueue:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.items: deque[tuple[Message, int]] = deque()  # (message, attempt)
        self.delayed: list[tuple[float, int, Message, int]] = []  # heap of (due, seq, message, attempt)
        self.consumers: set[MemoryConsumer] = set()
        self.lock = threading.Lock()
        self.not_empty = threading.Condition(self.lock)
        self.not_full = threading.Condition(self.lock)
        self.fetchers = 0  # consumers waiting on not_empty (publishes notify only when some are)
        self.publishers = 0  # publishers waiting on not_full
        self.warned_at = float("-inf")

    def promote(self, now: float) -> None:
        """Move due delayed messages to the tail (holding the lock)."""
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            _, _, message, attempt = heapq.heappop(delayed)
            self.items.append((message, attempt))

    def next_due(self) -> float | None:
        return self.delayed[0][0] if self.delayed else None


class MemoryDriver(Driver):
    kind = "queue.driver.memory"
    capabilities = Capabilities(bounded=True, ordered=True, exact_stats=True)

    def __init__(self, entry_id: str, options: dict[str, Any] | None = None, **kw: Any):
        super().__init__(entry_id, options, **kw)
        self._queues: dict[str, _MemoryQueue] = {}
        self._seq = itertools.count()
        self._declare_lock = threading.Lock()

    def _declare(self, queue: str, options: dict[str, Any]) -> None:
        max_length = int(options.get("max_length") or DEFAULT_MAX_LENGTH)
        with self._declare_lock:
            q = self._queues.get(queue)
            if q is None:
                self._queues[queue] = _MemoryQueue(max_length)
            else:
                q.max_length = max_length

    def _queue(self, name: str) -> _MemoryQueue:
        try:
            return self._queues[name]
        except KeyError:
            raise KeyError(f"queue '{name}' is not declared on driver {self.entry_id}") from None

    def _publish(self, queue: str, messages: Sequence[Message], timeout: float, cancel: threading.Event | None,
                 delay: float, force: bool) -> None:
        q = self._queues.get(queue) or self._queue(queue)
        with q.lock:
            if not delay and not force and len(messages) == 1 and len(q.items) < q.max_length:
                q.items.append((messages[0], 1))  # the common case, kept short
                if q.fetchers:
                    q.not_empty.notify()
                return
            if delay > 0:
                due = time.monotonic() + delay
                for m in messages:
                    heapq.heappush(q.delayed, (due, next(self._seq), m, 1))
                q.not_empty.notify()  # a waiting fetch recomputes its wake-up time
                return
            for m in messages:
                if not force and len(q.items) >= q.max_length:
                    self._wait_for_room(q, queue, timeout, cancel)
                q.items.append((m, 1))
            q.not_empty.notify(len(messages))
            if force:
                self._warn_if_over(q, queue)

    @staticmethod
    def _wait_for_room(q: _MemoryQueue, name: str, timeout: float, cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + timeout
        while len(q.items) >= q.max_length:
            if cancel is not None and cancel.is_set():
                raise Canceled(f"publish to queue '{name}' canceled: the worker is stopping")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishTimeout(
                    f"queue '{name}' is full ({q.max_length} messages) and stayed full for {timeout:g}s")
            q.publishers += 1
            try:
                q.not_full.wait(min(remaining, CANCEL_POLL) if cancel is not None else remaining)
            finally:
                q.publishers -= 1

    def _warn_if_over(self, q: _MemoryQueue, name: str) -> None:
        if len(q.items) > q.max_length:
            now = time.monotonic()
            if now - q.warned_at >= OVER_LIMIT_WARNING:
                q.warned_at = now
                log.warning("queue %s on driver %s holds %d messages, above its max_length %d "
                            "(requeues and dead letters are never refused)", name, self.entry_id, len(q.items),
                            q.max_length)

    def _consume(self, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any]) -> MemoryConsumer:
        q = self._queue(queue)
        consumer = MemoryConsumer(self, queue, consumer_id, prefetch, options, q)
        with q.lock:
            q.consumers.add(consumer)
        return consumer

    def _stats(self, queue: str) -> QueueStats:
        q = self._queue(queue)
        with q.lock:
            q.promote(time.monotonic())
            in_flight = sum(c.in_flight for c in q.consumers)
            return QueueStats(len(q.items), in_flight, len(q.delayed))

    def _purge(self, queue: str) -> int:
        q = self._queue(queue)
        with q.lock:
            n = len(q.items) + len(q.delayed)
            q.items.clear()
            q.delayed.clear()
            q.not_full.notify_all()
        return n


class MemoryConsumer(DriverConsumer):
    driver: MemoryDriver

    def __init__(self, driver: MemoryDriver, queue: str, consumer_id: str, prefetch: int, options: dict[str, Any],
                 q: _MemoryQueue):
        super().__init__(driver, queue, consumer_id, prefetch, options)
        self._q = q
        self._tokens = itertools.count(1)

    def _fetch(self, max_count: int, wait: float) -> list[Delivery]:
        q = self._q
        out: list[Delivery] = []
        with q.lock:
            if q.delayed:
                q.promote(time.monotonic())
            if not q.items:
                if wait <= 0:
                    return out
                deadline = time.monotonic() + wait
                while not q.items:
                    now = time.monotonic()
                    remaining = deadline - now
                    if remaining <= 0:
                        return out
                    due = q.next_due()
                    q.fetchers += 1
                    try:
                        q.not_empty.wait(remaining if due is None else max(0.0, min(remaining, due - now)))
                    finally:
                        q.fetchers -= 1
                    if q.delayed:
                        q.promote(time.monotonic())
            items, name, tokens = q.items, self.queue, self._tokens
            while items and len(out) < max_count:
                message, attempt = items.popleft()
                out.append(Delivery(name, message, attempt, next(tokens)))
            if q.publishers:
                q.not_full.notify(len(out))
            if items and q.fetchers:
                q.not_empty.notify()
        return out

    def _ack(self, d: Delivery) -> None:
        pass  # the base class has removed it from the in-flight map: it is gone

    def _ack_many(self, deliveries: list[Delivery]) -> None:
        pass

    def _retry(self, d: Delivery, delay: float) -> None:
        q = self._q
        with q.lock:
            if delay > 0:
                heapq.heappush(q.delayed, (time.monotonic() + delay, next(self.driver._seq), d.message, d.attempt + 1))
            else:
                q.items.append((d.message, d.attempt + 1))
            q.not_empty.notify()

    def _release(self, deliveries: list[Delivery]) -> None:
        q = self._q
        with q.lock:
            for d in reversed(deliveries):  # back to the head, in their order
                q.items.appendleft((d.message, d.attempt))
            q.not_empty.notify(len(deliveries))

    def _close(self) -> None:
        with self._q.lock:
            self._q.consumers.discard(self)

"""The in-memory driver (SPEC §7): one bounded FIFO per queue, thread-safe.

A real product part, not a test stub: `publish` blocks while a queue is at `max_length`
(up to the publish timeout), requeues never block or drop, and nothing is lost until the
process ends.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any

from ..errors import PublishTimeout
from ..queue.driver import Delivery, Driver
from ..queue.message import Message

DEFAULT_MAX_LENGTH = 1000


class _MemoryQueue:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.items: deque[Message] = deque()
        self.in_flight: dict[int, Message] = {}
        self.lock = threading.Lock()
        self.not_empty = threading.Condition(self.lock)
        self.not_full = threading.Condition(self.lock)


class MemoryDriver(Driver):
    kind = "queue.driver.memory"

    def __init__(self, entry_id: str):
        super().__init__(entry_id)
        self._queues: dict[str, _MemoryQueue] = {}
        self._tags = itertools.count(1)
        self._declare_lock = threading.Lock()

    def declare(self, name: str, options: dict[str, Any]) -> None:
        max_length = int(options.get("max_length") or DEFAULT_MAX_LENGTH)
        with self._declare_lock:
            q = self._queues.get(name)
            if q is None:
                self._queues[name] = _MemoryQueue(max_length)
            else:
                q.max_length = max_length

    def _queue(self, name: str) -> _MemoryQueue:
        try:
            return self._queues[name]
        except KeyError:
            raise KeyError(f"queue '{name}' is not declared on driver {self.entry_id}") from None

    def put(self, name: str, message: Message, timeout: float) -> None:
        q = self._queue(name)
        with q.lock:
            if len(q.items) >= q.max_length:
                deadline = time.monotonic() + timeout
                while len(q.items) >= q.max_length:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PublishTimeout(
                            f"queue '{name}' is full ({q.max_length} messages) and stayed full for {timeout:g}s")
                    q.not_full.wait(remaining)
            q.items.append(message)
            q.not_empty.notify()
        self.version += 1

    def get(self, name: str, max_count: int, timeout: float) -> list[Delivery]:
        q = self._queue(name)
        out: list[Delivery] = []
        with q.lock:
            if not q.items:
                q.not_empty.wait(timeout)
                if not q.items:
                    return out
            while q.items and len(out) < max_count:
                message = q.items.popleft()
                tag = next(self._tags)
                q.in_flight[tag] = message
                out.append(Delivery(name, message, tag))
            q.not_full.notify(len(out))
            if q.items:
                q.not_empty.notify()
        return out

    def ack(self, delivery: Delivery) -> bool:
        q = self._queue(delivery.queue)
        with q.lock:
            found = q.in_flight.pop(delivery.tag, None) is not None
        if found:
            self.version += 1
        return found

    def requeue(self, delivery: Delivery, message: Message) -> bool:
        q = self._queue(delivery.queue)
        with q.lock:
            if q.in_flight.pop(delivery.tag, None) is None:
                return False
            q.items.append(message)
            q.not_empty.notify()
        self.version += 1
        return True

    def release(self, delivery: Delivery) -> bool:
        q = self._queue(delivery.queue)
        with q.lock:
            message = q.in_flight.pop(delivery.tag, None)
            if message is None:
                return False
            q.items.appendleft(message)
            q.not_empty.notify()
        self.version += 1
        return True

    def stats(self, name: str) -> tuple[int, int]:
        q = self._queue(name)
        with q.lock:
            return len(q.items), len(q.in_flight)

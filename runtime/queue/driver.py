"""The driver interface (DESIGN convention 1): a small set of primitives per driver.

Contract, for every driver:

* Thread-safe: any method may be called from any thread.
* `declare(name, options)` is idempotent; it is called for every queue bound to the driver
  when the driver starts, before any other call names that queue.
* `put(name, message, timeout)` appends at the tail; it may block while the queue is full,
  up to `timeout` seconds, then raises PublishTimeout.
* `get(name, max_count, timeout)` blocks up to `timeout` for at least one message and
  returns up to `max_count` deliveries (an empty list on timeout). Each delivered message
  is *in flight* until settled by exactly one of the three calls below.
* `ack(delivery)` removes the message for good. `requeue(delivery, message)` puts
  `message` (the same message with its attempt count raised) at the tail, never blocking
  and never dropping, even above a length limit. `release(delivery)` returns the message
  unchanged to the head (prefetched but never started, or abandoned at shutdown).
  Each returns False, doing nothing, if the delivery is no longer in flight: a late ack
  from an abandoned handler is ignored.
* `stats(name)` returns (ready, in_flight). `close()` releases resources.

Drivers move encoded bytes and never import the Lua layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .message import Message


@dataclass(frozen=True)
class Delivery:
    """A message handed to a consumer, with the tag that settles it."""

    queue: str
    message: Message
    tag: int


class Driver:
    """Base class of queue drivers. Subclasses implement the primitives below."""

    kind = ""

    def __init__(self, entry_id: str):
        self.entry_id = entry_id
        # Grows on every put/ack/requeue/release: lets `App.idle()` see that something moved
        # between two looks. Increments may race; any race still leaves it changed.
        self.version = 0

    # -- primitives -------------------------------------------------------------------------
    def declare(self, name: str, options: dict[str, Any]) -> None:
        raise NotImplementedError

    def put(self, name: str, message: Message, timeout: float) -> None:
        raise NotImplementedError

    def get(self, name: str, max_count: int, timeout: float) -> list[Delivery]:
        raise NotImplementedError

    def ack(self, delivery: Delivery) -> bool:
        raise NotImplementedError

    def requeue(self, delivery: Delivery, message: Message) -> bool:
        raise NotImplementedError

    def release(self, delivery: Delivery) -> bool:
        raise NotImplementedError

    def stats(self, name: str) -> tuple[int, int]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the driver. The memory driver keeps its contents until dropped."""

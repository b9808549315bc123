"""What a worker runs for each delivery: the `Handler` protocol, and the Lua handler.

The consumer pool takes handlers through this small protocol, so its `run_once` step can
be driven in tests by a fake handler without Lua.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from ..lua.sandbox import ACK, BATCH_MAX, NACK, SETTLED, UNDECODABLE, LuaSandbox
from .codecs import Codec, JsonCodec
from .driver import Delivery

__all__ = ["ACK", "NACK", "SETTLED", "UNDECODABLE", "BATCH_MAX", "Outcome", "Handler", "BatchHandler", "LuaHandler"]


class Outcome(NamedTuple):
    """How a delivery went. status: ACK, NACK, SETTLED (the handler settled it itself) or
    UNDECODABLE; kind: the error kind of a failure (Timeout, Invalid, Internal...)."""

    status: int
    error: str | None = None
    traceback: str | None = None
    kind: str | None = None
    what: str | None = None  # what went wrong, for the log ("ran out of memory ...")


ACKED = Outcome(ACK)  # the common outcome, made once


class Handler(Protocol):
    def handle(self, delivery: Delivery, settle: Callable[[str], None]) -> Outcome:
        """Run on one delivery; `settle("ack"|"nack")` settles it early (msg:ack())."""
        ...

    def close(self) -> None: ...


class BatchHandler(Handler, Protocol):
    """A handler that can also run several buffered deliveries in one call (`batches` true)."""

    batches: bool

    def handle_batch(self, batch: Sequence[Delivery], start: int, settle: Callable[[str, Delivery], None],
                     timed: bool) -> tuple[int, Outcome | None, list[float] | None]:
        """Run batch[start:] in order, each message on its own (its time limit, its result),
        stopping at the first that is not a plain ack. Returns (k, outcome, durations):
        batch[start:k] were acked by their handler; `outcome` is that of batch[k] (None: the
        messages from k on did not start, because the worker is stopping or the batch ran
        long); `durations` (when `timed`) the handler times of the messages that ran.
        `settle(action, delivery)` settles one of the batch early (msg:ack())."""
        ...

    def running(self) -> int:
        """Index in the batch call running now of the message it runs (1-based; 0 before
        the first). Read from another thread (the pool's refill and stop)."""
        ...

    def ran_for(self) -> float:
        """Seconds the last handle_batch spent running its messages."""
        ...


class LuaHandler:
    """A `function.lua` entry loaded into one worker's own Lua state."""

    def __init__(self, make_sandbox: Callable[[], LuaSandbox], func: str, codec: Codec, timeout: float | None):
        self.make_sandbox = make_sandbox
        self.func = func
        self.codec = codec
        self.timeout = timeout
        self._json_body = isinstance(codec, JsonCodec)
        self._stopped = False
        self._ran_for = 0.0
        self.sandbox = self._new_sandbox()
        # Batches need the FFI control block (LuaJIT states without a memory limit) and a body
        # Lua decodes itself (JSON).
        self.batches = self.sandbox.batches and self._json_body

    def _new_sandbox(self) -> LuaSandbox:
        sandbox = self.make_sandbox()
        try:
            sandbox.ensure_loaded(self.func)
        except BaseException:
            sandbox.close()
            raise
        if self._stopped:
            sandbox.stop_batches()
        return sandbox

    def cancel(self) -> None:
        """Cut short what the running handler waits for (time.sleep, a full queue), and
        start no further message of a batch."""
        self._stopped = True
        self.sandbox.stop_batches()
        self.sandbox.bridge.cancel.set()

    def handle(self, delivery: Delivery, settle: Callable[..., None]) -> Outcome:
        sandbox = self.sandbox
        msg = delivery.message
        bridge = sandbox.bridge
        bridge.delivery = delivery
        bridge.settler = settle
        try:
            if self._json_body:
                result = sandbox.deliver(self.func, msg.body, None, False, delivery.attempt, self.timeout)
            else:
                try:
                    value = self.codec.decode(msg.body)
                except ValueError as exc:
                    return Outcome(UNDECODABLE, str(exc), None, "Invalid", "could not decode the message body")
                result = sandbox.deliver(self.func, msg.body, value, True, delivery.attempt, self.timeout)
        finally:
            bridge.settler = None
            bridge.delivery = None
        return self._outcome(*result)

    def handle_batch(self, batch: Sequence[Delivery], start: int, settle: Callable[[str, Delivery], None],
                     timed: bool) -> tuple[int, Outcome | None, list[float] | None]:
        sandbox = self.sandbox
        bridge = sandbox.bridge
        bridge.batch = batch
        bridge.offset = start
        bridge.settler = settle
        try:
            result = sandbox.deliver_batch(self.func, batch, start, self.timeout, timed)
        finally:
            bridge.settler = None
            bridge.batch = None
            self._ran_for = sandbox.ran_for()  # before a time limit may replace the state
        if result.__class__ is int:  # the hot path: every message of the call acked (or not started)
            return start + result, None, sandbox.durations(result) if timed else None
        k, status, error, tb, kind, *_ = result + (None,) * 4
        durations = sandbox.durations(k + 1) if timed else None  # read before the state may be replaced
        return start + k, self._outcome(status, error, tb, kind), durations

    def running(self) -> int:
        return self.sandbox.running()

    def ran_for(self) -> float:
        return self._ran_for

    def _outcome(self, status: int, error: str | None, tb: str | None, kind: str | None) -> Outcome:
        sandbox = self.sandbox
        if status == ACK:
            return ACKED
        if status == UNDECODABLE:
            return Outcome(UNDECODABLE, error, tb, "Invalid", "could not decode the message body")
        what = None
        if kind == "Memory":
            what = f"ran out of memory (memory_limit {sandbox.memory_limit} bytes)"
            self._replace_sandbox()  # after a memory error the state may stay full
        elif kind == "Timeout":
            self._replace_sandbox()  # stopped mid-way: its module state may be half-updated (or full)
        return Outcome(status, error, tb, kind or ("Internal" if status != SETTLED or error else None), what)

    def _replace_sandbox(self) -> None:
        old = self.sandbox
        self.sandbox = self._new_sandbox()
        old.close()

    def close(self) -> None:
        self.sandbox.close()


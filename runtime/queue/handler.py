"""What a worker runs for each delivery: the `Handler` protocol, and the Lua handler.

The consumer pool takes handlers through this small protocol, so its `run_once` step can
be driven in tests by a fake handler without Lua.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from ..lua.sandbox import ACK, NACK, SETTLED, UNDECODABLE, LuaSandbox
from .codecs import Codec, JsonCodec
from .driver import Delivery

__all__ = ["ACK", "NACK", "SETTLED", "UNDECODABLE", "Outcome", "Handler", "LuaHandler"]


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


class LuaHandler:
    """A `function.lua` entry loaded into one worker's own Lua state."""

    def __init__(self, make_sandbox: Callable[[], LuaSandbox], func: str, codec: Codec, timeout: float | None):
        self.make_sandbox = make_sandbox
        self.func = func
        self.codec = codec
        self.timeout = timeout
        self._json_body = isinstance(codec, JsonCodec)
        self.sandbox = self._new_sandbox()

    def _new_sandbox(self) -> LuaSandbox:
        sandbox = self.make_sandbox()
        try:
            sandbox.ensure_loaded(self.func)
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def cancel(self) -> None:
        """Cut short what the running handler waits for (time.sleep, a full queue)."""
        self.sandbox.bridge.cancel.set()

    def handle(self, delivery: Delivery, settle: Callable[[str], None]) -> Outcome:
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
        status, error, tb, kind = result
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


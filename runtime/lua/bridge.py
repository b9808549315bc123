"""The host side of the Lua modules: what `logger`, `queue` and `time` call into.

Every function handed to Lua goes through :func:`safe`, so no Python exception (an object
Lua could hold) ever crosses into a Lua state: failures come back as (None, kind, message).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import RuntimeHostError

LUA_LOGGER = "runtime.lua"
_log = logging.getLogger("runtime.lua.bridge")


class QueuePort(Protocol):
    """What the `queue` module needs from the host. Raise RuntimeHostError subclasses
    (their ``kind`` reaches Lua) for failures."""

    def publish(self, caller_id: str, queue_id: str, body: str, headers_json: str, security: Any = None,
                delay: Any = None, cancel: threading.Event | None = None) -> str: ...

    def codec_of(self, caller_id: str, queue_id: str) -> str: ...

    def info(self, caller_id: str, queue_id: str) -> dict[str, Any]: ...


def safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a bridge function so it returns (None, kind, message) instead of raising."""

    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeHostError as exc:
            return None, exc.kind, str(exc)
        except Exception as exc:  # noqa: BLE001 - must never reach Lua as an object
            _log.exception("internal error in a Lua module call")
            return None, "Internal", f"internal error: {type(exc).__name__}"

    wrapper.__name__ = fn.__name__
    return wrapper


class Bridge:
    """Host functions for one Lua state. `cancel` interrupts time.sleep on stop."""

    def __init__(self, queues: QueuePort, security: Any = None):
        self.queues = queues
        self.security = security  # the SecurityContext of the entry running in this state
        self.cancel = threading.Event()
        # Set by the worker around a handler call: settles a delivery ("ack"/"nack").
        self.settler: Callable[[str, Any], None] | None = None
        self.delivery: Any = None  # the Delivery being handled, for msg:headers()
        # Around a batch call instead: the batch, and where the call's first message is in it
        # (Lua names a message of the call by its 1-based index).
        self.batch: Any = None
        self.offset = 0

    def functions(self) -> dict[str, Callable[..., Any]]:
        return {name: safe(getattr(self, name))
                for name in ("log", "log_enabled", "publish", "queue_codec", "queue_info", "sleep", "now", "settle",
                                             "message_headers", "message_id", "monotonic")}

    # logger -----------------------------------------------------------------------------
    @staticmethod
    def log_enabled(level: int) -> bool:
        return logging.getLogger(LUA_LOGGER).isEnabledFor(int(level))

    @staticmethod
    def log(level: int, entry_id: str, name: str | None, src: str, line: int, msg: str,
            fields_json: str) -> None:
        # Named loggers share one Python logger: Lua must not be able to create Logger objects
        # without bound (logging keeps every one forever). The name shows in the record.
        logger = logging.getLogger(LUA_LOGGER)
        fields = json.loads(fields_json) if fields_json else {}
        if not isinstance(fields, dict):
            fields = {"fields": fields}
        record = logger.makeRecord(
            f"{LUA_LOGGER}.{name}" if name else LUA_LOGGER, int(level), src, int(line), msg, (), None, func=None,
            extra={"entry": entry_id, "lua_line": int(line), "lua_file": src, "fields": fields},
        )
        logger.handle(record)

    # queue -------------------------------------------------------------------------------
    def publish(self, caller_id: str, queue_id: str, body: str, headers_json: str, delay: Any = None) -> bool:
        # A publish waiting for room in a full queue gives up when the worker is stopping.
        self.queues.publish(caller_id, queue_id, body, headers_json, self.security, delay, self.cancel)
        return True

    def queue_codec(self, caller_id: str, queue_id: str) -> str:
        return self.queues.codec_of(caller_id, queue_id)

    def queue_info(self, caller_id: str, queue_id: str) -> str:
        return json.dumps(self.queues.info(caller_id, queue_id))

    def _delivery(self, index: Any) -> Any:
        """The delivery a Message object stands for: the single one, or one of the batch."""
        if index is None:
            d = self.delivery
        else:
            batch, i = self.batch, self.offset + int(index) - 1
            d = batch[i] if batch is not None and self.offset <= i < len(batch) else None
        if d is None:
            raise RuntimeHostError("no message")
        return d

    def settle(self, action: str, index: Any = None) -> bool:
        if self.settler is None:
            raise RuntimeHostError("no message to settle")
        self.settler(str(action), self._delivery(index))
        return True

    def message_id(self, index: Any = None) -> str:
        return str(self._delivery(index).message.id)

    def message_headers(self, index: Any = None) -> str:
        return json.dumps(self._delivery(index).message.headers, ensure_ascii=False)

    # time --------------------------------------------------------------------------------
    def sleep(self, seconds: float) -> Any:
        if self.cancel.wait(float(seconds)):
            return None, "Canceled", "time.sleep: canceled because the worker is stopping"
        return True

    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

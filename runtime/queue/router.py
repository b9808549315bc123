"""Queues bound to running drivers, and the routing of publishes and info requests.

`QueueRouter` is what Lua's `queue` module, `App.publish` and the CLI publish through: it
resolves queue IDs, validates headers, applies the queue's codec and hands bytes to the
driver. Permission checks for Lua callers happen here too (SPEC §3).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..drivers.catalog import driver_key
from ..errors import InvalidMessage, QueueNotFound, QueueUnavailable
from ..registry import QueueSpec, Registry, parse_duration
from .codecs import Codec, JsonCodec, get_codec
from .driver import Driver
from .message import HeaderValue, Message

PUBLISH_TIMEOUT = 30.0


@dataclass
class BoundQueue:
    """A `queue.queue` entry bound to its started driver."""

    spec: QueueSpec
    driver: Driver
    codec: Codec
    consumers: int = 0
    accepting: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.spec.queue_name

    def put(self, message: Message, timeout: float, cancel: threading.Event | None = None,
            delay: float = 0.0, force: bool = False) -> None:
        if not self.accepting:
            raise QueueUnavailable(f"queue '{self.spec.id}' is stopped")
        self.driver.publish(self.name, (message,), timeout, cancel, delay=delay, force=force)

    def info(self) -> dict[str, Any]:
        st = self.driver.stats(self.name)
        count = st.ready + st.in_flight if st.ready is not None and st.in_flight is not None else None
        return {"ready": st.ready, "in_flight": st.in_flight, "delayed": st.delayed, "message_count": count,
                "consumer_count": self.consumers}

    def empty(self) -> bool:
        """Nothing ready, in flight or waiting for a delay (as the driver counts)."""
        st = self.driver.stats(self.name)
        return not st.ready and not st.in_flight and not st.delayed


def check_headers(headers: dict[str, Any] | None) -> dict[str, HeaderValue]:
    """Headers from Python, by the rules Lua's queue.publish applies: string names, finite
    scalar values, valid Unicode, no reserved `x_` names (in any case)."""
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise InvalidMessage(f"headers must be a dict (got {type(headers).__name__})")
    out: dict[str, HeaderValue] = {}
    for key, value in headers.items():
        if not isinstance(key, str):
            raise InvalidMessage(f"header names must be strings (got {type(key).__name__})")
        if not _valid_text(key):
            raise InvalidMessage(f"header name {key!r} is not valid Unicode")
        if key[:2].lower() == "x_":  # X_attempts too: drivers and readers may not tell them apart
            raise InvalidMessage(f"header '{key}' is reserved: names starting with 'x_' belong to the runtime")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidMessage(f"header '{key}' must be a finite number")
        if not isinstance(value, (str, int, float, bool)) or (isinstance(value, str) and not _valid_text(value)):
            raise InvalidMessage(f"header '{key}' must be a string, number or boolean")
        out[key] = value
    return out


MAX_SAFE_INTEGER = 2**53
# 2^53 has 16 digits; every smaller integer has fewer. Digits map to "0", the rest to "x":
# two C passes over the encoded body, much cheaper than a regex or a walk of the value.
_DIGITS_AS_ZERO = bytes(48 if 48 <= i <= 57 else 120 for i in range(256))
_SIXTEEN_DIGITS = b"0" * 16


def check_travels(data: Any) -> None:
    """Refuse a body a handler could not receive unchanged: integers beyond ±2^53 (Lua
    numbers are doubles: they would be rounded) and NaN or infinities. What can travel
    (-0.0, big floats, deep values within the codec's limits) is kept as it is."""
    stack = [data]
    seen = 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > 10_000_000:
            return  # the codec refuses what is too large; this is not a size check
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, int):
            if not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
                raise InvalidMessage(f"integer {v} cannot travel unchanged: Lua numbers are exact only up to 2^53")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise InvalidMessage(f"cannot send {v} (NaN and infinities have no JSON form)")
        elif isinstance(v, dict):
            stack.extend(v.values())
            stack.extend(k for k in v if isinstance(k, (int, float)) and not isinstance(k, bool))
        elif isinstance(v, (list, tuple)):
            if len(stack) > 10_000_000:
                return
            stack.extend(v)


def _valid_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class QueueRouter:
    """Resolves queue IDs to bound queues; the host side of `queue.publish`/`queue.info`."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.queues: dict[str, BoundQueue] = {}
        self.publish_timeout = PUBLISH_TIMEOUT
        # (queue ID as given, namespace or Lua caller ID) -> its bound queue, for the per-message
        # path; an entry counts only while the registry and the binding are the ones it was made with.
        self._resolved: dict[tuple[str, str | None], tuple[Registry, BoundQueue]] = {}
        # Set by the app: (security context, caller ID, queue ID); raises PermissionDenied
        # when a Lua caller may not publish there (SPEC §3).
        self.authorize: Callable[[Any, str, str], None] | None = None

    def bind(self, spec: QueueSpec, driver: Driver) -> BoundQueue:
        options = dict(spec.driver_options.get(driver_key(driver.kind), {}) or {})
        options["codec"] = spec.codec  # drivers that label messages (AMQP content type) read it
        driver.declare(spec.queue_name, options)
        bound = BoundQueue(spec, driver, get_codec(spec.codec))
        self.queues[spec.id] = bound
        return bound

    def spec(self, queue_id: str, namespace: str | None = None) -> QueueSpec:
        full = self.registry.resolve(queue_id, namespace)
        spec = self.registry.get(full, QueueSpec)
        if spec is None:
            raise QueueNotFound(f"queue '{queue_id}' not found")
        return spec

    def bound(self, queue_id: str, namespace: str | None = None) -> BoundQueue:
        bound = self._cached((queue_id, namespace))
        if bound is None:
            bound = self._bound(queue_id, namespace)
            self._remember((queue_id, namespace), bound)
        return bound

    def _cached(self, key: tuple[str, str | None]) -> BoundQueue | None:
        hit = self._resolved.get(key)
        if hit is not None and hit[0] is self.registry and self.queues.get(hit[1].spec.id) is hit[1]:
            return hit[1]
        return None

    def _remember(self, key: tuple[str, str | None], bound: BoundQueue) -> None:
        if len(self._resolved) > 10_000:
            self._resolved.clear()  # names from Lua are not bounded: neither is this, otherwise
        self._resolved[key] = (self.registry, bound)

    def _bound(self, queue_id: str, namespace: str | None) -> BoundQueue:
        spec = self.spec(queue_id, namespace)
        bound = self.queues.get(spec.id)
        if bound is None:
            raise QueueUnavailable(f"queue '{spec.id}' is not running (its driver '{spec.driver}' is not started)")
        return bound

    # -- from Python (App.publish, CLI) ------------------------------------------------------
    def publish_value(self, queue_id: str, data: Any, headers: dict[str, Any] | None = None,
                      delay: float | str | None = None) -> str:
        bound = self.bound(queue_id)
        body = bound.codec.encode(data)
        # JSON text without a run of 16 digits holds no integer beyond 2^53 (and the codec
        # refused NaN and infinities): the full check runs only when one might be there.
        if not isinstance(bound.codec, JsonCodec) or _SIXTEEN_DIGITS in body.translate(_DIGITS_AS_ZERO):
            check_travels(data)
        message = Message.new(body, check_headers(headers))
        bound.put(message, self.publish_timeout, delay=check_delay(delay))
        return message.id

    # -- from Lua (QueuePort) ---------------------------------------------------------------
    def codec_of(self, caller_id: str, queue_id: str) -> str:
        """The codec name of a queue, so Lua encodes the body itself (byte for byte)."""
        return get_codec(self.spec(queue_id, caller_id.split(":", 1)[0]).codec).name

    def publish(self, caller_id: str, queue_id: str, body: str, headers_json: str, security: Any = None,
                delay: Any = None, cancel: threading.Event | None = None) -> str:
        """`body` is the queue codec's encoding made in Lua; for binary codecs its bytes come
        as the code points 0-255 of a str (lupa hands Lua strings over as UTF-8 text)."""
        bound = self._cached((queue_id, caller_id))  # no split of the caller ID per message
        if bound is None:
            bound = self.bound(queue_id, caller_id.split(":", 1)[0])
            self._remember((queue_id, caller_id), bound)
        if self.authorize is not None:
            self.authorize(security, caller_id, bound.spec.id)
        message = Message.new(bound.codec.from_lua(body), json.loads(headers_json) if headers_json else None)
        bound.put(message, self.publish_timeout, cancel, delay=check_delay(delay))
        return message.id

    def info(self, caller_id: str, queue_id: str) -> dict[str, Any]:
        return self.bound(queue_id, caller_id.split(":", 1)[0]).info()


def check_delay(delay: Any) -> float:
    """A publish delay (seconds or a duration string like "5s") as float seconds."""
    if delay is None:
        return 0.0
    try:
        seconds = parse_duration(delay)
    except ValueError as exc:
        raise InvalidMessage(f"delay: {exc}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidMessage("delay must be a finite duration of 0 or more")
    return seconds

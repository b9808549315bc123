"""How runtime messages map to AMQP messages and back (SPEC §7.3, Wippy's header mapping).

Publishing: `correlation_id`, `reply_to`, `message_type`, `content_type`, `encoding` and
`timestamp` become message properties; `amqp.priority`, `amqp.expiration`, `amqp.x_delay`,
`amqp.content_encoding`, `amqp.delivery_mode` and `amqp.mandatory` take their AMQP meaning;
every other header goes into the headers table. The message id is the `message_id` property.
A few private headers (`x-runtime-*`) make the round trip exact: which headers were mapped
to properties (so broker-stamped properties do not appear as headers), the timestamp's
fractional seconds, and the attempt number a retried message carries.

Receiving a message published by another client (no `x-runtime-props`): its properties map
back as Wippy maps them, table headers verbatim, values made scalar.
"""

from __future__ import annotations

import math
from typing import Any

import pika

from ..queue.message import Message, new_id

CONTENT_TYPES = {"json/plain": "application/json", "application/msgpack": "application/msgpack"}
PROPS = "x-runtime-props"  # the neutral / amqp.* headers that were mapped to properties
TS = "x-runtime-ts"  # the exact timestamp when it is not a whole second
ATTEMPT = "x-runtime-attempt"  # the attempt number of a republished (retried) message
FLOATS = "x-runtime-floats"  # table headers that were floats (AMQP tables as pika writes them have none)
DELIVERY_COUNT = "x-delivery-count"  # quorum queues: returns counted by the broker
BROKER_HEADERS = {"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                  "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", DELIVERY_COUNT}
PRIVATE = {PROPS, TS, ATTEMPT, FLOATS}


def to_amqp(m: Message, content_type: str, attempt: int = 1, expiration: str | None = None,
            keep_expiration: bool = True) -> tuple[Any, bool]:
    """(pika BasicProperties, mandatory) for a message."""
    table: dict[str, Any] = {}
    mapped: list[str] = []
    kw: dict[str, Any] = {"message_id": m.id, "content_type": content_type, "delivery_mode": 2}
    mandatory = True  # stronger than Wippy: an unroutable publish is an error, not a silent loss
    for key, value in m.headers.items():
        if key == "correlation_id":
            kw["correlation_id"] = str(value)
        elif key == "reply_to":
            kw["reply_to"] = str(value)
        elif key == "message_type":
            kw["type"] = str(value)
        elif key == "content_type":
            kw["content_type"] = str(value)
        elif key in ("encoding", "amqp.content_encoding"):
            kw["content_encoding"] = str(value)
        elif key == "timestamp":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                kw["timestamp"] = int(value)
                if isinstance(value, float):
                    table[TS] = repr(float(value))
            else:
                table[key] = value
                continue
        elif key == "amqp.priority":
            n = _small_int(value)
            if n is None:
                table[key] = value
                continue
            kw["priority"] = n
        elif key == "amqp.delivery_mode":
            n = _small_int(value)
            if n not in (1, 2):
                table[key] = value
                continue
            kw["delivery_mode"] = n
        elif key == "amqp.expiration":
            if keep_expiration:
                kw["expiration"] = str(value)
        elif key == "amqp.x_delay":
            try:
                table["x-delay"] = int(value)
            except (TypeError, ValueError):
                table[key] = value
                continue
        elif key == "amqp.mandatory":
            mandatory = value is True or str(value).lower() in ("true", "1")
        else:
            table[key] = value
            continue
        mapped.append(key)
    if expiration is not None and "expiration" not in kw:
        kw["expiration"] = expiration
    floats = [k for k, v in table.items() if isinstance(v, float)]
    for k in floats:
        table[k] = repr(table[k])
    if floats:
        table[FLOATS] = ",".join(floats)
    table[PROPS] = ",".join(mapped)
    if attempt != 1:
        table[ATTEMPT] = attempt
    kw["headers"] = table
    return pika.BasicProperties(**kw), mandatory


def from_amqp(props: Any, body: bytes) -> tuple[Message, int]:
    """(Message, the attempt number it carries) from a received message."""
    table = dict(props.headers or {})
    attempt = _int(table.get(ATTEMPT), 1)
    mapped_text = table.get(PROPS)
    headers: dict[str, Any] = {}
    if mapped_text is not None:
        for key in str(_scalar(mapped_text)).split(","):
            if key:
                value = _property(props, key, table)
                if value is not None:
                    headers[key] = value
    else:  # another client's message: as Wippy maps it
        for key in ("correlation_id", "reply_to", "content_type", "encoding", "message_type", "timestamp"):
            value = _property(props, key, table)
            if value is not None:
                headers[key] = value
        headers["amqp.priority"] = int(props.priority or 0)
        headers["amqp.delivery_mode"] = int(props.delivery_mode or 1)
        if props.expiration:
            headers["amqp.expiration"] = str(props.expiration)
    floats = set(str(_scalar(table.get(FLOATS) or "")).split(","))
    for key, value in table.items():
        if key in PRIVATE or key in BROKER_HEADERS:
            continue
        if key in floats:
            try:
                headers[key] = float(_scalar(value))
                continue
            except ValueError:
                pass
        if key == "x-delay" and "amqp.x_delay" in headers:
            continue
        headers[key] = _scalar(value)
    return Message(body, headers, props.message_id or new_id()), attempt


def _property(props: Any, key: str, table: dict[str, Any]) -> Any:
    if key == "correlation_id":
        return props.correlation_id
    if key == "reply_to":
        return props.reply_to
    if key == "message_type":
        return props.type
    if key == "content_type":
        return props.content_type
    if key in ("encoding", "amqp.content_encoding"):
        return props.content_encoding
    if key == "timestamp":
        if TS in table:
            return float(table[TS])
        return int(props.timestamp) if props.timestamp is not None else None
    if key == "amqp.priority":
        return int(props.priority) if props.priority is not None else None
    if key == "amqp.delivery_mode":
        return int(props.delivery_mode) if props.delivery_mode is not None else None
    if key == "amqp.expiration":
        return props.expiration
    if key == "amqp.x_delay":
        value = table.get("x-delay")
        return int(value) if value is not None else None
    if key == "amqp.mandatory":
        return True
    return None


def _scalar(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _small_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if 0 <= n <= 255 else None

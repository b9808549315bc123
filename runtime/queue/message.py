"""A queue message: encoded body bytes plus id, headers and attempt count."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, NamedTuple

HeaderValue = str | int | float | bool


_ids = threading.local()
_ID_BATCH = 256  # ids per call to os.urandom


def new_id() -> str:
    """A random (version 4) UUID as text; random bytes are taken from the OS 256 ids at a
    time (per thread), so an id costs a fraction of str(uuid.uuid4())."""
    try:
        h = _ids.pool.pop()
    except (AttributeError, IndexError):
        raw = os.urandom(16 * _ID_BATCH).hex()
        _ids.pool = [raw[i:i + 32] for i in range(0, len(raw), 32)]
        h = _ids.pool.pop()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# The variant bits (10xx) set on the first hex digit of the fourth group.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


class _Fields(NamedTuple):
    body: bytes
    headers: dict[str, HeaderValue]
    id: str


class Message(_Fields):
    """One message as drivers store it. `body` is already encoded by the queue's codec.

    `id` is kept across redeliveries. The attempt number is the driver's, on the Delivery.
    Immutable, and a named tuple rather than a dataclass: one is made per message, and a
    frozen dataclass costs several times as much to make."""

    __slots__ = ()

    def __new__(cls, body: bytes, headers: dict[str, HeaderValue] | None = None,
                id: str | None = None) -> Message:  # noqa: A002 - the field's name
        return tuple.__new__(cls, (body, {} if headers is None else headers, new_id() if id is None else id))

    @classmethod
    def new(cls, body: bytes, headers: dict[str, HeaderValue] | None = None) -> Message:
        all_headers: dict[str, Any] = {"timestamp": time.time()}
        if headers:
            all_headers.update(headers)
        return tuple.__new__(cls, (body, all_headers, new_id()))

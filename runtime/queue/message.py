"""A queue message: encoded body bytes plus id, headers and attempt count."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

HeaderValue = str | int | float | bool


def new_id() -> str:
    """A random (version 4) UUID as text; about 4x cheaper than str(uuid.uuid4())."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class Message:
    """One message as drivers store it. `body` is already encoded by the queue's codec.

    `id` is kept across redeliveries. The attempt number is the driver's, on the Delivery."""

    body: bytes
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    id: str = field(default_factory=new_id)

    @classmethod
    def new(cls, body: bytes, headers: dict[str, HeaderValue] | None = None) -> Message:
        all_headers: dict[str, Any] = {"timestamp": time.time()}
        if headers:
            all_headers.update(headers)
        return cls(body, all_headers, new_id())

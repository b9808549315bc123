"""A queue message: encoded body bytes plus id, headers and attempt count."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

HeaderValue = str | int | float | bool


@dataclass(frozen=True)
class Message:
    """One message as drivers store it. `body` is already encoded by the queue's codec.

    `id` is kept across redeliveries; `attempt` is 1 on first delivery and grows by one with
    every nack."""

    body: bytes
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    attempt: int = 1

    @classmethod
    def new(cls, body: bytes, headers: dict[str, HeaderValue] | None = None) -> Message:
        all_headers: dict[str, Any] = dict(headers or {})
        all_headers.setdefault("timestamp", time.time())
        return cls(body=body, headers=all_headers)

    def retried(self) -> Message:
        """The same message for its next delivery attempt."""
        return replace(self, attempt=self.attempt + 1)

"""The table of driver kinds: where each driver class lives and the options it takes.

Pure data, imported by the registry (to check definitions) and by the lifecycle (to build
drivers): nothing here imports an engine client. Adding a driver touches this table and its
own module, nothing in `registry/` or `lifecycle/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One option field. `type`: int, duration, text, bool, choice, mapping, list, any."""

    type: str
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False  # never shown in logs, errors or output
    help: str = ""


@dataclass(frozen=True)
class DriverKind:
    path: str  # "module:Class", imported when a driver of this kind is built
    extra: str | None = None  # the pip extra holding its client library
    fields: dict[str, Option] = field(default_factory=dict)  # on the driver entry
    queue_options: dict[str, Option] = field(default_factory=dict)  # queue driver_options.<key>
    consumer_options: dict[str, Option] = field(default_factory=dict)  # consumer driver_options.<key>


DRIVER_KINDS: dict[str, DriverKind] = {
    "queue.driver.memory": DriverKind(
        "runtime.drivers.memory:MemoryDriver",
        queue_options={"max_length": Option("int", 1000, minimum=0, help="0 means the default, 1000")},
    ),
    "queue.driver.sqlite": DriverKind(
        "runtime.drivers.sqlite:SqliteDriver",
        fields={
            "path": Option("text", ".runtime/queues.sqlite3"),
            "synchronous": Option("choice", "full", choices=("full", "normal")),
            "visibility_timeout": Option("duration", 30.0, minimum=0.1),
            "poll_interval": Option("duration", 0.1, minimum=0.001),
            "busy_timeout": Option("duration", 5.0, minimum=0.0),
        },
        queue_options={"max_length": Option("int", 0, minimum=0, help="0 means unbounded")},
    ),
    "queue.driver.redis": DriverKind(
        "runtime.drivers.redis:RedisDriver",
        extra="redis",
        fields={
            "url": Option("text", None, help="redis://[user:password@]host:port/db, rediss:// for TLS"),
            "addrs": Option("list", None, help="Wippy's list of host:port (one server)"),
            "username": Option("text", None),
            "password": Option("text", None, secret=True),
            "db": Option("int", 0, minimum=0),
            "client_name": Option("text", None),
            "pool_size": Option("int", 0, minimum=0, help="0 means 32 connections"),
            "dial_timeout": Option("duration", 5.0, minimum=0.001),
            "read_timeout": Option("duration", 3.0, minimum=0.01),
            "write_timeout": Option("duration", 3.0, minimum=0.01),
            "tls": Option("mapping", None, help="enabled, server_name, cert, key, ca, insecure_skip_verify"),
            "claim_interval": Option("duration", 30.0, minimum=0.01),
            "claim_min_idle": Option("duration", 60.0, minimum=0.01),
            "group": Option("text", "runtime"),
            "key_prefix": Option("text", "runtime:"),
        },
        queue_options={"max_length": Option("int", 0, minimum=0, help="0 means unbounded")},
    ),
}


def driver_key(kind: str) -> str:
    """The `driver_options` key of a driver kind (`queue.driver.sqlite` -> `sqlite`)."""
    return kind.rsplit(".", 1)[-1]

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
    """One option field. `type`: int, duration, text, bool, choice, mapping, list, any, url
    (`choices` are the allowed schemes; a problem shows it with the password masked), pem (PEM
    text, or a file that must exist, relative to the definition file) and env (the name of an
    environment variable that must be set). A mapping with `fields` is checked by that schema."""

    type: str
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False  # never shown in logs, errors or output
    help: str = ""
    fields: dict[str, Option] | None = None  # the schema of a nested mapping


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
    "queue.driver.amqp": DriverKind(
        "runtime.drivers.amqp:AmqpDriver",
        extra="amqp",
        fields={
            "url": Option("url", "amqp://guest:guest@localhost:5672/", choices=("amqp", "amqps"), secret=True),
            "vhost": Option("text"),
            "connection_name": Option("text"),
            "auth_mechanism": Option("choice", "PLAIN", choices=("PLAIN", "EXTERNAL", "AMQPLAIN")),
            "heartbeat": Option("duration", minimum=0.0),
            "connection_timeout": Option("duration", minimum=0.0),
            "reconnect_delay": Option("duration", 1.0, minimum=0.0),
            "reconnect_max_delay": Option("duration", 30.0, minimum=0.0),
            "default_message_ttl": Option("duration", minimum=0.0),
            "default_queue_ttl": Option("duration", minimum=0.0),
            "default_queue_expiry": Option("duration", minimum=0.0),
            "prefetch_count": Option("int", 0, minimum=0, maximum=65535),
            "frame_size": Option("int", 0, minimum=0),
            "channel_max": Option("int", 0, minimum=0, maximum=65535),
            "tls": Option("mapping", fields={
                "enabled": Option("bool", False),
                "server_name": Option("text"),
                "cert": Option("pem"),
                "key": Option("pem", secret=True),
                "ca": Option("pem"),
                "cert_env": Option("env"),
                "key_env": Option("env"),
                "ca_env": Option("env"),
                "insecure_skip_verify": Option("bool", False),
            }),
        },
        queue_options={
            "durable": Option("bool", True),
            "auto_delete": Option("bool", False),
            "message_ttl": Option("duration", minimum=0.0),
            "queue_expiry": Option("duration", minimum=0.0),
            "max_length": Option("int", 0, minimum=0, help="0 means unbounded; a full queue refuses publishes"),
            "queue_type": Option("choice", "classic", choices=("classic", "quorum")),
        },
        consumer_options={
            "exclusive": Option("bool", False),
            "no_local": Option("bool", False),
            "no_wait": Option("bool", False),
            "consumer_tag": Option("text"),
        },
    ),
}


def driver_key(kind: str) -> str:
    """The `driver_options` key of a driver kind (`queue.driver.sqlite` -> `sqlite`)."""
    return kind.rsplit(".", 1)[-1]

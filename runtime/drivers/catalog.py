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
    text, or a file that must exist, relative to the definition file), env (the name of an
    environment variable that must be set; a Wippy env registry ID `ns:NAME` names NAME) and
    ref (the ID of another entry, of a kind in `choices`: the registry puts that entry's
    options in its place once every file is read). A mapping with `fields` is checked by that
    schema."""

    type: str
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False  # never shown in logs, errors or output
    help: str = ""
    fields: dict[str, Option] | None = None  # the schema of a nested mapping
    required: bool = False  # a problem when absent


@dataclass(frozen=True)
class DriverKind:
    path: str  # "module:Class", imported when a driver of this kind is built
    extra: str | None = None  # the pip extra holding its client library
    fields: dict[str, Option] = field(default_factory=dict)  # on the driver entry
    queue_options: dict[str, Option] = field(default_factory=dict)  # queue driver_options.<key>
    consumer_options: dict[str, Option] = field(default_factory=dict)  # consumer driver_options.<key>


@dataclass(frozen=True)
class ConfigKind:
    """A `config.*` entry kind: settings that drivers share by reference (a `ref` option)."""

    fields: dict[str, Option]
    one_of: tuple[tuple[str, ...], ...] = ()  # groups of fields of which at least one must be given


CONFIG_KINDS: dict[str, ConfigKind] = {
    # Wippy's AWS settings, shared by queue.driver.sqs (and, in Wippy, cloudstorage.s3). Values may
    # be `${env:NAME}`; the older `*_env` fields name a variable instead (Wippy deprecates them).
    "config.aws": ConfigKind(
        fields={
            "region": Option("text"),
            "access_key_id": Option("text", secret=True),
            "secret_access_key": Option("text", secret=True),
            "session_token": Option("text", secret=True),
            "region_env": Option("env"),
            "access_key_id_env": Option("env"),
            "secret_access_key_env": Option("env"),
            "session_token_env": Option("env"),
        },
        one_of=(("region", "region_env"),),
    ),
}


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
    "queue.driver.sqs": DriverKind(
        "runtime.drivers.sqs:SqsDriver",
        extra="sqs",
        fields={
            "config": Option("ref", choices=("config.aws",), required=True, help="a config.aws entry"),
            "endpoint": Option("url", None, choices=("http", "https"), help="e.g. a local endpoint"),
            "message_retention_period": Option("int", 0, minimum=0, maximum=1209600,
                                               help="seconds, 60..1209600; 0 means the AWS default (4 days)"),
            "default_delay_seconds": Option("int", 0, minimum=0, maximum=900),
            "disable_message_checksum_validation": Option("bool", False),
            "use_fips": Option("bool", False),
            "use_dual_stack": Option("bool", False),
        },
        queue_options={
            "default_visibility_timeout": Option("duration", None, minimum=0.0, maximum=43200.0,
                                                 help="whole seconds; unset keeps the queue's (30s on a new one)"),
        },
        consumer_options={
            "visibility_timeout": Option("duration", None, minimum=0.0, maximum=43200.0,
                                         help="whole seconds; unset means the queue's"),
            "wait_time": Option("duration", 20.0, minimum=0.0, maximum=20.0, help="long polling, whole seconds"),
        },
    ),
}


def driver_key(kind: str) -> str:
    """The `driver_options` key of a driver kind (`queue.driver.sqlite` -> `sqlite`)."""
    return kind.rsplit(".", 1)[-1]

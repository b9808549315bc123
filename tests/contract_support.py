"""Shared pieces of the driver contract suite (tests/test_contract_*.py).

Every driver plugs in with one `DriverFactory` in FACTORIES. A factory for an engine on a
server names the engine; `engine_gate` skips its tests on a laptop without the server and
fails them under CI=true (DESIGN convention 6). Queue names are unique per test and every
queue a test declares is purged afterwards, so a persistent broker collects no leftovers.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runtime.drivers.amqp import AmqpDriver
from runtime.drivers.memory import MemoryDriver
from runtime.drivers.redis import RedisDriver
from runtime.drivers.sqlite import SqliteDriver

try:
    from runtime.drivers.sqs import SqsDriver
except ImportError:  # no boto3: the sqs factory's gate says so
    SqsDriver = None  # type: ignore[assignment,misc]
from runtime.queue.driver import Delivery, Driver, DriverConsumer
from runtime.queue.message import Message

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BLOCK_CHECK = 0.05  # seconds a blocked call is given to (wrongly) return before we act


@dataclass(frozen=True)
class DriverFactory:
    """How to build one driver under test and how to ask it for a bounded queue."""

    name: str
    make: Callable[[Path], Driver]
    bounded: Callable[[int], dict[str, Any]]  # queue options limiting the ready count to n
    unbounded: dict[str, Any] = field(default_factory=dict)
    engine: tuple[str, int] | None = None  # (host, port) of the server it needs, if any
    gate: Callable[[], None] | None = None  # skips (or fails under CI) when the driver cannot run here
    load: int = 1500  # messages per producer in the load test, a multiple of 50 (a slow test double gets fewer)


def _sqlite(tmp: Path) -> Driver:
    return SqliteDriver("test:sqlite", {"path": str(tmp / "queues.sqlite3"), "synchronous": "normal",
                                        "visibility_timeout": 30.0, "poll_interval": 0.05, "busy_timeout": 5.0})


def _redis(tmp: Path) -> Driver:
    # The machine's shared server: a key prefix of its own per harness, its keys deleted by close().
    return RedisDriver("test:redis", {"url": "redis://127.0.0.1:6379/0", "key_prefix": f"test:{uuid.uuid4().hex}:",
                                      "claim_interval": 1.0, "claim_min_idle": 5.0})


def _sqs(tmp: Path) -> Driver:
    import sqs_support  # a local endpoint: moto's server, shared by the session

    return SqsDriver("test:sqs", sqs_support.driver_options())


def _sqs_gate() -> None:
    import sqs_support

    sqs_support.sqs_gate()


FACTORIES = [
    DriverFactory("memory", lambda tmp: MemoryDriver("test:memory"), lambda n: {"max_length": n}),
    DriverFactory("sqlite", _sqlite, lambda n: {"max_length": n}),
    DriverFactory("redis", _redis, lambda n: {"max_length": n}, engine=("127.0.0.1", 6379)),
    DriverFactory("amqp", lambda tmp: AmqpDriver("test:amqp", {"url": AMQP_URL, "reconnect_delay": 0.2}),
                  lambda n: {"max_length": n, "queue_expiry": 600.0}, {"queue_expiry": 600.0},
                  engine=("127.0.0.1", 5672)),
    # moto's server takes a few ms per message (it is a test double): a smaller load test.
    DriverFactory("sqs", _sqs, lambda n: {}, gate=_sqs_gate, load=50),
]
CLASSES = {"memory": MemoryDriver, "sqlite": SqliteDriver, "redis": RedisDriver, "amqp": AmqpDriver,
           "sqs": SqsDriver}


def factories_with(capability: str) -> list[DriverFactory]:
    return [f for f in FACTORIES if CLASSES[f.name] is not None and getattr(CLASSES[f.name].capabilities, capability)]


def engine_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def engine_gate(factory: DriverFactory) -> None:
    """Skip without the factory's engine on a laptop; fail under CI=true."""
    if factory.gate is not None:
        factory.gate()
    if factory.engine is None:
        return
    host, port = factory.engine
    if not engine_reachable(host, port):
        message = f"{factory.name}: no server at {host}:{port}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI=true: engine tests must run)")
        pytest.skip(message)


class Harness:
    """A driver under test, with unique queue names and one consumer per queue by default."""

    def __init__(self, factory: DriverFactory, tmp: Path):
        self.factory = factory
        self.driver = factory.make(tmp)
        self.driver.open()
        self.declared: list[str] = []
        self.consumers: list[DriverConsumer] = []
        self._default: dict[str, DriverConsumer] = {}

    def queue(self, bounded: int | None = None) -> str:
        name = f"t{uuid.uuid4().hex[:12]}"
        options = self.factory.bounded(bounded) if bounded is not None else dict(self.factory.unbounded)
        self.driver.declare(name, options)
        self.declared.append(name)
        return name

    def consumer(self, queue: str, prefetch: int = 100) -> DriverConsumer:
        c = self.driver.consume(queue, f"test:{len(self.consumers)}", prefetch)
        self.consumers.append(c)
        return c

    def c(self, queue: str) -> DriverConsumer:
        """The default consumer of a queue."""
        if queue not in self._default:
            self._default[queue] = self.consumer(queue)
        return self._default[queue]

    def put(self, queue: str, *messages: Message, timeout: float = 1.0, **kw: Any) -> None:
        self.driver.publish(queue, list(messages), timeout, **kw)

    def get(self, queue: str, n: int = 10, wait: float = 1.0) -> list[Delivery]:
        return self.c(queue).fetch(n, wait)

    def one(self, queue: str) -> Delivery:
        got = self.get(queue, 1, 2.0)
        assert len(got) == 1, f"expected one delivery from {queue}, got {got}"
        return got[0]

    def counts(self, queue: str) -> tuple[int | None, int | None]:
        st = self.driver.stats(queue)
        return st.ready, st.in_flight

    def close(self) -> None:
        for c in self.consumers:
            c.close()
        for name in self.declared:
            self.driver.purge(name)
            drop = getattr(self.driver, "delete_queue", None)  # a server keeps queues: delete them
            if drop is not None:
                drop(name)
        self.driver.close()


@pytest.fixture
def harness_of(tmp_path: Path) -> Iterator[Callable[[DriverFactory], Harness]]:
    made: list[Harness] = []

    def make(factory: DriverFactory) -> Harness:
        engine_gate(factory)
        folder = tmp_path / f"h{len(made)}"
        folder.mkdir(exist_ok=True)
        h = Harness(factory, folder)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def harness_fixture(factories: list[DriverFactory]) -> Any:
    """The `h` fixture of a contract module: a Harness for each factory in `factories`."""

    @pytest.fixture(params=factories, ids=[f.name for f in factories])
    def h(request: pytest.FixtureRequest, harness_of: Callable[[DriverFactory], Harness]) -> Harness:
        return harness_of(request.param)

    return h


def msg(n: int | str, **headers: Any) -> Message:
    return Message(body=f'{{"n":"{n}"}}'.encode(), headers={"timestamp": 1.0, **headers}, id=str(n))


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.message.id for d in deliveries]


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, threading.Event, list[Any]]:
    """Run fn in a thread; returns (thread, started, outcome) where outcome gets
    ("ok", value) or ("error", exc)."""
    started = threading.Event()
    outcome: list[Any] = []

    def body() -> None:
        started.set()
        try:
            outcome.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(("error", exc))

    t = threading.Thread(target=body, daemon=True)
    t.start()
    assert started.wait(5)
    return t, started, outcome

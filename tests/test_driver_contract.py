"""Contract tests for the queue Driver interface (runtime/queue/driver.py).

Every driver must pass this suite. Today that is MemoryDriver; a later driver (redis, amqp,
sqlite ...) plugs in by adding a `DriverFactory` to `FACTORIES` (and skipping when its broker
is not reachable, DESIGN convention 6). Nothing here sleeps to wait: blocking calls are
observed through threads and events, and every wait is bounded.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runtime.drivers.memory import MemoryDriver
from runtime.errors import PublishTimeout
from runtime.queue.driver import Delivery, Driver
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(30)

BLOCK_CHECK = 0.05  # seconds a blocked call is given to (wrongly) return before we act


@dataclass(frozen=True)
class DriverFactory:
    """How to build one driver under test and how to ask it for a bounded queue."""

    name: str
    make: Callable[[], Driver]
    bounded: Callable[[int], dict[str, Any]]  # queue options limiting the ready count to n
    unbounded: dict[str, Any] = field(default_factory=dict)


FACTORIES = [
    DriverFactory("memory", lambda: MemoryDriver("test:memory"), lambda n: {"max_length": n}),
]


@pytest.fixture(params=FACTORIES, ids=[f.name for f in FACTORIES])
def driver_factory(request: pytest.FixtureRequest) -> DriverFactory:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def driver(driver_factory: DriverFactory) -> Iterator[Driver]:
    d = driver_factory.make()
    yield d
    d.close()


@pytest.fixture
def q(driver: Driver, driver_factory: DriverFactory) -> str:
    """A declared, unbounded queue name."""
    driver.declare("q", dict(driver_factory.unbounded))
    return "q"


@pytest.fixture
def small(driver: Driver, driver_factory: DriverFactory) -> str:
    """A declared queue holding at most 2 ready messages."""
    driver.declare("small", driver_factory.bounded(2))
    return "small"


def msg(n: int | str, **headers: Any) -> Message:
    return Message(body=f'{{"n":"{n}"}}'.encode(), headers={"timestamp": 1.0, **headers}, id=str(n))


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.message.id for d in deliveries]


def get_one(driver: Driver, name: str) -> Delivery:
    got = driver.get(name, 1, 1.0)
    assert len(got) == 1, f"expected one delivery from {name}, got {got}"
    return got[0]


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


# -- declare ---------------------------------------------------------------------------------

def test_declare_is_idempotent(driver: Driver, driver_factory: DriverFactory) -> None:
    driver.declare("q", dict(driver_factory.unbounded))
    driver.declare("q", dict(driver_factory.unbounded))
    assert driver.stats("q") == (0, 0)
    for i in range(3):
        driver.put("q", msg(i), 1.0)
    d = get_one(driver, "q")
    # Declaring again (as a restart of the app's queues would) keeps ready and in-flight messages.
    driver.declare("q", dict(driver_factory.unbounded))
    assert driver.stats("q") == (2, 1)
    assert driver.ack(d) is True
    assert ids(driver.get("q", 10, 1.0)) == ["1", "2"]


# -- put / get -------------------------------------------------------------------------------

def test_fifo_order(driver: Driver, q: str) -> None:
    for i in range(20):
        driver.put(q, msg(i), 1.0)
    got = [get_one(driver, q) for _ in range(20)]
    assert ids(got) == [str(i) for i in range(20)]
    assert all(d.queue == q for d in got)


def test_get_returns_the_message_unchanged(driver: Driver, q: str) -> None:
    m = Message(body=b'{"a":[1,2]}', headers={"timestamp": 12.5, "k": "v", "n": 3, "b": True}, id="abc", attempt=4)
    driver.put(q, m, 1.0)
    d = get_one(driver, q)
    assert d.message == m


def test_get_with_max_count_batches(driver: Driver, q: str) -> None:
    for i in range(5):
        driver.put(q, msg(i), 1.0)
    first = driver.get(q, 3, 1.0)
    assert ids(first) == ["0", "1", "2"]
    assert driver.stats(q) == (2, 3)
    rest = driver.get(q, 10, 1.0)
    assert ids(rest) == ["3", "4"]
    assert driver.stats(q) == (0, 5)
    tags = [d.tag for d in first + rest]
    assert len(set(tags)) == 5, "every delivery has its own tag"


def test_get_timeout_returns_empty_list(driver: Driver, q: str) -> None:
    start = time.monotonic()
    assert driver.get(q, 1, 0.01) == []
    assert driver.get(q, 10, 0.01) == []
    assert time.monotonic() - start < 5.0  # returned on its timeout, did not hang
    assert driver.stats(q) == (0, 0)


def test_get_wakes_up_when_a_message_arrives(driver: Driver, q: str) -> None:
    t, _, outcome = run_in_thread(lambda: driver.get(q, 5, 10.0))
    driver.put(q, msg("late"), 1.0)
    t.join(5)
    assert not t.is_alive(), "a blocked get did not return when a message was put"
    kind, value = outcome[0]
    assert kind == "ok"
    assert ids(value) == ["late"]
    assert driver.stats(q) == (0, 1)


# -- ack -------------------------------------------------------------------------------------

def test_ack_removes_for_good_and_second_ack_returns_false(driver: Driver, q: str) -> None:
    driver.put(q, msg("a"), 1.0)
    driver.put(q, msg("b"), 1.0)
    assert driver.stats(q) == (2, 0)
    d = get_one(driver, q)
    assert d.message.id == "a"
    assert driver.stats(q) == (1, 1)
    assert driver.ack(d) is True
    assert driver.stats(q) == (1, 0)
    assert driver.ack(d) is False
    assert driver.stats(q) == (1, 0)
    # A later settle of the acked delivery does nothing either.
    assert driver.requeue(d, d.message.retried()) is False
    assert driver.release(d) is False
    assert driver.stats(q) == (1, 0)
    d2 = get_one(driver, q)
    assert d2.message.id == "b"
    assert driver.ack(d2) is True
    assert driver.get(q, 10, 0.01) == [], "an acked message is never delivered again"
    assert driver.stats(q) == (0, 0)


# -- requeue ---------------------------------------------------------------------------------

def test_requeue_puts_the_given_message_at_the_tail(driver: Driver, q: str) -> None:
    for i in range(3):
        driver.put(q, msg(i), 1.0)
    d = get_one(driver, q)
    assert driver.stats(q) == (2, 1)
    retried = d.message.retried()
    assert driver.requeue(d, retried) is True
    assert driver.stats(q) == (3, 0)
    got = driver.get(q, 10, 1.0)
    assert ids(got) == ["1", "2", "0"]
    back = got[-1].message
    assert back == retried
    assert back.attempt == 2 and back.id == "0" and back.headers == d.message.headers and back.body == d.message.body
    # Settling the old delivery again does nothing.
    assert driver.requeue(d, retried) is False
    assert driver.ack(d) is False
    assert driver.stats(q) == (0, 3)


def test_requeue_never_blocks_even_at_max_length(driver: Driver, small: str) -> None:
    driver.put(small, msg("a"), 1.0)
    driver.put(small, msg("b"), 1.0)
    d = get_one(driver, small)
    driver.put(small, msg("c"), 1.0)  # full again: 2 ready, 1 in flight
    assert driver.stats(small) == (2, 1)
    t, _, outcome = run_in_thread(lambda: driver.requeue(d, d.message.retried()))
    t.join(5)
    assert not t.is_alive(), "requeue blocked on a full queue"
    assert outcome == [("ok", True)]
    assert driver.stats(small) == (3, 0), "requeue above max_length must not drop"
    got = driver.get(small, 10, 1.0)
    assert ids(got) == ["b", "c", "a"]
    assert got[-1].message.attempt == 2


def test_put_still_blocks_while_requeue_holds_the_queue_above_its_limit(driver: Driver, small: str) -> None:
    driver.put(small, msg("a"), 1.0)
    driver.put(small, msg("b"), 1.0)
    d = get_one(driver, small)
    driver.put(small, msg("c"), 1.0)
    assert driver.requeue(d, d.message.retried()) is True
    assert driver.stats(small) == (3, 0)
    with pytest.raises(PublishTimeout):
        driver.put(small, msg("d"), 0.05)
    assert driver.stats(small) == (3, 0)


# -- release ---------------------------------------------------------------------------------

def test_release_returns_the_message_unchanged_to_the_head(driver: Driver, q: str) -> None:
    for i in range(3):
        driver.put(q, msg(i), 1.0)
    first = driver.get(q, 2, 1.0)
    assert ids(first) == ["0", "1"]
    assert driver.stats(q) == (1, 2)
    # Released in reverse so the two keep their order at the head.
    assert driver.release(first[1]) is True
    assert driver.stats(q) == (2, 1)
    assert driver.release(first[0]) is True
    assert driver.stats(q) == (3, 0)
    got = driver.get(q, 10, 1.0)
    assert ids(got) == ["0", "1", "2"]
    assert got[0].message == first[0].message  # unchanged: same attempt, headers, body
    assert got[0].message.attempt == 1
    assert driver.release(first[0]) is False


def test_release_never_blocks_at_max_length(driver: Driver, small: str) -> None:
    driver.put(small, msg("a"), 1.0)
    driver.put(small, msg("b"), 1.0)
    d = get_one(driver, small)
    driver.put(small, msg("c"), 1.0)
    t, _, outcome = run_in_thread(lambda: driver.release(d))
    t.join(5)
    assert not t.is_alive(), "release blocked on a full queue"
    assert outcome == [("ok", True)]
    assert driver.stats(small) == (3, 0)
    assert ids(driver.get(small, 10, 1.0)) == ["a", "b", "c"]


def test_late_ack_after_release_returns_false_and_does_nothing(driver: Driver, q: str) -> None:
    driver.put(q, msg("a"), 1.0)
    old = get_one(driver, q)
    assert driver.release(old) is True
    assert driver.stats(q) == (1, 0)
    # The abandoned handler's late ack: ignored, the message stays ready.
    assert driver.ack(old) is False
    assert driver.stats(q) == (1, 0)
    new = get_one(driver, q)
    assert new.message == old.message
    assert driver.stats(q) == (0, 1)
    # Still ignored while the message is in flight again under a new delivery.
    assert driver.ack(old) is False
    assert driver.requeue(old, old.message.retried()) is False
    assert driver.release(old) is False
    assert driver.stats(q) == (0, 1)
    assert driver.ack(new) is True
    assert driver.stats(q) == (0, 0)


# -- blocking put ----------------------------------------------------------------------------

def test_put_blocks_when_full_then_raises_publish_timeout(driver: Driver, small: str) -> None:
    driver.put(small, msg("a"), 1.0)
    driver.put(small, msg("b"), 1.0)
    start = time.monotonic()
    with pytest.raises(PublishTimeout):
        driver.put(small, msg("c"), 0.05)
    assert time.monotonic() - start >= 0.045, "put gave up before its timeout"
    assert driver.stats(small) == (2, 0), "a timed-out put adds nothing"
    assert ids(driver.get(small, 10, 1.0)) == ["a", "b"]


def test_put_with_zero_timeout_on_a_full_queue_raises_at_once(driver: Driver, small: str) -> None:
    driver.put(small, msg("a"), 1.0)
    driver.put(small, msg("b"), 1.0)
    with pytest.raises(PublishTimeout):
        driver.put(small, msg("c"), 0)
    assert driver.stats(small) == (2, 0)


def test_blocked_put_proceeds_as_soon_as_a_consumer_gets(driver: Driver, small: str) -> None:
    driver.put(small, msg("a"), 1.0)
    driver.put(small, msg("b"), 1.0)
    done = threading.Event()

    def blocked_put() -> None:
        driver.put(small, msg("c"), 10.0)
        done.set()

    t, _, outcome = run_in_thread(blocked_put)
    assert not done.wait(BLOCK_CHECK), "put on a full queue did not block"
    d = get_one(driver, small)  # makes room
    assert done.wait(5), "blocked put did not proceed after a get made room"
    t.join(5)
    assert outcome == [("ok", None)]
    assert d.message.id == "a"
    assert driver.stats(small) == (2, 1)
    assert ids(driver.get(small, 10, 1.0)) == ["b", "c"]


def test_several_blocked_puts_all_proceed_as_room_appears(driver: Driver, small: str) -> None:
    driver.put(small, msg("a"), 1.0)
    driver.put(small, msg("b"), 1.0)
    threads = [run_in_thread(lambda i=i: driver.put(small, msg(f"p{i}"), 10.0)) for i in range(3)]
    got = driver.get(small, 2, 1.0)  # two slots free at once
    assert ids(got) == ["a", "b"]
    got += [get_one(driver, small)]  # and a third
    for t, _, _ in threads:
        t.join(5)
        assert not t.is_alive(), "a blocked put never proceeded"
    assert all(o == [("ok", None)] for _, _, o in threads)
    assert driver.stats(small) == (2, 3)


# -- several queues --------------------------------------------------------------------------

def test_several_queues_on_one_driver_are_independent(driver: Driver, driver_factory: DriverFactory) -> None:
    driver.declare("a", driver_factory.bounded(1))
    driver.declare("b", dict(driver_factory.unbounded))
    driver.put("a", msg("a1"), 1.0)
    # "a" is full, "b" is not affected.
    with pytest.raises(PublishTimeout):
        driver.put("a", msg("a2"), 0.01)
    for i in range(3):
        driver.put("b", msg(f"b{i}"), 1.0)
    assert driver.stats("a") == (1, 0)
    assert driver.stats("b") == (3, 0)
    db = driver.get("b", 10, 1.0)
    assert ids(db) == ["b0", "b1", "b2"]
    assert all(d.queue == "b" for d in db)
    assert driver.stats("a") == (1, 0)
    assert driver.stats("b") == (0, 3)
    da = get_one(driver, "a")
    assert da.queue == "a" and da.message.id == "a1"
    assert driver.get("a", 10, 0.01) == []
    assert driver.requeue(db[0], db[0].message.retried()) is True
    assert driver.stats("a") == (0, 1)
    assert driver.stats("b") == (1, 2)
    assert driver.ack(da) is True
    assert driver.stats("a") == (0, 0)
    assert driver.stats("b") == (1, 2)


# -- thread safety ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_thread_safety_every_message_acked_exactly_once(driver: Driver, driver_factory: DriverFactory) -> None:
    producers, consumers, per_producer = 4, 4, 5000
    total = producers * per_producer
    driver.declare("load", driver_factory.bounded(200))  # producers block now and then
    acked: list[list[str]] = [[] for _ in range(consumers)]
    failures: list[str] = []
    count_lock = threading.Lock()
    acked_total = [0]
    all_acked = threading.Event()
    go = threading.Event()

    def produce(p: int) -> None:
        go.wait(5)
        for i in range(per_producer):
            driver.put("load", Message(body=b"{}", headers={"timestamp": 0.0}, id=f"{p}-{i}"), 20.0)

    def consume(c: int) -> None:
        rng = random.Random(c)
        go.wait(5)
        while not all_acked.is_set():
            for d in driver.get("load", rng.randint(1, 16), 0.05):
                m = d.message
                # Exercise requeue (above the limit) and release under load too.
                if m.attempt == 1 and hash(m.id) % 10 == 0:
                    if not driver.requeue(d, m.retried()):
                        failures.append(f"requeue of {m.id} returned False")
                    continue
                if m.attempt == 2 and hash(m.id) % 20 == 0 and rng.random() < 0.5:
                    if not driver.release(d):
                        failures.append(f"release of {m.id} returned False")
                    continue
                if not driver.ack(d):
                    failures.append(f"ack of {m.id} returned False")
                    continue
                acked[c].append(m.id)
                with count_lock:
                    acked_total[0] += 1
                    if acked_total[0] >= total:
                        all_acked.set()

    threads = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(producers)]
    threads += [threading.Thread(target=consume, args=(c,), daemon=True) for c in range(consumers)]
    for t in threads:
        t.start()
    go.set()
    assert all_acked.wait(45), f"only {acked_total[0]} of {total} messages acked"
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert failures == []
    counts = Counter(i for per in acked for i in per)
    assert len(counts) == total
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v != 1][:10]
    assert driver.stats("load") == (0, 0)


# -- model-based: random operation sequences against a simple reference model --------------

class DriverModel(RuleBasedStateMachine):
    """Compares a driver with a list-based model of the contract (one bounded queue)."""

    factory: DriverFactory = FACTORIES[0]
    MAX = 3

    def __init__(self) -> None:
        super().__init__()
        self.driver = self.factory.make()
        self.driver.declare("m", self.factory.bounded(self.MAX))
        self.ready: list[Message] = []
        self.in_flight: dict[int, Delivery] = {}
        self.settled: list[Delivery] = []
        self.next_id = 0

    def teardown(self) -> None:
        self.driver.close()

    @rule()
    def put(self) -> None:
        m = Message(body=b"1", headers={"timestamp": 0.0}, id=str(self.next_id))
        self.next_id += 1
        if len(self.ready) >= self.MAX:
            with pytest.raises(PublishTimeout):
                self.driver.put("m", m, 0)
        else:
            self.driver.put("m", m, 0)
            self.ready.append(m)

    @rule(n=st.integers(min_value=1, max_value=4))
    def get(self, n: int) -> None:
        got = self.driver.get("m", n, 0.001)
        expected = self.ready[:n]
        assert [d.message for d in got] == expected
        del self.ready[:len(got)]
        for d in got:
            self.in_flight[d.tag] = d

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), action=st.sampled_from(["ack", "requeue", "release"]))
    def settle(self, data: st.DataObject, action: str) -> None:
        tag = data.draw(st.sampled_from(sorted(self.in_flight)))
        d = self.in_flight.pop(tag)
        if action == "ack":
            assert self.driver.ack(d) is True
        elif action == "requeue":
            retried = d.message.retried()
            assert self.driver.requeue(d, retried) is True
            self.ready.append(retried)
        else:
            assert self.driver.release(d) is True
            self.ready.insert(0, d.message)
        self.settled.append(d)

    @precondition(lambda self: self.settled)
    @rule(data=st.data(), action=st.sampled_from(["ack", "requeue", "release"]))
    def settle_again(self, data: st.DataObject, action: str) -> None:
        d = data.draw(st.sampled_from(self.settled))
        if action == "ack":
            assert self.driver.ack(d) is False
        elif action == "requeue":
            assert self.driver.requeue(d, d.message.retried()) is False
        else:
            assert self.driver.release(d) is False

    @invariant()
    def stats_match(self) -> None:
        assert self.driver.stats("m") == (len(self.ready), len(self.in_flight))


@pytest.mark.timeout(120)
def test_driver_matches_model(driver_factory: DriverFactory) -> None:
    machine = type(f"DriverModel_{driver_factory.name}", (DriverModel,), {"factory": driver_factory})
    state_test = machine.TestCase
    state_test.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    state_test().runTest()

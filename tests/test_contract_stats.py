"""Driver contract, drivers with exact stats: ready / in_flight / delayed counts are exact
at every step (idle detection trusts them), checked by hand and against a model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from contract_support import DriverFactory, Harness, factories_with, harness_fixture, harness_of, msg
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runtime.errors import PublishTimeout
from runtime.queue.driver import Delivery, QueueStats
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(60)
__all__ = ["harness_of"]
EXACT = factories_with("exact_stats")

h = harness_fixture(EXACT)


def test_counts_follow_every_step(h: Harness) -> None:
    q = h.queue()
    assert h.driver.stats(q) == QueueStats(0, 0, 0)
    h.put(q, msg("a"), msg("b"), msg("c"))
    h.put(q, msg("later"), delay=30)
    assert h.driver.stats(q) == QueueStats(3, 0, 1)
    c = h.c(q)
    a, b = h.get(q, 2)
    assert h.driver.stats(q) == QueueStats(1, 2, 1)
    c.ack(a)
    assert h.driver.stats(q) == QueueStats(1, 1, 1)
    c.retry(b, 30)
    assert h.driver.stats(q) == QueueStats(1, 0, 2)
    d = h.one(q)
    c.release([d])
    assert h.driver.stats(q) == QueueStats(1, 0, 2)
    assert h.driver.purge(q) == 3
    assert h.driver.stats(q) == QueueStats(0, 0, 0)


class DriverModel(RuleBasedStateMachine):
    """Compares a driver with a list-based model of the contract (one bounded queue)."""

    factory: DriverFactory = EXACT[0]
    MAX = 3

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.harness = Harness(self.factory, Path(self.tmp.name))
        self.q = self.harness.queue(bounded=self.MAX)
        self.c = self.harness.c(self.q)
        self.ready: list[tuple[Message, int]] = []
        self.delayed = 0
        self.in_flight: dict[object, Delivery] = {}
        self.settled: list[Delivery] = []
        self.next_id = 0

    def teardown(self) -> None:
        self.harness.close()
        self.tmp.cleanup()

    @rule()
    def publish(self) -> None:
        m = Message(body=b"1", headers={"timestamp": 0.0}, id=str(self.next_id))
        self.next_id += 1
        if len(self.ready) >= self.MAX:
            with pytest.raises(PublishTimeout):
                self.harness.put(self.q, m, timeout=0)
        else:
            self.harness.put(self.q, m, timeout=0)
            self.ready.append((m, 1))

    @rule()
    def publish_delayed(self) -> None:
        self.harness.put(self.q, msg(f"d{self.next_id}"), delay=3600)
        self.next_id += 1
        self.delayed += 1

    @rule(n=st.integers(min_value=1, max_value=4))
    def fetch(self, n: int) -> None:
        got = self.c.fetch(n, 0)
        expected = self.ready[:n]
        assert [(d.message, d.attempt) for d in got] == expected
        del self.ready[:len(got)]
        for d in got:
            self.in_flight[d.token] = d

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), action=st.sampled_from(["ack", "retry", "retry_later", "release"]))
    def settle(self, data: st.DataObject, action: str) -> None:
        token = data.draw(st.sampled_from(sorted(self.in_flight, key=repr)))
        d = self.in_flight.pop(token)
        if action == "ack":
            assert self.c.ack(d) is True
        elif action == "retry":
            assert self.c.retry(d, 0) is True
            self.ready.append((d.message, d.attempt + 1))
        elif action == "retry_later":
            assert self.c.retry(d, 3600) is True
            self.delayed += 1
        else:
            assert self.c.release([d]) == 1
            self.ready.insert(0, (d.message, d.attempt))
        self.settled.append(d)

    @precondition(lambda self: self.settled)
    @rule(data=st.data(), action=st.sampled_from(["ack", "retry", "release"]))
    def settle_again(self, data: st.DataObject, action: str) -> None:
        d = data.draw(st.sampled_from(self.settled))
        if action == "ack":
            assert self.c.ack(d) is False
        elif action == "retry":
            assert self.c.retry(d, 0) is False
        else:
            assert self.c.release([d]) == 0

    @invariant()
    def stats_match(self) -> None:
        assert self.harness.driver.stats(self.q) == QueueStats(len(self.ready), len(self.in_flight), self.delayed)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("factory", EXACT, ids=[f.name for f in EXACT])
def test_driver_matches_model(factory: DriverFactory) -> None:
    machine = type(f"DriverModel_{factory.name}", (DriverModel,), {"factory": factory})
    state_test = machine.TestCase
    state_test.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    state_test().runTest()

"""Driver contract, core: what every driver passes (runtime/queue/driver.py).

Capability modules add what only some drivers promise: test_contract_bounded.py,
test_contract_ordered.py, test_contract_stats.py. Nothing here sleeps to wait: blocking
calls are observed through threads and events, and every wait is bounded.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from contract_support import FACTORIES, Harness, harness_fixture, harness_of, ids, msg, run_in_thread

from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(60)
__all__ = ["harness_of"]

h = harness_fixture(FACTORIES)


def test_declare_is_idempotent_and_keeps_messages(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg(0), msg(1), msg(2))
    d = h.one(q)
    h.driver.declare(q, dict(h.factory.unbounded))  # as a restart of the app's queues would
    assert h.c(q).ack(d) is True
    assert sorted(ids(h.get(q, 10))) == ["1", "2"]


def test_a_delivery_carries_the_message_unchanged_with_attempt_one(h: Harness) -> None:
    q = h.queue()
    m = Message(body=b'{"a":[1,2]}\xff\x00', headers={"timestamp": 12.5, "k": "v", "n": 3, "b": True}, id="abc")
    h.put(q, m)
    d = h.one(q)
    assert d.message == m and d.attempt == 1 and d.queue == q


def test_fetch_takes_up_to_max_count_each_with_its_own_token(h: Harness) -> None:
    q = h.queue()
    h.put(q, *[msg(i) for i in range(5)])
    first = h.get(q, 3)
    assert len(first) == 3
    rest = h.get(q, 10)
    assert sorted(ids(first + rest)) == [str(i) for i in range(5)]
    assert len({d.token for d in first + rest}) == 5


def test_fetch_returns_empty_on_timeout(h: Harness) -> None:
    q = h.queue()
    start = time.monotonic()
    assert h.get(q, 1, 0.01) == []
    assert h.get(q, 10, 0) == []
    assert time.monotonic() - start < 5.0


def test_fetch_wakes_up_when_a_message_is_published_in_this_process(h: Harness) -> None:
    q = h.queue()
    c = h.c(q)
    t, _, outcome = run_in_thread(lambda: c.fetch(5, 10.0))
    h.put(q, msg("late"))
    t.join(5)
    assert not t.is_alive(), "a waiting fetch did not return when a message was published"
    assert outcome[0][0] == "ok" and ids(outcome[0][1]) == ["late"]


def test_ack_removes_for_good_and_a_second_settle_is_refused(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg("a"))
    c = h.c(q)
    d = h.one(q)
    assert c.ack(d) is True
    assert c.ack(d) is False
    assert c.retry(d, 0) is False
    assert c.release([d]) == 0
    assert h.get(q, 10, 0.2) == [], "an acked message is never delivered again"


def test_ack_many_acks_each_once_and_refuses_what_is_no_longer_in_flight(h: Harness) -> None:
    # What a worker does with the acked messages of a batch (runtime/queue/consumer.py).
    q = h.queue()
    h.put(q, *[msg(i) for i in range(6)])
    c = h.c(q)
    got = h.get(q, 6)
    while len(got) < 6:
        more = h.get(q, 6 - len(got))
        assert more, "all six are delivered"
        got += more
    released = got[5]
    assert c.release([released]) == 1
    assert c.ack_many(got[:3]) == 3
    assert c.ack_many(got) == 2, "the first three were acked already and the released one is not in flight"
    assert c.ack_many(got) == 0
    again = h.get(q, 10)
    assert ids(again) == ["5"], "only the released message comes back"
    assert c.ack_many(again) == 1
    assert h.get(q, 10, 0.2) == []


def test_retry_redelivers_the_same_message_with_the_attempt_raised(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg("a", k="v"))
    c = h.c(q)
    d = h.one(q)
    assert c.retry(d, 0) is True
    again = h.one(q)
    assert again.message == d.message and again.attempt == 2
    assert c.retry(d, 0) is False and c.ack(d) is False, "the old delivery is settled already"
    assert c.retry(again, 0) is True
    assert h.one(q).attempt == 3


def test_retry_with_a_delay_is_invisible_until_then(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg("a"))
    c = h.c(q)
    d = h.one(q)
    retried_at = time.monotonic()
    assert c.retry(d, 0.4) is True
    assert h.get(q, 10, 0) == [], "visible before its delay"
    got = h.get(q, 10, 5.0)
    assert ids(got) == ["a"] and got[0].attempt == 2
    assert time.monotonic() - retried_at >= 0.35


def test_delayed_publish_is_invisible_until_its_delay(h: Harness) -> None:
    q = h.queue()
    published = time.monotonic()
    h.put(q, msg("later"), delay=0.4)
    h.put(q, msg("now"))
    assert ids(h.get(q, 10, 0.1)) == ["now"]
    got = h.get(q, 10, 5.0)
    assert ids(got) == ["later"] and got[0].attempt == 1
    assert time.monotonic() - published >= 0.35


def test_release_returns_at_once_without_counting_an_attempt(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg("a"), msg("b"))
    c = h.c(q)
    first = h.get(q, 2)
    assert c.release(first) == 2
    assert c.release(first) == 0
    got = h.get(q, 10)
    assert sorted(ids(got)) == ["a", "b"] and {d.attempt for d in got} == {1}


def test_a_late_settle_after_release_does_nothing(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg("a"))
    c = h.c(q)
    old = h.one(q)
    assert c.release([old]) == 1
    new = h.one(q)
    assert new.message == old.message
    # The abandoned handler's late ack: ignored, also while the message is out again.
    assert c.ack(old) is False and c.retry(old, 0) is False
    assert c.ack(new) is True
    assert h.get(q, 10, 0.1) == []


def test_consumer_close_returns_what_it_held(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg("a"), msg("b"))
    first = h.consumer(q)
    assert len(first.fetch(10, 1.0)) == 2
    first.close()
    got = h.consumer(q).fetch(10, 2.0)
    assert sorted(ids(got)) == ["a", "b"] and {d.attempt for d in got} == {1}


def test_purge_deletes_what_waits_and_nothing_else(h: Harness) -> None:
    q, other = h.queue(), h.queue()
    h.put(q, msg("a"), msg("b"))
    h.put(q, msg("d"), delay=30)
    h.put(other, msg("o"))
    taken = h.one(q)
    assert h.driver.purge(q) == 2  # "b" and the delayed "d"; "a" is in flight
    assert h.c(q).ack(taken) is True
    assert h.get(q, 10, 0.1) == []
    assert ids(h.get(other)) == ["o"]


def test_two_consumers_compete_each_message_once(h: Harness) -> None:
    q = h.queue()
    h.put(q, *[msg(i) for i in range(40)])
    a, b = h.consumer(q, 5), h.consumer(q, 5)
    seen: Counter[str] = Counter()
    while sum(seen.values()) < 40:
        got = a.fetch(5, 1.0) + b.fetch(5, 1.0)
        assert got, f"stalled after {sum(seen.values())} messages"
        for d in got:
            seen[d.message.id] += 1
            (a if d.token in {x.token for x in a.deliveries()} else b).ack(d)
    assert len(seen) == 40 and set(seen.values()) == {1}


@pytest.mark.timeout(90)
def test_under_load_from_many_threads_every_message_is_acked_exactly_once(h: Harness) -> None:
    producers, consumers, per_producer = 4, 4, h.factory.load
    total = producers * per_producer
    q = h.queue()
    acked: list[list[str]] = [[] for _ in range(consumers)]
    failures: list[str] = []
    lock = threading.Lock()
    acked_total = [0]
    all_acked = threading.Event()
    go = threading.Event()

    def produce(p: int) -> None:
        go.wait(5)
        for i in range(0, per_producer, 50):
            h.put(q, *[Message(body=b"{}", headers={"timestamp": 0.0}, id=f"{p}-{j}") for j in range(i, i + 50)],
                  timeout=20.0)

    def consume(n: int) -> None:
        rng = random.Random(n)
        c = h.consumer(q, 16)
        go.wait(5)
        while not all_acked.is_set():
            for d in c.fetch(rng.randint(1, 16), 0.05):
                m = d.message
                # Retries and releases under load too.
                if d.attempt == 1 and hash(m.id) % 10 == 0:
                    if not c.retry(d, 0):
                        failures.append(f"retry of {m.id} refused")
                    continue
                if d.attempt == 2 and hash(m.id) % 20 == 0 and rng.random() < 0.5:
                    if c.release([d]) != 1:
                        failures.append(f"release of {m.id} refused")
                    continue
                if not c.ack(d):
                    failures.append(f"ack of {m.id} refused")
                    continue
                acked[n].append(m.id)
                with lock:
                    acked_total[0] += 1
                    if acked_total[0] >= total:
                        all_acked.set()

    threads = [threading.Thread(target=produce, args=(p,), daemon=True) for p in range(producers)]
    threads += [threading.Thread(target=consume, args=(c,), daemon=True) for c in range(consumers)]
    for t in threads:
        t.start()
    go.set()
    assert all_acked.wait(75), f"only {acked_total[0]} of {total} messages acked"
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert failures == []
    counts = Counter(i for per in acked for i in per)
    assert len(counts) == total and set(counts.values()) == {1}

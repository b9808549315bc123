"""Driver contract, bounded drivers: a queue's max_length makes publishers wait (SPEC §7.0).
Requeues, releases and forced publishes (dead letters) never wait and never drop."""

from __future__ import annotations

import threading
import time

import pytest
from contract_support import (
    BLOCK_CHECK,
    Harness,
    factories_with,
    harness_fixture,
    harness_of,
    ids,
    msg,
    run_in_thread,
)

from runtime.errors import Canceled, PublishTimeout

pytestmark = pytest.mark.timeout(30)
__all__ = ["harness_of"]
BOUNDED = factories_with("bounded")

h = harness_fixture(BOUNDED)


def full(h: Harness) -> str:
    q = h.queue(bounded=2)
    h.put(q, msg("a"), msg("b"))
    return q


def test_publish_waits_when_full_then_raises_publish_timeout(h: Harness) -> None:
    q = full(h)
    start = time.monotonic()
    with pytest.raises(PublishTimeout):
        h.put(q, msg("c"), timeout=0.05)
    assert time.monotonic() - start >= 0.045, "publish gave up before its timeout"
    assert sorted(ids(h.get(q))) == ["a", "b"], "a timed-out publish adds nothing"


def test_publish_with_zero_timeout_on_a_full_queue_raises_at_once(h: Harness) -> None:
    q = full(h)
    with pytest.raises(PublishTimeout):
        h.put(q, msg("c"), timeout=0)


def test_a_waiting_publish_proceeds_as_soon_as_a_consumer_takes_one(h: Harness) -> None:
    q = full(h)
    done = threading.Event()

    def blocked() -> None:
        h.put(q, msg("c"), timeout=10.0)
        done.set()

    t, _, outcome = run_in_thread(blocked)
    assert not done.wait(BLOCK_CHECK), "publish on a full queue did not wait"
    h.one(q)  # makes room
    assert done.wait(5), "the waiting publish did not proceed after a fetch made room"
    t.join(5)
    assert outcome == [("ok", None)]


def test_several_waiting_publishes_all_proceed_as_room_appears(h: Harness) -> None:
    q = full(h)
    threads = [run_in_thread(lambda i=i: h.put(q, msg(f"p{i}"), timeout=10.0)) for i in range(3)]
    got = h.get(q, 2)
    got += [h.one(q)]
    for t, _, _ in threads:
        t.join(5)
        assert not t.is_alive(), "a waiting publish never proceeded"
    assert all(o == [("ok", None)] for _, _, o in threads)
    assert len(got) == 3


def test_cancel_cuts_a_waiting_publish_short(h: Harness) -> None:
    q = full(h)
    cancel = threading.Event()
    t, _, outcome = run_in_thread(lambda: h.put(q, msg("c"), timeout=30.0, cancel=cancel))
    assert not t.join(BLOCK_CHECK) and t.is_alive()
    cancel.set()
    t.join(5)
    assert not t.is_alive(), "cancel did not end the wait"
    assert outcome[0][0] == "error" and isinstance(outcome[0][1], Canceled)


def test_forced_publish_retry_and_release_never_wait_above_the_limit(h: Harness) -> None:
    q = full(h)
    c = h.c(q)
    d = h.one(q)
    h.put(q, msg("c"))  # full again: 2 ready, 1 in flight
    for fn in (lambda: h.put(q, msg("dl"), timeout=30.0, force=True), lambda: c.retry(d, 0)):
        t, _, outcome = run_in_thread(fn)
        t.join(5)
        assert not t.is_alive(), "a forced publish or retry waited on a full queue"
        assert outcome[0][0] == "ok"
    got = h.get(q, 10)
    assert c.release(got) == len(got) == 4, "nothing above the limit was dropped"
    with pytest.raises(PublishTimeout):  # still full for normal publishes
        h.put(q, msg("x"), timeout=0.05)
    assert sorted(ids(h.get(q, 10))) == ["a", "b", "c", "dl"]


def test_queues_on_one_driver_are_bounded_independently(h: Harness) -> None:
    a, b = h.queue(bounded=1), h.queue()
    h.put(a, msg("a1"))
    with pytest.raises(PublishTimeout):
        h.put(a, msg("a2"), timeout=0.01)
    h.put(b, *[msg(f"b{i}") for i in range(3)])
    assert sorted(ids(h.get(b))) == ["b0", "b1", "b2"]
    assert ids(h.get(a)) == ["a1"]

"""Driver contract, ordered drivers: FIFO per queue; a retry goes to the tail, a release
back to the head in its order."""

from __future__ import annotations

import pytest
from contract_support import Harness, factories_with, harness_fixture, harness_of, ids, msg

pytestmark = pytest.mark.timeout(30)
__all__ = ["harness_of"]
ORDERED = factories_with("ordered")

h = harness_fixture(ORDERED)


def test_fifo_order(h: Harness) -> None:
    q = h.queue()
    for i in range(20):
        h.put(q, msg(i))
    assert ids([h.one(q) for _ in range(20)]) == [str(i) for i in range(20)]


def test_a_retry_goes_to_the_tail(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg(0), msg(1), msg(2))
    d = h.one(q)
    assert h.c(q).retry(d, 0) is True
    assert ids(h.get(q, 10)) == ["1", "2", "0"]


def test_a_release_goes_back_to_the_head_in_order(h: Harness) -> None:
    q = h.queue()
    h.put(q, msg(0), msg(1), msg(2))
    first = h.get(q, 2)
    assert ids(first) == ["0", "1"]
    assert h.c(q).release(first) == 2
    assert ids(h.get(q, 10)) == ["0", "1", "2"]

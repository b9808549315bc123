"""Chaos soak (hardening): 200,000 messages through a consumer of concurrency 8 whose
handler randomly raises, returns errors, runs past its time limit, settles early or nacks,
while the app is stopped and restarted twice on the same in-process driver. Afterwards every
message was acked exactly once (dead-lettered messages included: dead-lettering acks the
original), nothing is left or in flight, and memory stayed within a stated bound."""

from __future__ import annotations

import collections
import threading

import pytest
from conftest import wait_for, write_app

from runtime import App
from runtime.drivers.memory import MemoryConsumer

N = 200_000
MEMORY_BOUND_MIB = 400  # RSS growth allowed from before publishing to the end of the run

CHAOS = """
namespace: chaos
entries:
  - name: mem
    kind: queue.driver.memory
    lifecycle: {auto_start: true}
  - name: work
    kind: queue.queue
    driver: mem
    driver_options: {memory: {max_length: 300000}}
    dead_letter: {queue: dead, max_attempts: 3}
  - name: dead
    kind: queue.queue
    driver: mem
    driver_options: {memory: {max_length: 300000}}
  - name: h
    kind: function.lua
    modules: [queue]
    source: |
      local queue = require("queue")
      return function(body)
        if body.poison then error("poison message " .. body.n) end
        local r = math.random()
        if r < 0.01 then error("random raise") end
        if r < 0.02 then return nil, errors.new({message = "random error", kind = errors.UNAVAILABLE}) end
        if r < 0.0205 then while true do end end            -- runs past the time limit
        if r < 0.04 then queue.message():ack() error("failed after settling") end
        if r < 0.05 then queue.message():nack() return true end
        if r < 0.06 then return false end
        return true
      end
  - name: c
    kind: queue.consumer
    queue: work
    func: h
    concurrency: 8
    prefetch: 50
    timeout: 100ms
    lifecycle: {auto_start: true, stop_timeout: 5s}
"""


def _rss_mib() -> float:
    import resource
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1024 * 1024)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_soak(tmp_path, caplog, monkeypatch):
    caplog.set_level("CRITICAL")  # tens of thousands of expected failures
    write_app(tmp_path, {"app.yaml": CHAOS})
    app = App.load(tmp_path)
    rss_before = _rss_mib()
    app.start()
    acked: collections.Counter[str] = collections.Counter()
    real_ack, real_ack_many = MemoryConsumer._ack, MemoryConsumer._ack_many
    lock = threading.Lock()

    def record(deliveries):
        with lock:
            for d in deliveries:
                if d.queue == "work":
                    acked[d.message.id] += 1

    def recording_ack(self, delivery):
        real_ack(self, delivery)
        record([delivery])

    def recording_ack_many(self, deliveries):  # the acked messages of a batch
        real_ack_many(self, deliveries)
        record(deliveries)

    # The ground truth: the driver primitives run only for deliveries the base class found
    # in flight, i.e. what the driver really removed.
    monkeypatch.setattr(MemoryConsumer, "_ack", recording_ack)
    monkeypatch.setattr(MemoryConsumer, "_ack_many", recording_ack_many)
    ids = {app.publish("chaos:work", {"n": i, "poison": i % 2000 == 0}) for i in range(N)}
    assert len(ids) == N

    def acked_count() -> int:
        with lock:
            return len(acked)

    for fraction in (1 / 3, 2 / 3):
        assert wait_for(lambda f=fraction: acked_count() >= N * f, 300)
        app.stop()  # mid-stream: prefetched and in-flight messages go back to the queue
        app.start()
    assert app.wait_idle(300)
    stats = app.stats()
    app.stop()
    rss_after = _rss_mib()

    assert sum(acked.values()) == N and set(acked) == ids  # each id acked exactly once
    assert max(acked.values()) == 1
    work, dead = stats["queues"]["chaos:work"], stats["queues"]["chaos:dead"]
    assert work["message_count"] == 0
    assert dead["ready"] >= N // 2000  # every poison message, plus any unlucky ones
    c = stats["consumers"]["chaos:c"]
    assert c["dead_lettered"] == dead["ready"] and c["nacked"] > 0
    assert rss_after - rss_before < MEMORY_BOUND_MIB, (rss_before, rss_after)

"""samples/rabbitmq runs to the end on the machine's RabbitMQ, as its README says."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pika
import pytest
from conftest import SAMPLES
from contract_support import AMQP_URL, FACTORIES, engine_gate

pytestmark = pytest.mark.timeout(90)


def test_rabbitmq_sample_runs_to_the_end() -> None:
    engine_gate(next(f for f in FACTORIES if f.name == "amqp"))
    suffix = f".t{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, AMQP_URL=AMQP_URL, QUEUE_SUFFIX=suffix)
    root = SAMPLES / "rabbitmq"
    try:
        out = subprocess.run([sys.executable, "-m", "runtime", "run", str(root), "--until-idle", "--log-level", "warn",
                              "--publish", f"rabbit:jobs=@{root / 'jobs.jsonl'}"], capture_output=True, text=True,
                             env=env, timeout=80)
        assert out.returncode == 0, out.stderr
        assert "rabbit:worker acked=1996 nacked=8 dead_lettered=4 processed=2008" in out.stdout, out.stdout
        assert out.stderr.count("cannot be done") == 12
        assert "guest:guest" not in out.stderr
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            for name in (f"sample.jobs{suffix}", f"sample.failed{suffix}"):
                ch = conn.channel()
                ch.queue_delete(name)
                ch.close()
        finally:
            conn.close()

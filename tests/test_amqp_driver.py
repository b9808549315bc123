"""The AMQP driver against the machine's RabbitMQ (SPEC §7.3): configuration, publisher
confirms, header mapping, quorum attempts, retry delays without a prefetch slot, dead letters,
max_length refusing. Every test uses the engine gate; queues are unique and deleted after."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from conftest import REPO, wait_for, write_app
from contract_support import AMQP_URL, FACTORIES, engine_gate

from runtime import App
from runtime.drivers.amqp import AmqpDriver, _delay_bucket
from runtime.errors import ConfigError, DriverError, PublishTimeout, QueueUnavailable
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(60)
AMQP = next(f for f in FACTORIES if f.name == "amqp")


@pytest.fixture
def broker() -> Iterator[list[str]]:
    """Gate on the broker; the test appends the queue names it made, deleted afterwards."""
    engine_gate(AMQP)
    made: list[str] = []
    yield made
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        for name in made:
            ch = conn.channel()
            ch.queue_delete(name)
            ch.close()
    finally:
        conn.close()


def qname() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def driver(broker: list[str]) -> Iterator[AmqpDriver]:
    d = AmqpDriver("test:amqp", {"url": AMQP_URL, "reconnect_delay": 0.2})
    d.open()
    yield d
    for q in list(d.queues):
        d.delete_queue(q)
    d.close()


def m(n: Any, **headers: Any) -> Message:
    return Message(json.dumps({"n": n}).encode(), {"timestamp": 1.5, **headers}, f"id{n}")


# -- configuration -----------------------------------------------------------------------------

DRIVER_YAML = """
namespace: app
entries:
  - name: rabbit
    kind: queue.driver.amqp
{fields}
"""


def check(tmp_path: Path, fields: str, files: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    write_app(tmp_path, {"app.yaml": DRIVER_YAML.format(fields=fields), **(files or {})})
    return subprocess.run([sys.executable, "-m", "runtime", "check", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)


def test_every_wippy_field_is_accepted_with_its_defaults(tmp_path: Path) -> None:
    write_app(tmp_path, {"app.yaml": """
namespace: app
entries:
  - name: rabbit
    kind: queue.driver.amqp
    url: "amqp://guest:guest@localhost:5672/"
    vhost: "/"
    connection_name: "wippy-service"
    auth_mechanism: AMQPLAIN
    heartbeat: "10s"
    connection_timeout: "30s"
    reconnect_delay: "1s"
    reconnect_max_delay: "30s"
    default_message_ttl: "1h"
    default_queue_ttl: "2h"
    default_queue_expiry: "24h"
    prefetch_count: 10
    frame_size: 131072
    channel_max: 64
    tls: {enabled: false, server_name: rabbit.example.com, insecure_skip_verify: false}
  - name: q
    kind: queue.queue
    driver: rabbit
    driver_options:
      amqp: {durable: true, auto_delete: false, message_ttl: "1h", queue_expiry: "24h", max_length: 5,
             queue_type: quorum}
  - name: f
    kind: function.lua
    source: "return function() end"
  - name: c
    kind: queue.consumer
    queue: q
    func: f
    driver_options:
      amqp: {exclusive: false, no_local: false, no_wait: false, consumer_tag: worker-1}
"""})
    app = App.load(tmp_path)
    spec = app.registry.get("app:rabbit")
    assert spec.options["heartbeat"] == 10.0 and spec.options["auth_mechanism"] == "AMQPLAIN"
    assert spec.options["tls"]["server_name"] == "rabbit.example.com"
    q = app.registry.get("app:q")
    assert q.driver_options["amqp"]["queue_type"] == "quorum" and q.driver_options["amqp"]["message_ttl"] == 3600.0
    d = AmqpDriver("app:rabbit", spec.options)
    assert d.params.heartbeat == 10 and d.params.frame_max == 131072 and d.params.channel_max == 64
    assert d.params.client_properties["connection_name"] == "wippy-service"
    assert d.params.credentials.TYPE == "AMQPLAIN"
    args = d._queue_arguments(q.driver_options["amqp"])[2]
    assert args == {"x-queue-type": "quorum", "x-message-ttl": 3600000, "x-expires": 86400000, "x-max-length": 5,
                    "x-overflow": "reject-publish"}
    defaults = App.load(write_app(tmp_path / "d", {"app.yaml": DRIVER_YAML.format(fields="")})).registry.get(
        "app:rabbit").options
    assert defaults["url"] == "amqp://guest:guest@localhost:5672/" and defaults["auth_mechanism"] == "PLAIN"
    assert defaults["reconnect_delay"] == 1.0 and defaults["reconnect_max_delay"] == 30.0


def test_unknown_fields_are_problems_with_a_hint_and_file_line(tmp_path: Path) -> None:
    out = check(tmp_path, "    heartbeats: 10s\n    tls: {enabled: true, sever_name: x}")
    assert out.returncode == 1
    assert "app.yaml:5" in out.stdout and "'heartbeats' is not a known field" in out.stdout
    assert "did you mean 'heartbeat'" in out.stdout
    assert "tls.sever_name" in out.stdout and "server_name" in out.stdout


def test_a_missing_tls_cert_file_is_a_problem_with_file_line(tmp_path: Path) -> None:
    out = check(tmp_path, "    tls:\n      enabled: true\n      cert: certs/client.pem\n      key: certs/client.key")
    assert out.returncode == 1
    assert "app.yaml:7" in out.stdout and "certs/client.pem" in out.stdout and "not found" in out.stdout


def test_a_bad_url_is_a_problem_and_its_password_is_masked(tmp_path: Path) -> None:
    out = check(tmp_path, '    url: "http://admin:s3cr3t@rabbit:5672/"')
    assert out.returncode == 1 and "amqp://" in out.stdout and "app.yaml:5" in out.stdout
    assert "s3cr3t" not in out.stdout + out.stderr and "admin:***@rabbit" in out.stdout


def test_url_and_credentials_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_AMQP_URL", "amqp://u:p4ss@h:5673/v")
    write_app(tmp_path, {"app.yaml": DRIVER_YAML.format(fields='    url: "${env:T_AMQP_URL}"')})
    d = AmqpDriver("app:rabbit", App.load(tmp_path).registry.get("app:rabbit").options)
    assert (d.params.host, d.params.port, d.params.virtual_host, d.params.credentials.password) == \
        ("h", 5673, "v", "p4ss")
    monkeypatch.delenv("T_AMQP_URL")
    with pytest.raises(ConfigError, match="T_AMQP_URL"):
        App.load(tmp_path)


def test_tls_fields_reach_the_client(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    key = tmp_path / "k.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(ca), "-days", "1", "-subj", "/CN=rabbit.test"], capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    d = AmqpDriver("app:rabbit", {"url": "amqp://guest:guest@rabbit.test:5671/",
                                  "tls": {"enabled": True, "server_name": "broker.test", "ca": str(ca),
                                          "cert": str(ca), "key": key.read_text(), "insecure_skip_verify": False}})
    ssl_options = d.params.ssl_options
    assert ssl_options is not None and ssl_options.server_hostname == "broker.test"
    assert ssl_options.context.check_hostname is True
    assert any(c.get("subject") for c in ssl_options.context.get_ca_certs())
    with pytest.raises(ConfigError, match="together"):
        AmqpDriver("app:rabbit", {"tls": {"enabled": True, "cert": str(ca)}})


def test_password_is_masked_in_errors_and_logs(broker: list[str], caplog: pytest.LogCaptureFixture) -> None:
    d = AmqpDriver("test:bad", {"url": "amqp://guest:Wr0ngPassw0rd@127.0.0.1:5672/", "connection_timeout": 5.0})
    with caplog.at_level(logging.DEBUG), pytest.raises(QueueUnavailable) as err:
        d.open()
    d.close()
    assert "Wr0ngPassw0rd" not in str(err.value) and "Wr0ngPassw0rd" not in caplog.text


def test_wippy_docs_examples_load_and_run(tmp_path: Path, broker: list[str]) -> None:
    """Wippy's queue docs: the AMQP driver, a queue with driver_options.amqp, the consumer."""
    name = qname()
    broker.append(name)
    write_app(tmp_path, {"app.yaml": f"""
version: "1.0"
namespace: app.queue
entries:
  - name: amqp_driver
    kind: queue.driver.amqp
    url: "{AMQP_URL}"
    vhost: "/"
    connection_name: "wippy-service"
    heartbeat: "10s"
    connection_timeout: "30s"
    reconnect_delay: "1s"
    reconnect_max_delay: "30s"
    default_message_ttl: "1h"
    default_queue_expiry: "24h"
    prefetch_count: 10
    lifecycle:
      auto_start: true
  - name: tasks
    kind: queue.queue
    driver: app.queue:amqp_driver
    codec: json/plain
    queue_name: "{name}"
    driver_options:
      amqp:
        durable: true
        auto_delete: false
        message_ttl: "1h"
        max_length: 500
  - name: task_consumer
    kind: queue.consumer
    queue: app.queue:tasks
    func: app.queue:task_handler
    concurrency: 4
    prefetch: 20
    auto_ack: false
    driver_options:
      amqp:
        consumer_tag: "worker-1"
        exclusive: false
    lifecycle:
      auto_start: true
      depends_on:
        - app.queue:tasks
  - name: task_handler
    kind: function.lua
    source: file://task_handler.lua
    method: main
    modules:
      - queue
      - logger
""", "task_handler.lua": """
local queue = require("queue")
local logger = require("logger")

local function main(body)
    local msg = queue.message()
    logger:info("processing", {
        id = msg:id(),
        correlation_id = msg:header("correlation_id")
    })
    if body.fail then
        return false
    end
    return true
end

return { main = main }
"""})
    with App.load(tmp_path) as app:
        for i in range(20):
            app.publish("app.queue:tasks", {"n": i}, headers={"correlation_id": f"c{i}"})
        assert app.wait_idle(30)
        assert app.stats()["consumers"]["app.queue:task_consumer"]["acked"] == 20


# -- publishing -------------------------------------------------------------------------------

def test_publish_confirms_and_headers_round_trip(driver: AmqpDriver) -> None:
    q = qname()
    driver.declare(q, {"codec": "application/msgpack"})
    sent = Message(b"\x81\xa1a\x01", {"timestamp": 1700000000.25, "correlation_id": "c-1", "reply_to": "r",
                                     "message_type": "t", "encoding": "gzip", "amqp.priority": 3,
                                     "amqp.expiration": "60000", "k": "v", "n": 7, "f": 2.5, "b": False}, "mid-1")
    driver.publish(q, [sent])
    c = driver.consume(q, "test:c", 10)
    got = c.fetch(1, 5.0)
    assert len(got) == 1 and got[0].message == sent and got[0].attempt == 1
    c.ack(got[0])
    raw = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = raw.channel()
        c.close()
        driver.publish(q, [sent])
        method, props, body = ch.basic_get(q, auto_ack=True)
        assert props.content_type == "application/msgpack" and props.delivery_mode == 2
        assert props.correlation_id == "c-1" and props.reply_to == "r" and props.type == "t"
        assert props.content_encoding == "gzip" and props.priority == 3 and props.expiration == "60000"
        assert props.timestamp == 1700000000 and props.message_id == "mid-1" and props.headers["k"] == "v"
        # A message from another client: properties mapped back as Wippy maps them.
        ch.basic_publish("", q, b'{"x":1}', pika.BasicProperties(correlation_id="o", headers={"h": b"bytes"}))
    finally:
        raw.close()
    c2 = driver.consume(q, "test:c2", 10)
    (foreign,) = c2.fetch(1, 5.0)
    assert foreign.message.headers["correlation_id"] == "o" and foreign.message.headers["h"] == "bytes"
    assert foreign.message.headers["amqp.priority"] == 0 and foreign.attempt == 1
    c2.ack(foreign)
    c2.close()


def test_an_unroutable_publish_is_an_error_not_a_loss(driver: AmqpDriver) -> None:
    with pytest.raises(QueueUnavailable, match="could not route"):
        driver.publish(f"missing-{uuid.uuid4().hex[:8]}", [m(1)])


def test_publishes_from_many_threads_pipeline_their_confirms(driver: AmqpDriver) -> None:
    q = qname()
    driver.declare(q, {})
    publisher = driver._publisher
    assert publisher is not None
    in_flight: list[int] = []
    real = publisher._flush

    def spy() -> None:
        real()
        in_flight.append(len(publisher._unconfirmed))
    publisher._flush = spy  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(100):
                driver.publish(q, [m(f"{t}-{i}")])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert max(in_flight) > 1, "every publish waited for the one before it to be confirmed"
    assert driver.stats(q).ready == 800


def test_max_length_refuses_and_never_drops(driver: AmqpDriver) -> None:
    q = qname()
    driver.declare(q, {"max_length": 2})
    driver.publish(q, [m(1), m(2)])
    with pytest.raises(PublishTimeout, match="full"):
        driver.publish(q, [m(3)], timeout=0.3)
    with pytest.raises(PublishTimeout):
        driver.publish(q, [m(4)], timeout=0.3, force=True)  # a dead letter: refused, kept by its sender
    done = threading.Event()
    t = threading.Thread(target=lambda: (driver.publish(q, [m(5)], timeout=10.0), done.set()))
    t.start()
    assert not done.wait(0.2)
    c = driver.consume(q, "test:c", 1)
    first = c.fetch(1, 5.0)
    assert done.wait(5), "a waiting publish did not proceed once there was room"
    t.join(5)
    c.ack(first[0])
    seen = []
    while len(seen) < 2:
        got = c.fetch(1, 5.0)
        assert got
        seen += [d.message.id for d in got]
        for d in got:
            c.ack(d)
    assert sorted([first[0].message.id, *seen]) == ["id1", "id2", "id5"]
    c.close()


def test_prefetch_is_the_channel_qos(driver: AmqpDriver) -> None:
    q = qname()
    driver.declare(q, {})
    driver.publish(q, [m(i) for i in range(10)])
    c = driver.consume(q, "test:c", 3)
    assert wait_for(lambda: c.held() == 3, 5.0)
    c.sync()
    assert c.held() == 3 and driver.stats(q).ready == 7, "the broker sent more than the QoS allows"
    got = c.fetch(10, 1.0)
    assert len(got) == 3
    for d in got:
        c.ack(d)
    assert wait_for(lambda: c.held() == 3 and driver.stats(q).ready == 4, 5.0)
    c.close()


def test_a_clash_with_the_queue_on_the_broker_names_the_setting(driver: AmqpDriver) -> None:
    q = qname()
    driver.declare(q, {"durable": True})
    with pytest.raises(DriverError, match=f"'{q}'.*durable"):
        driver.declare(q, {"durable": False})


# -- attempts, retries, dead letters ---------------------------------------------------------------

def test_quorum_queue_counts_attempts_with_the_brokers_delivery_count(driver: AmqpDriver) -> None:
    q = qname()
    driver.declare(q, {"queue_type": "quorum"})
    driver.publish(q, [m(1)])
    c = driver.consume(q, "test:c", 10)
    (d,) = c.fetch(1, 5.0)
    assert d.attempt == 1
    c.retry(d, 0)  # a nack: the broker counts it
    (d,) = c.fetch(1, 5.0)
    assert d.attempt == 2
    c.release([d])  # not counted
    (d,) = c.fetch(1, 5.0)
    assert d.attempt == 2
    c.close()  # a channel closed with the message unsettled: like a crash, it counts
    c2 = driver.consume(q, "test:c2", 10)
    got = c2.fetch(10, 5.0)
    got += c2.fetch(10, 0.5)
    assert len(got) == 1, f"the close left {len(got)} copies: {[(x.message.id, x.attempt) for x in got]}"
    # Known and open (issue 9): about one run in twenty, under load, the broker counts the
    # message closed back once more (attempt 3). Never a loss or a second copy (checked above).
    assert got[0].attempt in (2, 3), "a graceful close returned it counted more than once"
    c2.retry(got[0], 0.2)
    (d,) = c2.fetch(1, 5.0)
    assert d.attempt == 3
    c2.ack(d)
    c2.close()


def test_a_delayed_retry_holds_no_prefetch_slot(driver: AmqpDriver) -> None:
    q = qname()
    driver.declare(q, {})
    driver.publish(q, [m("slow"), m("next")])
    c = driver.consume(q, "test:c", 1)  # QoS 1: one unacked message at a time
    (d,) = c.fetch(1, 5.0)
    assert d.message.id == "idslow"
    c.retry(d, 2.0)
    (n,) = c.fetch(1, 5.0)
    assert n.message.id == "idnext", "the waiting retry kept the only prefetch slot"
    st = driver.stats(q)
    assert st.delayed == 1
    c.ack(n)
    (again,) = c.fetch(1, 10.0)
    assert again.message.id == "idslow" and again.attempt == 2
    c.ack(again)
    c.close()


def test_delays_round_up_to_a_few_steps() -> None:
    assert _delay_bucket(0) == 0 and _delay_bucket(0.4) >= 400 and _delay_bucket(0.4) <= 440
    assert len({_delay_bucket(x / 1000) for x in range(100, 30_000)}) < 70


DLQ_APP = """
namespace: t
entries:
  - name: rabbit
    kind: queue.driver.amqp
    url: "{url}"
    lifecycle: {{auto_start: true}}
  - name: mem
    kind: queue.driver.memory
    lifecycle: {{auto_start: true}}
  - name: jobs
    kind: queue.queue
    driver: rabbit
    queue_name: "{jobs}"
    driver_options: {{amqp: {{queue_type: {qtype}}}}}
    retry: {{initial_delay: 50ms, max_delay: 200ms}}
    dead_letter: {{queue: {dlq}, max_attempts: 3}}
  - name: dlq_amqp
    kind: queue.queue
    driver: rabbit
    queue_name: "{dlq_name}"
  - name: dlq_mem
    kind: queue.queue
    driver: mem
  - name: f
    kind: function.lua
    source: "return function(body) error('boom ' .. body.n) end"
  - name: c
    kind: queue.consumer
    queue: jobs
    func: f
    concurrency: 2
    prefetch: 5
    lifecycle: {{auto_start: true}}
"""


@pytest.mark.parametrize(("qtype", "dlq"), [("classic", "dlq_amqp"), ("quorum", "dlq_mem")])
def test_dead_lettering_on_both_queue_types(tmp_path: Path, broker: list[str], qtype: str, dlq: str) -> None:
    jobs, dlq_name = qname(), qname()
    broker += [jobs, dlq_name]
    write_app(tmp_path, {"app.yaml": DLQ_APP.format(url=AMQP_URL, jobs=jobs, dlq_name=dlq_name, qtype=qtype, dlq=dlq)})
    with App.load(tmp_path) as app:
        for i in range(3):
            app.publish("t:jobs", {"n": i})
        assert app.wait_idle(40)
        stats = app.stats()
        assert stats["consumers"]["t:c"]["dead_lettered"] == 3 and stats["consumers"]["t:c"]["nacked"] == 6
        bound = app.router.bound(f"t:{dlq}")
        c = bound.driver.consume(bound.name, "test:reader", 10)
        got = []
        while len(got) < 3:
            more = c.fetch(10, 5.0)
            assert more, got
            got += more
        for d in got:
            h = d.message.headers
            assert h["x_attempts"] == 3 and h["x_original_queue"] == "t:jobs" and "boom" in h["x_dead_letter_reason"]
            c.ack(d)
        c.close()
        app.router.bound("t:jobs").driver.delete_queue(jobs)


def test_runtime_check_shows_no_password(tmp_path: Path) -> None:
    out = check(tmp_path, '    url: "amqp://admin:Sup3rS3cret@rabbit:5672/"\n    bogus: 1')
    assert out.returncode == 1 and "Sup3rS3cret" not in out.stdout + out.stderr


def test_the_driver_entry_is_documented_in_the_readme() -> None:
    text = (REPO / "README.md").read_text()
    assert "queue.driver.amqp" in text and "RabbitMQ" in text

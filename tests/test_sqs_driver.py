"""The SQS driver (SPEC §7.5, runtime/drivers/sqs.py) beyond the contract suite, on the local
endpoint (moto's server in this process, tests/sqs_support.py): config.aws in both
spellings, masking, config errors, long polling and batching, lease renewal, retry delays,
FIFO queues, headers, and messages from other SQS producers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqs_support
from conftest import wait_for, write_app

from runtime import App
from runtime.errors import InvalidMessage
from runtime.queue.message import Message

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent
SECRET = sqs_support.SECRET_KEY


@pytest.fixture(autouse=True)
def sqs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in sqs_support.env().items():
        monkeypatch.setenv(key, value)


def unique(prefix: str = "q") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def app_yaml(entries: str, aws: str | None = None) -> str:
    """An app (namespace t) with a config.aws `aws`, an SQS driver `sqs` and `entries`."""
    aws = aws if aws is not None else sqs_support.aws_yaml()
    return "version: \"1.0\"\nnamespace: t\nentries:\n" + aws + """
  - name: sqs
    kind: queue.driver.sqs
    config: aws
    endpoint: ${env:SQS_ENDPOINT}
    lifecycle:
      auto_start: true
""" + textwrap.indent(textwrap.dedent(entries), "  ")


@pytest.fixture
def sqs_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def make(entries: str, files: dict[str, str] | None = None, aws: str | None = None, start: bool = True) -> App:
        root = tmp_path / f"app{len(apps)}"
        write_app(root, {"app.yaml": app_yaml(entries, aws), **(files or {})})
        app = App.load(root)
        apps.append(app)
        if start:
            app.start()
        return app

    yield make
    for app in apps:
        if app.running:
            app.stop(10)
        for bound in app.router.queues.values():
            try:
                bound.driver.delete_queue(bound.name)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a closed driver: the queue stays on the test server
                pass


def boto() -> Any:
    import boto3

    return boto3.client("sqs", endpoint_url=sqs_support.endpoint(), region_name=sqs_support.REGION,
                        aws_access_key_id=sqs_support.ACCESS_KEY, aws_secret_access_key=SECRET)


def queue_entry(name: str, queue_name: str, extra: str = "") -> str:
    return f"""
- name: {name}
  kind: queue.queue
  driver: sqs
  queue_name: {queue_name}
{textwrap.indent(textwrap.dedent(extra), "  ")}"""


def take_all(app: App, queue_id: str, n: int, wait: float = 5.0) -> list[Any]:
    bound = app.router.queues[queue_id]
    c = bound.driver.consume(bound.name, "test:take", 100)
    got: list[Any] = []
    deadline = time.monotonic() + wait
    try:
        while len(got) < n and time.monotonic() < deadline:
            for d in c.fetch(n - len(got), 0.5):
                got.append(d)
                c.ack(d)
        return got
    finally:
        c.close()


# -- config.aws ---------------------------------------------------------------------------------

def test_config_aws_with_env_placeholders_reaches_the_driver(sqs_app: Callable[..., App]) -> None:
    q = unique()
    app = sqs_app(queue_entry("jobs", q))
    driver = app.router.queues["t:jobs"].driver
    assert driver.options["config"]["id"] == "t:aws"
    assert (driver.region, driver._access_key) == (sqs_support.REGION, sqs_support.ACCESS_KEY)  # type: ignore
    app.publish("t:jobs", {"n": 1})
    assert [json.loads(d.message.body) for d in take_all(app, "t:jobs", 1)] == [{"n": 1}]


def test_config_aws_with_wippys_env_fields(sqs_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_REGION", sqs_support.REGION)
    aws = """
  - name: aws
    kind: config.aws
    region_env: MY_REGION
    access_key_id_env: app.env:SQS_TEST_ACCESS_KEY      # a Wippy env registry ID: the variable after ':'
    secret_access_key_env: SQS_TEST_SECRET_KEY
"""
    app = sqs_app(queue_entry("jobs", unique()), aws=aws)
    driver = app.router.queues["t:jobs"].driver
    assert (driver.region, driver._access_key, driver._secret_key) == (  # type: ignore[attr-defined]
        sqs_support.REGION, sqs_support.ACCESS_KEY, SECRET)
    app.publish("t:jobs", "hello")
    assert [d.message.body for d in take_all(app, "t:jobs", 1)] == [b'"hello"']


def check(tmp_path: Path, yaml: str) -> subprocess.CompletedProcess[str]:
    write_app(tmp_path, {"app.yaml": yaml})
    return subprocess.run([sys.executable, "-m", "runtime", "check", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_config_mistakes_are_problems_with_lines_and_hints(tmp_path: Path) -> None:
    yaml = """version: "1.0"
namespace: t
entries:
  - name: aws
    kind: config.aws
    acess_key_id: x
    secret_access_key: SECRET_HERE
  - name: sqs
    kind: queue.driver.sqs
    config: aws
    endpiont: http://127.0.0.1:1
    default_delay_seconds: 901
  - name: other
    kind: queue.driver.sqs
    config: sqs
  - name: nothing
    kind: queue.driver.sqs
  - name: jobs
    kind: queue.queue
    driver: sqs
    driver_options:
      sqs: {default_visibility_timout: 5}
""".replace("SECRET_HERE", SECRET)
    out = check(tmp_path, yaml)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "app.yaml:4" in text and "needs 'region' or 'region_env'" in text, text
    assert "app.yaml:6" in text and "did you mean 'access_key_id'" in text, text
    assert "app.yaml:11" in text and "did you mean 'endpoint'" in text, text
    assert "app.yaml:12" in text and "901 is above the maximum 900" in text, text
    assert "app.yaml:15" in text and "which is a queue.driver.sqs, not a config.aws" in text, text
    assert "entry t:nothing: missing required field 'config'" in text, text
    assert "did you mean 'default_visibility_timeout'" in text, text
    assert SECRET not in text


def test_secrets_stay_out_of_repr_logs_and_errors(sqs_app: Callable[..., App], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    app = sqs_app(queue_entry("jobs", unique()))
    spec = app.registry.entries["t:sqs"]
    aws = app.registry.entries["t:aws"]
    driver = app.router.queues["t:jobs"].driver
    for shown in (repr(spec), repr(aws), repr(driver.options), str(spec)):
        assert SECRET not in shown and "'***'" in shown
    exc = RuntimeError(f"boom {SECRET}")
    assert SECRET not in driver.describe_error(exc)
    # An unreachable endpoint: the errors in the log of a run name no secret.
    yaml = app_yaml(queue_entry("jobs", unique())).replace("${env:SQS_ENDPOINT}", "http://127.0.0.1:9")
    write_app(tmp_path / "down", {"app.yaml": yaml})
    env = dict(__import__("os").environ, **sqs_support.env())
    p = subprocess.run([sys.executable, "-m", "runtime", "run", str(tmp_path / "down"), "--until-idle",
                        "--log-level", "debug"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert p.returncode != 0
    assert "127.0.0.1:9" in p.stderr and SECRET not in p.stdout + p.stderr


# -- receiving, batching, leases ------------------------------------------------------------------

class Spy:
    """Records the calls an SQS client makes (on the driver's own client)."""

    def __init__(self, client: Any, *names: str):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        for name in names:
            real = getattr(client, name)

            def spy(*a: Any, _name: str = name, _real: Any = real, **kw: Any) -> Any:
                self.calls.append((_name, kw))
                return _real(*a, **kw)

            setattr(client, name, spy)

    def of(self, name: str) -> list[dict[str, Any]]:
        return [kw for n, kw in self.calls if n == name]


def test_receives_long_poll_whole_seconds_for_at_most_10_or_the_free_prefetch(sqs_app: Callable[..., App]) -> None:
    app = sqs_app(queue_entry("jobs", unique()), start=True)
    bound = app.router.queues["t:jobs"]
    driver = bound.driver
    spy = Spy(driver._client, "receive_message", "send_message_batch", "delete_message_batch")  # type: ignore
    driver.publish(bound.name, [Message.new(b"{}") for _ in range(25)])
    assert [len(kw["Entries"]) for kw in spy.of("send_message_batch")] == [10, 10, 5]
    small = driver.consume(bound.name, "test:small", 3, {"wait_time": 1.5})
    got = small.fetch(10, 5.0)
    assert 1 <= len(got) <= 3
    kw = spy.of("receive_message")[0]
    assert kw["MaxNumberOfMessages"] <= 3 and kw["WaitTimeSeconds"] == 2
    for d in got:
        small.ack(d)
    small.close()
    big = driver.consume(bound.name, "test:big", 100)
    seen = len(got)
    while seen < 25:
        batch = big.fetch(100, 5.0)
        assert batch, "stalled"
        seen += len(batch)
        for d in batch:
            big.ack(d)
    assert all(kw["MaxNumberOfMessages"] <= 10 for kw in spy.of("receive_message"))
    assert spy.of("receive_message")[-1]["WaitTimeSeconds"] == 20  # the default long poll
    assert wait_for(lambda: sum(len(kw["Entries"]) for kw in spy.of("delete_message_batch")) == 25, 5)
    assert max(len(kw["Entries"]) for kw in spy.of("delete_message_batch")) <= 10
    big.close()


SLOW = """
local time = require("time")
return function(job)
    time.sleep(job.sleep or 0)
    return true
end
"""


def test_a_handler_slower_than_the_visibility_timeout_keeps_its_message(sqs_app: Callable[..., App]) -> None:
    app = sqs_app(queue_entry("jobs", unique()) + """
- name: slow
  kind: function.lua
  source: file://slow.lua
  modules: [time]
- name: worker
  kind: queue.consumer
  queue: jobs
  func: slow
  concurrency: 2
  driver_options:
    sqs: {visibility_timeout: 1, wait_time: 1}
  lifecycle: {auto_start: true}
""", files={"slow.lua": SLOW})
    app.publish("t:jobs", {"sleep": 2.5})
    assert app.wait_idle(30)
    stats = app.consumer_stats()["t:worker"]
    assert (stats["acked"], stats["processed"]) == (1, 1), stats  # not handed to the second worker meanwhile


def test_a_retry_delay_beyond_15_minutes_is_clamped_and_said_once(sqs_app: Callable[..., App],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    app = sqs_app(queue_entry("jobs", unique()))
    bound = app.router.queues["t:jobs"]
    bound.driver.publish(bound.name, [Message.new(b"1"), Message.new(b"2")])
    c = bound.driver.consume(bound.name, "test:c", 10)
    got = []
    while len(got) < 2:
        got += c.fetch(2, 5.0)
    spy = Spy(bound.driver._client, "change_message_visibility")  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, "runtime.driver.sqs"):
        assert c.retry(got[0], 3600) and c.retry(got[1], 7200)
    assert [kw["VisibilityTimeout"] for kw in spy.of("change_message_visibility")] == [900, 900]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["driver t:sqs: a retry delay of 3600s is longer than SQS allows; delays are clamped to 900s "
                        "(15 minutes); said once"]
    st = bound.driver.stats(bound.name)
    assert (st.ready, st.in_flight, st.exact) == (0, 2, False)
    c.close()


def test_attempts_come_from_the_receive_count_and_dead_lettering_is_the_runtimes(
        sqs_app: Callable[..., App]) -> None:
    app = sqs_app(queue_entry("jobs", unique(), """
retry: {initial_delay: 0}
dead_letter: {queue: dead, max_attempts: 3}
""") + queue_entry("dead", unique("dead")) + """
- name: fail
  kind: function.lua
  source: |
    local queue = require("queue")
    return function(job)
        error("attempt " .. queue.message():attempt())
    end
  modules: [queue]
- name: worker
  kind: queue.consumer
  queue: jobs
  func: fail
  driver_options:
    sqs: {wait_time: 1}
  lifecycle: {auto_start: true}
""")
    app.publish("t:jobs", {"n": 1}, headers={"k": "v"})
    dead = take_all(app, "t:dead", 1, wait=20)
    assert len(dead) == 1
    h = dead[0].message.headers
    assert (h["x_attempts"], h["x_original_queue"], h["k"]) == (3, "t:jobs", "v")
    assert "attempt 3" in h["x_dead_letter_reason"]
    assert wait_for(lambda: app.consumer_stats()["t:worker"]["dead_lettered"] == 1, 5)  # counted after the publish


# -- headers, FIFO, other producers -------------------------------------------------------------

PUBLISH = """
local queue = require("queue")
return function(queue_id, headers)
    local id, err = queue.publish(queue_id, {n = 1}, headers)
    if err then return nil, err:kind(), err:message() end
    return id
end
"""


def test_fifo_queues_need_a_message_group_id(sqs_app: Callable[..., App]) -> None:
    name = unique("f") + ".fifo"
    app = sqs_app(queue_entry("orders", name) + """
- name: pub
  kind: function.lua
  source: file://pub.lua
  modules: [queue]
""", files={"pub.lua": PUBLISH})
    url = boto().get_queue_url(QueueName=name)["QueueUrl"]
    assert boto().get_queue_attributes(QueueUrl=url, AttributeNames=["FifoQueue"])["Attributes"]["FifoQueue"] == "true"
    _, kind, message = app.call("t:pub", "t:orders", {})
    assert kind == "Invalid" and "sqs.message_group_id" in message
    for i in range(3):
        assert app.call("t:pub", "t:orders", {"sqs.message_group_id": "g1", "seq": i}) is True
    got = take_all(app, "t:orders", 3)
    assert [d.message.headers["seq"] for d in got] == [0, 1, 2]  # in order within the group
    assert all(d.message.headers["sqs.message_group_id"] == "g1" for d in got)
    with pytest.raises(InvalidMessage, match="no per-message delay"):
        app.publish("t:orders", {"n": 2}, headers={"sqs.message_group_id": "g1"}, delay=1)


def test_headers_travel_typed_and_the_runtimes_own_are_packed(sqs_app: Callable[..., App]) -> None:
    name = unique()
    app = sqs_app(queue_entry("jobs", name))
    headers: dict[str, Any] = {f"h{i}": f"v{i}" for i in range(9)}
    headers.update({"count": 7, "ratio": 0.25, "ok": True, "empty": "", "bad name!": "x", "big": 1e300})
    msg_id = app.publish("t:jobs", {"n": 1}, headers=headers)
    raw = boto().receive_message(QueueUrl=boto().get_queue_url(QueueName=name)["QueueUrl"],
                                 MessageAttributeNames=["All"], VisibilityTimeout=0, WaitTimeSeconds=5)["Messages"][0]
    attributes = raw["MessageAttributes"]
    assert len(attributes) == 10 and "x_runtime" in attributes  # 9 user headers native, the rest packed
    assert json.loads(raw["Body"]) == {"n": 1}  # the JSON itself, readable by other SQS consumers
    (d,) = take_all(app, "t:jobs", 1)
    assert d.message.id == msg_id and d.attempt >= 1
    assert {k: v for k, v in d.message.headers.items() if k != "timestamp"} == headers
    assert isinstance(d.message.headers["timestamp"], float)


def test_sqs_delay_seconds_header_delays_the_message(sqs_app: Callable[..., App]) -> None:
    app = sqs_app(queue_entry("jobs", unique()))
    t0 = time.monotonic()
    app.publish("t:jobs", {"n": 1}, headers={"sqs.delay_seconds": 1})
    (d,) = take_all(app, "t:jobs", 1, wait=10)
    assert time.monotonic() - t0 >= 0.9
    assert "sqs.delay_seconds" not in d.message.headers
    with pytest.raises(InvalidMessage, match="at most 900s"):
        app.publish("t:jobs", {"n": 1}, delay=901)


def test_a_message_from_another_sqs_producer_reaches_the_handler(sqs_app: Callable[..., App]) -> None:
    name = unique()
    app = sqs_app(queue_entry("jobs", name) + """
- name: seen
  kind: queue.queue
  driver: sqs
  queue_name: SEEN_QUEUE
- name: copy
  kind: function.lua
  source: |
    local queue = require("queue")
    return function(job)
        local m = queue.message()
        queue.publish("t:seen", {job = job, source = m:header("source"), n = m:header("n")})
        return true
    end
  modules: [queue]
- name: worker
  kind: queue.consumer
  queue: jobs
  func: copy
  lifecycle: {auto_start: true}
""".replace("SEEN_QUEUE", unique("seen")))
    url = boto().get_queue_url(QueueName=name)["QueueUrl"]
    sent = boto().send_message(QueueUrl=url, MessageBody='{"from": "elsewhere"}', MessageAttributes={
        "source": {"DataType": "String", "StringValue": "billing"}, "n": {"DataType": "Number", "StringValue": "42"}})
    (d,) = take_all(app, "t:seen", 1, wait=20)
    assert json.loads(d.message.body) == {"job": {"from": "elsewhere"}, "source": "billing", "n": 42}
    assert sent["MessageId"]


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.drivers import driver_class
    from runtime.errors import ConfigError

    monkeypatch.setitem(sys.modules, "boto3", None)  # an import of boto3 fails
    monkeypatch.delitem(sys.modules, "runtime.drivers.sqs", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'lua-queue-runtime\[sqs\]'"):
        driver_class("queue.driver.sqs")

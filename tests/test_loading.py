"""Loading applications (SPEC §1-§2) through App.load: what valid apps may use."""

from __future__ import annotations

from textwrap import dedent

import pytest
from conftest import SAMPLES, write_app

from runtime import App, ConfigError
from runtime.registry import ConsumerSpec, FunctionSpec, QueueSpec

FUNC = """
  - name: f
    kind: function.lua
    source: "return function() return 1 end"
"""


def test_seed_sample_loads_with_its_fields():
    app = App.load(SAMPLES / "seed")
    consumer = app.registry.get("app.queue:task_consumer", ConsumerSpec)
    assert consumer is not None
    assert (consumer.queue, consumer.func) == ("app.queue:tasks", "app.queue:task_handler")
    assert (consumer.concurrency, consumer.prefetch, consumer.auto_ack) == (4, 20, False)
    assert consumer.lifecycle.auto_start and consumer.lifecycle.depends_on == ("app.queue:tasks",)
    queue = app.registry.get("app.queue:tasks", QueueSpec)
    assert queue.codec == "json/plain" and queue.driver == "app.queue:memory_driver"
    assert set(app.registry.dependencies["app.queue:task_consumer"]) == {
        "app.queue:tasks", "app.queue:task_handler"}


def test_recursive_discovery_bare_names_and_file_meta(tmp_path):
    write_app(tmp_path, {
        "a.yaml": """
            namespace: my.app
            meta: {team: core, tier: 1}
            entries:
              - name: drv
                kind: queue.driver.memory
              - name: q
                kind: queue.queue
                driver: drv
                meta: {tier: 2}
        """,
        "nested/deeper/b.yml": """
            namespace: other.ns
            entries:
              - name: h
                kind: function.lua
                source: file://h.lua
              - name: c
                kind: queue.consumer
                queue: my.app:q
                func: h
        """,
        "nested/deeper/h.lua": "return function(b) return b end",
        ".hidden/ignored.yaml": "not: [valid",
    })
    app = App.load(tmp_path)
    assert set(app.registry.entries) == {"my.app:drv", "my.app:q", "other.ns:h", "other.ns:c"}
    q = app.registry.get("my.app:q", QueueSpec)
    assert q.driver == "my.app:drv"
    assert q.meta == {"team": "core", "tier": 2}  # entry keys win over file meta
    c = app.registry.get("other.ns:c", ConsumerSpec)
    assert c.func == "other.ns:h" and c.queue == "my.app:q"


def test_wippy_lock_source_folders(tmp_path):
    write_app(tmp_path, {
        "wippy.lock": "directories:\n  src: ./src\n",
        "src/app.yaml": "namespace: app\nentries:\n" + FUNC,
        "elsewhere/broken.yaml": "this is: [not loaded",
    })
    assert set(App.load(tmp_path).registry.entries) == {"app:f"}


def test_wippy_lock_source_list(tmp_path):
    write_app(tmp_path, {
        "wippy.lock": "directories:\n  src: [one, two]\n",
        "one/a.yaml": "namespace: a\nentries:\n" + FUNC,
        "two/b.yaml": "namespace: b\nentries:\n" + FUNC,
    })
    assert set(App.load(tmp_path).registry.entries) == {"a:f", "b:f"}


def test_env_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("RT_WORKERS", "7")
    monkeypatch.setenv("RT_QUEUE", "jobs")
    monkeypatch.delenv("RT_UNSET", raising=False)
    write_app(tmp_path, {"app.yaml": dedent("""
        namespace: app
        entries:
          - name: drv
            kind: queue.driver.memory
          - name: q
            kind: queue.queue
            driver: drv
            queue_name: "prefix-${env:RT_QUEUE}-${env:RT_UNSET|x}"
          - name: c
            kind: queue.consumer
            queue: q
            func: f
            concurrency: "${env:RT_WORKERS|4}"
            prefetch: "${env:RT_UNSET|25}"
            auto_ack: "${env:RT_UNSET|true}"
    """) + FUNC})
    app = App.load(tmp_path)
    c = app.registry.get("app:c", ConsumerSpec)
    assert (c.concurrency, c.prefetch, c.auto_ack) == (7, 25, True)
    assert app.registry.get("app:q", QueueSpec).queue_name == "prefix-jobs-x"


def test_file_source_relative_to_yaml_and_verbatim(tmp_path, monkeypatch):
    monkeypatch.setenv("RT_SHOULD_NOT_EXPAND", "oops")
    write_app(tmp_path, {
        "defs/app.yaml": """
            namespace: app
            entries:
              - name: f
                kind: function.lua
                source: file://../lua/f.lua
        """,
        "lua/f.lua": 'return function() return "${env:RT_SHOULD_NOT_EXPAND}" end',
    })
    app = App.load(tmp_path)
    assert app.call("app:f") == "${env:RT_SHOULD_NOT_EXPAND}"
    assert app.registry.get("app:f", FunctionSpec).source.path == (tmp_path / "lua/f.lua").resolve()


@pytest.mark.parametrize("value, expected", [(0, 1), (-5, 1), (1000, 1000)])
def test_concurrency_zero_or_below_means_default(tmp_path, value, expected):
    write_app(tmp_path, {"app.yaml": dedent(f"""
        namespace: app
        entries:
          - name: drv
            kind: queue.driver.memory
          - name: q
            kind: queue.queue
            driver: drv
          - name: c
            kind: queue.consumer
            queue: q
            func: f
            concurrency: {value}
            prefetch: {value}
    """) + FUNC})
    c = App.load(tmp_path).registry.get("app:c", ConsumerSpec)
    assert c.concurrency == expected
    assert c.prefetch == (10 if value <= 0 else 1000)


def test_durations_sizes_codecs_and_limits(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: app
        entries:
          - name: drv
            kind: queue.driver.memory
            lifecycle: {stop_timeout: 1m30s, restart: {max_attempts: 3, initial_delay: 500ms, max_delay: 2}}
          - name: q
            kind: queue.queue
            driver: drv
            codec: msgpack
            driver_options: {memory: {max_length: 50}}
            dead_letter: {queue: dlq, max_attempts: 5}
          - name: dlq
            kind: queue.queue
            driver: drv
          - name: f
            kind: function.lua
            source: "return function() end"
            timeout: 250ms
            memory_limit: 64MB
    """})
    app = App.load(tmp_path)
    drv = app.registry.get("app:drv")
    assert drv.lifecycle.stop_timeout == 90.0
    assert (drv.lifecycle.restart.max_attempts, drv.lifecycle.restart.initial_delay,
            drv.lifecycle.restart.max_delay) == (3, 0.5, 2.0)
    q = app.registry.get("app:q", QueueSpec)
    assert q.codec == "application/msgpack"
    assert q.dead_letter.queue == "app:dlq" and q.dead_letter.max_attempts == 5
    f = app.registry.get("app:f", FunctionSpec)
    assert (f.timeout, f.memory_limit) == (0.25, 64 * 1024 * 1024)


def test_all_kinds_accepted(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: app
        entries:
          - name: host
            kind: process.host
            host: {workers: 4}
            lifecycle: {auto_start: true}
          - name: producer
            kind: process.lua
            source: "return { main = function(n) return n end }"
          - name: svc
            kind: process.service
            process: producer
            host: app:host
            args: [10]
            lifecycle:
              auto_start: true
              security:
                actor: {id: producer-bot, meta: {role: worker}}
                policies: [pol]
                groups: [workers]
          - name: pol
            kind: security.policy
            groups: [workers]
            policy:
              actions: "queue.publish"
              resources: ["app:*"]
              effect: allow
              conditions:
                - {field: actor.meta.role, operator: eq, value: worker}
    """})
    app = App.load(tmp_path)
    assert {s.kind for s in app.registry} == {"process.host", "process.lua", "process.service",
                                              "security.policy"}
    svc = app.registry.get("app:svc")
    assert svc.args == (10,) and svc.lifecycle.security.actor.id == "producer-bot"
    assert svc.lifecycle.security.policies == ("app:pol",)


def test_config_error_lists_every_problem(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: app
        entries:
          - name: c
            kind: queue.consumer
            queue: nowhere
            func: nothing
            concurrency: 5000
          - name: x
            kind: queue.queu
    """})
    with pytest.raises(ConfigError) as info:
        App.load(tmp_path)
    messages = [p.message for p in info.value.problems]
    assert len(messages) == 4, messages
    assert all(p.file.endswith("app.yaml") and p.line > 0 for p in info.value.problems)
    assert any("did you mean 'queue.queue'" in m for m in messages)


def test_missing_app_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        App.load(tmp_path / "nope")

"""Publish authorization end to end (SPEC §3): a handler publishes as its consumer's
lifecycle actor; `queue.publish` checks `queue.publish` then `queue.publish.queue`."""

from __future__ import annotations

import logging

from conftest import drain, write_app

from runtime import App

APP = """
namespace: app
entries:
  - name: mem
    kind: queue.driver.memory
    lifecycle: {auto_start: true}
  - name: in
    kind: queue.queue
    driver: mem
  - name: out
    kind: queue.queue
    driver: mem
  - name: secret
    kind: queue.queue
    driver: mem
  - name: results
    kind: queue.queue
    driver: mem
  - name: publish_to_out
    kind: security.policy
    policy:
      actions: ["queue.publish", "queue.publish.queue"]
      resources: ["app:out", "app:results"]
      effect: allow
      conditions:
        - {field: actor.meta.role, operator: eq, value: worker}
  - name: deny_secret
    kind: security.policy
    groups: [everyone]
    policy: {actions: "queue.*", resources: "app:secret", effect: deny}
  - name: allow_all
    kind: security.policy
    policy: {actions: "*", resources: "*", effect: allow}
  - name: h
    kind: function.lua
    modules: [queue]
    source: |
      local queue = require("queue")
      return function(body)
        local ok, err = queue.publish(body.to, {from = "handler"})
        local kind = err and err:kind() or "ok"
        -- report through a queue the test reads (the reporter itself is allowed)
        queue.publish("results", {to = body.to, kind = kind, message = err and err:message() or ""})
      end
  - name: c
    kind: queue.consumer
    queue: in
    func: h
    lifecycle:
      auto_start: true
      security:
        actor: {id: worker-1, meta: {role: ROLE}}
        policies: [POLICIES]
        groups: [GROUPS]
"""


def _run(tmp_path, role="worker", policies="publish_to_out", groups="", strict=False, targets=("app:out",)):
    text = APP.replace("ROLE", role).replace("POLICIES", policies).replace("GROUPS", groups)
    write_app(tmp_path, {"app.yaml": text})
    app = App.load(tmp_path, strict_security=strict)
    with app:
        for target in targets:
            app.publish("app:in", {"to": target})
        assert app.wait_idle(10)
    return {r["to"]: (r["kind"], r["message"]) for _, r in drain(app, "app:results")}


def test_allowed_and_not_allowed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="runtime.security")
    out = _run(tmp_path, targets=("app:out", "app:secret", "app:in"))
    assert out["app:out"][0] == "ok"
    assert out["app:secret"][0] == "PermissionDenied" and "worker-1" in out["app:secret"][1]
    assert out["app:in"][0] == "PermissionDenied"
    assert "actor worker-1 (in app:h) may not publish to app:in" in caplog.text


def test_condition_on_actor_meta(tmp_path):
    out = _run(tmp_path, role="visitor", targets=("app:out",))
    # the reporting publish is denied too, so nothing reaches `results`
    assert out == {}


def test_deny_wins_over_allow_through_groups(tmp_path):
    out = _run(tmp_path, policies="allow_all", groups="everyone", targets=("app:out", "app:secret"))
    assert out["app:out"][0] == "ok"
    assert out["app:secret"][0] == "PermissionDenied" and "deny_secret" in out["app:secret"][1]


def test_no_actor_is_allowed_by_default_and_denied_in_strict_mode(tmp_path):
    write_app(tmp_path, {"app.yaml": """
        namespace: app
        entries:
          - name: mem
            kind: queue.driver.memory
            lifecycle: {auto_start: true}
          - name: out
            kind: queue.queue
            driver: mem
          - name: f
            kind: function.lua
            modules: [queue]
            source: "local q = require('queue') return function() return q.publish('app:out', 1) end"
    """})
    with App.load(tmp_path) as app:
        assert app.call("app:f") is True
    with App.load(tmp_path, strict_security=True) as app:
        ok, err = app.call("app:f")
        assert ok is None and err.kind == "PermissionDenied" and "strict mode" in err.message
        # host-side publishing is the operator's and is never checked
        app.publish("app:out", 2)
        assert app.stats()["queues"]["app:out"]["ready"] == 1  # (a new App: a new memory driver)

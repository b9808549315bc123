"""The policy engine (runtime.lifecycle.security): patterns, conditions, decisions (SPEC §2, §3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import App, ConfigError
from runtime.lifecycle.security import Authorizer, Decision, policy_problems
from runtime.registry import ConsumerSpec, PolicySpec, Registry, load_registry
from runtime.registry.kinds import Actor, Lifecycle, PolicyCondition, SecurityContext

PUBLISH = "queue.publish"
META = {"level": 5, "limit": 5, "ratio": 0.5, "team": "ops", "other_team": "dev", "tags": ["a", "b"],
        "name": "alice-admin", "flag": True, "nothing": None, "pattern": "^ali", "bad_pattern": "(",
        "queue": "app:q", "nested": {"deep": "x"}}
ALICE = Actor("u1", META)


def policy(name: str, *, actions: Any = "*", resources: Any = "*", effect: str = "allow",
           conditions: list[dict[str, Any]] | None = None, groups: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"actions": actions, "resources": resources, "effect": effect}
    if conditions:
        body["conditions"] = conditions
    entry: dict[str, Any] = {"name": name, "kind": "security.policy", "policy": body}
    if groups:
        entry["groups"] = groups
    return entry


def load(root: Path, *entries: dict[str, Any]) -> Registry:
    write_app(root, {"app.yaml": yaml.safe_dump({"namespace": "app", "entries": list(entries)})})
    registry, problems = load_registry(root)
    assert problems == []
    return registry


def ctx(*policies: str, actor: Actor | None = ALICE, groups: tuple[str, ...] = ()) -> SecurityContext:
    return SecurityContext(actor, tuple(f"app:{p}" for p in policies), groups)


# -- conditions: every operator, both ways -------------------------------------------------------

def cond(field: str, operator: str, value: Any = None, *, value_from: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"field": field, "operator": operator}
    if value_from is not None:
        c["value_from"] = value_from
    elif operator not in ("exists", "nexists") or value is not None:
        c["value"] = value
    return c


M = "actor.meta."
CONDITION_CASES: list[tuple[dict[str, Any], bool]] = [
    # eq / ne: numbers as numbers, no cross-type equality, booleans only equal booleans
    (cond(M + "level", "eq", 5), True),
    (cond(M + "level", "eq", 5.0), True),
    (cond(M + "level", "eq", "5"), False),
    (cond(M + "level", "eq", 6), False),
    (cond(M + "team", "eq", "ops"), True),
    (cond(M + "team", "eq", "dev"), False),
    (cond(M + "flag", "eq", True), True),
    (cond(M + "flag", "eq", 1), False),
    (cond(M + "tags", "eq", ["a", "b"]), True),
    (cond(M + "nested", "eq", {"deep": "x"}), True),
    (cond("actor.id", "eq", "u1"), True),
    (cond(M + "team", "ne", "dev"), True),
    (cond(M + "team", "ne", "ops"), False),
    (cond(M + "level", "ne", "5"), True),
    (cond(M + "flag", "ne", 1), True),
    # ordering: numbers and strings, a type mismatch (or a boolean) is false
    (cond(M + "level", "lt", 6), True),
    (cond(M + "level", "lt", 5), False),
    (cond(M + "level", "lt", "6"), False),
    (cond(M + "team", "lt", "pz"), True),
    (cond(M + "team", "lt", "a"), False),
    (cond(M + "level", "gt", 4), True),
    (cond(M + "level", "gt", 5), False),
    (cond(M + "ratio", "gt", 0.25), True),
    (cond(M + "team", "gt", 1), False),
    (cond(M + "level", "lte", 5), True),
    (cond(M + "level", "lte", 4.5), False),
    (cond(M + "level", "gte", 5), True),
    (cond(M + "level", "gte", 6), False),
    (cond(M + "flag", "gte", 0), False),
    (cond(M + "tags", "gte", ["a"]), False),
    # in / nin
    (cond(M + "team", "in", ["ops", "dev"]), True),
    (cond(M + "team", "in", ["dev"]), False),
    (cond(M + "level", "in", [4, 5]), True),
    (cond(M + "level", "in", ["5"]), False),
    (cond(M + "team", "in", "ops"), True),  # a scalar is a one-item list
    (cond(M + "team", "nin", ["dev"]), True),
    (cond(M + "team", "nin", ["ops", "dev"]), False),
    # exists / nexists (null reads as absent)
    (cond(M + "team", "exists"), True),
    (cond("actor.id", "exists"), True),
    (cond(M + "absent", "exists"), False),
    (cond(M + "nothing", "exists"), False),
    (cond(M + "team.deeper", "exists"), False),
    (cond(M + "nested.deep", "exists"), True),
    (cond(M + "absent", "nexists"), True),
    (cond(M + "nothing", "nexists"), True),
    (cond(M + "team", "nexists"), False),
    # contains / ncontains: substrings of strings, items of lists
    (cond(M + "name", "contains", "admin"), True),
    (cond(M + "name", "contains", "root"), False),
    (cond(M + "name", "contains", 5), False),
    (cond(M + "tags", "contains", "a"), True),
    (cond(M + "tags", "contains", "z"), False),
    (cond(M + "level", "contains", 5), False),
    (cond(M + "name", "ncontains", "root"), True),
    (cond(M + "name", "ncontains", "admin"), False),
    (cond(M + "tags", "ncontains", "b"), False),
    # matches / nmatches: re.search, a non-string field never matches
    (cond(M + "name", "matches", "^alice"), True),
    (cond(M + "name", "matches", "admin$"), True),
    (cond(M + "name", "matches", "^admin"), False),
    (cond(M + "level", "matches", "5"), False),
    (cond(M + "name", "nmatches", "^bob"), True),
    (cond(M + "name", "nmatches", "^alice"), False),
    (cond(M + "level", "nmatches", "5"), True),
    # the rest of the evaluation document
    (cond("action", "eq", PUBLISH), True),
    (cond("action", "eq", "queue.info"), False),
    (cond("resource", "matches", "^app:"), True),
    (cond("groups", "contains", "g1"), True),
    (cond("groups", "contains", "g9"), False),
    # value_from: the compared value is read from the document too
    (cond(M + "level", "eq", value_from=M + "limit"), True),
    (cond(M + "team", "eq", value_from=M + "other_team"), False),
    (cond(M + "team", "ne", value_from=M + "other_team"), True),
    (cond(M + "level", "lte", value_from=M + "limit"), True),
    (cond(M + "level", "lt", value_from=M + "limit"), False),
    (cond("resource", "eq", value_from=M + "queue"), True),
    (cond(M + "tags", "contains", value_from="actor.meta.tags"), False),
    (cond(M + "name", "matches", value_from=M + "pattern"), True),
    (cond(M + "name", "matches", value_from=M + "bad_pattern"), False),
    (cond(M + "name", "nmatches", value_from=M + "bad_pattern"), True),
    (cond(M + "name", "matches", value_from=M + "level"), False),
    # a value_from that does not resolve: positives false, negatives true
    (cond(M + "team", "eq", value_from=M + "absent"), False),
    (cond(M + "team", "ne", value_from=M + "absent"), True),
    (cond(M + "team", "in", value_from=M + "absent"), False),
    (cond(M + "team", "nin", value_from=M + "absent"), True),
    # a literal null value is no value
    (cond(M + "team", "eq", None), False),
    (cond(M + "team", "ne", None), True),
]
MISSING_FIELD_CASES: list[tuple[str, Any, bool]] = [
    ("eq", "x", False), ("ne", "x", True), ("lt", 1, False), ("gt", 1, False), ("lte", 1, False),
    ("gte", 1, False), ("in", ["x"], False), ("nin", ["x"], True), ("exists", None, False),
    ("nexists", None, True), ("contains", "x", False), ("ncontains", "x", True),
    ("matches", ".*", False), ("nmatches", ".*", True),
]


@pytest.fixture(scope="module")
def condition_authorizer(tmp_path_factory: pytest.TempPathFactory) -> Authorizer:
    entries = [policy(f"c{i}", conditions=[c]) for i, (c, _) in enumerate(CONDITION_CASES)]
    entries += [policy(f"m_{op}", conditions=[cond(M + "absent", op, value)])
                for op, value, _ in MISSING_FIELD_CASES]
    return Authorizer(load(tmp_path_factory.mktemp("conditions"), *entries))


@pytest.mark.parametrize(("index", "holds"), [(i, h) for i, (_, h) in enumerate(CONDITION_CASES)],
                         ids=[f"{c['field']}-{c['operator']}-{c.get('value', c.get('value_from'))}"
                              for c, _ in CONDITION_CASES])
def test_condition_operator(condition_authorizer: Authorizer, index: int, holds: bool) -> None:
    decision = condition_authorizer.check(ctx(f"c{index}", groups=("g1",)), PUBLISH, "app:q")
    assert decision.allowed is holds
    if holds:
        assert decision == Decision(True, f"allowed by policy app:c{index}", f"app:c{index}")
    else:
        assert decision.reason.startswith("no policy allows") and decision.policy is None


@pytest.mark.parametrize(("operator", "holds"), [(op, h) for op, _, h in MISSING_FIELD_CASES])
def test_missing_field_fails_every_operator_but_the_negative_ones(condition_authorizer: Authorizer,
                                                                  operator: str, holds: bool) -> None:
    assert condition_authorizer.check(ctx(f"m_{operator}"), PUBLISH, "app:q").allowed is holds


def test_actor_conditions_without_an_actor(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("deny_anon", effect="deny",
                                                  conditions=[cond("actor.id", "nexists")]),
                                 policy("deny_ops", effect="deny",
                                        conditions=[cond(M + "team", "eq", "ops")])))
    assert authorizer.check(ctx("deny_anon", "deny_ops", actor=None), PUBLISH, "app:q") == \
        Decision(False, "denied by policy app:deny_anon", "app:deny_anon")
    assert authorizer.check(ctx("deny_ops", actor=None), PUBLISH, "app:q").allowed
    assert authorizer.check(ctx("deny_ops", actor=Actor("u2", {"team": "ops"})), PUBLISH, "app:q").policy == \
        "app:deny_ops"


def test_all_conditions_must_hold(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("both", conditions=[cond(M + "level", "gte", 3),
                                                                      cond(M + "team", "eq", "ops")])))
    assert authorizer.check(ctx("both", actor=Actor("a", {"level": 3, "team": "ops"})), PUBLISH, "q").allowed
    assert not authorizer.check(ctx("both", actor=Actor("a", {"level": 3, "team": "dev"})), PUBLISH, "q").allowed
    assert not authorizer.check(ctx("both", actor=Actor("a", {"level": 2, "team": "ops"})), PUBLISH, "q").allowed


def test_condition_outcomes_are_not_cached_across_actors(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("lvl", conditions=[cond(M + "level", "gte", 3)])))
    for _ in range(3):
        assert authorizer.check(ctx("lvl", actor=Actor("a", {"level": 3})), PUBLISH, "app:q").allowed
        assert not authorizer.check(ctx("lvl", actor=Actor("b", {"level": 1})), PUBLISH, "app:q").allowed


def test_invalid_literal_pattern_is_a_config_problem(tmp_path: Path) -> None:
    registry = load(tmp_path, policy("bad", conditions=[cond(M + "name", "matches", "(")]),
                    policy("num", conditions=[cond(M + "name", "nmatches", 5)]),
                    policy("fine", conditions=[cond(M + "name", "matches", value_from=M + "x")]))
    problems = policy_problems(registry)
    assert len(problems) == 2
    assert "app:bad" in str(problems[0]) and "invalid regular expression" in str(problems[0])
    assert "app:num" in str(problems[1]) and "string pattern" in str(problems[1])
    assert all(p.file.endswith("app.yaml") and p.line > 0 for p in problems)
    with pytest.raises(ConfigError, match="app:bad"):
        Authorizer(registry)


# -- patterns ------------------------------------------------------------------------------------

PATTERN_CASES = [
    ("*", "anything.at:all", True),
    ("*", "", True),
    ("queue.publish", "queue.publish", True),
    ("queue.publish", "queue.publish.queue", False),
    ("queue.publish", "queue.publis", False),
    ("queue.*", "queue.publish", True),
    ("queue.*", "queue.publish.queue", True),
    ("queue.*", "queue.", True),
    ("queue.*", "queue", False),
    ("queue.*", "queues.publish", False),
    ("queue.publish*", "queue.publish", True),
    ("queue.publish*", "queue.publish.queue", True),
    ("app:*", "app:tasks", True),
    ("app:*", "app.queue:tasks", False),
    ("app*", "app.queue:tasks", True),
    ("app.queue:*", "app.queue:tasks", True),
    ("app.queue:*", "app:tasks", False),
    ("a*b", "a*b", True),  # only a trailing star is special
    ("a*b", "axb", False),
]


@pytest.mark.parametrize(("pattern", "text", "expected"), PATTERN_CASES)
@pytest.mark.parametrize("side", ["action", "resource"])
def test_patterns(tmp_path: Path, side: str, pattern: str, text: str, expected: bool) -> None:
    if side == "action":
        authorizer = Authorizer(load(tmp_path, policy("p", actions=[pattern], resources=["r"])))
        decision = authorizer.check(ctx("p"), text, "r")
    else:
        authorizer = Authorizer(load(tmp_path, policy("p", actions=[PUBLISH], resources=[pattern])))
        decision = authorizer.check(ctx("p"), PUBLISH, text)
    assert decision.allowed is expected


def test_any_of_several_patterns_and_a_single_string(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("p", actions=["queue.info", PUBLISH], resources=["app:a", "x:*"]),
                                 policy("s", actions="queue.info", resources="app:s")))
    for action, resource in [(PUBLISH, "app:a"), ("queue.info", "x:y"), (PUBLISH, "x:")]:
        assert authorizer.check(ctx("p"), action, resource).allowed
    for action, resource in [("queue.other", "app:a"), (PUBLISH, "app:b")]:
        assert not authorizer.check(ctx("p"), action, resource).allowed
    assert authorizer.check(ctx("s"), "queue.info", "app:s").allowed
    assert not authorizer.check(ctx("s"), "queue.info", "app:t").allowed


# -- decisions -----------------------------------------------------------------------------------

def test_deny_wins_over_allow_whatever_the_order(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("allow_all"), policy("no_dlq", effect="deny", resources=["app:dlq"])))
    denied = Decision(False, "denied by policy app:no_dlq", "app:no_dlq")
    assert authorizer.check(ctx("allow_all", "no_dlq"), PUBLISH, "app:dlq") == denied
    assert authorizer.check(ctx("no_dlq", "allow_all"), PUBLISH, "app:dlq") == denied
    assert authorizer.check(ctx("no_dlq", "allow_all"), PUBLISH, "app:tasks").policy == "app:allow_all"


def test_deny_whose_condition_fails_does_not_deny(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("allow_all"),
                                 policy("no_juniors", effect="deny", conditions=[cond(M + "level", "lt", 3)])))
    assert authorizer.check(ctx("allow_all", "no_juniors"), PUBLISH, "app:q").allowed
    junior = Actor("j", {"level": 1})
    assert authorizer.check(ctx("allow_all", "no_juniors", actor=junior), PUBLISH, "app:q").policy == "app:no_juniors"


def test_the_first_applicable_policy_is_named(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("d1", effect="deny"), policy("d2", effect="deny"),
                                 policy("a1"), policy("a2")))
    assert authorizer.check(ctx("d2", "d1"), PUBLISH, "q").policy == "app:d2"
    assert authorizer.check(ctx("a2", "a1"), PUBLISH, "q").policy == "app:a2"


def test_group_derived_policies(tmp_path: Path) -> None:
    registry = load(
        tmp_path,
        policy("ops_publish", actions=["queue.*"], resources=["app:*"], groups=["ops"]),
        policy("no_dlq", effect="deny", resources=["app:dlq"], groups=["ops", "auditors"]),
        policy("named", actions=["queue.info"]))
    authorizer = Authorizer(registry)
    ops = SecurityContext(ALICE, (), ("ops",))
    assert authorizer.effective_policies(ops) == ("app:ops_publish", "app:no_dlq")
    assert authorizer.check(ops, PUBLISH, "app:tasks").policy == "app:ops_publish"
    assert authorizer.check(ops, PUBLISH, "app:dlq").policy == "app:no_dlq"
    assert not authorizer.check(ops, PUBLISH, "other:tasks").allowed
    auditors = SecurityContext(ALICE, ("app:named",), ("auditors", "ops", "nobody"))
    assert authorizer.effective_policies(auditors) == ("app:named", "app:ops_publish", "app:no_dlq")
    assert authorizer.check(auditors, "queue.info", "app:dlq").policy == "app:no_dlq"
    # a group no policy names gives no policies: the no-policy default applies
    dev = SecurityContext(ALICE, (), ("dev",))
    assert authorizer.effective_policies(dev) == ()
    assert authorizer.check(dev, PUBLISH, "app:dlq") == Decision(True, "no policies")
    assert Authorizer(registry, strict=True).check(dev, PUBLISH, "app:dlq") == \
        Decision(False, "no policies (strict mode)")


def test_a_named_policy_listed_twice_or_also_by_group_counts_once(tmp_path: Path) -> None:
    authorizer = Authorizer(load(tmp_path, policy("p", groups=["g"])))
    assert authorizer.effective_policies(SecurityContext(ALICE, ("app:p", "app:p"), ("g",))) == ("app:p",)


DEFAULT_CASES = [
    # actor, policies,  strict, allowed, reason
    (False, (), False, True, "no policies"),
    (False, (), True, False, "no actor (strict mode)"),
    (True, (), False, True, "no policies"),
    (True, (), True, False, "no policies (strict mode)"),
    (True, ("info_only",), False, False, "no policy allows queue.publish on app:q for actor u1"),
    (True, ("info_only",), True, False, "no policy allows queue.publish on app:q for actor u1"),
    (False, ("info_only",), False, True, "no actor"),
    (False, ("info_only",), True, False, "no actor (strict mode)"),
    (False, ("allow_all",), False, True, "allowed by policy app:allow_all"),
    (False, ("allow_all",), True, False, "no actor (strict mode)"),
    (True, ("allow_all",), True, True, "allowed by policy app:allow_all"),
    (False, ("deny_all",), False, False, "denied by policy app:deny_all"),
    (False, ("deny_all",), True, False, "denied by policy app:deny_all"),
    (True, ("ghost",), False, False, "no policy allows queue.publish on app:q for actor u1"),
    (False, ("ghost",), False, True, "no actor"),
]


@pytest.mark.parametrize(("has_actor", "policies", "strict", "allowed", "reason"), DEFAULT_CASES)
def test_defaults(tmp_path: Path, has_actor: bool, policies: tuple[str, ...], strict: bool, allowed: bool,
                  reason: str) -> None:
    registry = load(tmp_path, policy("info_only", actions=["queue.info"]), policy("allow_all"),
                    policy("deny_all", effect="deny"))
    decision = Authorizer(registry, strict=strict).check(ctx(*policies, actor=ALICE if has_actor else None),
                                                         PUBLISH, "app:q")
    assert (decision.allowed, decision.reason) == (allowed, reason)


@pytest.mark.parametrize("strict", [False, True])
def test_no_context_is_no_actor_and_no_policies(tmp_path: Path, strict: bool) -> None:
    authorizer = Authorizer(load(tmp_path, policy("deny_all", effect="deny", groups=["g"])), strict=strict)
    assert authorizer.check(None, PUBLISH, "app:q") == authorizer.check(SecurityContext(), PUBLISH, "app:q")
    assert authorizer.check(None, PUBLISH, "app:q").allowed is not strict
    assert authorizer.check_publish(None, "app:q").allowed is not strict


def test_decision_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Decision(True, "x").allowed = False  # type: ignore[misc]


# -- queue.publish checks both actions --------------------------------------------------------------

def test_check_publish_needs_both_actions(tmp_path: Path) -> None:
    authorizer = Authorizer(load(
        tmp_path,
        policy("publish_only", actions=[PUBLISH], resources=["app:q"]),
        policy("both", actions=[PUBLISH, "queue.publish.queue"], resources=["app:q"]),
        policy("prefix", actions=["queue.*"], resources=["app:*"]),
        policy("deny_second", effect="deny", actions=["queue.publish.queue"], resources=["app:q"]),
        policy("deny_first", effect="deny", actions=[PUBLISH], resources=["app:q"])))
    assert authorizer.check(ctx("publish_only"), PUBLISH, "app:q").allowed
    assert authorizer.check_publish(ctx("publish_only"), "app:q") == \
        Decision(False, "no policy allows queue.publish.queue on app:q for actor u1")
    assert authorizer.check_publish(ctx("both"), "app:q") == Decision(True, "allowed by policy app:both", "app:both")
    assert not authorizer.check_publish(ctx("both"), "app:other").allowed
    assert authorizer.check_publish(ctx("prefix"), "app:other").allowed
    assert authorizer.check_publish(ctx("prefix", "deny_second"), "app:q").policy == "app:deny_second"
    assert authorizer.check_publish(ctx("prefix", "deny_second", "deny_first"), "app:q").policy == "app:deny_first"
    # without policies the default applies to both checks
    assert authorizer.check_publish(ctx(), "app:q") == Decision(True, "no policies")


def test_context_from_a_consumer_lifecycle(tmp_path: Path) -> None:
    write_app(tmp_path, {"app.yaml": """
        namespace: app.queue
        entries:
          - name: drv
            kind: queue.driver.memory
          - name: tasks
            kind: queue.queue
            driver: drv
          - name: results
            kind: queue.queue
            driver: drv
          - name: handler
            kind: function.lua
            source: "return function(b) return true end"
          - name: worker
            kind: queue.consumer
            queue: tasks
            func: handler
            lifecycle:
              security:
                actor: {id: "svc:worker", meta: {tier: 2}}
                policies: [publish_results]
                groups: [workers]
          - name: publish_results
            kind: security.policy
            policy:
              actions: ["queue.publish", "queue.publish.queue"]
              resources: ["app.queue:results"]
              effect: allow
              conditions: [{field: actor.meta.tier, operator: gte, value: 2}]
          - name: no_tasks
            kind: security.policy
            groups: [workers]
            policy: {actions: "queue.*", resources: "app.queue:tasks", effect: deny}
    """})
    app = App.load(tmp_path)
    consumer = app.registry.get("app.queue:worker", ConsumerSpec)
    assert consumer is not None
    context = consumer.lifecycle.security
    assert context is not None and context.policies == ("app.queue:publish_results",)
    authorizer = Authorizer(app.registry)
    assert authorizer.check_publish(context, "app.queue:results").policy == "app.queue:publish_results"
    assert authorizer.check_publish(context, "app.queue:tasks").policy == "app.queue:no_tasks"


# -- properties ------------------------------------------------------------------------------------

ACTIONS = [PUBLISH, "queue.publish.queue", "queue.info"]
RESOURCES = ["app:a", "app:b", "other:c"]
ACTION_PATTERNS = ["*", "queue.*", PUBLISH, "queue.publish.queue", "queue.publish*", "queue.info"]
RESOURCE_PATTERNS = ["*", "app:*", "app:a", "app:b", "other:c", "other*"]
CONDITIONS = [
    PolicyCondition("actor.meta.level", "gte", 3),
    PolicyCondition("actor.meta.team", "eq", "ops"),
    PolicyCondition("actor.meta.team", "ne", "ops"),
    PolicyCondition("actor.meta.tags", "contains", "x"),
    PolicyCondition("actor.id", "exists"),
    PolicyCondition("actor.id", "nexists"),
    PolicyCondition("actor.id", "matches", "^a"),
    PolicyCondition("actor.meta.level", "lt", value_from="actor.meta.limit"),
    PolicyCondition("resource", "in", ["app:a", "other:c"]),
]
GROUPS = ["g1", "g2", "g3"]
ACTORS = [None, Actor("alice", {"level": 5, "team": "ops", "tags": ["x"], "limit": 9}),
          Actor("bob", {"level": 1, "team": "dev"}), Actor("anon", {})]


def make_policy(pid: str, actions: list[str], resources: list[str], effect: str,
                conditions: list[PolicyCondition], groups: list[str]) -> PolicySpec:
    return PolicySpec(id=pid, kind="security.policy", file="gen.yaml", line=1, meta={}, lifecycle=Lifecycle(),
                      actions=tuple(actions), resources=tuple(resources), effect=effect,
                      conditions=tuple(conditions), groups=tuple(groups))


def policies_strategy(effect: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(st.lists(st.sampled_from(ACTION_PATTERNS), min_size=1, max_size=2),
                     st.lists(st.sampled_from(RESOURCE_PATTERNS), min_size=1, max_size=2), effect,
                     st.lists(st.sampled_from(CONDITIONS), max_size=2),
                     st.lists(st.sampled_from(GROUPS), max_size=2))


def registry_of(specs: list[PolicySpec]) -> Registry:
    return Registry(Path("."), {s.id: s for s in specs})


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(base=st.lists(policies_strategy(st.sampled_from(["allow", "deny"])), max_size=4),
       extra=policies_strategy(st.just("deny")),
       attach=st.sampled_from(["named", "group", "detached"]),
       actor=st.sampled_from(ACTORS),
       named=st.lists(st.integers(0, 4), max_size=3),
       groups=st.lists(st.sampled_from(GROUPS), max_size=2),
       strict=st.booleans())
def test_adding_a_deny_policy_never_turns_a_denial_into_an_allow(
        base: list[tuple[Any, ...]], extra: tuple[Any, ...], attach: str, actor: Actor | None,
        named: list[int], groups: list[str], strict: bool) -> None:
    specs = [make_policy(f"gen:p{i}", *p) for i, p in enumerate(base)]
    # an index past the list names a policy that does not exist (fails closed)
    context = SecurityContext(actor, tuple(f"gen:p{i}" for i in named), tuple(groups))
    before = Authorizer(registry_of(specs), strict=strict)

    actions, resources, effect, conditions, extra_groups = extra
    if attach == "group":
        extra_groups = [*extra_groups, "g_extra"]
    deny = make_policy("gen:extra", actions, resources, effect, conditions, extra_groups)
    after_context = context
    if attach == "named":
        after_context = dataclasses.replace(context, policies=context.policies + ("gen:extra",))
    elif attach == "group":
        after_context = dataclasses.replace(context, groups=context.groups + ("g_extra",))
    after = Authorizer(registry_of([*specs, deny]), strict=strict)

    for action in ACTIONS:
        for resource in RESOURCES:
            old = before.check(context, action, resource)
            assert before.check(context, action, resource) == old  # the caches change nothing
            new = after.check(after_context, action, resource)
            if not old.allowed:
                assert not new.allowed, (old, new)
            if strict and actor is None:
                assert not old.allowed and not new.allowed
    for resource in RESOURCES:
        if not before.check_publish(context, resource).allowed:
            assert not after.check_publish(after_context, resource).allowed


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-3, 3, allow_nan=False),
                    st.sampled_from(["", "a", "ab", "b", "^a", "("]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(field_value=VALUES, value=VALUES, operator=st.sampled_from(["eq", "in", "contains", "exists"]),
       from_document=st.booleans())
def test_negative_operators_negate_the_positive_ones(field_value: Any, value: Any, operator: str,
                                                     from_document: bool) -> None:
    negative = {"eq": "ne", "in": "nin", "contains": "ncontains", "exists": "nexists"}[operator]
    meta = {"f": field_value, "v": value}

    def outcome(op: str) -> bool:
        if from_document:
            condition = PolicyCondition("actor.meta.f", op, value_from="actor.meta.v")
        else:
            condition = PolicyCondition("actor.meta.f", op, value)
        authorizer = Authorizer(registry_of([make_policy("gen:p", ["*"], ["*"], "allow", [condition], [])]))
        return authorizer.check(SecurityContext(Actor("a", meta), ("gen:p",)), PUBLISH, "app:q").allowed

    assert outcome(operator) is not outcome(negative)

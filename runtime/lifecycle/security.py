"""Permission checks: `security.policy` entries evaluated against a security context (SPEC §2, §3).

Pure Python and read-only after construction, so one :class:`Authorizer` serves every worker
thread. Everything that depends only on the registry (patterns, regexes, the group index) is
prepared in ``__init__``; the policies effective for a context and the policies whose patterns
match an (action, resource) pair are cached, so a repeated check only evaluates conditions.

**Effective policies** of a context: the policies named in ``context.policies`` (in that order),
then every `security.policy` entry whose ``groups`` shares a name with ``context.groups`` (in
registry order), each once. A named ID that is not a `security.policy` (validation rejects
that, but a context may be built by hand) still counts as a policy the context has, one that
never applies: naming a policy asks for restriction, so a missing one fails closed.

**Patterns** (``actions`` and ``resources``): ``*`` matches anything; a pattern ending in ``*``
matches every string that starts with the part before the ``*`` (``queue.*`` matches
``queue.publish``, ``app:*`` matches ``app:tasks``, ``queue.publish*`` matches both
``queue.publish`` and ``queue.publish.queue``); any other pattern, including one with a ``*``
elsewhere, matches only itself.

**A policy applies** to (action, resource) when one of its action patterns matches the action,
one of its resource patterns matches the resource, and all its conditions hold.

**Conditions** read dotted paths (``field``, and ``value_from`` instead of a literal ``value``)
in the evaluation document::

    {"actor": {"id": ..., "meta": {...}}, "action": ..., "resource": ..., "groups": [...]}

``actor`` is absent when the context has no actor. A path *resolves* when every step is a key
of a mapping and the final value is not null (a YAML ``null`` reads as absent, as ``nil`` does
in Lua); list items are not addressable. Operators:

- ``eq`` / ``ne``: equality; numbers compare as numbers (``1 == 1.0``), booleans equal only
  booleans, other values compare by type and value (``"1"`` is not ``1``).
- ``lt gt lte gte``: two numbers compare as numbers, two strings as strings (code-point order);
  any other pair (type mismatch, booleans, lists...) is false.
- ``in`` / ``nin``: the field's value equals (as ``eq``) an item of the list ``value``; a
  scalar ``value`` is taken as a one-item list.
- ``exists`` / ``nexists``: the field path resolves / does not (``value`` is ignored).
- ``contains`` / ``ncontains``: a string field contains ``value`` as a substring (``value``
  must be a string), or a list field has an item equal to ``value``; other types contain
  nothing.
- ``matches`` / ``nmatches``: ``re.search(value, field)`` finds a match; a non-string field
  never matches. A literal pattern is compiled once (an invalid one is a configuration
  problem, see :func:`policy_problems`); a pattern read with ``value_from`` that is not a
  string or does not compile matches nothing.

Every negative operator (``ne nin nexists ncontains nmatches``) is exactly the negation of its
positive one. So when the field (or the ``value_from`` path) does not resolve, every positive
operator is false and every negative one is true: "``actor.meta.team`` ne ``ops``" holds for an
actor without a team. A literal ``value: null`` is no value either: positives false, negatives
true.

**Decision**, first rule that fires:

1. an applicable policy with effect ``deny`` → denied, naming the first such policy;
2. strict mode and no actor → denied (SPEC §3: strict mode denies a check made without an
   actor; an allow policy cannot grant anything to nobody);
3. an applicable policy with effect ``allow`` → allowed, naming the first such policy;
4. no effective policy → denied in strict mode, allowed otherwise;
5. an actor with effective policies, none of which allows → denied ("no policy allows ...");
6. no actor (not strict) → allowed.

Adding a deny policy can therefore never turn a denial into an allow.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, Problem
from ..registry import PolicySpec, Registry
from ..registry.kinds import PolicyCondition, SecurityContext

PUBLISH_ACTIONS = ("queue.publish", "queue.publish.queue")
_CACHE_LIMIT = 4096  # (context, action, resource) combinations kept before the cache restarts

_MISSING: Any = object()
_NEGATIONS = {"ne": "eq", "nin": "in", "nexists": "exists", "ncontains": "contains", "nmatches": "matches"}

Document = Mapping[str, Any]
Test = Callable[[Document], bool]


@dataclass(frozen=True)
class Decision:
    """The outcome of one permission check."""

    allowed: bool
    reason: str  # human text for logs, e.g. "denied by policy app:no_dlq"
    policy: str | None = None  # the deciding policy ID, if any


# -- patterns --------------------------------------------------------------------------------

class _Patterns:
    """A set of action or resource patterns, matched with one set lookup and one startswith."""

    __slots__ = ("any", "exact", "prefixes")

    def __init__(self, patterns: Sequence[str]):
        self.any = "*" in patterns
        self.exact = frozenset(p for p in patterns if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def match(self, text: str) -> bool:
        return self.any or text in self.exact or (bool(self.prefixes) and text.startswith(self.prefixes))


# -- conditions ------------------------------------------------------------------------------

def _resolve(doc: Document, parts: tuple[str, ...]) -> Any:
    value: Any = doc
    for part in parts:
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return _MISSING if value is None else value


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)  # 1 == 1.0; "1" != 1; lists and mappings compare by content


def _ordered(op: str) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        if not ((_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))):
            return False
        if op == "lt":
            return bool(a < b)
        if op == "gt":
            return bool(a > b)
        if op == "lte":
            return bool(a <= b)
        return bool(a >= b)
    return compare


def _in(a: Any, b: Any) -> bool:
    items = b if isinstance(b, list | tuple) else (b,)
    return any(_equal(a, item) for item in items)


def _contains(a: Any, b: Any) -> bool:
    if isinstance(a, str):
        return isinstance(b, str) and b in a
    if isinstance(a, list | tuple):
        return any(_equal(item, b) for item in a)
    return False


def _matches_dynamic(a: Any, b: Any) -> bool:
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        return re.search(b, a) is not None  # `re` caches compiled patterns
    except re.error:
        return False


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": _equal, "lt": _ordered("lt"), "gt": _ordered("gt"), "lte": _ordered("lte"),
    "gte": _ordered("gte"), "in": _in, "contains": _contains, "matches": _matches_dynamic,
}


def _compile_condition(cond: PolicyCondition) -> Test:
    negate = cond.operator in _NEGATIONS
    op = _NEGATIONS.get(cond.operator, cond.operator)
    field_parts = tuple(cond.field.split("."))
    if op == "exists":
        def exists(doc: Document) -> bool:
            return (_resolve(doc, field_parts) is not _MISSING) != negate
        return exists
    compare = _COMPARE[op]
    if cond.value_from is not None:
        value_parts = tuple(cond.value_from.split("."))

        def dynamic(doc: Document) -> bool:
            a = _resolve(doc, field_parts)
            b = _resolve(doc, value_parts)
            return (a is not _MISSING and b is not _MISSING and compare(a, b)) != negate
        return dynamic
    value = cond.value
    if value is None:  # a literal null is "no value": nothing equals it, as with a missing path
        return lambda doc: negate
    if op == "matches":
        pattern = re.compile(value)  # checked by policy_problems before we get here

        def static_match(doc: Document) -> bool:
            a = _resolve(doc, field_parts)
            return (isinstance(a, str) and pattern.search(a) is not None) != negate
        return static_match

    def static(doc: Document) -> bool:
        a = _resolve(doc, field_parts)
        return (a is not _MISSING and compare(a, value)) != negate
    return static


def policy_problems(registry: Registry) -> list[Problem]:
    """Problems the registry's own validation does not see: literal `matches` patterns."""
    problems = []
    for spec in registry.of_type(PolicySpec):
        for i, cond in enumerate(spec.conditions):
            if cond.operator not in ("matches", "nmatches") or cond.value_from is not None:
                continue
            where = f"entry {spec.id}: policy condition #{i + 1}"
            if not isinstance(cond.value, str):
                problems.append(Problem(spec.file, spec.line, f"{where}: '{cond.operator}' needs a string "
                                        "pattern as 'value'"))
                continue
            try:
                re.compile(cond.value)
            except re.error as exc:
                problems.append(Problem(spec.file, spec.line, f"{where}: invalid regular expression "
                                        f"{cond.value!r}: {exc}"))
    return problems


# -- policies --------------------------------------------------------------------------------

class _Policy:
    __slots__ = ("id", "deny", "actions", "resources", "conditions")

    def __init__(self, spec: PolicySpec):
        self.id = spec.id
        self.deny = spec.effect == "deny"
        self.actions = _Patterns(spec.actions)
        self.resources = _Patterns(spec.resources)
        self.conditions = tuple(_compile_condition(c) for c in spec.conditions)

    def holds(self, doc: Document) -> bool:
        return all(test(doc) for test in self.conditions)


@dataclass(frozen=True)
class _Effective:
    policies: tuple[_Policy, ...]
    has_policies: bool  # also true when a named policy is unknown (fail closed)


@dataclass(frozen=True)
class _Candidates:
    """The effective policies whose patterns match one (action, resource), split by effect."""

    deny: tuple[_Policy, ...]
    allow: tuple[_Policy, ...]
    has_policies: bool
    needs_document: bool


class Authorizer:
    """Decides permission checks for Lua code against an application's `security.policy` entries.

    Thread-safe: the registry is immutable and the caches only ever gain complete values.
    Raises :class:`ConfigError` for problems :func:`policy_problems` reports.
    """

    def __init__(self, registry: Registry, *, strict: bool = False):
        problems = policy_problems(registry)
        if problems:
            raise ConfigError(problems)
        self.strict = strict
        self._policies: dict[str, _Policy] = {s.id: _Policy(s) for s in registry.of_type(PolicySpec)}
        self._by_group: dict[str, list[str]] = {}
        for spec in registry.of_type(PolicySpec):
            for group in dict.fromkeys(spec.groups):
                self._by_group.setdefault(group, []).append(spec.id)
        self._order = {pid: i for i, pid in enumerate(self._policies)}
        self._effective: dict[tuple[tuple[str, ...], tuple[str, ...]], _Effective] = {}
        self._candidates: dict[tuple[tuple[str, ...], tuple[str, ...], str, str], _Candidates] = {}

    def check(self, context: SecurityContext | None, action: str, resource: str) -> Decision:
        """May code running with `context` do `action` on `resource`? (module docstring: rules)"""
        if context is None:
            context = _NO_CONTEXT
        found = self._candidates_for(context, action, resource)
        # The document is only built when some candidate has conditions to read it.
        doc = _document(context, action, resource) if found.needs_document else _NO_DOCUMENT
        for policy in found.deny:
            if not policy.conditions or policy.holds(doc):
                return Decision(False, f"denied by policy {policy.id}", policy.id)
        actor = context.actor
        if actor is None and self.strict:
            return Decision(False, "no actor (strict mode)")
        for policy in found.allow:
            if not policy.conditions or policy.holds(doc):
                return Decision(True, f"allowed by policy {policy.id}", policy.id)
        if not found.has_policies:
            if self.strict:
                return Decision(False, "no policies (strict mode)")
            return Decision(True, "no policies")
        if actor is not None:
            return Decision(False, f"no policy allows {action} on {resource} for actor {actor.id}")
        return Decision(True, "no actor")

    def check_publish(self, context: SecurityContext | None, queue_id: str) -> Decision:
        """`queue.publish` then `queue.publish.queue`, both with the queue ID as resource; the first denial wins."""
        decision = self.check(context, PUBLISH_ACTIONS[0], queue_id)
        if not decision.allowed:
            return decision
        return self.check(context, PUBLISH_ACTIONS[1], queue_id)

    def effective_policies(self, context: SecurityContext | None) -> tuple[str, ...]:
        """IDs of the known policies that apply to `context` (named ones first, then by group)."""
        context = context or _NO_CONTEXT
        return tuple(p.id for p in self._effective_for(context.policies, context.groups).policies)

    # -- caches --------------------------------------------------------------------------------
    def _effective_for(self, names: tuple[str, ...], groups: tuple[str, ...]) -> _Effective:
        key = (names, groups)
        eff = self._effective.get(key)
        if eff is None:
            ids = [n for n in names if n in self._policies]
            from_groups = {pid for g in groups for pid in self._by_group.get(g, ())}
            ids += sorted(from_groups, key=self._order.__getitem__)
            policies = tuple(self._policies[pid] for pid in dict.fromkeys(ids))
            eff = _Effective(policies, bool(names) or bool(policies))
            if len(self._effective) >= _CACHE_LIMIT:
                self._effective.clear()
            self._effective[key] = eff
        return eff

    def _candidates_for(self, context: SecurityContext, action: str, resource: str) -> _Candidates:
        key = (context.policies, context.groups, action, resource)
        found = self._candidates.get(key)
        if found is None:
            eff = self._effective_for(context.policies, context.groups)
            hits = [p for p in eff.policies if p.actions.match(action) and p.resources.match(resource)]
            found = _Candidates(tuple(p for p in hits if p.deny), tuple(p for p in hits if not p.deny),
                                eff.has_policies, any(p.conditions for p in hits))
            if len(self._candidates) >= _CACHE_LIMIT:
                self._candidates.clear()
            self._candidates[key] = found
        return found


_NO_CONTEXT = SecurityContext()
_NO_DOCUMENT: Document = {}


def _document(context: SecurityContext, action: str, resource: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"action": action, "resource": resource, "groups": list(context.groups)}
    if context.actor is not None:
        doc["actor"] = {"id": context.actor.id, "meta": context.actor.meta}
    return doc

"""Policy: per-category thresholds that turn a provider's scores into `allow`, `review` or `block` (over several
texts, the strictest decision and each category's highest score). See docs/moderation.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.models import Decision
from app.moderation.providers import ProviderResult
from app.moderation.taxonomy import CATEGORIES
from app.moderation.terms import TermMatcher

ROLES: tuple[str, ...] = ("input", "output")


@dataclass(frozen=True)
class Threshold:
    """Review at or above `review`, block at or above `block`; None: never."""

    review: float | None
    block: float | None

    def as_json(self) -> dict[str, float | None]:
        return {"review": self.review, "block": self.block}


# A category switched off for a role has no threshold: it is never acted on.
Thresholds = dict[str, Threshold | None]


@dataclass(frozen=True)
class BlockRule:
    """A match of the term list decides `category` as `decision`, for the roles given."""

    list_name: str
    list_version: int
    matcher: TermMatcher
    category: str
    decision: Decision
    roles: frozenset[str]


@dataclass(frozen=True)
class AllowRule:
    """The list's terms are exempt from `categories`: no blocklist match there, and a text holding one is decided
    at most `max_decision` in them."""

    list_name: str
    list_version: int
    matcher: TermMatcher
    categories: frozenset[str]
    max_decision: Decision


@dataclass(frozen=True)
class Policy:
    name: str
    version: int
    roles: dict[str, Thresholds]
    blocklists: tuple[BlockRule, ...] = ()
    allowlists: tuple[AllowRule, ...] = ()
    shadow: Policy | None = None

    @property
    def thresholds(self) -> Thresholds:
        """The input role's thresholds."""
        return self.roles["input"]

    def thresholds_json(self, role: str = "input") -> dict[str, Any]:
        return {c: None if t is None else t.as_json() for c, t in self.roles[role].items()}

    @property
    def lists_version(self) -> str:
        """The term lists it uses and their versions (part of the verdict cache's key)."""
        rules: list[BlockRule | AllowRule] = [*self.blocklists, *self.allowlists]
        if self.shadow is not None:
            rules += [*self.shadow.blocklists, *self.shadow.allowlists]
        return ",".join(sorted({f"{r.list_name}:{r.list_version}" for r in rules}))


_STRICT = Threshold(review=0.2, block=0.5)
_DEFAULT = Threshold(review=0.5, block=0.8)

# Categories where a missed case costs most get lower thresholds.
_BUILTIN: Thresholds = {c: _STRICT if c in {"sexual/minors", "self-harm/intent", "self-harm/instructions"}
                        else _DEFAULT for c in CATEGORIES}
DEFAULT_POLICY = Policy(name="default", version=1, roles={role: dict(_BUILTIN) for role in ROLES})

POLICIES: dict[str, Policy] = {DEFAULT_POLICY.name: DEFAULT_POLICY}


def get_policy(name: str) -> Policy | None:
    """The built-in policy of that name (only `default`)."""
    return POLICIES.get(name)


def _threshold(spec: dict[str, Any]) -> Threshold | None:
    if not spec.get("enabled", True):
        return None
    return Threshold(review=spec.get("review"), block=spec.get("block"))


def build_policy(
    name: str, version: int, document: dict[str, Any], *, lists: dict[tuple[str, str], tuple[int, TermMatcher]],
    shadow: Policy | None = None,
) -> Policy:
    """The runtime policy of a stored (already validated) document. `lists` holds the term lists it names, by
    (kind, name), each with its version and compiled matcher; a list that is missing is left out."""
    roles: dict[str, Thresholds] = {}
    for role in ROLES:
        thresholds: Thresholds = {}
        for category in CATEGORIES:
            spec = next((section[category] for section in (document.get(role), document.get("categories"))
                         if section and category in section), document.get("defaults"))
            thresholds[category] = _BUILTIN[category] if spec is None else _threshold(spec)
        roles[role] = thresholds
    blocklists = tuple(
        BlockRule(list_name=rule["list"], list_version=lists[("blocklist", rule["list"])][0],
                  matcher=lists[("blocklist", rule["list"])][1], category=rule["category"],
                  decision=Decision(rule.get("decision", "block")),
                  roles=frozenset(rule.get("roles", ROLES)))
        for rule in document.get("blocklists", []) if ("blocklist", rule["list"]) in lists)
    allowlists = tuple(
        AllowRule(list_name=rule["list"], list_version=lists[("allowlist", rule["list"])][0],
                  matcher=lists[("allowlist", rule["list"])][1], categories=frozenset(rule["categories"]),
                  max_decision=Decision(rule.get("max_decision", "review")))
        for rule in document.get("allowlists", []) if ("allowlist", rule["list"]) in lists)
    return Policy(name=name, version=version, roles=roles, blocklists=blocklists, allowlists=allowlists,
                  shadow=shadow)


@dataclass(frozen=True)
class Assessment:
    decision: Decision
    flagged: bool
    categories: dict[str, bool | None]
    category_scores: dict[str, float | None]
    results: list[dict[str, Any]]
    not_judged: list[str]
    # Each category's own decision (None: no score and no list match), the thresholds held against the scores,
    # and the term lists that matched (which list, category, decision, text, how often: never the words).
    category_decisions: dict[str, str | None] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    matches: list[dict[str, Any]] = field(default_factory=list)


_SEVERITY = {Decision.ALLOW: 0, Decision.REVIEW: 1, Decision.BLOCK: 2}


def _stricter(a: Decision | None, b: Decision) -> Decision:
    return b if a is None or _SEVERITY[b] > _SEVERITY[a] else a


def _decide(score: float, threshold: Threshold | None) -> Decision:
    if threshold is None:
        return Decision.ALLOW
    if threshold.block is not None and score >= threshold.block:
        return Decision.BLOCK
    if threshold.review is not None and score >= threshold.review:
        return Decision.REVIEW
    return Decision.ALLOW


def _text_decisions(policy: Policy, role: str, scores: dict[str, float], text: str | None, index: int,
                    matches: list[dict[str, Any]]) -> dict[str, Decision | None]:
    """One text's decision in each category: its score against the role's threshold, capped by the allowlists
    whose terms it holds, raised by the blocklists that match it (appended to `matches`)."""
    thresholds = policy.roles[role]
    decisions: dict[str, Decision | None] = {}
    for category in CATEGORIES:
        score = scores.get(category)
        decisions[category] = None if score is None else _decide(score, thresholds[category])
    if text is None:
        return decisions
    for allow in policy.allowlists:
        if allow.matcher.matches(text):
            for category in allow.categories:
                current = decisions[category]
                if current is not None and _SEVERITY[current] > _SEVERITY[allow.max_decision]:
                    decisions[category] = allow.max_decision
    for rule in policy.blocklists:
        if role not in rule.roles:
            continue
        exempt = [a.matcher for a in policy.allowlists if rule.category in a.categories]
        count = rule.matcher.matches(text, exempt=exempt)
        if count:
            decisions[rule.category] = _stricter(decisions[rule.category], rule.decision)
            matches.append({"list": rule.list_name, "list_version": rule.list_version, "category": rule.category,
                            "decision": rule.decision.value, "text": index, "count": count})
    return decisions


def assess(policy: Policy, outcome: ProviderResult, *, role: str = "input",
           texts: Sequence[str] | None = None) -> Assessment:
    """The decision step: the provider's scores (and, when given, the texts, for the term lists) held against the
    policy's thresholds for `role`. Over several texts, the strictest decision and each category's highest score."""
    not_judged = [c for c in CATEGORIES if c not in outcome.judged]
    decision = Decision.ALLOW
    top: dict[str, float | None] = {c: None for c in CATEGORIES}
    overall: dict[str, Decision | None] = {c: None for c in CATEGORIES}
    matches: list[dict[str, Any]] = []
    per_text: list[dict[str, Any]] = []
    for index, text in enumerate(outcome.results):
        own_text = texts[index] if texts is not None and index < len(texts) else None
        decisions = _text_decisions(policy, role, text.scores, own_text, index, matches)
        text_decision = Decision.ALLOW
        text_categories: dict[str, bool | None] = {}
        for category in CATEGORIES:
            category_decision = decisions[category]
            if category_decision is None:
                text_categories[category] = None
                continue
            text_categories[category] = category_decision is not Decision.ALLOW
            text_decision = _stricter(text_decision, category_decision)
            overall[category] = _stricter(overall[category], category_decision)
            score = text.scores.get(category)
            if score is not None:
                previous = top[category]
                top[category] = score if previous is None else max(previous, score)
        decision = _stricter(decision, text_decision)
        per_text.append({
            # Which provider's answer decided this text (they differ within one verdict under the cascade).
            "provider": text.decided_by or outcome.provider,
            "decision": text_decision.value,
            "flagged": text_decision is not Decision.ALLOW,
            "categories": text_categories,
            "category_scores": {c: text.scores.get(c) for c in CATEGORIES},
        })
    categories: dict[str, bool | None] = {
        c: None if overall[c] is None else overall[c] is not Decision.ALLOW for c in CATEGORIES
    }
    return Assessment(
        decision=decision,
        flagged=decision is not Decision.ALLOW,
        categories=categories,
        category_scores=top,
        results=per_text,
        not_judged=not_judged,
        category_decisions={c: None if d is None else d.value for c, d in overall.items()},
        thresholds=policy.thresholds_json(role),
        matches=matches,
    )

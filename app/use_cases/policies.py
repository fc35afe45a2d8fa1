"""Tenant policies in the database: create, change (a new immutable version), retire, read any version; term lists;
the tenant's default policy; loading the policy a verdict is decided under; shadow reports and backtests over stored
verdicts. Every change is audited in the caller's transaction. See docs/moderation.md ("Policies")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from pydantic import ValidationError
from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from app.db import Database
from app.models import (
    Backtest,
    Decision,
    PolicyVersion,
    ReviewItem,
    ReviewStatus,
    Submission,
    Tenant,
    TenantPolicy,
    TermList,
    Verdict,
    utcnow,
)
from app.moderation.policy import DEFAULT_POLICY, ROLES, Policy, assess, build_policy
from app.moderation.providers import ProviderResult, TextScores
from app.moderation.taxonomy import CATEGORIES
from app.moderation.terms import TermMatcher, check_pattern, compile_terms, normalized_term
from app.outbox import RUN_BACKTEST, Message, send_after_commit
from app.schemas.policies import BacktestIn, PolicyDocument, TermListIn
from app.use_cases.audit import record_event
from app.use_cases.authentication import TenantDefaults
from app.use_cases.errors import Conflict, DomainError, InvalidInput, NotFound, PreconditionFailed

log = structlog.get_logger(__name__)

BUILTIN = DEFAULT_POLICY.name
KINDS = ("blocklist", "allowlist")
DECISIONS = tuple(d.value for d in Decision)
# What a reviewer can decide (the database's check constraint on review_items says the same).
HUMAN_DECISIONS = (Decision.ALLOW.value, Decision.BLOCK.value)
# The most field changes one `policy.changed` event lists (the rest are counted).
MAX_CHANGES_LISTED = 100
FAILSAFE_PROVIDER = "failsafe"


@dataclass(frozen=True)
class PolicyView:
    """A policy as the API and CLI show it: its current version (or the one asked for)."""

    name: str
    version: int
    builtin: bool
    document: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    retired_at: datetime | None
    created_by: str | None = None


def builtin_document() -> dict[str, Any]:
    """The built-in `default` policy as a document."""
    return {"name": BUILTIN, "description": "The built-in policy: read-only, for every tenant.",
            "categories": {c: t.as_json() for c, t in DEFAULT_POLICY.thresholds.items() if t is not None}}


def _builtin_view() -> PolicyView:
    return PolicyView(name=BUILTIN, version=DEFAULT_POLICY.version, builtin=True, document=builtin_document(),
                      created_at=None, updated_at=None, retired_at=None)


def digest_of(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tenant_id_named(session: Session, tenant_name: str) -> str:
    """The operator's door names tenants; NotFound if there is none of that name."""
    tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
    if tenant_id is None:
        raise NotFound(f"No tenant named {tenant_name!r}.", param="tenant")
    return tenant_id


# ---- reading ---------------------------------------------------------------------------------------------------


def _policy_row(session: Session, tenant_id: str, name: str, *, for_update: bool = False) -> TenantPolicy | None:
    if "\x00" in name:
        return None
    query = select(TenantPolicy).where(TenantPolicy.tenant_id == tenant_id, TenantPolicy.name == name)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def _version_row(session: Session, policy: TenantPolicy, version: int) -> PolicyVersion | None:
    return session.scalars(select(PolicyVersion).where(PolicyVersion.policy_id == policy.id,
                                                       PolicyVersion.version == version)).one_or_none()


def _view(policy: TenantPolicy, version: PolicyVersion) -> PolicyView:
    return PolicyView(name=policy.name, version=version.version, builtin=False, document=version.document,
                      created_at=policy.created_at, updated_at=policy.updated_at, retired_at=policy.retired_at,
                      created_by=version.created_by)


def list_policies(session: Session, tenant_id: str) -> list[PolicyView]:
    """The built-in policy first, then the tenant's by name (retired ones too: they say so)."""
    rows = session.execute(
        select(TenantPolicy, PolicyVersion)
        .join(PolicyVersion, (PolicyVersion.policy_id == TenantPolicy.id)
              & (PolicyVersion.version == TenantPolicy.current_version))
        .where(TenantPolicy.tenant_id == tenant_id).order_by(TenantPolicy.name)
    ).tuples().all()
    return [_builtin_view(), *(_view(policy, version) for policy, version in rows)]


def get_policy(session: Session, tenant_id: str, name: str, version: int | None = None) -> PolicyView:
    """The current version of the tenant's policy (or `version`); another tenant's answers as a missing one."""
    if name == BUILTIN:
        if version not in (None, DEFAULT_POLICY.version):
            raise NotFound("No such policy version.", param="version")
        return _builtin_view()
    policy = _policy_row(session, tenant_id, name)
    if policy is None:
        raise NotFound("No such policy.", param="name")
    row = _version_row(session, policy, policy.current_version if version is None else version)
    if row is None:
        raise NotFound("No such policy version.", param="version")
    return _view(policy, row)


def list_versions(session: Session, tenant_id: str, name: str) -> list[PolicyView]:
    """Every version, newest first."""
    if name == BUILTIN:
        return [_builtin_view()]
    policy = _policy_row(session, tenant_id, name)
    if policy is None:
        raise NotFound("No such policy.", param="name")
    rows = session.scalars(select(PolicyVersion).where(PolicyVersion.policy_id == policy.id)
                           .order_by(PolicyVersion.version.desc())).all()
    return [_view(policy, row) for row in rows]


# ---- writing ---------------------------------------------------------------------------------------------------


def _check_references(session: Session, tenant_id: str, document: PolicyDocument) -> None:
    """What the document names must exist: its shadow (another live policy) and its term lists."""
    if document.shadow is not None:
        if document.shadow == document.name:
            raise InvalidInput("shadow: a policy cannot be its own shadow.", param="shadow", code="invalid_shadow")
        if document.shadow != BUILTIN:
            shadow = _policy_row(session, tenant_id, document.shadow)
            if shadow is None or shadow.retired_at is not None:
                raise InvalidInput(f"shadow: no live policy named {document.shadow!r}.", param="shadow",
                                   code="unknown_policy")
    wanted = [("blocklist", f"blocklists[{i}].list", r.list_name) for i, r in enumerate(document.blocklists)]
    wanted += [("allowlist", f"allowlists[{i}].list", r.list_name) for i, r in enumerate(document.allowlists)]
    if not wanted:
        return
    existing = set(session.execute(select(TermList.kind, TermList.name).where(
        TermList.tenant_id == tenant_id, TermList.name.in_({name for _, _, name in wanted}))).tuples().all())
    for kind, param, name in wanted:
        if (kind, name) not in existing:
            raise InvalidInput(f"{param}: no {kind} named {name!r} (PUT /v1/{kind}s/{name} first).", param=param,
                               code=f"unknown_{kind}")


def _refuse_builtin(name: str) -> None:
    if name == BUILTIN:
        raise Conflict("The built-in 'default' policy is read-only; create a policy of another name.",
                       code="builtin_policy")


def create_policy(session: Session, tenant_id: str, document: PolicyDocument, *, actor: str,
                  request_id: str | None) -> PolicyView:
    """Version 1 of a new policy, and `policy.created`, in the caller's transaction."""
    _refuse_builtin(document.name)
    if _policy_row(session, tenant_id, document.name) is not None:
        raise Conflict(f"A policy named {document.name!r} exists (retired policies keep their names); change it "
                       "with PUT.", code="policy_exists")
    _check_references(session, tenant_id, document)
    canonical = document.canonical()
    now = utcnow()
    policy = TenantPolicy(tenant_id=tenant_id, name=document.name, current_version=1, created_at=now,
                          updated_at=now)
    session.add(policy)
    session.flush()
    version = PolicyVersion(policy_id=policy.id, version=1, document=canonical, digest=digest_of(canonical),
                            created_at=now, created_by=actor)
    session.add(version)
    record_event(session, tenant_id=tenant_id, action="policy.created", actor=actor, subject_type="policy",
                 subject_id=policy.id, request_id=request_id,
                 details={"name": policy.name, "version": 1, "digest": version.digest})
    return _view(policy, version)


def update_policy(session: Session, tenant_id: str, name: str, document: PolicyDocument, *, if_match: int | None,
                  actor: str, request_id: str | None) -> tuple[PolicyView, bool]:
    """A new version when the document differs from the current one (and whether it did), with `policy.changed`
    naming what changed. `if_match`: the version the caller read; another one current is a lost update (412)."""
    _refuse_builtin(name)
    if document.name != name:
        raise InvalidInput(f"name: the document names {document.name!r}, the URL {name!r}.", param="name",
                           code="name_mismatch")
    policy = _policy_row(session, tenant_id, name, for_update=True)  # two writers queue here: no lost update
    if policy is None:
        raise NotFound("No such policy.", param="name")
    if policy.retired_at is not None:
        raise Conflict(f"The policy {name!r} is retired.", code="policy_retired")
    if if_match is not None and if_match != policy.current_version:
        raise PreconditionFailed(f"If-Match: version {if_match} is not current; version {policy.current_version} "
                                 "is. Read it, and apply your change to it.", param="If-Match")
    current = _version_row(session, policy, policy.current_version)
    assert current is not None  # noqa: S101 - the current version always exists
    canonical = document.canonical()
    digest = digest_of(canonical)
    if digest == current.digest:
        return _view(policy, current), False
    _check_references(session, tenant_id, document)
    now = utcnow()
    new = PolicyVersion(policy_id=policy.id, version=policy.current_version + 1, document=canonical, digest=digest,
                        created_at=now, created_by=actor)
    session.add(new)
    policy.current_version = new.version
    policy.updated_at = now
    changes = diff_documents(current.document, canonical)
    record_event(session, tenant_id=tenant_id, action="policy.changed", actor=actor, subject_type="policy",
                 subject_id=policy.id, request_id=request_id,
                 details={"name": name, "from_version": current.version, "to_version": new.version,
                          "changes": changes[:MAX_CHANGES_LISTED], "change_count": len(changes), "digest": digest})
    return _view(policy, new), True


def apply_policy(session: Session, tenant_id: str, document: PolicyDocument, *, actor: str) -> tuple[PolicyView, str]:
    """Policy as code: create it, or change it, or nothing when it is already so. Returns the policy and which
    (`created`, `changed`, `unchanged`)."""
    if _policy_row(session, tenant_id, document.name) is None:
        return create_policy(session, tenant_id, document, actor=actor, request_id=None), "created"
    view, changed = update_policy(session, tenant_id, document.name, document, if_match=None, actor=actor,
                                  request_id=None)
    return view, "changed" if changed else "unchanged"


def retire_policy(session: Session, tenant_id: str, name: str, *, actor: str, request_id: str | None) -> PolicyView:
    """Refuse new submissions under it; its versions stay readable and old verdicts still name it. Retiring twice
    changes nothing. Refused while it is the tenant's default or another live policy's shadow."""
    _refuse_builtin(name)
    policy = _policy_row(session, tenant_id, name, for_update=True)
    if policy is None:
        raise NotFound("No such policy.", param="name")
    if policy.retired_at is None:
        if default_policy_name(session, tenant_id) == name:
            raise Conflict(f"{name!r} is the tenant's default policy; choose another default first.",
                           code="policy_in_use")
        for other in list_policies(session, tenant_id):
            if not other.builtin and other.retired_at is None and other.document.get("shadow") == name:
                raise Conflict(f"{name!r} is the shadow of policy {other.name!r}.", code="policy_in_use")
        policy.retired_at = utcnow()
        record_event(session, tenant_id=tenant_id, action="policy.retired", actor=actor, subject_type="policy",
                     subject_id=policy.id, request_id=request_id,
                     details={"name": name, "version": policy.current_version})
    return get_policy(session, tenant_id, name)


def diff_documents(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """What changed between two documents, field by field (`output.violence.review: 0.5 -> 0.3`)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [{"field": key, "from": flat_old.get(key), "to": flat_new.get(key)}
            for key in sorted(flat_old.keys() | flat_new.keys()) if flat_old.get(key) != flat_new.get(key)]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


# ---- the tenant's default --------------------------------------------------------------------------------------


def default_policy_name(session: Session, tenant_id: str, known: TenantDefaults | None = None) -> str:
    """The tenant's default policy: from `known` (read with the caller's key) when given, else from the database."""
    if known is not None:
        return known.policy or BUILTIN
    return session.scalar(select(Tenant.default_policy).where(Tenant.id == tenant_id)) or BUILTIN


def check_usable(session: Session, tenant_id: str, name: str, *, param: str) -> None:
    """A submission may name the built-in policy or a live policy of its tenant."""
    if name == BUILTIN:
        return
    policy = _policy_row(session, tenant_id, name)
    if policy is None:
        raise InvalidInput(f"Unknown policy '{name}'.", param=param, code="unknown_policy")
    if policy.retired_at is not None:
        raise InvalidInput(f"The policy '{name}' is retired.", param=param, code="policy_retired")


def set_default_policy(session: Session, tenant_id: str, name: str | None, *, actor: str,
                       request_id: str | None) -> str:
    """Make `name` (None: the built-in) the policy of submissions that name none; `tenant.updated` says so."""
    wanted = None if name in (None, BUILTIN) else name
    if wanted is not None:
        check_usable(session, tenant_id, wanted, param="policy")
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:  # pragma: no cover - the caller's tenant exists
        raise NotFound("No such tenant.")
    if tenant.default_policy != wanted:
        record_event(session, tenant_id=tenant_id, action="tenant.updated", actor=actor, subject_type="tenant",
                     subject_id=tenant_id, request_id=request_id,
                     details={"changes": {"default_policy": {"from": tenant.default_policy, "to": wanted}}})
        tenant.default_policy = wanted
    return wanted or BUILTIN


# ---- term lists ------------------------------------------------------------------------------------------------


def _checked_list(body: TermListIn) -> tuple[list[str], list[str]]:
    terms: list[str] = []
    for index, term in enumerate(body.terms):
        if not normalized_term(term):
            raise InvalidInput(f"terms[{index}]: a term needs at least one letter or digit.",
                               param=f"terms[{index}]", code="invalid_term")
        terms.append(term)
    for index, pattern in enumerate(body.patterns):
        try:
            check_pattern(pattern)
        except ValueError as exc:
            raise InvalidInput(f"patterns[{index}]: not a usable RE2 pattern ({str(exc)[:200]}).",
                               param=f"patterns[{index}]", code="invalid_pattern") from exc
    # Order and duplicates do not matter to matching: kept sorted and unique, so the same list is the same version.
    return sorted(set(terms)), sorted(set(body.patterns))


def put_term_list(session: Session, tenant_id: str, kind: str, name: str, body: TermListIn, *, actor: str,
                  request_id: str | None) -> tuple[TermList, bool]:
    """Create or replace a term list (and whether it changed); `blocklist.changed` / `allowlist.changed` record
    the new version with counts and a digest, never the terms."""
    if kind not in KINDS:  # pragma: no cover - the routes name the kind
        raise ValueError(kind)
    terms, patterns = _checked_list(body)
    digest = digest_of({"terms": terms, "patterns": patterns, "description": body.description})
    row = session.scalars(select(TermList).where(TermList.tenant_id == tenant_id, TermList.kind == kind,
                                                 TermList.name == name).with_for_update()).one_or_none()
    if row is not None and row.digest == digest:
        return row, False
    now = utcnow()
    before_terms = set(row.terms) if row is not None else set()
    if row is None:
        row = TermList(tenant_id=tenant_id, kind=kind, name=name, version=1, created_at=now)
        session.add(row)
    else:
        row.version += 1
    row.terms, row.patterns, row.description, row.digest, row.updated_at = terms, patterns, body.description, \
        digest, now
    session.flush()
    record_event(session, tenant_id=tenant_id, action=f"{kind}.changed", actor=actor, subject_type="term_list",
                 subject_id=row.id, request_id=request_id,
                 details={"name": name, "kind": kind, "version": row.version, "terms": len(terms),
                          "patterns": len(patterns), "terms_added": len(set(terms) - before_terms),
                          "terms_removed": len(before_terms - set(terms)), "digest": digest})
    return row, True


def get_term_list(session: Session, tenant_id: str, kind: str, name: str) -> TermList:
    row = None if "\x00" in name else session.scalars(select(TermList).where(
        TermList.tenant_id == tenant_id, TermList.kind == kind, TermList.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"No such {kind}.", param="name")
    return row


def list_term_lists(session: Session, tenant_id: str, kind: str) -> list[TermList]:
    return list(session.scalars(select(TermList).where(TermList.tenant_id == tenant_id, TermList.kind == kind)
                                .order_by(TermList.name)))


# ---- deciding under a policy -----------------------------------------------------------------------------------

_MEMO = "verdict.policies"


def load_policy(session: Session, tenant_id: str, name: str) -> Policy:
    """The policy a verdict is decided under now: the current version of the tenant's policy (retired ones too:
    a submission accepted before the retirement is still decided under it), with its term lists and its shadow.
    Read once per transaction and policy; the built-in policy when there is no such policy."""
    if name == BUILTIN:
        return DEFAULT_POLICY
    transaction = session.get_transaction()
    memo_owner, memo = session.info.get(_MEMO, (None, {}))
    if memo_owner is not transaction:
        memo = {}
        session.info[_MEMO] = (transaction, memo)
    key = (tenant_id, name)
    if key not in memo:
        memo[key] = _load(session, tenant_id, name, with_shadow=True)
    policy: Policy = memo[key]
    return policy


def _load(session: Session, tenant_id: str, name: str, *, with_shadow: bool) -> Policy:
    if name == BUILTIN:
        return DEFAULT_POLICY
    row = session.execute(
        select(PolicyVersion.version, PolicyVersion.document)
        .join(TenantPolicy, (PolicyVersion.policy_id == TenantPolicy.id)
              & (PolicyVersion.version == TenantPolicy.current_version))
        .where(TenantPolicy.tenant_id == tenant_id, TenantPolicy.name == name)
    ).one_or_none()
    if row is None:
        log.warning("policy_missing", tenant_id=tenant_id, policy=name)
        return DEFAULT_POLICY
    document: dict[str, Any] = row.document
    shadow = None
    if with_shadow and document.get("shadow"):
        shadow = _load(session, tenant_id, document["shadow"], with_shadow=False)
    return build_policy(name, row.version, document, lists=_lists(session, tenant_id, document), shadow=shadow)


def _lists(session: Session, tenant_id: str,
           document: dict[str, Any]) -> dict[tuple[str, str], tuple[int, TermMatcher]]:
    names = {rule["list"] for rule in [*document.get("blocklists", []), *document.get("allowlists", [])]}
    if not names:
        return {}
    rows = session.execute(select(TermList.kind, TermList.name, TermList.version, TermList.terms, TermList.patterns)
                           .where(TermList.tenant_id == tenant_id, TermList.name.in_(names))).tuples().all()
    return {(kind, name): (version, compile_terms(terms, patterns)) for kind, name, version, terms, patterns in rows}


def shadow_summary(shadow: Policy, outcome: ProviderResult, *, role: str, texts: Sequence[str] | None
                   ) -> dict[str, Any]:
    """The shadow policy's decision on the same scores and texts: stored beside the real one, never acted on."""
    assessment = assess(shadow, outcome, role=role, texts=texts)
    return {"policy": shadow.name, "policy_version": shadow.version, "decision": assessment.decision.value,
            "flagged": assessment.flagged, "category_decisions": assessment.category_decisions,
            "matches": assessment.matches}


# ---- comparing: shadow reports and backtests -------------------------------------------------------------------


def _matrix() -> dict[str, dict[str, int]]:
    return {made: dict.fromkeys(DECISIONS, 0) for made in DECISIONS}


class _Tally:
    """Decisions made against another decider's, overall and per category."""

    def __init__(self) -> None:
        self.total = 0
        self.agreed = 0
        self.matrix = _matrix()
        self.by_category = {c: _matrix() for c in CATEGORIES}

    def add(self, made: str, other: str, made_categories: dict[str, str | None],
            other_categories: dict[str, str | None]) -> None:
        self.total += 1
        self.agreed += made == other
        self.matrix[made][other] += 1
        for category in CATEGORIES:
            a, b = made_categories.get(category), other_categories.get(category)
            if a is not None and b is not None:
                self.by_category[category][a][b] += 1

    def result(self) -> dict[str, Any]:
        return {"total": self.total, "agreed": self.agreed,
                "agreement_rate": round(self.agreed / self.total, 4) if self.total else None,
                "matrix": self.matrix, "by_category": self.by_category}


class _ReviewedTally:
    """The candidate's decisions against the people's, over the verdicts a reviewer decided: rows are the
    reviewer's decision (allow or block), columns the candidate's (a candidate `review` sends it to a person again)."""

    def __init__(self) -> None:
        self.total = 0
        self.agreed = 0
        self.matrix = {human: dict.fromkeys(DECISIONS, 0) for human in HUMAN_DECISIONS}

    def add(self, human: str, candidate: str) -> None:
        self.total += 1
        self.agreed += human == candidate
        self.matrix[human][candidate] += 1

    def result(self) -> dict[str, Any]:
        return {"total": self.total, "agreed": self.agreed,
                "agreement_rate": round(self.agreed / self.total, 4) if self.total else None,
                "matrix": self.matrix}


def _in_range(query: Any, start: datetime | None, end: datetime | None) -> Any:
    if start is not None:
        query = query.where(Verdict.created_at >= start)
    if end is not None:
        query = query.where(Verdict.created_at < end)
    return query


def shadow_report(session: Session, tenant_id: str, name: str, *, start: datetime | None,
                  end: datetime | None) -> dict[str, Any]:
    """How often the policy's verdicts in [start, end) agreed with their shadow decisions, and the disagreement
    matrix (overall and per category)."""
    get_policy(session, tenant_id, name)  # NotFound for another tenant's or no policy
    if start is not None and end is not None and end <= start:
        raise InvalidInput("end: must be after start.", param="end", code="invalid_range")
    query = _in_range(select(Verdict.decision, Verdict.category_decisions, Verdict.shadow)
                      .where(Verdict.tenant_id == tenant_id, Verdict.policy_name == name,
                             Verdict.shadow_decision.is_not(None)), start, end)
    tally = _Tally()
    versions: dict[tuple[str, int], int] = {}
    for decision, category_decisions, shadow in session.execute(query.execution_options(yield_per=1000)):
        tally.add(decision, shadow["decision"], category_decisions or {}, shadow.get("category_decisions") or {})
        key = (shadow["policy"], shadow["policy_version"])
        versions[key] = versions.get(key, 0) + 1
    return {**tally.result(), "policy": name, "start": start, "end": end,
            "shadow_versions": [{"policy": p, "version": v, "verdicts": n} for (p, v), n in sorted(versions.items())]}


def _derived_decisions(scores: dict[str, float | None], thresholds: dict[str, Any]) -> dict[str, str | None]:
    """Each category's decision re-derived from a verdict's scores and the thresholds it recorded (verdicts from
    before category decisions were stored)."""
    out: dict[str, str | None] = {}
    for category in CATEGORIES:
        score, threshold = scores.get(category), thresholds.get(category)
        if score is None:
            out[category] = None
        elif not threshold:
            out[category] = Decision.ALLOW.value
        elif threshold.get("block") is not None and score >= threshold["block"]:
            out[category] = Decision.BLOCK.value
        elif threshold.get("review") is not None and score >= threshold["review"]:
            out[category] = Decision.REVIEW.value
        else:
            out[category] = Decision.ALLOW.value
    return out


def _candidate(session: Session, tenant_id: str, name: str, request: BacktestIn) -> Policy:
    if request.version is not None:
        view = get_policy(session, tenant_id, name, request.version)
        document = view.document
        version = view.version
    else:
        assert request.document is not None  # noqa: S101 - the schema asks for one of them
        document = request.document.canonical()
        version = 0
    # Scores only: the texts may be erased, so term lists are not re-matched (docs/moderation.md, "Backtests").
    return build_policy(name, version, document, lists={})


def backtest_verdicts(session: Session, tenant_id: str, name: str, request: BacktestIn) -> Iterable[Any]:
    """Each verdict in range with what re-deciding it needs, and the reviewer's decision in force (an admin's
    override, else the reviewer's) when a person decided it."""
    human = case((ReviewItem.status == ReviewStatus.DECIDED.value,
                  func.coalesce(ReviewItem.override_decision, ReviewItem.decision)), else_=None)
    query = (select(Verdict.decision, Verdict.category_scores, Verdict.category_decisions, Verdict.thresholds,
                    Verdict.provider, Verdict.not_judged, Submission.role, human)
             .join(Submission, Submission.id == Verdict.submission_id)
             .outerjoin(ReviewItem, ReviewItem.submission_id == Verdict.submission_id)
             .where(Verdict.tenant_id == tenant_id))
    if request.verdicts == "policy":
        query = query.where(Verdict.policy_name == name)
    return session.execute(_in_range(query, request.start, request.end).execution_options(yield_per=1000))


def count_backtest_verdicts(session: Session, tenant_id: str, name: str, request: BacktestIn, *, limit: int) -> int:
    """How many verdicts the backtest would read, counting no further than `limit + 1`."""
    query = select(Verdict.id).where(Verdict.tenant_id == tenant_id)
    if request.verdicts == "policy":
        query = query.where(Verdict.policy_name == name)
    return len(session.scalars(_in_range(query, request.start, request.end).limit(limit + 1)).all())


def run_backtest_now(session: Session, tenant_id: str, name: str, request: BacktestIn) -> dict[str, Any]:
    """Re-decide the stored verdicts in range under the candidate from their stored scores (no provider call;
    erased submissions too), against the decisions actually made."""
    candidate = _candidate(session, tenant_id, name, request)
    tally = _Tally()
    reviewed = _ReviewedTally()
    skipped = 0
    for decision, scores, category_decisions, thresholds, provider, not_judged, role, human in backtest_verdicts(
            session, tenant_id, name, request):
        if provider == FAILSAFE_PROVIDER:
            skipped += 1  # a fail-open or fail-closed verdict has no scores to re-decide
            continue
        judged = frozenset(c for c in CATEGORIES if c not in (not_judged or []) and scores.get(c) is not None)
        outcome = ProviderResult(provider=provider, model="", latency_ms=0, judged=judged,
                                 results=[TextScores(scores={c: scores[c] for c in judged})])
        redecided = assess(candidate, outcome, role=role if role in ROLES else "input")
        made = category_decisions or _derived_decisions(scores, thresholds or {})
        tally.add(decision, redecided.decision.value, made, redecided.category_decisions)
        if human is not None:
            reviewed.add(human, redecided.decision.value)
    return {**tally.result(), "skipped": skipped, "reviewed": reviewed.result()}


def queue_backtest(session: Session, tenant_id: str, name: str, request: BacktestIn, *, actor: str) -> Backtest:
    """A backtest too large to answer at once: a row a worker takes up once this transaction commits."""
    job = Backtest(tenant_id=tenant_id, policy_name=name, request=request.model_dump(mode="json", by_alias=True,
                                                                                       exclude_none=True),
                   status="queued", created_by=actor, created_at=utcnow())
    session.add(job)
    session.flush()
    send_after_commit(session, Message(RUN_BACKTEST, (job.id,)))
    return job


def requeue_backtests(session: Session, *, queued_for: float, running_for: float, batch_size: int = 100) -> int:
    """Send again what the queue lost, in the caller's transaction: backtests queued longer than `queued_for`
    seconds (their message lost), and running ones started more than `running_for` seconds ago (their worker died:
    no task runs that long), which go back to the queue. The row, not the message, is the record."""
    now = utcnow()
    stale_queued = (Backtest.status == "queued") & (Backtest.created_at < now - timedelta(seconds=queued_for))
    dead_running = (Backtest.status == "running") & (Backtest.started_at < now - timedelta(seconds=running_for))
    ids = list(session.scalars(select(Backtest.id).where(stale_queued | dead_running)
                               .order_by(Backtest.created_at).limit(batch_size)))
    if not ids:
        return 0
    session.execute(update(Backtest).where(Backtest.id.in_(ids), dead_running).values(status="queued", started_at=None)
                    .execution_options(synchronize_session=False))
    send_after_commit(session, *(Message(RUN_BACKTEST, (backtest_id,)) for backtest_id in ids))
    log.info("requeued_backtests", count=len(ids))
    return len(ids)


def get_backtest(session: Session, tenant_id: str, backtest_id: str) -> Backtest:
    job = None if "\x00" in backtest_id else session.get(Backtest, backtest_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound("No such backtest.", param="id")
    return job


def claim_backtest(session: Session, backtest_id: str) -> Backtest | None:
    """Take a queued backtest (a conditional UPDATE: a redelivered message finds it taken)."""
    won = session.execute(update(Backtest).where(Backtest.id == backtest_id, Backtest.status == "queued")
                          .values(status="running", started_at=utcnow()).returning(Backtest.id)
                          .execution_options(synchronize_session=False)).scalar_one_or_none()
    return None if won is None else session.get(Backtest, backtest_id)


def finish_backtest(session: Session, backtest_id: str, *, result: dict[str, Any] | None, error: str | None) -> None:
    session.execute(update(Backtest).where(Backtest.id == backtest_id, Backtest.status == "running")
                    .values(status="failed" if error else "completed", result=result, error=error,
                            completed_at=utcnow()).execution_options(synchronize_session=False))


def backtest_request(job: Backtest) -> BacktestIn:
    try:
        return BacktestIn.model_validate(job.request, strict=False)
    except ValidationError as exc:  # pragma: no cover - stored as validated
        raise InvalidInput("The stored backtest request is unreadable.", code="invalid_backtest") from exc


def run_backtest(database: Database, backtest_id: str) -> str:
    """The worker's side of a large backtest, in steps: claim it; re-decide its verdicts (one read-only
    transaction); record the result, or why it failed."""
    with database.session() as session:
        with session.begin():
            job = claim_backtest(session, backtest_id)
            if job is None:
                return "skipped"  # done already, or another worker has it
            tenant_id, name, request = job.tenant_id, job.policy_name, backtest_request(job)
        try:
            with session.begin():
                result = run_backtest_now(session, tenant_id, name, request)
        except DomainError as exc:
            with session.begin():
                finish_backtest(session, backtest_id, result=None, error=exc.message[:500])
            return "failed"
        with session.begin():
            finish_backtest(session, backtest_id, result=result, error=None)
    log.info("backtest_completed", backtest_id=backtest_id, verdicts=result["total"])
    return "completed"

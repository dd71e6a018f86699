"""The verifier work queue and reliability audits, as methods of `TrajectoryStore`.

Claiming is the one place where backends differ. PostgreSQL picks rows with
`SELECT … FOR UPDATE SKIP LOCKED` inside the claiming `UPDATE`, so concurrent workers on any number
of machines get disjoint batches without waiting on each other. SQLite has no row locks (SQLAlchemy
silently drops `FOR UPDATE` there) but runs one writer at a time, so the same single
`UPDATE … RETURNING` statement is atomic. On both, a claim is a lease: a worker that dies simply stops
renewing it, and once `lease_until` passes the row is claimable again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, exists, func, insert, literal, select, text, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased

from honed._json import scrubbed
from honed.store.database import Database
from honed.store.schema import TrajectoryRow, UTCDateTime, VerdictRow
from honed.store.signing import Signer
from honed.store.verification_tables import VerificationClaimRow, VerifierAuditRow, VerifierPolicyRow
from honed.trajectory import ERROR_KEY, INTERRUPTED, Verdict

if TYPE_CHECKING:
    from honed.redaction.redact import Redactor
    from honed.store.audit import AuditResult

C = VerificationClaimRow
log = logging.getLogger("honed")


@dataclass(frozen=True, slots=True)
class Claim:
    """A trajectory a worker now holds, and how many times it has been claimed (this one included)."""

    trajectory_id: str
    attempts: int


@dataclass(slots=True)
class ClaimOutcome:
    """What a worker settles for one claimed trajectory: verdicts to write, and either done
    (`retry_at` None) or back to the queue from `retry_at` (a verifier erred and may succeed later)."""

    trajectory_id: str
    verdicts: list[Verdict] = field(default_factory=list)
    retry_at: datetime | None = None
    error: str | None = None
    digest: str | None = None  # of the content judged (`honed.store.signing.content_digest`)


UNSIGNED_POLICY = "not signed with this store's key: not trusted until set again with it"


@dataclass(frozen=True, slots=True)
class VerifierPolicy:
    """Whether a verifier's passes may be training data: `usable` is False for a verifier with a
    minimum precision its latest audit does not reach (or that was never audited), and for a
    low-trust verifier (a model judge) that has no minimum precision at all."""

    verifier: str
    trust: str = "high"
    min_precision: float | None = None
    precision: float | None = None
    audited_at: datetime | None = None
    note: str = ""

    @property
    def usable(self) -> bool:
        if self.min_precision is None:
            return self.trust != "low"
        return self.precision is not None and self.precision >= self.min_precision


class VerificationStore:
    """Verification, a part of `TrajectoryStore`: claiming unlabeled trajectories, audits of verifiers."""

    def __init__(self, db: Database) -> None:
        self.engine, self._sessions, self._signer = db.engine, db.sessions, db.signer

    # -- the work queue ---------------------------------------------------------------------

    def enqueue_verification(
        self, queue: str, *, limit: int | None = None, ids: Collection[str] | None = None
    ) -> int:
        """Give every trajectory (of `ids`, when given) without a row in `queue` a pending one;
        returns how many were added."""
        now = _now()
        missing = (
            select(
                TrajectoryRow.id,
                literal(queue),
                literal("pending"),
                literal(0),
                literal(now, UTCDateTime()),
                literal(now, UTCDateTime()),
                literal(now, UTCDateTime()),
            )
            .where(~exists().where(C.trajectory_id == TrajectoryRow.id, C.queue == queue))
            # A run paused at an interrupt has no outcome yet: it is enqueued once it is resumed.
            .where(TrajectoryRow.status != INTERRUPTED)
            .order_by(TrajectoryRow.created_at)
        )
        if ids is not None:
            missing = missing.where(TrajectoryRow.id.in_(list(ids)))
        if limit is not None:
            missing = missing.limit(limit)
        columns = ["trajectory_id", "queue", "state", "attempts", "available_at", "enqueued_at", "updated_at"]
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # One enqueuer at a time (concurrent INSERT … SELECTs could deadlock); the next one
                # waits, then finds the rows there and adds nothing.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(queue)})
                stmt = postgresql.insert(C).from_select(columns, missing).on_conflict_do_nothing()
            elif conn.dialect.name == "sqlite":
                stmt = sqlite.insert(C).from_select(columns, missing).on_conflict_do_nothing()
            else:  # pragma: no cover - other backends: plain insert, the anti-join avoids duplicates
                stmt = insert(C).from_select(columns, missing)
            result = conn.execute(stmt.execution_options(preserve_rowcount=True))
            return max(0, result.rowcount or 0)

    def claim_verification(
        self,
        queue: str,
        owner: str,
        *,
        limit: int = 16,
        lease_s: float = 60.0,
        ids: Collection[str] | None = None,
    ) -> list[Claim]:
        """Claim up to `limit` claimable trajectories of `queue` (of `ids`, when given) for `owner`
        until now + `lease_s`.

        Claimable: claimed under a lease that expired (its worker died), taken first so a steady
        stream of new work cannot starve it; then pending and due, oldest first."""
        now = _now()
        values = {
            "state": "claimed",
            "owner": owner,
            "lease_until": now + timedelta(seconds=lease_s),
            "attempts": C.attempts + 1,
            "updated_at": now,
        }
        expired = and_(C.state == "claimed", C.lease_until < now)
        due = and_(C.state == "pending", C.available_at <= now)
        claims: list[Claim] = []
        with self.engine.begin() as conn:
            for condition, order in ((expired, C.lease_until), (due, C.available_at)):
                if len(claims) >= limit:
                    break
                among = C.trajectory_id.in_(list(ids)) if ids is not None else true()
                pick = (
                    select(C.trajectory_id)
                    .where(C.queue == queue, condition, among)
                    .order_by(order)
                    .limit(limit - len(claims))
                    .with_for_update(skip_locked=True)
                    # Materialised, so PostgreSQL runs it once: as a plain IN-subquery the planner
                    # may rescan it per row, and each rescan locks another batch of rows.
                    .cte("picked")
                    .prefix_with("MATERIALIZED", dialect="postgresql")
                )
                stmt = (
                    update(C)
                    .where(C.queue == queue, C.trajectory_id.in_(select(pick.c.trajectory_id)))
                    .values(**values)
                    .returning(C.trajectory_id, C.attempts)
                )
                claims += [Claim(tid, attempts) for tid, attempts in conn.execute(stmt).all()]
        return claims

    def renew_claims(self, queue: str, owner: str, trajectory_ids: Iterable[str], *, lease_s: float) -> int:
        """Extend `owner`'s leases on these trajectories (work still going on); returns how many."""
        ids = list(trajectory_ids)
        if not ids:
            return 0
        now = _now()
        stmt = (
            update(C)
            .where(C.queue == queue, C.owner == owner, C.state == "claimed", C.trajectory_id.in_(ids))
            .values(lease_until=now + timedelta(seconds=lease_s), updated_at=now)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount or 0

    def finish_claims(self, queue: str, owner: str, outcomes: Sequence[ClaimOutcome]) -> set[str]:
        """Write the verdicts and settle the claims `owner` still holds, in one transaction.

        Claims another worker took over (this owner's lease ran out) are left alone and their
        verdicts dropped: the new owner writes its own. Returns the ids settled."""
        if not outcomes:
            return set()
        now = _now()
        mine = and_(C.queue == queue, C.owner == owner, C.state == "claimed")
        done = [o.trajectory_id for o in outcomes if o.retry_at is None]
        with self._sessions.begin() as session:
            # Claims first: a write takes SQLite's write lock at once, and locks our rows on PostgreSQL.
            held: set[str] = set()
            if done:
                settle = (
                    update(C)
                    .where(mine, C.trajectory_id.in_(done))
                    .values(state="done", owner=None, lease_until=None, updated_at=now)
                    .returning(C.trajectory_id)
                )
                held |= set(session.scalars(settle))
            for outcome in outcomes:
                if outcome.retry_at is None:
                    continue
                retry = (
                    update(C)
                    .where(mine, C.trajectory_id == outcome.trajectory_id)
                    .values(
                        state="pending",
                        owner=None,
                        lease_until=None,
                        available_at=outcome.retry_at,
                        last_error=(outcome.error or "")[:4000],
                        updated_at=now,
                    )
                )
                if session.execute(retry).rowcount:
                    held.add(outcome.trajectory_id)
            rows = {
                (o.trajectory_id, v.verifier, v.version): verdict_row(
                    o.trajectory_id, v, now, o.digest, self._signer
                )
                for o in outcomes
                if o.trajectory_id in held
                for v in o.verdicts
            }
            if rows:
                _upsert_verdicts(session, list(rows.values()))
        return held

    def release_claims(self, queue: str, owner: str, trajectory_ids: Iterable[str]) -> int:
        """Give back claims never worked on (a clean shutdown): pending again, attempt not counted."""
        ids = list(trajectory_ids)
        if not ids:
            return 0
        now = _now()
        stmt = (
            update(C)
            .where(C.queue == queue, C.owner == owner, C.state == "claimed", C.trajectory_id.in_(ids))
            .values(
                state="pending",
                owner=None,
                lease_until=None,
                available_at=now,
                attempts=func.max(C.attempts - 1, 0)
                if self.engine.dialect.name == "sqlite"
                else func.greatest(C.attempts - 1, 0),
                updated_at=now,
            )
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount or 0

    def verification_backlog(self, queue: str) -> dict[str, int]:
        """How much of `queue` is pending (due or backing off), claimed, done, and not yet enqueued."""
        now = _now()
        with self._sessions() as session:
            counts = dict(
                session.execute(select(C.state, func.count()).where(C.queue == queue).group_by(C.state)).all()
            )
            due = session.scalar(
                select(func.count()).where(C.queue == queue, C.state == "pending", C.available_at <= now)
            )
            unqueued = session.scalar(
                select(func.count())
                .select_from(TrajectoryRow)
                .where(~exists().where(C.trajectory_id == TrajectoryRow.id, C.queue == queue))
            )
        return {
            "pending": int(counts.get("pending", 0)),
            "due": int(due or 0),
            "claimed": int(counts.get("claimed", 0)),
            "done": int(counts.get("done", 0)),
            "unqueued": int(unqueued or 0),
        }

    # -- audits and policies ----------------------------------------------------------------

    def audit_verifier(
        self, verifier: str, *, gold: str = "human", version: str | None = None, save: bool = True
    ) -> AuditResult:
        """Compare `verifier`'s verdicts (its newest version unless `version` is given) with `gold`'s
        on the same trajectories; store and return precision, recall and false-positive rate."""
        from honed.store.audit import confusion

        version = version or self._newest_version(verifier)
        pairs = self._verdict_pairs(verifier, version, gold)
        result = confusion(pairs, verifier=verifier, version=version, gold=gold)
        if save:
            row = VerifierAuditRow(
                verifier=verifier,
                version=version,
                gold=gold,
                tp=result.tp,
                fp=result.fp,
                tn=result.tn,
                fn=result.fn,
                undecided=result.undecided,
                created_at=_now(),
                **_rate_columns("precision", result.precision),
                **_rate_columns("recall", result.recall),
                **_rate_columns("false_positive_rate", result.false_positive_rate),
            )
            if self._signer is not None:
                row.signature = self._signer.audit(_columns(row))
            with self._sessions.begin() as session:
                session.add(row)
                session.flush()
                result.id, result.created_at = row.id, row.created_at
        return result

    def audits(self, verifier: str | None = None, *, limit: int = 20) -> list[AuditResult]:
        """Stored audits, newest first."""
        from honed.store.audit import AuditResult

        query = select(VerifierAuditRow).order_by(
            VerifierAuditRow.created_at.desc(), VerifierAuditRow.id.desc()
        )
        if verifier is not None:
            query = query.where(VerifierAuditRow.verifier == verifier)
        with self._sessions() as session:
            rows = [r for r in session.scalars(query) if self._audit_checks(r)][:limit]
        return [
            AuditResult(
                verifier=r.verifier,
                version=r.version,
                gold=r.gold,
                tp=r.tp,
                fp=r.fp,
                tn=r.tn,
                fn=r.fn,
                undecided=r.undecided,
                id=r.id,
                created_at=r.created_at,
            )
            for r in rows
        ]

    def set_min_precision(
        self, verifier: str, min_precision: float | None, *, note: str = ""
    ) -> VerifierPolicy:
        """Below this audited precision a verifier's passes are not training data (None: no minimum)."""
        if min_precision is not None and not 0.0 <= min_precision <= 1.0:
            raise ValueError(f"min_precision must be within [0, 1], not {min_precision}")
        with self._sessions.begin() as session:
            row = session.get(VerifierPolicyRow, verifier)
            if row is None:
                row = VerifierPolicyRow(verifier=verifier, trust="high")
            elif row.signature is not None and not self._policy_checks(row):  # changed without the key
                row.trust = "low"
            row.min_precision, row.note, row.updated_at = min_precision, note, _now()
            if self._signer is not None:
                row.signature = self._signer.policy(row.verifier, row.trust, row.min_precision)
            session.add(row)
        return self.verifier_policy(verifier)

    def set_trust(self, verifier: str, trust: str, *, note: str = "") -> VerifierPolicy:
        """A person's word on a verifier's trust ("high": its passes train unless a minimum
        precision says otherwise; "low": only with an audited minimum), signed with this store's
        key: how a policy another key wrote (a worker started with the wrong one) is set right."""
        if trust not in ("high", "low"):
            raise ValueError(f"trust must be high or low, not {trust!r}")
        with self._sessions.begin() as session:
            row = session.get(VerifierPolicyRow, verifier) or VerifierPolicyRow(verifier=verifier)
            if row.signature is not None and not self._policy_checks(row):
                row.min_precision = None  # what another key wrote is not kept under this one
            row.trust, row.note, row.updated_at = trust, note, _now()
            if self._signer is not None:
                row.signature = self._signer.policy(row.verifier, row.trust, row.min_precision)
            session.add(row)
        return self.verifier_policy(verifier)

    def rekey(self, previous: Signer) -> dict[str, int]:
        """Sign again with this store's key every verdict, policy and audit that checks out with
        `previous` (a key being retired: leaked, or due), and move the worker's queue to this
        key, so nothing is judged again; rows that do not check out with `previous` are left as
        they are (they count under neither). Returns how many rows of each were signed again."""
        if self._signer is None:
            raise ValueError("open the store with the new key (HONED_VERDICT_KEY) to sign again")
        new = self._signer
        counts = dict.fromkeys(("verdicts", "policies", "audits", "queued"), 0)
        V, P, A, C = VerdictRow, VerifierPolicyRow, VerifierAuditRow, VerificationClaimRow
        with self._sessions.begin() as session:
            for row in session.execute(select(V.__table__).where(V.signature.is_not(None))).mappings():
                if previous.verdict_checks(row):
                    session.execute(update(V).where(V.id == row["id"]).values(signature=new.verdict(row)))
                    counts["verdicts"] += 1
            for row in session.execute(select(P.__table__).where(P.signature.is_not(None))).mappings():
                if previous.policy_checks(row):
                    signature = new.policy(row["verifier"], row["trust"], row["min_precision"])
                    session.execute(
                        update(P).where(P.verifier == row["verifier"]).values(signature=signature)
                    )
                    counts["policies"] += 1
            for row in session.execute(select(A.__table__).where(A.signature.is_not(None))).mappings():
                if previous.audit_checks(row):
                    session.execute(update(A).where(A.id == row["id"]).values(signature=new.audit(row)))
                    counts["audits"] += 1
            old_queue, new_queue = f"+signed:{previous.fingerprint}", f"+signed:{new.fingerprint}"
            for (queue,) in session.execute(select(C.queue).where(C.queue.endswith(old_queue)).distinct()):
                moved = queue[: -len(old_queue)] + new_queue
                if session.scalar(select(func.count()).select_from(C).where(C.queue == moved)):
                    continue  # a worker with the new key started already: its queue stands
                counts["queued"] += session.execute(
                    update(C).where(C.queue == queue).values(queue=moved)
                ).rowcount
        return counts

    def register_verifiers(self, trusts: dict[str, str], *, only_new: bool = False) -> None:
        """Record each verifier's trust level (the worker calls this on start), keeping policies.
        An upsert: many workers start at once. `only_new`: leave verifiers with a policy alone."""
        if not trusts:
            return
        now = _now()
        rows = [{"verifier": n, "trust": t, "note": "", "updated_at": now} for n, t in sorted(trusts.items())]
        with self.engine.begin() as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            replace = ["trust", "updated_at"]
            if self._signer is not None:
                replace += ["min_precision", "signature"]
                rows = self._signed_policies(conn, rows)
                if not rows:
                    return
            stmt = dialect.insert(VerifierPolicyRow).values(rows)
            if only_new:
                conn.execute(stmt.on_conflict_do_nothing(index_elements=["verifier"]))
                return
            stmt = stmt.on_conflict_do_update(
                index_elements=["verifier"], set_={c: stmt.excluded[c] for c in replace}
            )
            conn.execute(stmt)

    def _signed_policies(self, conn: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The policies `register_verifiers` writes, signed: the trust the code declares, the minimum
        precision of the row there. A row written before the key was set (no signature) is adopted
        as it is; one whose signature does not check out (another key, or changed without one) is
        left as it is, untrusted, and said: re-signed, a minimum precision removed or lowered
        without the key came back as the owner's (a QA pass, session 26)."""
        assert self._signer is not None
        P = VerifierPolicyRow
        names = [r["verifier"] for r in rows]
        stored = {
            r.verifier: r
            for r in conn.execute(
                select(P.verifier, P.trust, P.min_precision, P.signature).where(P.verifier.in_(names))
            )
        }
        kept = []
        for row in rows:
            old = stored.get(row["verifier"])
            if old is not None and old.signature is not None and not self._signer.policy_checks(old._mapping):
                log.warning(
                    "honed: the policy of verifier %s does not check out with this key (signed with another, "
                    "or changed without one): it stays untrusted until set again with this key "
                    "(`honed verifiers policy %s --trust high`, or an audit with --min-precision P)",
                    row["verifier"],
                    row["verifier"],
                )
                continue
            row["min_precision"] = old.min_precision if old is not None else None
            row["signature"] = self._signer.policy(row["verifier"], row["trust"], row["min_precision"])
            kept.append(row)
        return kept

    def verifier_policy(self, verifier: str) -> VerifierPolicy:
        """The policy of one verifier with its latest audited precision."""
        return next(p for p in self.verifier_policies([verifier]))

    def verifier_policies(self, verifiers: Iterable[str] | None = None) -> list[VerifierPolicy]:
        """Policies of the given verifiers (default: all registered or audited), with latest precision."""
        with self._sessions() as session:
            rows = {r.verifier: r for r in session.scalars(select(VerifierPolicyRow))}
            labelling = _labelling_versions(session, self._signer)
            audits: dict[str, VerifierAuditRow] = {}
            ordered = select(VerifierAuditRow).order_by(
                VerifierAuditRow.created_at.desc(), VerifierAuditRow.id.desc()
            )
            for audit in session.scalars(ordered):
                if not self._audit_checks(audit):
                    continue
                # An audit of one version says nothing of another: the one that counts is of the
                # version labelling now (its newest verdict's), or one made across versions.
                current = labelling.get(audit.verifier)
                if audit.version is None or current is None or audit.version == current:
                    audits.setdefault(audit.verifier, audit)
        names = sorted(set(rows) | set(audits)) if verifiers is None else list(verifiers)
        out = []
        for name in names:
            row, audit = rows.get(name), audits.get(name)
            if row is not None and not self._policy_checks(row):
                out.append(VerifierPolicy(verifier=name, trust="low", note=UNSIGNED_POLICY))
                continue
            out.append(
                VerifierPolicy(
                    verifier=name,
                    trust=row.trust if row else "high",
                    min_precision=row.min_precision if row else None,
                    precision=audit.precision if audit else None,
                    audited_at=audit.created_at if audit else None,
                    note=row.note if row else "",
                )
            )
        return out

    def untrusted_verifiers(self) -> set[str]:
        """Verifiers whose passes must not become training data (see `VerifierPolicy.usable`), and
        the composites (`any_of(reference,style)`, as `honed.verifiers.compose` names them) with
        an untrusted part: a part under its audited minimum decided `any_of` alone."""
        policies = self.verifier_policies()
        untrusted = {p.verifier for p in policies if not p.usable}
        if self._signer is not None:  # a policy deleted by code with the URL: not trusted either
            with self._sessions() as session:
                judging = set(_labelling_versions(session, self._signer))
            untrusted |= judging - {p.verifier for p in policies}
            policies += [
                VerifierPolicy(verifier=name, trust="low")
                for name in judging - {p.verifier for p in policies}
            ]
        grew = bool(untrusted)
        while grew:  # composites of composites
            grew = False
            for policy in policies:
                if policy.verifier not in untrusted and untrusted & set(composite_parts(policy.verifier)):
                    untrusted.add(policy.verifier)
                    grew = True
        return untrusted

    def verifier_counts(self) -> list[dict[str, Any]]:
        """Verdict counts per verifier and version: passes, fails, undecided (and of those, errors)."""
        V = VerdictRow
        query = (
            select(
                V.verifier,
                V.version,
                func.count(),
                func.count().filter(V.passed.is_(True)),
                func.count().filter(V.passed.is_(False)),
                func.max(V.created_at),
                func.count().filter(V.passed.is_(None), V.evidence[ERROR_KEY].as_string().is_not(None)),
            )
            .group_by(V.verifier, V.version)
            .order_by(V.verifier, V.version)
        )
        if self._signer is not None:  # signed: what counts (a forged signature is found on reading)
            query = query.where(V.signature.is_not(None))
        with self._sessions() as session:
            rows = session.execute(query).all()
        return [
            {
                "verifier": n,
                "version": v,
                "total": t,
                "pass": p,
                "fail": f,
                "undecided": t - p - f,
                "errors": e,  # of the undecided: the verifier failed (a retry may judge them)
                "latest": at,
            }
            for n, v, t, p, f, at, e in rows
        ]

    def label_signing(self) -> str:
        """How labels are signed, as seen from here: `off` (no key here, none signed), `elsewhere`
        (no key here, but the store holds signed labels: nothing is checked), `checked` (the key
        here checks the newest signed labels, or none are signed yet), `other-key` (none of the
        newest signed labels check out with the key here)."""
        V = VerdictRow
        with self._sessions() as session:
            newest = session.scalars(
                select(V).where(V.signature.is_not(None)).order_by(V.created_at.desc(), V.id.desc()).limit(50)
            ).all()
        if self._signer is None:
            return "elsewhere" if newest else "off"
        if newest and not any(self._signer.verdict_checks(_columns(v)) for v in newest):
            return "other-key"
        return "checked"

    def unsigned_verdicts(self) -> int | None:
        """With a verdict key, how many verdicts carry no signature (written without the key: not
        counted); None without a key (nothing is signed)."""
        if self._signer is None:
            return None
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).where(VerdictRow.signature.is_(None))) or 0)

    # -- helpers ----------------------------------------------------------------------------

    def _policy_checks(self, row: VerifierPolicyRow) -> bool:
        return self._signer is None or self._signer.policy_checks(_columns(row))

    def _audit_checks(self, row: VerifierAuditRow) -> bool:
        return self._signer is None or self._signer.audit_checks(_columns(row))

    def _pair_checks(self, row: Any) -> bool:
        if self._signer is None:
            return True
        return all(self._signer.verdict_checks(_columns(v)) for v in row[-2:])

    def _newest_version(self, verifier: str) -> str | None:
        query = (
            select(VerdictRow.version)
            .where(VerdictRow.verifier == verifier)
            .order_by(VerdictRow.created_at.desc(), VerdictRow.id.desc())
            .limit(1)
        )
        with self._sessions() as session:
            return session.scalar(query)

    def _verdict_pairs(
        self, verifier: str, version: str | None, gold: str
    ) -> list[tuple[bool | None, bool | None]]:
        said, truth = aliased(VerdictRow), aliased(VerdictRow)
        query = (
            select(said.trajectory_id, said.passed, truth.passed, truth.created_at, truth.id)
            .join(truth, truth.trajectory_id == said.trajectory_id)
            .where(said.verifier == verifier, truth.verifier == gold)
            .order_by(truth.created_at, truth.id)
        )
        if version is not None:
            query = query.where(said.version == version)
        if self._signer is not None:  # only verdicts signed with the key, on both sides
            query = query.where(said.signature.is_not(None), truth.signature.is_not(None)).add_columns(
                said, truth
            )
        with self._sessions() as session:
            rows = [r for r in session.execute(query).all() if self._pair_checks(r)]
        said_of: dict[str, bool | None] = {}
        gold_of: dict[str, list[bool | None]] = {}
        for tid, verdict_passed, gold_passed, *_ in rows:
            said_of[tid] = verdict_passed
            gold_of.setdefault(tid, []).append(gold_passed)
        # Every labeller's label counts, as in `label`: where two disagree, the truth is a fail (the
        # label written last decided before: the order of labelling set a verifier's precision).
        pairs = []
        for tid, golds in gold_of.items():
            judged = [g for g in golds if g is not None]
            pairs.append((said_of[tid], all(judged) if judged else None))
        return pairs


_COMPOSITE = re.compile(r"(?:all_of|any_of|weighted)\((.*)\)")


def composite_parts(name: str) -> list[str]:
    """The part names in a composite's default name, nested ones too (`any_of(a,all_of(b,c))` ->
    `a`, `all_of(b,c)`, `b`, `c`)."""
    match = _COMPOSITE.fullmatch(name)
    if match is None:
        return []
    parts, depth, start, inner = [], 0, 0, match.group(1)
    for i, c in enumerate(inner):
        depth += (c == "(") - (c == ")")
        if c == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [name for part in parts if part for name in (part, *composite_parts(part))]


def _labelling_versions(session: Any, signer: Signer | None = None) -> dict[str, str]:
    """Each verifier's version whose verdict is the newest: the version labelling now (with a
    `signer`, of the verdicts it signed: a row with a made-up signature and a future time chose
    the version whose audit counted)."""
    V = VerdictRow
    newest = (
        select(V.verifier, V.version, func.max(V.created_at).label("at"))
        .where(*([V.signature.is_not(None)] if signer is not None else []))
        .group_by(V.verifier, V.version)
        .order_by(func.max(V.created_at))
    )
    groups = session.execute(newest).all()
    if signer is None:
        return {verifier: version for verifier, version, _ in groups}
    newest_signed: dict[tuple[str, str], Any] = {}
    for verifier, version, _ in groups:
        rows = session.scalars(
            select(V)
            .where(V.verifier == verifier, V.version == version, V.signature.is_not(None))
            .order_by(V.created_at.desc(), V.id.desc())
            .execution_options(yield_per=64)
        )
        at = next((r.created_at for r in rows if signer.verdict_checks(_columns(r))), None)
        if at is not None:
            newest_signed[(verifier, version)] = at
    ordered = sorted(newest_signed.items(), key=lambda item: item[1])
    return {verifier: version for (verifier, version), _ in ordered}


def _upsert_verdicts(session: Any, rows: list[dict[str, Any]]) -> None:
    """One verdict per (trajectory, verifier, version): a new one replaces the old in place."""
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(VerdictRow)
    replace = {
        c: stmt.excluded[c]
        for c in ("passed", "score", "reason", "evidence", "duration_s", "created_at", "digest", "signature")
    }
    session.execute(
        stmt.on_conflict_do_update(index_elements=["trajectory_id", "verifier", "version"], set_=replace),
        rows,
    )


@functools.cache
def _redactor() -> Redactor:
    from honed.redaction.redact import Redactor

    return Redactor()


def redacted_verdict(v: Verdict) -> tuple[str, dict[str, Any]]:
    """A verdict's reason and evidence as they may be stored: redacted like captured text. A
    verifier's exception quotes a failing URL with its API key, a sandbox's output prints the
    environment; the agent's own text was redacted at capture, these were not."""
    redactor = _redactor()
    return redactor.redact_text(str(v.reason or "")), redactor.redact(_plain_json(v.evidence or {}))


def verdict_row(
    trajectory_id: str, v: Verdict, now: datetime, digest: str | None = None, signer: Signer | None = None
) -> dict[str, Any]:
    """A verdict's row as stored: redacted, plain JSON, signed when a key is set."""
    reason, evidence = redacted_verdict(v)
    row = {
        "trajectory_id": trajectory_id,
        "verifier": v.verifier,
        "version": v.version,
        # A "pass" that reports an error failed to judge: stored as the verifier error it is.
        "passed": None if v.passed is True and (v.evidence or {}).get(ERROR_KEY) else v.passed,
        "score": float(v.score),
        "reason": scrubbed(reason),
        # What a verifier quotes of the agent's output (a NUL PostgreSQL refuses, a set) must
        # never fail the batch: every other trajectory's verdict waited behind it, forever.
        "evidence": _plain_json(evidence),
        "duration_s": float(v.duration_s or 0.0),
        "created_at": now,
        "digest": digest,
    }
    row["signature"] = signer.verdict(row) if signer is not None else None
    return row


def _plain_json(value: Any, depth: int = 0) -> Any:
    """`value` as JSON every store holds: text without NUL or lone surrogates, finite numbers
    (NaN and infinities as None), lists for sets and tuples, anything else as its text."""
    if value is None or type(value) in (bool, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return scrubbed(value)
    if depth > 32:
        return scrubbed(repr(value)[:1000])
    if isinstance(value, dict):
        return {scrubbed(str(k)): _plain_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_plain_json(v, depth + 1) for v in items]
    if isinstance(value, bytes | bytearray):
        return scrubbed(bytes(value).decode("utf-8", "replace"))
    return scrubbed(str(value))


def _columns(row: Any) -> dict[str, Any]:
    """An ORM row's columns by name, as `honed.store.signing` reads them."""
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


def _rate_columns(name: str, rate: Any) -> dict[str, float | None]:
    if rate is None:
        return {name: None, f"{name}_low": None, f"{name}_high": None}
    return {name: rate.value, f"{name}_low": rate.low, f"{name}_high": rate.high}


def _lock_key(queue: str) -> int:
    return int.from_bytes(hashlib.sha256(f"honed-verify:{queue}".encode()).digest()[:8], "big", signed=True)


def _now() -> datetime:
    return datetime.now(UTC)

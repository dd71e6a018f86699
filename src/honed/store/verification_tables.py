"""ORM tables of the verifier work queue, verifier audits and verifier policies (migration 0002).

`verification_claims` holds one row per (trajectory, queue): a queue is one set of verifiers
(name@version list), so a new verifier version starts a new queue and labels everything again.
A row is `pending` (claimable from `available_at`, which backoff pushes forward), `claimed` by an
`owner` until `lease_until` (renewed while work goes on; a crashed owner's lease simply expires),
or `done`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from honed.store.schema import Base


def _now() -> datetime:
    return datetime.now(UTC)


class VerificationClaimRow(Base):
    __tablename__ = "verification_claims"

    trajectory_id: Mapped[str] = mapped_column(
        ForeignKey("trajectories.id", ondelete="CASCADE"), primary_key=True
    )
    queue: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    owner: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(default=_now)
    lease_until: Mapped[datetime | None]
    enqueued_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_verification_claims_queue_state", "queue", "state", "available_at"),
        Index("ix_verification_claims_owner", "owner"),
    )


class VerifierAuditRow(Base):
    __tablename__ = "verifier_audits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    verifier: Mapped[str] = mapped_column(String(200))
    version: Mapped[str | None] = mapped_column(String(64))
    gold: Mapped[str] = mapped_column(String(200))
    tp: Mapped[int] = mapped_column(Integer, default=0)
    fp: Mapped[int] = mapped_column(Integer, default=0)
    tn: Mapped[int] = mapped_column(Integer, default=0)
    fn: Mapped[int] = mapped_column(Integer, default=0)
    undecided: Mapped[int] = mapped_column(Integer, default=0)
    precision: Mapped[float | None] = mapped_column(Float)
    precision_low: Mapped[float | None] = mapped_column(Float)
    precision_high: Mapped[float | None] = mapped_column(Float)
    recall: Mapped[float | None] = mapped_column(Float)
    recall_low: Mapped[float | None] = mapped_column(Float)
    recall_high: Mapped[float | None] = mapped_column(Float)
    false_positive_rate: Mapped[float | None] = mapped_column(Float)
    false_positive_rate_low: Mapped[float | None] = mapped_column(Float)
    false_positive_rate_high: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    signature: Mapped[str | None] = mapped_column(String(64))  # `honed.store.signing` (0008)

    __table_args__ = (Index("ix_verifier_audits_verifier_created", "verifier", "created_at"),)


class VerifierPolicyRow(Base):
    __tablename__ = "verifier_policies"

    verifier: Mapped[str] = mapped_column(String(200), primary_key=True)
    trust: Mapped[str] = mapped_column(String(8), default="high")
    min_precision: Mapped[float | None] = mapped_column(Float)
    note: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=_now)
    signature: Mapped[str | None] = mapped_column(String(64))  # `honed.store.signing` (0008)

"""Verifiers: label every trajectory's outcome in the background, and measure their own reliability.

    from honed.verifiers import ReferenceMatch, JsonSchema, TestSuite, GoalCheck, Judge, Worker
    worker = Worker(store, verifiers=[ReferenceMatch(), TestSuite()], concurrency=2)
    worker.run_once()            # or run_forever(); `honed verify --once | --watch` from a shell

A verifier is `verify(trajectory) -> Verdict` with a `name` and `version` (see `protocol`).
"""

from honed.store.audit import AuditResult, Rate, confusion, wilson
from honed.verifiers.compose import all_of, any_of, weighted
from honed.verifiers.goal import GoalCheck
from honed.verifiers.judge import Judge, JudgeDecision
from honed.verifiers.protocol import (
    BaseVerifier,
    CannotTell,
    UnknownVerifier,
    Unreadable,
    Verifier,
    VerifierError,
    VerifierTimeout,
)
from honed.verifiers.reference import ReferenceMatch
from honed.verifiers.routing import applicable
from honed.verifiers.sandbox import Limits, Sandbox, SandboxError, SandboxResult, SandboxUnavailable
from honed.verifiers.schema import JsonSchema
from honed.verifiers.testsuite import TestSuite
from honed.verifiers.worker import Worker, WorkerStats, queue_name

__all__ = [
    "AuditResult",
    "BaseVerifier",
    "CannotTell",
    "GoalCheck",
    "JsonSchema",
    "Judge",
    "JudgeDecision",
    "Limits",
    "Rate",
    "ReferenceMatch",
    "Sandbox",
    "SandboxError",
    "SandboxResult",
    "SandboxUnavailable",
    "TestSuite",
    "UnknownVerifier",
    "Unreadable",
    "Verifier",
    "VerifierError",
    "VerifierTimeout",
    "Worker",
    "WorkerStats",
    "all_of",
    "any_of",
    "applicable",
    "confusion",
    "queue_name",
    "weighted",
    "wilson",
]

"""The verifier work queue and reliability audits, as methods of `TrajectoryStore`."""

from __future__ import annotations


class VerificationStore:
    """Mixed into `TrajectoryStore`: claiming unlabeled trajectories, audits of verifiers."""

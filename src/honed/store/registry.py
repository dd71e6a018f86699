"""The model registry (versions, promotion, rollback), as methods of `TrajectoryStore`."""

from __future__ import annotations


class ModelRegistry:
    """Mixed into `TrajectoryStore`: `register_model`, `promote`, `rollback`, `live_version`, `versions`."""

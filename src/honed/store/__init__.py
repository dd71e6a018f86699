"""The trajectory store: SQLite by default, PostgreSQL in production, migrated on open."""

from honed.store.store import (
    DEFAULT_STORE_URL,
    InvalidStoreURL,
    StoreNotFound,
    StoreSchemaOld,
    StoreSchemaUnknown,
    StoreUnavailable,
    TrajectoryNotFound,
    TrajectoryStore,
    check_store_url,
    open_store,
    record_to_trajectory,
    resolve_store_url,
    trajectory_to_record,
)

__all__ = [
    "DEFAULT_STORE_URL",
    "InvalidStoreURL",
    "StoreNotFound",
    "StoreSchemaOld",
    "StoreSchemaUnknown",
    "StoreUnavailable",
    "TrajectoryNotFound",
    "TrajectoryStore",
    "check_store_url",
    "open_store",
    "record_to_trajectory",
    "resolve_store_url",
    "trajectory_to_record",
]

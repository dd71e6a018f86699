"""What the store's parts share, passed to each explicitly: the engine, a session factory and the
signer of labels (`honed.store.signing`), None where no key is set."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from honed.store.signing import Signer


@dataclass(frozen=True)
class Database:
    engine: Engine
    sessions: sessionmaker[Session]
    signer: Signer | None = None

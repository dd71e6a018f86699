"""Alembic environment: honed runs migrations programmatically on `open_store`, on the
connection it hands over in `config.attributes["connection"]`."""

from __future__ import annotations

from alembic import context

from honed.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

"""Alembic environment: run the migrations on the connection that `lmops.store` passes in.

Online mode only, on config.attributes["connection"]; the caller owns the transaction, so an upgrade
commits whole or not at all. render_as_batch lets later revisions alter SQLite tables (which have
almost no ALTER TABLE) by copying them. The version table is lmops_alembic_version, so a
PostgreSQL database shared with MLflow (which has its own alembic_version) works.
"""

from alembic import context

from lmops.store import VERSION_TABLE, Base  # every domain module of lmops.store is imported: all tables

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("lmops migrations run on a connection: use lmops.store.Store.open or alembic_config(conn)")
context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                  render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()

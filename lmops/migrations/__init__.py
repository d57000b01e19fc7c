"""Alembic migrations of the metadata store, shipped in the package and run by `Store.open`.

No alembic.ini: `lmops.store.alembic_config(connection)` points Alembic here. Tables are created and
changed only by the revisions in versions/, never by metadata.create_all.
"""

"""Revisions, applied in order of their down_revision links (Alembic skips this file)."""

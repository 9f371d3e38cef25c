"""Alembic migrations (arrive with issue 4)."""

"""Alembic migrations of the service database (run by :func:`stoker.service.db.upgrade`)."""

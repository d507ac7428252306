"""Alembic environment: migrate the connection :func:`stoker.service.db.upgrade` hands over.

There is no ``alembic.ini``: :func:`stoker.service.db.alembic_config` builds the
configuration in code.  Run by hand, ``alembic`` gets the URL from that
configuration's ``sqlalchemy.url`` and opens its own connection.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from stoker.service.db import make_engine
from stoker.service.models import Base


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: later migrations copy tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run() -> None:
    config = context.config
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=Base.metadata,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _migrate(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None, "sqlalchemy.url is not set"
    engine = make_engine(url)
    try:
        with engine.begin() as own:
            _migrate(own)
    finally:
        engine.dispose()


_run()

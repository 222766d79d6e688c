"""Versioned schema migrations: a table records which numbered steps ran; missing ones run in order.

Why not `create_all` at start-up: deployed databases outlive the code, so every schema change must be an
explicit, ordered, recorded step that upgrades an existing database in place. On PostgreSQL an advisory
lock serialises replicas that start at the same time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from aeic.receiver.storage import schema

__all__ = ["MIGRATIONS", "SQLITE_BUSY_TIMEOUT_MS", "Migration", "SchemaTooNewError", "current_version", "migrate"]

# Arbitrary constant key for pg_advisory_xact_lock ("AEIC" in ASCII).
_PG_LOCK_KEY = 0x41454943
# How long a statement waits for another connection's write on SQLite before failing (every connection).
SQLITE_BUSY_TIMEOUT_MS = 15_000


@dataclass(frozen=True)
class Migration:
    """One schema step; `apply` runs inside the migration transaction."""

    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _v1_initial(conn: sa.Connection) -> None:
    schema.metadata.create_all(conn, tables=[schema.images, schema.device_tokens])


def _v2_decode_counter(conn: sa.Connection) -> None:
    # v1 creates the current table, so a database created by this code already has the column.
    if "decodes" not in {c["name"] for c in sa.inspect(conn).get_columns(schema.images.name)}:
        conn.execute(sa.text("ALTER TABLE images ADD COLUMN decodes INTEGER NOT NULL DEFAULT 0"))


def _v3_coding_downscale(conn: sa.Connection) -> None:
    # Streams stored before the container carried a downscale were all coded whole.
    if "downscale" not in {c["name"] for c in sa.inspect(conn).get_columns(schema.images.name)}:
        conn.execute(sa.text("ALTER TABLE images ADD COLUMN downscale INTEGER NOT NULL DEFAULT 1"))


def _v4_gallery_sessions(conn: sa.Connection) -> None:
    schema.gallery_sessions.create(conn, checkfirst=True)


def _v5_status_index(conn: sa.Connection) -> None:
    # v1 creates the current table, indexes included, so a database created by this code already has it.
    next(i for i in schema.images.indexes if i.name == "ix_images_status_seq").create(conn, checkfirst=True)


# The listing indexes of v6, and those of earlier versions they replace (v1 created both).
_V6_LISTING_INDEXES = ("ix_images_created_seq", "ix_images_device_created_seq", "ix_images_status_created_seq",
                       "ix_images_device_status_created_seq")
_V6_REPLACED_INDEXES = ("ix_images_created_at", "ix_images_device_seq")


def _v6_listing_indexes(conn: sa.Connection) -> None:
    # A listing filtered by since/until walked every image in seq order (or every image of its device or
    # status) when few or none matched; these indexes serve the filter and the order together.
    for index in schema.images.indexes:
        if index.name in _V6_LISTING_INDEXES:
            index.create(conn, checkfirst=True)
    for name in _V6_REPLACED_INDEXES:
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))


def _v7_fair_decode_order(conn: sa.Connection) -> None:
    # Images stored before keep tag 0: they are decoded first, in arrival order, as they would have been.
    if "fair_tag" not in {c["name"] for c in sa.inspect(conn).get_columns(schema.images.name)}:
        conn.execute(sa.text("ALTER TABLE images ADD COLUMN fair_tag FLOAT NOT NULL DEFAULT 0"))
    for index in schema.images.indexes:
        if index.name in ("ix_images_claim_fair", "ix_images_status_fair_seq"):
            index.create(conn, checkfirst=True)
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_images_claim"))


# A new token: 32 random hex digits, drawn by the database in the writer's transaction.
_SQLITE_TOKEN = "lower(hex(randomblob(16)))"
_POSTGRES_TOKEN = "replace(gen_random_uuid()::text, '-', '')"
# PostgreSQL: 16 token rows, a transaction changing the one its transaction id picks (all its changes the
# same row), so concurrent writers seldom wait for one another's commit: with a single row, 8 threads writing
# images with durable commits managed 374-391 writes a second, against 365-506 with no trigger and 462-688
# with 16 rows (3 runs each, a local server with fsync on). SQLite: one row (one writer at a time anyway).
_POSTGRES_ROWS = 16
_FIRST_TOKENS = ("INSERT INTO aeic_catalogue (id, token) SELECT n, {token} FROM {rows}"
                 " WHERE NOT EXISTS (SELECT 1 FROM aeic_catalogue)")
# SQLite: a row trigger per event. PostgreSQL: one row trigger deferred to the commit, so a transaction takes
# its token row's lock last, after all its image rows (no lock-order deadlock with another writer), and holds
# it only while it commits.
_SQLITE_CATALOGUE = [_FIRST_TOKENS.format(token=_SQLITE_TOKEN, rows="(SELECT 0 AS n)")] + [
    f"CREATE TRIGGER IF NOT EXISTS aeic_catalogue_on_{event.lower()} AFTER {event} ON images"
    f" BEGIN UPDATE aeic_catalogue SET token = {_SQLITE_TOKEN}; END"
    for event in ("INSERT", "UPDATE", "DELETE")]
_POSTGRES_CATALOGUE = [
    _FIRST_TOKENS.format(token=_POSTGRES_TOKEN, rows=f"generate_series(0, {_POSTGRES_ROWS - 1}) AS n"),
    ("CREATE OR REPLACE FUNCTION aeic_catalogue_changed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
     f" UPDATE aeic_catalogue SET token = {_POSTGRES_TOKEN} WHERE id = mod(txid_current(), {_POSTGRES_ROWS});"
     " RETURN NULL; END $$"),
    "DROP TRIGGER IF EXISTS aeic_catalogue_changed ON images",
    ("CREATE CONSTRAINT TRIGGER aeic_catalogue_changed AFTER INSERT OR UPDATE OR DELETE ON images"
     " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE PROCEDURE aeic_catalogue_changed()"),
]


def _v8_catalogue_token(conn: sa.Connection) -> None:
    # Triggers, not the store's methods, change the token: every write to `images` does it, whatever
    # process or code made it (a worker of the previous release during a rolling upgrade, an operator's SQL).
    schema.catalogue.create(conn, checkfirst=True)
    for statement in _POSTGRES_CATALOGUE if conn.dialect.name == "postgresql" else _SQLITE_CATALOGUE:
        conn.exec_driver_sql(statement)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "images and device tokens", _v1_initial),
    Migration(2, "decode counter", _v2_decode_counter),
    Migration(3, "coding downscale", _v3_coding_downscale),
    Migration(4, "gallery sessions", _v4_gallery_sessions),
    Migration(5, "images by status in seq order", _v5_status_index),
    Migration(6, "listing indexes in (created_at, seq) order", _v6_listing_indexes),
    Migration(7, "decode order fair across devices", _v7_fair_decode_order),
    Migration(8, "catalogue change token", _v8_catalogue_token),
)


# How long a start waits for another process's migration on SQLite (a large catalogue's indexes take a
# while: v6 took 1.3 s at 500,000 images); then the connection's usual wait again.
_SQLITE_MIGRATION_WAIT_MS = 600_000


def _begin_sqlite_migration(conn: sa.Connection) -> None:
    """Open the migration's transaction on SQLite as a write transaction, now.

    Python's sqlite3 module opens a transaction only before INSERT/UPDATE/DELETE, so the DDL of a migration
    committed statement by statement: a process killed in v6 left two of its four indexes and v5 recorded,
    and two processes starting at once (`serve` and `token create`) both ran it, one failing on "index
    already exists". `BEGIN IMMEDIATE` makes the steps and their version row one transaction, and makes a
    second process wait for the first's, then find nothing left to do (as the advisory lock does on
    PostgreSQL)."""
    conn.exec_driver_sql(f"PRAGMA busy_timeout = {_SQLITE_MIGRATION_WAIT_MS}")
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer aeic: this code must not write to a schema it does not know
    (the command line reports it in one line)."""


def current_version(conn: sa.Connection) -> int:
    """Highest applied migration, 0 for an empty database."""
    if not sa.inspect(conn).has_table(schema.schema_version.name):
        return 0
    value = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar()
    return int(value or 0)


def migrate(engine: sa.Engine) -> int:
    """Bring the database to the newest schema; returns the resulting version."""
    known = max(m.version for m in MIGRATIONS)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        elif engine.dialect.name == "sqlite":
            _begin_sqlite_migration(conn)
        schema.schema_version.create(conn, checkfirst=True)
        version = current_version(conn)
        if version > known:
            raise SchemaTooNewError(
                f"database schema v{version} is newer than this code (v{known}); upgrade aeic")
        for step in MIGRATIONS:
            if step.version <= version:
                continue
            step.apply(conn)
            conn.execute(
                schema.schema_version.insert().values(
                    version=step.version, description=step.description, applied_at=time.time()
                )
            )
            version = step.version
    return version

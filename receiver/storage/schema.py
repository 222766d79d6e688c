"""Current relational schema (SQLAlchemy Core), portable between SQLite and PostgreSQL.

Times are float seconds since the epoch: the same type and comparison semantics on both engines, no
time-zone surprises in SQLite. `seq` gives a stable newest-first order and paging cursor; `id` is the
public, unguessable identifier.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["catalogue", "device_tokens", "gallery_sessions", "images", "metadata", "schema_version"]

metadata = sa.MetaData()

schema_version = sa.Table(
    "aeic_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("device", sa.String(128), nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("model_id", sa.String(8), nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("rate_index", sa.Integer, nullable=False),
    # The coding downscale of the bitstream (1, 2 or 4): the sender coded the image reduced by it.
    sa.Column("downscale", sa.Integer, nullable=False, server_default="1"),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("bpp", sa.Float, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("retry_at", sa.Float, nullable=True),
    sa.Column("claim_token", sa.String(32), nullable=True),
    sa.Column("claimed_at", sa.Float, nullable=True),
    sa.Column("entropy_ms", sa.Float, nullable=True),
    sa.Column("decoder_ms", sa.Float, nullable=True),
    sa.Column("decode_ms", sa.Float, nullable=True),
    sa.Column("batch_size", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("decoded_at", sa.Float, nullable=True),
    # Completed decodes (incremented with the `done` transition): 1 for every done image unless a job was
    # ever decoded twice, which the scale-out tests and operators check.
    sa.Column("decodes", sa.Integer, nullable=False, server_default="0"),
    # Place in the decode order, fair across devices (schema v7; `SqlMetadataStore.insert_image`): the
    # worker claims pending images by (fair_tag, seq), so one device's backlog does not hold up the others.
    sa.Column("fair_tag", sa.Float, nullable=False, server_default="0"),
    sa.UniqueConstraint("device", "idempotency_key", name="uq_images_device_idempotency_key"),
    # A batch: due first attempts of the head's model and size, in decode order (schema v7; v1: by seq).
    sa.Index("ix_images_claim_fair", "status", "model_id", "width", "height", "fair_tag", "seq"),
    # Images by status in arrival order (schema v5; the worker's next-job query walked it until v7).
    sa.Index("ix_images_status_seq", "status", "seq"),
    # The worker's next-job query walks this (schema v7), and an upload reads the queue's head from it.
    sa.Index("ix_images_status_fair_seq", "status", "fair_tag", "seq"),
    # The listing's order is (created_at, seq), newest first, and its time filters are ranges on
    # created_at: each filter a client polls with (none, device, status, both; with since/until or not) has
    # an index whose leading equality columns it fixes and whose remainder is that order, so a page, and a
    # poll that finds nothing new, reads only the rows it returns (schema v6).
    sa.Index("ix_images_created_seq", "created_at", "seq"),
    sa.Index("ix_images_device_created_seq", "device", "created_at", "seq"),
    sa.Index("ix_images_status_created_seq", "status", "created_at", "seq"),
    sa.Index("ix_images_device_status_created_seq", "device", "status", "created_at", "seq"),
)

device_tokens = sa.Table(
    "device_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("device", sa.String(128), nullable=False, index=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

# Gallery sign-ins: the browser's cookie holds a random session secret, stored here only as its SHA-256,
# tied to the hash of the token that opened it (so revoking that token ends the session too).
gallery_sessions = sa.Table(
    "gallery_sessions",
    metadata,
    sa.Column("session_hash", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

# Tokens that every committed change to `images` replaces with a fresh random value (triggers of schema v8,
# so every writer, in any process or version, does it; one row on SQLite, 16 on PostgreSQL, the migration
# says why): the image listing's ETag is made from them, so an unchanged listing is a 304 without a query.
catalogue = sa.Table(
    "aeic_catalogue",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("token", sa.String(32), nullable=False),
)

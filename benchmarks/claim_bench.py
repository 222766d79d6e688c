"""Decode-queue benchmark: the claim path at a large backlog, and whose images are decoded first.

* claim: `claim_batch` (then `complete`, so the backlog stays as large) over N pending images, most of
  them one device's, p50/p95 ms; insert: `insert_image` at that size, p50/p95 ms;
* order: device A uploads a backlog of 200 images, then device B uploads 5: the places B's images get in
  decode order (first claim is place 0).

Both on SQLite (a file in a temporary folder, as the embedded receiver keeps it) and on PostgreSQL (a
local server from `aeic.local_servers`, or `--postgres URL`).

Usage: python -m benchmarks.claim_bench [--rows 100000] [--claims 200] [--postgres URL] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from aeic.receiver.storage import DecodeTimings, NewImage, SqlMetadataStore
from aeic.receiver.storage.schema import images

from aeic import local_servers

_DONE = DecodeTimings(entropy_ms=1.0, decoder_ms=1.0, total_ms=2.0, batch_size=1)
_SIZE = (1920, 1080, 2)  # a 1080p photo at the sender's automatic downscale


def _new(device: str) -> NewImage:
    width, height, downscale = _SIZE
    return NewImage(id=secrets.token_hex(16), device=device, idempotency_key=None, model_id="54535431",
                    width=width, height=height, rate_index=40, bytes=2500, sha256="a" * 64, downscale=downscale)


def _ms(values: list[float]) -> dict[str, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50_ms": round(float(p50) * 1000, 3), "p95_ms": round(float(p95) * 1000, 3)}


def _bulk_load(store: SqlMetadataStore, rows: int) -> None:
    """`rows` pending images in one statement per 10,000: nine in ten from device `big`, the rest spread over
    nine others (filled in as `insert_image` would, where the schema has more to fill)."""
    width, height, downscale = _SIZE
    columns = {c.name for c in images.c}
    served: dict[str, float] = {}
    now = time.time()
    batch: list[dict[str, Any]] = []
    for n in range(rows):
        device = "big" if n % 10 else f"cam{n // 10 % 9}"
        row: dict[str, Any] = {
            "id": f"{n:032x}", "device": device, "model_id": "54535431", "width": width, "height": height,
            "rate_index": 40, "downscale": downscale, "bytes": 2500, "bpp": 0.01, "sha256": "a" * 64,
            "status": "pending", "attempts": 0, "created_at": now + n * 1e-3, "updated_at": now + n * 1e-3,
        }
        if "fair_tag" in columns:  # nothing claimed yet: each device's images follow its previous ones
            row["fair_tag"] = served.get(device, 0.0)
            served[device] = row["fair_tag"] + 1.0
        batch.append(row)
        if len(batch) == 10_000 or n == rows - 1:
            with store.engine.begin() as conn:
                conn.execute(images.insert(), batch)
            batch = []
    if store.engine.dialect.name == "postgresql":  # what autovacuum does after a load like this
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE images")


def bench_claims(store: SqlMetadataStore, rows: int, claims: int) -> dict[str, Any]:
    """Claim and insert times over a backlog of `rows` pending images."""
    _bulk_load(store, rows)
    claim_s: list[float] = []
    for _ in range(claims):
        start = time.perf_counter()
        claim = store.claim_batch(4)
        claim_s.append(time.perf_counter() - start)
        assert claim is not None
        for record in claim.records:
            store.complete(record.id, claim.token, _DONE)
    insert_s: list[float] = []
    for n in range(claims):
        start = time.perf_counter()
        store.insert_image(_new("big" if n % 2 else "cam1"))
        insert_s.append(time.perf_counter() - start)
    return {"rows": rows, "claim_batch": _ms(claim_s), "insert_image": _ms(insert_s)}


def bench_order(store: SqlMetadataStore, backlog: int = 200, newcomer: int = 5) -> list[int]:
    """Places in decode order (one image per claim) of `newcomer` images uploaded after a `backlog`."""
    for _ in range(backlog):
        store.insert_image(_new("a"))
    ids = {store.insert_image(_new("b"))[0].id for _ in range(newcomer)}
    places: list[int] = []
    for place in range(backlog + newcomer):
        claim = store.claim_batch(1)
        assert claim is not None
        places += [place] if claim.records[0].id in ids else []
        store.complete(claim.records[0].id, claim.token, _DONE)
    return places


@contextmanager
def _databases(postgres: str | None) -> Iterator[Callable[[str], str]]:
    """A maker of fresh, empty database URLs on an engine ("sqlite" or "postgresql")."""
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aeic-claim-bench-")))
        server = postgres or stack.enter_context(local_servers.postgres_server())

        def fresh(engine: str) -> str:
            name = f"claim_bench_{secrets.token_hex(4)}"
            if engine == "sqlite":
                return f"sqlite:///{folder / name}.db"
            return local_servers.create_database(server, name)

        yield fresh


def _run(url: str, work: Callable[[SqlMetadataStore], Any]) -> Any:
    store = SqlMetadataStore.from_url(url)
    try:
        store.migrate()
        return work(store)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    """Run both parts on both engines and print (and optionally write) the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--postgres", help="a PostgreSQL base URL (no database name); default: start one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with _databases(args.postgres) as fresh:
        for engine in ("sqlite", "postgresql"):
            results[engine] = {
                **_run(fresh(engine), lambda store: bench_claims(store, args.rows, args.claims)),
                "newcomer_places": _run(fresh(engine), bench_order),
            }
            print(engine, json.dumps(results[engine]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

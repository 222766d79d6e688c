"""The receiver with a large catalogue: query plans that do not grow with the number of images, paging that
stays exact while images come and go, and the HTTP semantics of the blob downloads."""

from __future__ import annotations

import base64
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import receiver_support
import sqlalchemy as sa
from aeic.receiver.api import create_app
from aeic.receiver.auth import create_device_token
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import ImageFilter, InvalidCursorError, SqlMetadataStore, Status, schema
from aeic.receiver.storage.migrations import MIGRATIONS
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, make_bitstream, new_image, store_left_at

# Fixtures shared with the other receiver tests.
database_url = receiver_support.database_url
postgres_server = receiver_support.postgres_server
postgres_url = receiver_support.postgres_url
store = receiver_support.store


@pytest.fixture()
def sqlite_store(tmp_path: Path) -> Iterator[SqlMetadataStore]:
    store = SqlMetadataStore.from_url(f"sqlite:///{tmp_path / 'receiver.db'}")
    store.migrate()
    try:
        yield store
    finally:
        store.close()


@contextmanager
def statements(store: SqlMetadataStore) -> Iterator[list[tuple[str, Any]]]:
    """Record every SQL statement (and its parameters) the store runs inside the block."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)


def query_plans(store: SqlMetadataStore, seen: list[tuple[str, Any]]) -> list[str]:
    """SQLite's plan steps of every recorded SELECT and UPDATE, one string per statement."""
    plans = []
    with store.engine.connect() as conn:
        for statement, parameters in seen:
            if statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
                plans.append(" | ".join(row[3] for row in rows))
    return plans


# -- query plans ---------------------------------------------------------------------------------

# Every listing filter a client polls or pages with (`since`: "anything new?"; a device token always adds its
# device), and the index whose equality columns it fixes and whose rest is the listing's (created_at, seq)
# order. Was, for `since` alone, a walk of every image in seq order: 68 ms per poll at 500,000 images.
LATER = 4_000_000_000.0
LISTINGS = {
    "since": (ImageFilter(since=LATER), "ix_images_created_seq"),
    "since+device": (ImageFilter(device="cam1", since=LATER), "ix_images_device_created_seq"),
    "since+status": (ImageFilter(status=Status.DONE, since=LATER), "ix_images_status_created_seq"),
    "since+device+status": (ImageFilter(device="cam1", status=Status.DONE, since=LATER),
                            "ix_images_device_status_created_seq"),
    "until": (ImageFilter(until=1.0), "ix_images_created_seq"),
    "since+until": (ImageFilter(since=1.0, until=LATER), "ix_images_created_seq"),
    "device+until": (ImageFilter(device="cam1", until=1.0), "ix_images_device_created_seq"),
    "status+until": (ImageFilter(status=Status.FAILED, until=1.0), "ix_images_status_created_seq"),
    "everything": (ImageFilter(), "ix_images_created_seq"),
    "device": (ImageFilter(device="cam1"), "ix_images_device_created_seq"),
    "device+status": (ImageFilter(device="cam1", status=Status.FAILED), "ix_images_device_status_created_seq"),
    **{f"status={s.value}": (ImageFilter(status=s), "ix_images_status_created_seq") for s in Status},
}


def listing_statement(store: SqlMetadataStore, flt: ImageFilter, cursor: str | None) -> tuple[str, Any]:
    """The SELECT (and its parameters) that one listing page runs."""
    with statements(store) as seen:
        store.list_images(flt, 50, cursor)
    return seen[-1]


@pytest.mark.parametrize("name", list(LISTINGS))
def test_every_polled_listing_walks_an_index_in_its_order(sqlite_store: SqlMetadataStore, name: str) -> None:
    """SQLite's plan for each filter, first page and later page: one index range, no table scan, no sort."""
    flt, index = LISTINGS[name]
    for n in range(3):
        sqlite_store.insert_image(new_image(n))
    cursor = sqlite_store.list_images(ImageFilter(), 1, None).next
    for page in (None, cursor):
        (plan,) = query_plans(sqlite_store, [listing_statement(sqlite_store, flt, page)])
        assert f"USING INDEX {index} " in plan + " " and "TEMP B-TREE" not in plan, plan
        assert plan.startswith("SEARCH") or (name == "everything" and page is None), plan


@pytest.mark.parametrize("name", ["since", "since+device", "since+status", "since+device+status", "until"])
def test_polled_listings_have_an_index_in_their_order_on_postgresql(postgres_url: str, name: str) -> None:
    """PostgreSQL picks among indexes by statistics (on a few rows, by a coin toss), so only ask whether one
    serves the filter and the order: with sequential scans, bitmap scans and sorts priced out, the plan is one
    backward scan of a listing index, no Sort."""
    flt, _ = LISTINGS[name]
    store = SqlMetadataStore.from_url(postgres_url)
    try:
        store.migrate()
        for n in range(3):
            store.insert_image(new_image(n))
        cursor = store.list_images(ImageFilter(), 1, None).next
        for page in (None, cursor):
            statement, parameters = listing_statement(store, flt, page)
            with store.engine.begin() as conn:
                for knob in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
                    conn.exec_driver_sql(f"SET LOCAL {knob} = off")
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, parameters))
            assert re.search(r"Index Scan Backward using ix_images_\w*created_seq on images", plan), plan
            assert "Sort" not in plan and "Seq Scan" not in plan, plan
    finally:
        store.close()


def test_claiming_a_batch_never_scans_every_image(sqlite_store: SqlMetadataStore) -> None:
    """The claimed rows were read back by claim_token, which has no index: a full scan per batch."""
    for n in range(3):
        sqlite_store.insert_image(new_image(n))
    with statements(sqlite_store) as seen:
        claim = sqlite_store.claim_batch(2)
    assert claim is not None and len(claim.records) == 2
    plans = query_plans(sqlite_store, seen)
    assert plans and all("SCAN" not in plan and "TEMP B-TREE" not in plan for plan in plans), plans
    assert "ix_images_status_fair_seq" in plans[0] and "ix_images_claim_fair" in plans[1], plans  # decode order


def test_a_v4_database_gains_the_status_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v4.db'}"
    record = store_left_at(url, 4, "DROP INDEX ix_images_status_seq", image=new_image(1))
    store = SqlMetadataStore.from_url(url)
    try:
        assert store.migrate() == MIGRATIONS[-1].version
        with store.engine.connect() as conn:
            assert "ix_images_status_seq" in {i["name"] for i in sa.inspect(conn).get_indexes("images")}
        assert [r.id for r in store.list_images(ImageFilter(status=Status.PENDING), 10, None).items] == [record.id]
    finally:
        store.close()


V6_INDEXES = {"ix_images_created_seq", "ix_images_device_created_seq", "ix_images_status_created_seq",
              "ix_images_device_status_created_seq"}
V5_LISTING_INDEXES = ["CREATE INDEX ix_images_created_at ON images (created_at)",
                      "CREATE INDEX ix_images_device_seq ON images (device, seq)"]


def test_a_v5_database_gains_the_listing_indexes_and_its_cursors_still_page(database_url: str) -> None:
    """A data dir of schema v5 (on each engine): v6 replaces its two listing indexes with the four in
    (created_at, seq) order, and a cursor a client got from the v5 receiver continues where it stopped."""
    record = store_left_at(database_url, 5, *(f"DROP INDEX {name}" for name in sorted(V6_INDEXES)),
                           *V5_LISTING_INDEXES, image=new_image(0))
    old = SqlMetadataStore.from_url(database_url)
    try:
        for n in range(1, 5):
            old.insert_image(new_image(n))
    finally:
        old.close()
    v5_cursor = base64.urlsafe_b64encode(b"s3").decode().rstrip("=")  # "the page after image seq 3"
    store = SqlMetadataStore.from_url(database_url)
    try:
        assert store.migrate() == MIGRATIONS[-1].version >= 6
        with store.engine.connect() as conn:
            names = {i["name"] for i in sa.inspect(conn).get_indexes("images")}
        assert V6_INDEXES <= names and not names & {"ix_images_created_at", "ix_images_device_seq"}, names
        page = store.list_images(ImageFilter(), 10, v5_cursor)
        assert [r.seq for r in page.items] == [2, 1] and page.next is None
        assert [r.id for r in store.list_images(ImageFilter(since=record.created_at), 10, None).items] == [
            f"{n:032x}" for n in (4, 3, 2, 1, 0)]
        assert store.list_images(ImageFilter(), 10, base64.urlsafe_b64encode(b"s1").decode()).items == []
    finally:
        store.close()


def test_pages_follow_upload_time_with_ties_and_a_clock_step(store: SqlMetadataStore) -> None:
    """The listing's order is (created_at, seq): equal times keep arrival order, an image stamped before
    older ones (a clock stepped back) sits by its time, and paging by cursor under every filter returns each
    matching image exactly once, in that order (on each engine)."""
    stamps = [100.0, 100.0, 101.0, 99.5, 101.0, 102.0, 100.0, 103.0, 98.0, 102.0]
    for n, _ in enumerate(stamps):
        store.insert_image(new_image(n, device=f"cam{n % 2}"))
    with store.engine.begin() as conn:
        for n, stamp in enumerate(stamps):
            status = Status.DONE if n % 3 else Status.FAILED
            conn.execute(schema.images.update().where(schema.images.c.id == f"{n:032x}")
                         .values(created_at=stamp, status=status.value))
    records = {r.id: r for r in store.list_images(ImageFilter(), 200, None).items}
    assert len(records) == len(stamps)
    for flt in (ImageFilter(), ImageFilter(since=100.0), ImageFilter(until=101.0), ImageFilter(device="cam1"),
                ImageFilter(status=Status.DONE, since=99.5, until=102.0),
                ImageFilter(device="cam0", status=Status.FAILED)):
        expected = sorted((r for r in records.values()
                           if (flt.device is None or r.device == flt.device)
                           and (flt.status is None or r.status is flt.status)
                           and (flt.since is None or r.created_at >= flt.since)
                           and (flt.until is None or r.created_at < flt.until)),
                          key=lambda r: (r.created_at, r.seq), reverse=True)
        for limit in (1, 2, 3):
            got, cursor = [], None
            while True:
                page = store.list_images(flt, limit, cursor)
                got += [r.id for r in page.items]
                cursor = page.next
                if cursor is None:
                    break
            assert got == [r.id for r in expected], (flt, limit)


@pytest.mark.parametrize("raw", [b"tnan:1", b"tinf:1", b"t1e400:2", b"t100.5", b"t100.5:-1", b"t:1", b"x1",
                                 b"s", b"s-1"])
def test_a_forged_cursor_is_refused(sqlite_store: SqlMetadataStore, raw: bytes) -> None:
    with pytest.raises(InvalidCursorError):
        sqlite_store.list_images(ImageFilter(), 10, base64.urlsafe_b64encode(raw).decode())


# -- paging while images come and go -------------------------------------------------------------


def test_paging_is_exact_while_images_are_inserted_and_deleted(sqlite_store: SqlMetadataStore) -> None:
    """Keyset paging on `seq`: newer uploads never push items onto later pages (no duplicates), deletions
    never pull an item past the cursor (nothing that stays is skipped), and every page is newest first."""
    rng = random.Random(7)
    for n in range(40):
        sqlite_store.insert_image(new_image(n))
    kept = {f"{n:032x}" for n in range(40)}
    seen: list[str] = []
    seqs: list[int] = []
    cursor, fresh = None, 1000
    while True:
        page = sqlite_store.list_images(ImageFilter(), 7, cursor)
        seen += [r.id for r in page.items]
        seqs += [r.seq for r in page.items]
        for _ in range(3):  # uploads arrive between the pages
            sqlite_store.insert_image(new_image(fresh))
            fresh += 1
        for victim in rng.sample(sorted(kept), 2):  # seen or not yet seen
            sqlite_store.delete_image(victim)
            kept.discard(victim)
        cursor = page.next
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and seqs == sorted(seqs, reverse=True)
    assert kept <= set(seen) and all(int(i, 16) < 40 for i in seen)


def test_a_cursor_survives_the_deletion_of_the_item_it_points_at(sqlite_store: SqlMetadataStore) -> None:
    for n in range(6):
        sqlite_store.insert_image(new_image(n))
    first = sqlite_store.list_images(ImageFilter(), 3, None)
    sqlite_store.delete_image(first.items[-1].id)
    rest = sqlite_store.list_images(ImageFilter(), 3, first.next)
    assert [r.id for r in rest.items] == [f"{n:032x}" for n in (2, 1, 0)] and rest.next is None


# -- the HTTP API --------------------------------------------------------------------------------

ADMIN = "catalogue-admin-token-0123456789"
BLOBS = ["/reconstruction", "/reconstruction.png", "/reconstruction.jpg", "/reconstruction.webp", "/thumbnail"]


class Api:
    """A running app (TestClient, in-process worker with the decoder double) and a token per device."""

    def __init__(self, client: TestClient, tokens: dict[str, str]) -> None:
        self.client, self.tokens = client, tokens

    def bearer(self, who: str = "cam1", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN if who == 'admin' else self.tokens[who]}", **extra}

    def upload(self, payload: bytes = b"\x01\x02\x03") -> str:
        headers = self.bearer(**{"Content-Type": "application/octet-stream"})
        reply = self.client.post("/v1/images", content=make_bitstream(payload=payload), headers=headers)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def decoded(self, payload: bytes = b"\x01\x02\x03") -> str:
        image_id = self.upload(payload)
        deadline = time.monotonic() + 10
        while self.client.get(f"/v1/images/{image_id}", headers=self.bearer()).json()["status"] != "done":
            assert time.monotonic() < deadline, "not decoded in 10 s"
            time.sleep(0.02)
        return image_id


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    settings = ReceiverSettings(data_dir=tmp_path / "data", admin_token=ADMIN, poll_interval_s=0.05,
                                retry_delay_s=0.0, max_upload_bytes=4096)
    settings.data_dir.mkdir()
    store = SqlMetadataStore.from_url(settings.resolved_database_url())
    store.migrate()
    tokens = {device: create_device_token(store, device) for device in ("cam1", "cam2")}
    store.close()
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        yield Api(client, tokens)


@pytest.mark.parametrize("limit", ["-1", "0", "201", "99999999999999999999999", "abc", "1.5", "", "1e3"])
def test_a_listing_limit_outside_1_to_200_is_422_naming_the_limit(api: Api, limit: str) -> None:
    reply = api.client.get(f"/v1/images?limit={limit}", headers=api.bearer())
    error = reply.json()["error"]
    assert reply.status_code == 422 and error["code"] == "invalid_request" and "limit" in error["message"]


@pytest.mark.parametrize("path", ["", *BLOBS])
def test_head_answers_like_get_without_a_body(api: Api, path: str) -> None:
    """HEAD was 405 on every read (RFC 9110 requires it wherever GET works)."""
    url = f"/v1/images/{api.decoded()}{path}"
    get, head = api.client.get(url, headers=api.bearer()), api.client.head(url, headers=api.bearer())
    assert get.status_code == head.status_code == 200 and head.content == b""
    for name in ("content-type", "content-length", "cache-control", "etag"):
        assert head.headers.get(name) == get.headers.get(name), name
    assert int(get.headers["content-length"]) == len(get.content)
    assert api.client.head("/v1/images", headers=api.bearer()).status_code == 200


@pytest.mark.parametrize(("path", "media"), [("/reconstruction", "image/png"), ("/reconstruction.png", "image/png"),
                                             ("/reconstruction.jpg", "image/jpeg"),
                                             ("/reconstruction.webp", "image/webp"), ("/thumbnail", "image/jpeg")])
def test_blob_downloads_revalidate_with_their_etag(api: Api, path: str, media: str) -> None:
    """The files of a done image never change: a client's copy is confirmed by 304 without a blob read."""
    url = f"/v1/images/{api.decoded()}{path}"
    first = api.client.get(url, headers=api.bearer())
    etag = first.headers["etag"]
    assert first.headers["content-type"] == media and first.headers["cache-control"] == "private, max-age=86400"
    for condition in (etag, etag.removeprefix("W/"), f'"other", {etag}', "*"):
        again = api.client.get(url, headers=api.bearer(**{"If-None-Match": condition}))
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag, condition
    changed = api.client.get(url, headers=api.bearer(**{"If-None-Match": '"stale"'}))
    assert changed.status_code == 200 and changed.content == first.content
    other_id = api.decoded(b"\x09")
    other = api.client.get(f"/v1/images/{other_id}{path}", headers=api.bearer())
    assert other.headers["etag"] != etag


def test_an_etag_never_bypasses_access_or_readiness(api: Api) -> None:
    done = api.decoded()
    etag = api.client.get(f"/v1/images/{done}/thumbnail", headers=api.bearer()).headers["etag"]
    stranger = api.client.get(f"/v1/images/{done}/thumbnail", headers=api.bearer("cam2", **{"If-None-Match": "*"}))
    assert stranger.status_code == 404
    failed = api.upload(b"FAIL")
    deadline = time.monotonic() + 10
    while api.client.get(f"/v1/images/{failed}", headers=api.bearer()).json()["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reply = api.client.get(f"/v1/images/{failed}/thumbnail", headers=api.bearer(**{"If-None-Match": etag}))
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "decode_failed"
    api.client.delete(f"/v1/images/{done}", headers=api.bearer())
    gone = api.client.get(f"/v1/images/{done}/thumbnail", headers=api.bearer(**{"If-None-Match": etag}))
    assert gone.status_code == 404


def test_changing_private_answers_are_never_stored(api: Api) -> None:
    """Status, listings and gallery pages change and belong to one signer-in: Back after sign-out must not
    show them from the browser's cache."""
    image_id = api.upload()
    for url in ("/v1/images", f"/v1/images/{image_id}"):
        assert api.client.get(url, headers=api.bearer()).headers["cache-control"] == "no-store", url
    api.client.get("/login", params={"token": api.tokens["cam1"]})
    for url in ("/", f"/images/{image_id}", "/?cursor=garbage"):
        assert api.client.get(url).headers["cache-control"] == "no-store", url


def test_the_gallery_renders_one_page_of_lazy_thumbnails_whatever_the_catalogue(api: Api) -> None:
    """Many images: the page holds 60 cards, every thumbnail lazy, also those the live script adds."""
    state = api.client.app.state.receiver  # type: ignore[attr-defined]
    for n in range(70):
        state.store.insert_image(new_image(10_000 + n))
    with state.store.engine.begin() as conn:
        conn.execute(schema.images.update().values(status=Status.DONE.value, decoded_at=time.time()))
    api.client.get("/login", params={"token": ADMIN})
    page = api.client.get("/").text
    assert page.count('class="card') == 60 and page.count("<img") == page.count('loading="lazy"') == 60
    script = api.client.get("/static/gallery.js").text
    assert 'pic.loading = "lazy"' in script and "limit=" in script

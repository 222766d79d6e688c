"""The receiver with a large catalogue: query plans that do not grow with the number of images, paging that
stays exact while images come and go, and the HTTP semantics of the blob downloads."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aeic.receiver.api import create_app
from aeic.receiver.auth import create_device_token
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import ImageFilter, SqlMetadataStore, Status, schema
from aeic.receiver.storage.migrations import MIGRATIONS
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, make_bitstream, new_image, store_left_at


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


@pytest.mark.parametrize("status", list(Status))
def test_listing_by_status_walks_an_index_instead_of_sorting_every_image(sqlite_store: SqlMetadataStore,
                                                                         status: Status) -> None:
    """Was a temporary B-tree over every image of the status: 669 ms per page at 500,000 done images."""
    for n in range(3):
        sqlite_store.insert_image(new_image(n))
    page = sqlite_store.list_images(ImageFilter(status=Status.PENDING), 1, None)
    for cursor in (None, page.next):
        with statements(sqlite_store) as seen:
            sqlite_store.list_images(ImageFilter(status=status), 50, cursor)
        (plan,) = query_plans(sqlite_store, seen)
        assert "ix_images_status_seq" in plan and "TEMP B-TREE" not in plan, plan


def test_claiming_a_batch_never_scans_every_image(sqlite_store: SqlMetadataStore) -> None:
    """The claimed rows were read back by claim_token, which has no index: a full scan per batch."""
    for n in range(3):
        sqlite_store.insert_image(new_image(n))
    with statements(sqlite_store) as seen:
        claim = sqlite_store.claim_batch(2)
    assert claim is not None and len(claim.records) == 2
    plans = query_plans(sqlite_store, seen)
    assert plans and all("SCAN" not in plan and "TEMP B-TREE" not in plan for plan in plans), plans


def test_a_v4_database_gains_the_status_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v4.db'}"
    record = store_left_at(url, 4, "DROP INDEX ix_images_status_seq", image=new_image(1))
    store = SqlMetadataStore.from_url(url)
    try:
        assert store.migrate() == MIGRATIONS[-1].version == 5
        with store.engine.connect() as conn:
            assert "ix_images_status_seq" in {i["name"] for i in sa.inspect(conn).get_indexes("images")}
        assert [r.id for r in store.list_images(ImageFilter(status=Status.PENDING), 10, None).items] == [record.id]
    finally:
        store.close()


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

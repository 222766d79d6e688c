"""The image listing is revalidated, not re-sent: a strong ETag, and 304 with no body to an `If-None-Match`
naming it. The gallery's open grid polled its first page every 1.5 s and got the whole of it each time (39 KB
at 60 images) though nothing had changed; its script now names the listing it shows and gets headers only
until something changes. The tag is made from the catalogue's change token (schema v8: replaced by a trigger
on every write to the images) and the query, so a 304 runs no listing query. The listing stays `no-store`
(docs/receiver.md)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import receiver_support
import sqlalchemy as sa
from aeic.receiver.api import create_app
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import DecodeTimings, SqlMetadataStore, claims
from aeic.receiver.storage.migrations import MIGRATIONS
from fastapi.testclient import TestClient
from receiver_support import FakeCodec, ServerThread, gallery_app, make_bitstream, make_tokens
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

if TYPE_CHECKING:
    from httpx2 import Response  # what starlette's TestClient answers with

postgres_server = receiver_support.postgres_server
postgres_url = receiver_support.postgres_url
browser = receiver_support.browser

ADMIN = "listing-cache-admin-token"
TIMINGS = DecodeTimings(entropy_ms=1.0, decoder_ms=2.0, total_ms=3.0, batch_size=1)
STRONG_TAG = re.compile(r'^"[0-9a-f]{32}"$')


class Api:
    """A receiver without a decode worker: the tests move images through their states in the store."""

    def __init__(self, client: TestClient, tokens: dict[str, str]) -> None:
        self.client, self.tokens = client, tokens
        self.store: SqlMetadataStore = client.app.state.receiver.store  # type: ignore[attr-defined]

    def auth(self, who: str = "cam1", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN if who == 'admin' else self.tokens[who]}", **extra}

    def upload(self, payload: bytes = b"\x01") -> str:
        reply = self.client.post("/v1/images", content=make_bitstream(payload=payload),
                                 headers=self.auth(**{"Content-Type": "application/octet-stream"}))
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def listing(self, who: str = "cam1", tag: str | None = None, method: str = "GET") -> Response:
        extra = {} if tag is None else {"If-None-Match": tag}
        return self.client.request(method, "/v1/images", headers=self.auth(who, **extra))


def _api(data: Path, **overrides: Any) -> tuple[TestClient, dict[str, str]]:
    settings = ReceiverSettings(data_dir=data, admin_token=ADMIN, worker=False, **overrides)
    tokens = make_tokens(settings, "cam1", "cam2")
    return TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))), tokens


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    client, tokens = _api(tmp_path / "data")
    with client:
        yield Api(client, tokens)


def test_an_unchanged_listing_answers_304_with_headers_only(api: Api) -> None:
    api.upload(b"\x01")
    api.upload(b"\x02")
    first = api.listing()
    tag = first.headers["etag"]
    assert first.status_code == 200 and STRONG_TAG.match(tag), first.headers
    assert first.headers["cache-control"] == "no-store"
    for asked in (tag, f'"0123", {tag}', f"W/{tag}", "*"):  # RFC 9110: a list, weak comparison, any
        again = api.listing(tag=asked)
        assert again.status_code == 304, asked
        assert again.content == b"" and "content-length" not in again.headers
        assert again.headers["etag"] == tag and again.headers["cache-control"] == "no-store"
    head = api.listing(method="HEAD")
    assert head.status_code == 200 and head.headers["etag"] == tag
    assert head.headers["content-length"] == str(len(first.content))
    assert api.listing(tag=tag, method="HEAD").status_code == 304
    assert api.listing(tag='"0123456789abcdef0123456789abcdef"').json() == first.json()


def test_every_change_the_listing_shows_is_a_200_with_a_new_tag(api: Api) -> None:
    """Decoding, finishing, a new image and a deletion each change the body, so the last tag is stale."""
    waiting = api.upload(b"\x01")
    seen = [api.listing()]

    def changed() -> dict[str, Any]:
        reply = api.listing(tag=seen[-1].headers["etag"])
        assert reply.status_code == 200, reply.headers
        assert reply.headers["etag"] not in {r.headers["etag"] for r in seen}
        seen.append(reply)
        return dict(reply.json())

    claim = api.store.claim_batch(1)
    assert claim is not None
    assert changed()["items"][0]["status"] == "decoding"
    assert api.store.complete(waiting, claim.token, TIMINGS)
    assert changed()["items"][0]["status"] == "done"
    newest = api.upload(b"\x02")
    assert [i["id"] for i in changed()["items"]] == [newest, waiting]
    assert api.client.delete(f"/v1/images/{waiting}", headers=api.auth()).status_code == 204
    assert [i["id"] for i in changed()["items"]] == [newest]
    assert api.listing(tag=seen[-1].headers["etag"]).status_code == 304


def test_a_tag_names_the_query_as_understood_whoever_asks(api: Api) -> None:
    """Another device's listing is another query (its own device), so cam1's tag earns it no 304; the admin
    asking for cam1's images asks the same query, and a 304 is right; the admin's listing of every image is
    another query, whatever its bytes."""
    api.upload()
    mine = api.listing("cam1").headers["etag"]
    other = api.listing("cam2", tag=mine)
    assert other.status_code == 200 and other.json() == {"items": [], "next": None}
    same = api.client.get("/v1/images?device=cam1", headers=api.auth("admin", **{"If-None-Match": mine}))
    assert same.status_code == 304
    assert api.listing("admin", tag=mine).status_code == 200
    for query in ("limit=49", "status=done", "since=0", "until=4000000000"):
        reply = api.client.get(f"/v1/images?{query}", headers=api.auth(**{"If-None-Match": mine}))
        assert reply.status_code == 200, query


@contextmanager
def statements(store: SqlMetadataStore) -> Iterator[list[str]]:
    """Every SQL statement the store runs inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", record)


def test_a_304_runs_no_listing_query(api: Api) -> None:
    """Was: the page's query and its JSON made again for every poll, only to hash them (7 ms at 600 images);
    now one single-row read of the change token, and a 200 still reads the rows after it."""
    api.upload()
    tag = api.listing().headers["etag"]
    with statements(api.store) as seen:
        assert api.listing(tag=tag).status_code == 304
    touching_images = [s for s in seen if re.search(r"\bimages\b", s)]
    assert touching_images == [] and any("aeic_catalogue" in s for s in seen), seen
    with statements(api.store) as seen:
        assert api.listing().status_code == 200
    order = [("aeic_catalogue" in s, bool(re.search(r"\bFROM images\b", s))) for s in seen]
    assert order.index((True, False)) < order.index((False, True)), seen  # the token before the rows


def test_a_malformed_cursor_is_a_400_whatever_the_tag(api: Api) -> None:
    tag = api.listing().headers["etag"]
    reply = api.client.get("/v1/images?cursor=%21%21", headers=api.auth(**{"If-None-Match": tag}))
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_cursor"
    assert api.client.get("/v1/images?cursor=x", headers=api.auth(**{"If-None-Match": "*"})).status_code == 400


def test_replicas_sharing_one_database_agree_on_the_tag(tmp_path: Path, postgres_url: str) -> None:
    """Several API replicas serve one PostgreSQL database: the tag holds no per-process state, so any
    replica confirms another's and any replica sees a change another made."""
    first, tokens = _api(tmp_path / "a", database_url=postgres_url)
    second = TestClient(create_app(ReceiverSettings(data_dir=tmp_path / "b", admin_token=ADMIN, worker=False,
                                                    database_url=postgres_url),
                                   registry=CodecRegistry.from_codecs([FakeCodec()])))
    with first, second:
        a, b = Api(first, tokens), Api(second, tokens)
        image = a.upload()
        tag = a.listing().headers["etag"]
        assert b.listing(tag=tag).status_code == 304
        claim = b.store.claim_batch(1)
        assert claim is not None and b.store.complete(image, claim.token, TIMINGS)
        fresh = a.listing(tag=tag)
        assert fresh.status_code == 200 and fresh.json()["items"][0]["status"] == "done"
        assert b.listing(tag=fresh.headers["etag"]).status_code == 304


# The grid's listing fetches as Chromium timed them: HTTP status, bytes on the wire, body bytes.
_LISTINGS_JS = """
return performance.getEntriesByType('resource').filter(e => e.name.includes('/v1/images?'))
  .map(e => [e.responseStatus, e.transferSize, e.encodedBodySize]);
"""


def test_an_idle_grid_gets_headers_only_and_shows_a_decoded_image_at_once(tmp_path: Path, browser: Chrome) -> None:
    """Before, each poll of an unchanged grid was a 200 with the whole listing; now a 304 of headers (300 B
    as Chromium counts them), and a status change still reaches the grid within a poll interval."""
    app, tokens = gallery_app(tmp_path, ADMIN, ("cam1",), worker=False)
    store: SqlMetadataStore = app.state.receiver.store
    with ServerThread(app) as server:
        ids = []
        for n in range(3):
            reply = httpx.post(f"{server.url}/v1/images", content=make_bitstream(payload=bytes([n + 1])), timeout=10,
                               headers={"Authorization": f"Bearer {tokens['cam1']}",
                                        "Content-Type": "application/octet-stream"})
            assert reply.status_code == 202, reply.text
            ids.append(str(reply.json()["id"]))
        browser.get(f"{server.url}/login?token={ADMIN}")
        WebDriverWait(browser, 15).until(lambda d: len(d.execute_script(_LISTINGS_JS)) >= 4)  # 3 idle polls
        first, *idle = browser.execute_script(_LISTINGS_JS)
        assert first[0] == 200 and first[2] > 1000, first
        assert all(status == 304 and body == 0 and wire < 600 for status, wire, body in idle), idle
        assert browser.find_element(By.ID, "live").text == "Updating live"

        claim = store.claim_batch(1)  # the oldest upload
        assert claim is not None and [r.id for r in claim.records] == [ids[0]]
        assert store.complete(ids[0], claim.token, TIMINGS)
        changed_at = time.monotonic()
        WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: d.execute_script(
            "return document.querySelector('.card[data-id=\"' + arguments[0] + '\"]').dataset.status",
            ids[0]) == "done")
        assert time.monotonic() - changed_at < 3.0  # the next poll or the one after, on a busy machine
        later = browser.execute_script(_LISTINGS_JS)[1 + len(idle):]
        assert any(status == 200 and body > 1000 for status, _, body in later), later


# -- the change token ----------------------------------------------------------------------------

database_url = receiver_support.database_url
store = receiver_support.store


class Token:
    """Asserts on the store's change token between the steps of a test."""

    def __init__(self, store: SqlMetadataStore) -> None:
        self.store, self.last = store, store.catalogue_token()

    def changed(self) -> bool:
        now = self.store.catalogue_token()
        changed, self.last = now != self.last, now
        return changed


def test_every_write_path_changes_the_token_and_idle_polls_do_not(store: SqlMetadataStore) -> None:
    """Each way an image row is written (the store's, the queue workers' claims, an operator's SQL) replaces
    the token on SQLite and on PostgreSQL; the worker's idle polls and sweeps, which write nothing, do not."""
    token = Token(store)
    assert re.fullmatch(r"([0-9a-f]{32})+", token.last)
    first, _ = store.insert_image(receiver_support.new_image(1))
    assert token.changed()
    second, _ = store.insert_image(receiver_support.new_image(2))
    assert token.changed()
    claim = store.claim_batch(1)
    assert claim is not None and [r.id for r in claim.records] == [first.id] and token.changed()
    assert store.claim_batch(1) is not None and token.changed()  # the second image
    assert store.claim_batch(1) is None and not token.changed()  # an idle poll
    assert store.requeue_abandoned(3, claimed_before=0.0) == 0 and not token.changed()  # an idle sweep
    assert store.fail_attempt(first.id, claim.token, "boom", 3, retry_at=0.0) and token.changed()
    again = claims.claim_ids(store, [first.id], stale_before=0.0, max_attempts=3)
    assert again is not None and token.changed()
    assert store.release_claim(again.token, "stopping") == 1 and token.changed()
    assert store.requeue_abandoned(3) == 1 and token.changed()  # the second image's claim
    retry = store.claim_batch(1)  # a retry is claimed alone
    assert retry is not None and [r.id for r in retry.records] == [first.id] and token.changed()
    assert store.complete(first.id, retry.token, TIMINGS) and token.changed()
    assert store.claim_batch(1) is not None and token.changed()
    assert claims.fail_exhausted_stale(store, [second.id], time.time() + 1, 1) == [second.id] and token.changed()
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE images SET error = 'by hand'"))
    assert token.changed()
    assert store.delete_image(first.id) is not None and token.changed()
    assert store.delete_image(first.id) is None and not token.changed()


def test_a_database_upgraded_from_v7_gets_a_token_and_its_triggers(database_url: str) -> None:
    """A catalogue written by the previous release: the step adds the token and the triggers in place."""
    downgrade = ["DROP TABLE aeic_catalogue", "DROP TRIGGER IF EXISTS aeic_catalogue_on_insert",
                 "DROP TRIGGER IF EXISTS aeic_catalogue_on_update", "DROP TRIGGER IF EXISTS aeic_catalogue_on_delete"]
    if database_url.startswith("postgresql"):
        downgrade = ["DROP TABLE aeic_catalogue", "DROP TRIGGER aeic_catalogue_changed ON images",
                     "DROP FUNCTION aeic_catalogue_changed()"]
    old = receiver_support.store_left_at(database_url, 7, *downgrade, image=receiver_support.new_image(1))
    with receiver_support.migrated_store(database_url) as upgraded:
        token = Token(upgraded)
        assert upgraded.get_image(old.id) is not None
        assert upgraded.delete_image(old.id) is not None and token.changed()
        assert upgraded.migrate() == MIGRATIONS[-1].version and not token.changed()  # a second start: as it was


def test_on_postgresql_a_writer_takes_the_token_only_as_it_commits(postgres_url: str) -> None:
    """A transaction still writing images holds no token row, so another writer never waits for it there (a
    trigger run at each statement took it mid-transaction: a second image write in the same transaction could
    then wait for a row the other writer held, while that one waited for the token: a deadlock)."""
    with receiver_support.migrated_store(postgres_url) as meta:
        first, _ = meta.insert_image(receiver_support.new_image(1))
        second, _ = meta.insert_image(receiver_support.new_image(2))
        token = Token(meta)
        with meta.engine.connect() as slow, meta.engine.connect() as quick:
            open_transaction = slow.begin()
            slow.execute(sa.text("UPDATE images SET error = 'slow' WHERE id = :id"), {"id": first.id})
            row = slow.execute(sa.text("SELECT mod(txid_current(), 16)")).scalar()
            for _ in range(64):  # a transaction whose id picks the same token row as the open one's
                with quick.begin() as attempt:
                    if quick.execute(sa.text("SELECT mod(txid_current(), 16)")).scalar() != row:
                        attempt.rollback()
                        continue
                    quick.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                    quick.execute(sa.text("UPDATE images SET error = 'quick' WHERE id = :id"), {"id": second.id})
                break
            else:
                pytest.fail("no transaction id picked the open transaction's token row")
            assert token.changed()
            open_transaction.commit()
        assert token.changed()

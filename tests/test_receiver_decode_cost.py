"""Decode cost: a stream's header, not its length, sets how long it takes to decode, so the per-device rate
limit counts decode cost (a picture at the decode limits costs many normal photos), and the worker claims
images in an order that is fair across devices (one device's backlog does not hold up the others')."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import receiver_support
import sqlalchemy as sa
from aeic.receiver.api import create_app
from aeic.receiver.auth import RateLimiter
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import DecodeTimings, SqlMetadataStore
from aeic.receiver.storage.migrations import MIGRATIONS
from aeic.sender.coding_scale import downscale_for_budget, downscale_for_rate
from aeic.shared.decode_limits import decode_cost
from fastapi.testclient import TestClient
from manual_clock import ManualClock
from receiver_support import FakeCodec, make_bitstream, make_tokens, new_image, store_left_at

# Fixtures shared with the other receiver tests.
postgres_server = receiver_support.postgres_server
postgres_url = receiver_support.postgres_url
database_url = receiver_support.database_url
store = receiver_support.store

OCTET = {"Content-Type": "application/octet-stream"}
DONE = DecodeTimings(entropy_ms=1.0, decoder_ms=1.0, total_ms=2.0, batch_size=1)
# A header-only stream (23 bytes) that asks for the largest coded picture a receiver decodes.
AT_THE_LIMITS = {"width": 4096, "height": 4096, "downscale": 1}


class Api:
    """A receiver app (no worker) whose upload limiter runs on `clock`, and a device token per name."""

    def __init__(self, client: TestClient, tokens: dict[str, str], clock: ManualClock) -> None:
        self.client, self.tokens, self.clock = client, tokens, clock

    def upload(self, device: str, width: int = 48, height: int = 32, downscale: int = 1) -> Any:
        """POST a valid stream of that picture as `device`."""
        return self.client.post("/v1/images", content=make_bitstream(width, height, downscale=downscale),
                                headers={"Authorization": f"Bearer {self.tokens[device]}", **OCTET})


@contextmanager
def api(tmp_path: Path, **settings: Any) -> Iterator[Api]:
    """An `Api` with the default rate limit unless `settings` say otherwise."""
    config = ReceiverSettings(data_dir=tmp_path / "data", worker=False, max_upload_bytes=4096, **settings)
    tokens = make_tokens(config, "cam", "rogue")
    clock = ManualClock()
    app = create_app(config, registry=CodecRegistry.from_codecs([FakeCodec()]))
    app.state.receiver.limiter = RateLimiter(config.rate_limit_per_minute, config.rate_limit_burst, clock=clock)
    with TestClient(app) as client:
        yield Api(client, tokens, clock)


@pytest.fixture()
def defaults(tmp_path: Path) -> Iterator[Api]:
    """The receiver's default rate limit: 600 per minute, 60 at once."""
    with api(tmp_path) as running:
        yield running


# -- what a stream costs ------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (1080, 1920), (3840, 2160), (1280, 720),
                                               (4032, 3024)])
def test_a_photo_at_the_senders_automatic_downscale_costs_one_unit(width: int, height: int) -> None:
    """A fixed rate level codes every one of these at 1/2 or 1/4; a 1 KB budget at 1/2 or 1/4 too."""
    for downscale in (downscale_for_rate(height, width), downscale_for_budget(height, width, 1000)):
        assert decode_cost(height, width, downscale) == 1.0, downscale


def test_a_picture_at_the_decode_limits_costs_many_units() -> None:
    assert decode_cost(1080, 1920, 1) == pytest.approx(1.0)  # the unit: a 1080p photo coded whole
    assert decode_cost(2160, 3840, 1) == pytest.approx(3.79, abs=0.01)  # a 4K photo under a large budget
    assert decode_cost(4096, 4096, 1) == pytest.approx(7.61, abs=0.01)
    assert decode_cost(2048, 8192, 1) == pytest.approx(7.61, abs=0.01)  # long and thin: the same coded pixels
    assert decode_cost(8192, 8192, 2) == pytest.approx(8.96, abs=0.01)  # the most output pixels
    assert decode_cost(4096, 6144, 1) == pytest.approx(11.42, abs=0.01)  # the most within the limits
    assert decode_cost(32, 48, 1) == 1.0  # every upload costs at least one


# -- the rate limit counts decode cost ----------------------------------------------------------


def test_an_oversized_claim_burst_gets_429_while_a_normal_photo_stream_is_unaffected(defaults: Api) -> None:
    """Was: 60 header-only streams at the limits were all accepted at once (about 80 minutes of decoding
    on a 2-core CPU); now the burst buys 60 units of decode work, seven of those pictures."""
    rogue = [defaults.upload("rogue", **AT_THE_LIMITS).status_code for _ in range(60)]
    assert rogue == [202] * 7 + [429] * 53
    normal = [defaults.upload("cam", width=1920, height=1080, downscale=2).status_code for _ in range(30)]
    normal += [defaults.upload("cam", width=3840, height=2160, downscale=4).status_code for _ in range(30)]
    assert normal == [202] * 60  # a whole burst of photos, as before
    listing = defaults.client.get("/v1/images", params={"limit": 200},
                                  headers={"Authorization": f"Bearer {defaults.tokens['rogue']}"}).json()
    assert len(listing["items"]) == 7  # nothing refused was stored


def test_retry_after_reflects_the_cost_and_the_retry_then_passes(tmp_path: Path) -> None:
    with api(tmp_path, rate_limit_per_minute=60, rate_limit_burst=10) as api_:  # one unit a second
        cost = decode_cost(4096, 4096, 1)
        assert api_.upload("rogue", **AT_THE_LIMITS).status_code == 202  # 10 units -> 10 - cost
        refused = api_.upload("rogue", **AT_THE_LIMITS)  # its gate's unit stays taken: the body was read
        left = 10 - cost - 1
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) == math.ceil(cost - left) == 7
        assert f"costs {cost:.1f} units" in refused.json()["error"]["message"]
        api_.clock.now += 6.0
        assert api_.upload("rogue", **AT_THE_LIMITS).status_code == 429  # a second early
        api_.clock.now += 7.0
        assert api_.upload("rogue", **AT_THE_LIMITS).status_code == 202


def test_a_cost_over_the_burst_passes_from_a_full_bucket_and_leaves_a_debt(tmp_path: Path) -> None:
    with api(tmp_path, rate_limit_per_minute=60, rate_limit_burst=2) as api_:
        cost = decode_cost(4096, 4096, 1)
        assert api_.upload("rogue", **AT_THE_LIMITS).status_code == 202  # never refused for good
        after = api_.upload("rogue")  # a small stream waits until the debt is repaid, gate and all
        assert after.status_code == 429 and int(after.headers["Retry-After"]) == math.ceil(1 - (2 - cost))
        assert api_.upload("cam").status_code == 202  # another device's bucket is its own


def test_the_upload_count_limit_still_holds_for_small_streams(tmp_path: Path) -> None:
    with api(tmp_path, rate_limit_per_minute=6, rate_limit_burst=2) as api_:
        assert [api_.upload("cam").status_code for _ in range(3)] == [202, 202, 429]
        refused = api_.upload("cam")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "10"
        assert "too many uploads from cam" in refused.json()["error"]["message"]


# -- decode order is fair across devices --------------------------------------------------------


def _decode_order(store: SqlMetadataStore, batch_size: int = 1) -> list[list[str]]:
    """Devices of each claimed batch, claiming (and completing) until nothing is pending."""
    order = []
    while (claim := store.claim_batch(batch_size)) is not None:
        order.append([record.device for record in claim.records])
        for record in claim.records:
            store.complete(record.id, claim.token, DONE)
    return order


def test_two_devices_one_with_a_big_backlog_interleave_in_decode_order(store: SqlMetadataStore) -> None:
    """Was: claims went by arrival, so cam2's images waited for all 40 of cam1's."""
    for n in range(40):
        store.insert_image(new_image(n, device="cam1"))
    for n in range(40, 44):
        store.insert_image(new_image(n, device="cam2"))
    order = [devices[0] for devices in _decode_order(store)]
    assert [place for place, device in enumerate(order) if device == "cam2"] == [1, 3, 5, 7]
    assert len(order) == 44


def test_a_batch_takes_both_devices_images(store: SqlMetadataStore) -> None:
    for n in range(20):
        store.insert_image(new_image(n, device="cam1"))
    for n in range(20, 22):
        store.insert_image(new_image(n, device="cam2"))
    assert sorted(_decode_order(store, batch_size=4)[0]) == ["cam1", "cam1", "cam2", "cam2"]


def test_a_device_that_joins_later_waits_for_one_turn_not_the_backlog(store: SqlMetadataStore) -> None:
    for n in range(20):
        store.insert_image(new_image(n, device="cam1"))
    for devices in [_claim_one(store) for _ in range(10)]:
        assert devices == "cam1"
    for n in range(20, 22):
        store.insert_image(new_image(n, device="cam2"))
    assert [_claim_one(store) for _ in range(5)] == ["cam1", "cam2", "cam1", "cam2", "cam1"]


def _claim_one(store: SqlMetadataStore) -> str:
    claim = store.claim_batch(1)
    assert claim is not None
    store.complete(claim.records[0].id, claim.token, DONE)
    return claim.records[0].device


def test_turns_are_shared_by_decode_cost(store: SqlMetadataStore) -> None:
    """Pictures at the limits cost 7.6 units each, so their device gets one in for every 7-8 photos."""
    for n in range(30):
        store.insert_image(new_image(n, device="cam1", size=(1920, 1080)))
    for n in range(30, 33):
        store.insert_image(new_image(n, device="rogue", size=(4096, 4096)))
    order = [devices[0] for devices in _decode_order(store)]
    assert [place for place, device in enumerate(order) if device == "rogue"] == [1, 9, 18]


def test_images_stored_before_the_upgrade_keep_their_order(database_url: str) -> None:
    """A schema v6 database (on each engine): its pending images are decoded first, in arrival order."""
    downgrade = ("DROP INDEX ix_images_status_fair_seq", "DROP INDEX ix_images_claim_fair",
                 "CREATE INDEX ix_images_claim ON images (status, model_id, width, height, seq)",
                 "ALTER TABLE images DROP COLUMN fair_tag")
    store_left_at(database_url, 6, *downgrade, image=new_image(1, device="cam1"))
    with receiver_support.migrated_store(database_url) as upgraded:
        assert upgraded.migrate() == MIGRATIONS[-1].version >= 7
        with upgraded.engine.connect() as conn:
            indexes = {index["name"] for index in sa.inspect(conn).get_indexes("images")}
        assert {"ix_images_status_fair_seq", "ix_images_claim_fair"} <= indexes
        assert "ix_images_claim" not in indexes
        upgraded.insert_image(new_image(2, device="cam2"))
        upgraded.insert_image(new_image(3, device="cam1"))
        assert [devices[0] for devices in _decode_order(upgraded)] == ["cam1", "cam2", "cam1"]


def test_placing_an_upload_reads_two_index_entries(tmp_path: Path) -> None:
    """The upload's extra query finds the queue's head and the device's last pending image by index, never
    by a scan of the pending images (SQLite's plan; PostgreSQL chooses by its statistics)."""
    with receiver_support.migrated_store(f"sqlite:///{tmp_path / 'receiver.db'}") as meta:
        for n in range(3):
            meta.insert_image(new_image(n))
        seen: list[tuple[str, Any]] = []

        def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
            seen.append((statement, parameters))

        sa.event.listen(meta.engine, "before_cursor_execute", record)
        try:
            meta.insert_image(new_image(3))
        finally:
            sa.event.remove(meta.engine, "before_cursor_execute", record)
        placing = [(s, p) for s, p in seen if "UNION ALL" in s]
        assert len(placing) == 1
        with meta.engine.connect() as conn:
            plan = " | ".join(row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + placing[0][0],
                                                                      placing[0][1]))
        assert "ix_images_status_fair_seq" in plan and "ix_images_device_status_created_seq" in plan, plan
        assert "SCAN images" not in plan and "TEMP B-TREE" not in plan, plan

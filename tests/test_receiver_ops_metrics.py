"""What an operator scrapes and reads: `/metrics` keeps answering while the database fails, every metric
the receiver exports is in docs/receiver.md with its labels, and the access log hides a sign-in token
however its parameter name is spelt."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from aeic.receiver.api import create_app
from aeic.receiver.log_redaction import install_log_redaction, redact
from aeic.receiver.metrics import ReceiverMetrics
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore, SqlMetadataStore, Status
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from receiver_support import FakeCodec, make_bitstream, make_tokens

DOCS = Path(__file__).resolve().parents[1] / "docs" / "receiver.md"


def _database_down() -> dict[Status, int]:
    raise sa.exc.OperationalError("SELECT status", {}, ConnectionRefusedError("connection refused"))


def test_metrics_answer_while_the_database_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Was: the per-status gauge is read from the database at scrape time, and its error failed the whole
    exposition (503), so a database outage also hid the upload and decode counters that show it."""
    down: list[bool] = []
    counts = SqlMetadataStore.status_counts

    def status_counts(store: SqlMetadataStore) -> dict[Status, int]:
        return _database_down() if down else counts(store)

    monkeypatch.setattr(SqlMetadataStore, "status_counts", status_counts)
    settings = ReceiverSettings(data_dir=tmp_path / "data", poll_interval_s=0.05)
    tokens = make_tokens(settings, "cam1")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", "Content-Type": "application/octet-stream"}
        assert client.post("/v1/images", content=make_bitstream(), headers=headers).status_code == 202
        assert "aeic_images{" in client.get("/metrics").text
        down.append(True)
        with caplog.at_level(logging.WARNING, logger="aeic.receiver.metrics"):
            answer = client.get("/metrics")
    assert answer.status_code == 200
    assert 'aeic_uploads_total{outcome="accepted"} 1.0' in answer.text and "aeic_images{" not in answer.text
    assert "aeic_images left out of this scrape" in caplog.text


def test_a_scrape_leaves_out_only_the_gauge_whose_source_failed() -> None:
    metrics = ReceiverMetrics()
    metrics.uploads.labels("accepted").inc()
    metrics.watch_jobs(_database_down)
    text = generate_latest(metrics.registry).decode()
    assert 'aeic_uploads_total{outcome="accepted"} 1.0' in text and "aeic_images" not in text


def _exported(metrics: ReceiverMetrics) -> dict[str, set[str]]:
    """Each metric family's exposed name (counters with `_total`) and its label names, le excluded."""
    families: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        families[name] = labels
    return families


def test_every_exported_metric_is_documented_with_its_labels() -> None:
    metrics = ReceiverMetrics()
    metrics.uploads.labels("accepted").inc()
    metrics.decoded.labels("done").inc()
    metrics.watch_jobs(lambda: {status: 0 for status in Status})
    section = DOCS.read_text().split("### Metrics", 1)[1].split("\n## ", 1)[0]
    rows = {match.group(1): match.group(2) for match in re.finditer(r"^\| `(aeic_\w+)` \| (.*)$", section,
                                                                     re.MULTILINE)}
    exported = _exported(metrics)
    assert set(rows) == set(exported)
    for name, labels in exported.items():
        assert all(f"`{label}`" in rows[name] for label in labels), (name, labels, rows[name])
    for status in Status:
        assert f"`{status.value}`" in rows["aeic_images"]


def test_the_access_log_hides_a_token_whose_name_is_percent_encoded(caplog: pytest.LogCaptureFixture) -> None:
    """Was: only the literal names were matched, but the app decodes the query's names, so
    `/login?%74oken=...` signed in and its token reached the access log in clear."""
    assert redact("/login?%74oken=aeic_S1&next=/") == "/login?%74oken=[redacted]&next=/"
    assert redact("/login?next=%2F&TOK%45N=aeic_S2") == "/login?next=%2F&TOK%45N=[redacted]"
    assert redact("/v1/images?cursor=abc&tokens=1") == "/v1/images?cursor=abc&tokens=1"
    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET",
                                                 "/login?access%5Ftoken=aeic_SECRET", "1.1", 303)
    assert "aeic_SECRET" not in caplog.text


def test_a_sign_in_link_with_an_encoded_name_still_signs_in(tmp_path: Path) -> None:
    """Why the redaction decodes names: the gallery reads the decoded parameter, so such a link works."""
    settings = ReceiverSettings(data_dir=tmp_path / "data", worker=False)
    tokens = make_tokens(settings, "cam1")
    with TestClient(create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))) as client:
        answer = client.get(f"/login?%74oken={tokens['cam1']}", follow_redirects=False)
    assert answer.status_code in (302, 303) and "aeic_session" in answer.headers.get("set-cookie", "")


class _FullDisk(FilesystemBlobStore):
    """A blob folder on a full disk."""

    def put(self, key: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_upload_refused_for_storage_is_counted(tmp_path: Path) -> None:
    """Was: a full disk answered every upload 503 while aeic_uploads_total stayed still, so an alert on the
    upload counters saw no outage."""
    settings = ReceiverSettings(data_dir=tmp_path / "data", worker=False)
    tokens = make_tokens(settings, "cam1")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]),
                     blobs=_FullDisk(tmp_path / "data" / "blobs"))
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {tokens['cam1']}", "Content-Type": "application/octet-stream"}
        answer = client.post("/v1/images", content=make_bitstream(), headers=headers)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "storage_unavailable"
        assert 'aeic_uploads_total{outcome="storage_unavailable"} 1.0' in client.get("/metrics").text


def test_a_blob_store_failure_is_logged_once_by_the_readiness_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe every 10 s through a day of full disk logged the same warning 8,640 times; now once, and once
    more when the store is usable again."""
    full: list[bool] = [True]
    ping = FilesystemBlobStore.ping

    def checked(store: FilesystemBlobStore) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        ping(store)

    monkeypatch.setattr(FilesystemBlobStore, "ping", checked)
    settings = ReceiverSettings(data_dir=tmp_path / "data", worker=False)
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="aeic.receiver.api"):
        answers = [client.get("/readyz") for _ in range(5)]
        full.clear()
        answers += [client.get("/readyz") for _ in range(3)]
    assert [a.status_code for a in answers] == [503] * 5 + [200] * 3
    lines = [r.getMessage() for r in caplog.records if "blob store" in r.getMessage()]
    assert len(lines) == 2 and "No space left on device" in lines[0], lines
    assert lines[1] == "readiness: the blob store is usable again"

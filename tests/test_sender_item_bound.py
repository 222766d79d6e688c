"""``spool_max_item_bytes`` set below the size of the streams the sender itself makes: the sender queued its
own new stream, and the forwarder then moved it to ``rejected/`` as damaged ("over the largest a bitstream may
be here"), so an operator saw a corrupt spool where the setting was the problem, and ``watch`` recorded the
photo as sent. A stream over the bound is now refused when queued, with a line naming the setting, and the
watcher records its file as failed."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from aeic.sender.spool import Spool, SpoolFullError, StreamTooLargeError
from PIL import Image
from sender_support import ContainerCodec, ScanCounter, make_bitstream


def test_a_stream_over_the_item_bound_is_refused_when_queued(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_item_bytes=100)
    data = make_bitstream(1, payload_bytes=200)
    with pytest.raises(StreamTooLargeError, match=rf"{len(data)} bytes, over spool_max_item_bytes=100") as refused:
        spool.put(data, source="big.jpg")
    assert not isinstance(refused.value, SpoolFullError)  # waiting for room would not help
    assert len(spool) == 0 and spool.rejected() == [] and list(spool.pending_dir.iterdir()) == []
    assert spool.put(make_bitstream(2, payload_bytes=40)).size <= 100  # a stream within the bound still goes


def test_watch_fails_a_photo_whose_stream_is_over_the_item_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("aeic.sender.encoder")  # the command layer catches the encoder's BudgetError
    from aeic.sender import cli

    folder, spool_dir = tmp_path / "outbox", tmp_path / "spool"
    folder.mkdir()
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(folder / "photo.png")
    codec = ContainerCodec()
    monkeypatch.setenv("AEIC_TOKEN", "device-token")
    monkeypatch.setenv("AEIC_SPOOL_MAX_ITEM_BYTES", "20")  # below any stream the codec makes
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    ScanCounter(monkeypatch, stop_after=10)
    code = cli.main(["watch", str(folder), "--to", "http://127.0.0.1:9", "--spool", str(spool_dir), "--rate", "0",
                     "--poll", "0.02"], codec_factory=lambda config, reporter: codec)  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK
    assert codec.calls == 1, err  # failed, not retried every scan
    assert err.count("not queued") == 1 and "spool_max_item_bytes=20" in err
    assert "takes no new image" not in err  # not taken for a full spool
    spool = Spool(spool_dir)
    assert len(spool) == 0 and spool.rejected() == []  # not queued, so not rejected as damaged either
    (state,) = (spool_dir / "watch").glob("*.db")
    with closing(sqlite3.connect(state)) as db:
        rows = db.execute("SELECT name, status, detail FROM handled").fetchall()
    assert rows == [("photo.png", "failed", rows[0][2])] and "spool_max_item_bytes" in rows[0][2]

"""A download whose client stops reading is cut after `SEND_TIMEOUT_S` without progress: it held its
connection, its open file and a chunk in the send buffer for as long as the client stayed connected."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import time
from pathlib import Path

import anyio
import httpx
import pytest
from aeic.receiver.api import create_app, downloads
from aeic.receiver.registry import CodecRegistry
from aeic.receiver.settings import ReceiverSettings
from aeic.receiver.storage import FilesystemBlobStore
from aeic.receiver.storage.blobs import CHUNK_BYTES, OpenBlob, reconstruction_key
from receiver_support import FakeCodec, ServerThread, make_bitstream, make_tokens
from starlette.types import Message

SIZE = 32 << 20  # far more than the socket buffers on both sides hold


def test_a_client_that_stops_reading_is_cut_off_and_the_server_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(downloads, "SEND_TIMEOUT_S", 0.5)
    settings = ReceiverSettings(data_dir=tmp_path / "data", poll_interval_s=0.05, retry_delay_s=0.0)
    token = make_tokens(settings, "cam1")["cam1"]
    blobs = FilesystemBlobStore(tmp_path / "blobs")
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]), blobs=blobs)
    auth = {"Authorization": f"Bearer {token}"}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, headers=auth, timeout=10) as client:
        image_id = client.post("/v1/images", content=make_bitstream(),
                               headers={"Content-Type": "application/octet-stream"}).json()["id"]
        deadline = time.monotonic() + 10
        while client.get(f"/v1/images/{image_id}").json()["status"] != "done":
            assert time.monotonic() < deadline, "decode did not finish"
            time.sleep(0.02)
        blobs.put(reconstruction_key(image_id), os.urandom(SIZE))  # a large picture's PNG
        with socket.create_connection(("127.0.0.1", server.port)) as conn, caplog.at_level(logging.WARNING):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            conn.sendall(f"GET /v1/images/{image_id}/reconstruction HTTP/1.1\r\nHost: localhost\r\n"
                         f"Authorization: Bearer {token}\r\n\r\n".encode())
            time.sleep(2.5)  # reads nothing: the server's sends stall
            conn.settimeout(10)
            received = b""
            while chunk := conn.recv(1 << 20):
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head.lower())
        assert head.startswith(b"HTTP/1.1 200") and length is not None and int(length.group(1)) == SIZE
        assert len(body) < SIZE, "the whole file arrived: nothing stalled"
        assert any("took no data" in record.getMessage() for record in caplog.records)
        assert client.get(f"/v1/images/{image_id}/thumbnail").status_code == 200  # the server goes on


def test_a_chunk_is_sent_in_slices_so_the_limit_is_on_progress() -> None:
    """A 1 MiB chunk waited on whole would cut off a client reading steadily under 17 KB/s; each slice of
    `SEND_SLICE_BYTES` gets the limit instead, and the bytes arrive as they are, in order."""
    data = os.urandom(3 * CHUNK_BYTES + 5)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await anyio.sleep(3600)
        return {"type": "http.disconnect"}

    download = downloads.BlobDownload(OpenBlob("k", len(data), io.BytesIO(data)), "image/png", {})
    scope = {"type": "http", "method": "GET", "path": "/x", "asgi": {"spec_version": "2.4"}}
    anyio.run(download, scope, receive, send)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert max(len(m["body"]) for m in bodies) <= downloads.SEND_SLICE_BYTES
    assert b"".join(m["body"] for m in bodies) == data
    assert all(m["more_body"] for m in bodies[:-1]) and not bodies[-1]["more_body"]

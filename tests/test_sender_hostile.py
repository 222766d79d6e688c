"""aeic-send against a world that is wrong or hostile: a receiver (or whoever answers in its place), a
camera URL, other users of the device. Real HTTP servers on loopback, the real command line in-process."""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from aeic.sender import cli
from aeic.sender.backoff import Backoff
from aeic.sender.camera import Camera, display_name
from aeic.sender.config import exposed_files, load_config
from aeic.sender.spool import Spool
from aeic.sender.uploader import Outcome, Uploader
from sender_support import make_bitstream, send_json, traced_peak

TOKEN = "device-token"
Answer = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def hostile_server(answer: Answer) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback HTTP server whose every POST/GET is answered by ``answer``; yields its URL and the
    headers of each request it got."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            seen.append({key.lower(): value for key, value in self.headers.items()})
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer(self)

        do_POST = do_GET = _any

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # quick to shut down
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _json_answer(status: int, body: object) -> Answer:
    return lambda handler: send_json(handler, status, body)


def _flush(url: str, spool: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    monkeypatch.setenv("AEIC_TOKEN", TOKEN)
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    return cli.main(["flush", "--to", url, "--spool", str(spool), "--retry-for", "0", *extra])


def _raw_answer(status: int, content_type: str, body: bytes) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


@pytest.mark.parametrize(
    "answer",
    [
        _json_answer(400, {"detail": "bad \x1b[8mhidden \x1b]0;owned\x07"}),
        _raw_answer(503, "text/plain", b"busy \x1b[2J\x1b[31mred\x9b1m"),
    ],
    ids=["json-reason", "text-reason"],
)
def test_an_answer_cannot_drive_the_operators_terminal(
    answer: Answer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An escape sequence in a receiver's (or a proxy's) answer went to the terminal as is: it could retitle
    it, clear it, or hide or recolour what follows."""
    Spool(tmp_path / "spool").put(make_bitstream(1), source="a.jpg")
    with hostile_server(answer) as (url, _):
        _flush(url, tmp_path / "spool", monkeypatch)
    err = capsys.readouterr().err
    assert not any(char in err for char in "\x1b\x07\x9b")
    shown = next(line for line in err.splitlines() if "HTTP" in line)  # the rejection, or the outage's line
    assert "\\x1b" in shown


def test_a_file_name_cannot_forge_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """Whoever may drop files into the watched folder names them; the name is in every line about the file."""
    reporter = cli.Reporter()
    reporter.error("x", "watch: /srv/outbox/a\nuploaded b.jpg\x1b[1A.jpg: cannot read")
    assert capsys.readouterr().err == "error: watch: /srv/outbox/a\\nuploaded b.jpg\\x1b[1A.jpg: cannot read\n"


@pytest.mark.parametrize(
    "body", [{"id": False}, {"id": 17}, {"id": ""}, {"id": {"nested": 1}}, {"id": ["a"]}, {"id": "a b"}, {"id": "x" * 256}],
    ids=["false", "number", "empty", "object", "list", "space", "long"],
)
def test_a_2xx_whose_id_is_no_receivers_id_keeps_the_item(body: object) -> None:
    """The receiver's receipt is its image id, a string (32 hex digits); another server's 201 with some other
    ``id`` (a number, false, an object) deleted the image from the spool as delivered."""
    data = make_bitstream(2)
    with hostile_server(_json_answer(201, body)) as (url, _), Uploader(url, TOKEN, timeout=5.0) as uploader:
        result = uploader.upload(data, "k" * 64)
    assert result.outcome is Outcome.RETRY and "without the receiver's receipt" in result.detail


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_token_stays(status: int) -> None:
    """A receiver (or a man in the middle of plain http://) that redirects cannot make the sender send its
    token, or the image, to another server."""
    with hostile_server(_json_answer(202, {"id": "stolen"})) as (elsewhere, taken):

        def redirect(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(status)
            handler.send_header("Location", elsewhere + "/v1/images")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        data = make_bitstream(3)
        with hostile_server(redirect) as (url, asked), Uploader(url, TOKEN, timeout=5.0) as uploader:
            result = uploader.upload(data, "k" * 64)
    assert result.outcome is Outcome.BLOCKED and elsewhere in result.detail
    assert asked[0]["authorization"] == f"Bearer {TOKEN}" and taken == []


def test_an_endless_close_delimited_answer_is_cut(tmp_path: Path) -> None:
    """HTTP/1.0 without Content-Length: the body ends when the server closes, which this one never does."""

    def endless(handler: BaseHTTPRequestHandler) -> None:
        handler.protocol_version = "HTTP/1.0"
        handler.send_response(503)
        handler.end_headers()
        try:
            while True:
                handler.wfile.write(b"<p>busy</p>" * 4096)
        except OSError:
            pass  # the sender stopped reading and closed: as it should

    data = make_bitstream(4)
    with hostile_server(endless) as (url, _), Uploader(url, TOKEN, timeout=5.0) as uploader:
        result = uploader.upload(data, "k" * 64)
    assert (result.outcome, result.status) == (Outcome.RETRY, 503) and len(result.detail) <= 400


def test_plain_http_to_another_host_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token rides on every upload; on http:// to another host anyone on the path can read it."""
    for url in ("http://127.0.0.1:1", "https://receiver.invalid:1", "http://receiver.invalid:1"):
        _flush(url, tmp_path / "spool", monkeypatch)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "plain http://" in line]
    assert len(warnings) == 1 and "http://receiver.invalid:1" in warnings[0]


def _config(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "sender.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_token_in_a_world_readable_config_file_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readable = _config(tmp_path, f'token = "{TOKEN}"\n', 0o644)
    monkeypatch.delenv("AEIC_TOKEN", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cli.main(["flush", "--config", str(readable), "--to", "http://127.0.0.1:1", "--retry-for", "0"])
    err = capsys.readouterr().err
    assert "holds the device token and any user of this device can read it (mode 0644)" in err
    assert TOKEN not in err
    readable.chmod(0o640)  # the install guide's root:aeic 0640: no warning
    assert exposed_files(load_config(config_path=readable, environ={}), readable, {}) == []
    without = _config(tmp_path, 'receiver_url = "https://r"\n', 0o644)  # no token in it: readable is fine
    assert exposed_files(load_config(config_path=without, environ={}), without, {}) == []


def test_a_world_writable_config_file_or_ca_bundle_is_warned_about(tmp_path: Path) -> None:
    """Whoever may write them can send the token to their own server, or pose as the receiver."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    bundle.chmod(0o666)
    path = _config(tmp_path, f'receiver_url = "https://r"\nca_bundle = "{bundle}"\n', 0o666)
    lines = exposed_files(load_config(config_path=path, environ={}), None, {"AEIC_SENDER_CONFIG": str(path)})
    assert len(lines) == 2
    assert "can be changed by any user" in lines[0] and "(mode 0666)" in lines[0] and "receiver_url" in lines[0]
    assert lines[1].startswith(f"CA bundle {bundle} can be changed by any user")


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("http://cam/videostream.cgi?user=admin&pwd=s3cret&resolution=32",
         "http://cam/videostream.cgi?user=admin&pwd=***&resolution=32"),
        ("rtsp://admin:s3cret@cam:554/live?channel=1&token=s3cret", "rtsp://admin:***@cam:554/live?channel=1&token=***"),
        ("http://cam/ISAPI/picture?auth=YWRtaW46czNjcmV0", "http://cam/ISAPI/picture?auth=***"),
        ("http://cam/snap.jpg?Password=s3cret#x", "http://cam/snap.jpg?Password=***#x"),
        ("rtsp://cam/live?channel=1&subtype=0", "rtsp://cam/live?channel=1&subtype=0"),
        ("/dev/video0", "/dev/video0"),
        (0, "0"),
    ],
)  # fmt: skip
def test_camera_credentials_in_the_query_are_not_logged(source: int | str, shown: str) -> None:
    """Many IP cameras take the password in the query; the agent's start line put it in the journal."""
    assert display_name(source) == shown
    assert Camera(source).name == shown


def test_a_file_url_camera_or_redirect_to_a_local_file_is_refused_by_opencv(tmp_path: Path) -> None:
    """A camera that answers with a redirect to ``file://`` (or an HLS playlist naming one) must not make
    OpenCV read a local file: its FFmpeg allows only network protocols below an http:// source."""
    cv2 = pytest.importorskip("cv2")
    secret = tmp_path / "secret.avi"
    writer = cv2.VideoWriter(str(secret), cv2.VideoWriter.fourcc(*"MJPG"), 5, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    writer.write(np.full((24, 32, 3), 90, np.uint8))
    writer.release()
    playlist = f"#EXTM3U\n#EXTINF:1.0,\nfile://{secret}\n#EXT-X-ENDLIST\n".encode()

    def camera(handler: BaseHTTPRequestHandler) -> None:
        if handler.path.endswith(".m3u8"):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/vnd.apple.mpegurl")
            handler.send_header("Content-Length", str(len(playlist)))
            handler.end_headers()
            handler.wfile.write(playlist)
            return
        handler.send_response(302)
        handler.send_header("Location", f"file://{secret}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with hostile_server(camera) as (url, asked):
        for path in ("/snapshot.mjpg", "/live.m3u8"):
            capture = cv2.VideoCapture(url + path)
            assert not capture.isOpened()
            capture.release()
    assert len(asked) == 2
    assert os.access(secret, os.R_OK)  # readable: only the protocol rule kept it out


def test_a_new_spool_is_private_and_an_open_one_keeps_its_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool holds every image until it is delivered, and a bitstream decodes with the public model: made
    with the default umask (0755) every user of the device could read them."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    previous = os.umask(0o022)
    try:
        assert cli.main(["spool"]) == cli.EXIT_OK
        shared = tmp_path / "shared-spool"
        shared.mkdir(mode=0o750)
        shared.chmod(0o750)
        assert cli.main(["spool", "--spool", str(shared)]) == cli.EXIT_OK
    finally:
        os.umask(previous)
    assert (tmp_path / "state" / "aeic" / "spool").stat().st_mode & 0o777 == 0o700
    assert shared.stat().st_mode & 0o777 == 0o750


def test_a_spool_linked_to_storage_not_mounted_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "spool"
    link.symlink_to(tmp_path / "card" / "spool")
    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    assert cli.main(["spool", "--spool", str(link)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "is a symbolic link to" in err and "does not exist (storage not mounted?)" in err  # was: File exists


def test_a_world_writable_spool_is_warned_about(tmp_path: Path) -> None:
    """Whoever may write into it queues pictures the agent uploads as this device's."""
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o1777)
    (line,) = exposed_files(load_config({"spool_dir": spool}, environ={}), None, {})
    assert line.startswith(f"spool {spool} can be written by any user") and "(mode 1777)" in line


def test_a_web_servers_400_page_does_not_reject_the_whole_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``http://`` to a TLS port, or another web server at the URL, answers every upload with an HTML 400
    (nginx: "The plain HTTP request was sent to HTTPS port"): nothing is wrong with the items, and taking the
    page for the receiver's verdict moved the whole queue to rejected/, one item per request."""
    page = b"<html><head><title>400 The plain HTTP request was sent to HTTPS port</title></head></html>"
    spool = Spool(tmp_path / "spool")
    for seed in range(3):
        spool.put(make_bitstream(10 + seed), source=f"{seed}.jpg")
    with hostile_server(_raw_answer(400, "text/html", page)) as (url, asked):
        code = _flush(url, tmp_path / "spool", monkeypatch)
    err = capsys.readouterr().err
    assert (len(spool), len(spool.rejected()), len(asked)) == (3, 0, 1)
    assert code == cli.EXIT_USAGE and "plain HTTP request was sent to HTTPS port" in err and "check the receiver URL" in err


def test_a_proxys_413_page_still_rejects_the_item_alone() -> None:
    """A size limit is about the item: the others still go."""
    page = b"<html><head><title>413 Request Entity Too Large</title></head></html>"
    data = make_bitstream(5)
    with hostile_server(_raw_answer(413, "text/html", page)) as (url, _), Uploader(url, TOKEN, timeout=5.0) as uploader:
        result = uploader.upload(data, "k" * 64)
    assert result.outcome is Outcome.REJECTED and "413 Request Entity Too Large" in result.detail


class _OversizeThenGood:
    """A capture whose frames are wider than a bitstream holds (``wide``), or normal."""

    def __init__(self, wide: bool) -> None:
        self.wide, self.released = wide, False

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        return True, np.zeros((1, 16385, 3) if self.wide else (4, 6, 3), np.uint8)

    def grab(self) -> bool:
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        return self.read()

    def release(self) -> None:
        self.released = True

    def set(self, prop: int, value: float) -> bool:
        return True


def test_a_frame_no_bitstream_holds_is_skipped_with_one_line() -> None:
    """A broken or hostile camera's 16385-pixel-wide frame was copied to RGB (a second frame-sized array: hundreds of
    MB for the largest frames FFmpeg decodes) and refused by the encoder: one error line per frame, every
    interval, for as long as the camera sent them."""
    opened = [_OversizeThenGood(wide=True), _OversizeThenGood(wide=True), _OversizeThenGood(wide=False)]
    queue = list(opened)
    lines: list[str] = []
    camera = Camera(0, opener=lambda source: queue.pop(0), backoff=Backoff(base=0.001, max_delay=0.002),
                    log=lines.append)  # fmt: skip
    frames = list(camera.frames(interval=0.0, stop=threading.Event(), count=1))
    assert [frame.shape for frame in frames] == [(4, 6, 3)]
    assert opened[0].released and opened[1].released
    assert [line.split(" (")[0] for line in lines] == [
        "camera 0: a 16385x1 frame is larger than the 16384 pixels a side a bitstream holds; skipped, reconnecting",
        "camera 0: frames again",
    ]



def _compressed_zeros(encoding: str, mebibytes: int) -> bytes:
    """``mebibytes`` MiB of zeros as ``encoding`` says (gzip or zlib's deflate), made a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(mebibytes)) + packer.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_answer_is_not_expanded_past_the_limit(encoding: str) -> None:
    """The sender asks for ``identity``; a server that compresses anyway (a hostile receiver, a man in the
    middle) sent 256 KiB of gzip that httpx expanded a 64 KiB network read at a time, 64 MiB at once, to
    keep 64 KiB of it. An encoding that cannot be decoded within the limit is dropped: the status counts."""
    body = b"\x0b" * 4096 if encoding == "br" else _compressed_zeros(encoding, 256)

    def compressed(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(503)
        handler.send_header("Content-Encoding", encoding)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    data = make_bitstream(6)
    with hostile_server(compressed) as (url, _), Uploader(url, TOKEN, timeout=10.0) as uploader:
        result, peak = traced_peak(lambda: uploader.upload(data, "k" * 64))
    assert (result.outcome, result.status) == (Outcome.RETRY, 503)
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB allocated for an answer of which 64 KiB are kept"

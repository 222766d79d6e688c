"""`aeic-receiver` as an operator meets it: every wrong setting, config file, data directory, database and
port is one line on stderr and status 2, found before the model loads (so no worker starts, nothing is
claimed), and a password in a database URL never reaches that line."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aeic.receiver import api
from aeic.receiver.cli import main
from aeic.receiver.settings import ReceiverSettings, load_settings
from aeic.receiver.storage.migrations import MIGRATIONS

NEWEST = max(step.version for step in MIGRATIONS)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single stderr line of a failed command (no traceback, no pydantic block)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aeic-receiver: "), err
    return err.strip()


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `serve` gets as far as building the app (loading models, starting the worker)."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("serve built the app (model load, worker start) before reporting the error")

    monkeypatch.setattr(api, "create_app", refuse)


def test_a_wrong_value_is_one_line_naming_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Was: pydantic's four-line block ending in a link to its documentation."""
    monkeypatch.setenv("AEIC_MAX_UPLOAD_BYTES", "-5")
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 2
    line = _one_line(capsys)
    assert "max_upload_bytes" in line and "'-5'" in line and "pydantic.dev" not in line
    monkeypatch.delenv("AEIC_MAX_UPLOAD_BYTES")
    config = tmp_path / "receiver.toml"
    config.write_text('batch_size = "many"\nport = -1\n')
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path), "--config", str(config)]) == 2
    line = _one_line(capsys)
    assert "batch_size" in line and "'many'" in line and "port" in line


def test_a_secret_setting_is_not_repeated_in_its_error(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "receiver.toml"
    config.write_text('admin_token = 12345678\ndatabase_url = ["sqlite:///x"]\n')
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path), "--config", str(config)]) == 2
    line = _one_line(capsys)
    assert "admin_token" in line and "database_url" in line and "12345678" not in line and "x'" not in line


def test_an_unknown_config_key_names_the_setting_it_resembles(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "receiver.toml"
    config.write_text("batchsize = 2\n")
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path), "--config", str(config)]) == 2
    assert _one_line(capsys).endswith("batchsize is not a setting (did you mean batch_size?)")


def test_a_config_file_that_is_not_toml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a 49-line tomllib traceback and status 1."""
    config = tmp_path / "receiver.toml"
    config.write_text("batch_size = \n")
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path), "--config", str(config)]) == 2
    assert _one_line(capsys) == f"aeic-receiver: config file {config} is not valid TOML: Invalid value (at line 1, column 14)"


def test_a_misspelt_environment_variable_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Was: AEIC_MAX_UPLOAD_BYTE=5000 was ignored, the receiver kept the default limit, and nothing said so."""
    monkeypatch.setenv("AEIC_MAX_UPLOAD_BYTE", "5000")
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 2
    assert _one_line(capsys) == ("aeic-receiver: environment variable AEIC_MAX_UPLOAD_BYTE is not a receiver "
                                 "setting: did you mean AEIC_MAX_UPLOAD_BYTES?")


def test_other_tools_variables_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender, the model loader and the tests share the AEIC_ prefix: a compose file or a shell may set
    theirs beside the receiver's."""
    for name in ("AEIC_TOKEN", "AEIC_TOKEN_FILE", "AEIC_RECEIVER_URL", "AEIC_SENDER_CONFIG", "AEIC_SPOOL_DIR",
                 "AEIC_SPOOL_MAX_ITEMS", "AEIC_TIMEOUT", "AEIC_MODEL", "AEIC_SD_TURBO_DIR", "AEIC_TAEF2_DIR",
                 "AEIC_REQUIRE_TEST_TOOLS", "AEIC_SCALEOUT_UPLOADS", "AEIC_BENCH_IMAGES", "AEIC_VERSION"):
        monkeypatch.setenv(name, "1")
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 0


def test_every_sender_setting_in_the_environment_is_left_alone(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo shell or a host running both exports the sender's AEIC_<KEY>: was, AEIC_ITEM_MAX_ATTEMPTS was
    refused as a misspelt AEIC_MAX_ATTEMPTS."""
    from aeic.sender.config import SenderConfig

    for key in SenderConfig.model_fields:
        monkeypatch.setenv(f"AEIC_{key.upper()}", "1")
    for key in ReceiverSettings.model_fields:  # those both read keep the receiver's meaning
        monkeypatch.delenv(f"AEIC_{key.upper()}", raising=False)
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 0


def test_a_data_directory_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a 118-line SQLAlchemy traceback ("unable to open database file") and, under a file, a
    FileExistsError traceback."""
    file = tmp_path / "data"
    file.write_text("")
    assert main(["token", "create", "--device", "cam1", "--data", str(file)]) == 2
    assert _one_line(capsys) == f"aeic-receiver: the data directory is not a folder: {file}"
    assert main(["token", "create", "--device", "cam1", "--data", str(file / "sub")]) == 2
    assert _one_line(capsys) == (f"aeic-receiver: cannot create the data directory {file / 'sub'}: "
                                 f"File exists: {file}")


def test_a_corrupt_database_is_one_line_before_the_model_loads(tmp_path: Path, no_model_load: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a 142-line traceback from uvicorn's start-up (status 3), after the model had loaded."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "receiver.db").write_bytes(b"not a database, 100 bytes of it".ljust(100, b"."))
    for command in (["token", "create", "--device", "cam1"], ["serve", "--port", "0"]):
        assert main([*command, "--data", str(data)]) == 2
        assert _one_line(capsys) == (f"aeic-receiver: cannot use the database sqlite:///{data.resolve()}/receiver.db: "
                                     "file is not a database")


def test_a_database_of_a_newer_schema_is_one_line_before_the_model_loads(
        tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    main(["token", "create", "--device", "cam1", "--data", str(data)])
    with sqlite3.connect(data / "receiver.db") as conn:
        conn.execute("INSERT INTO aeic_schema_version (version, description, applied_at) VALUES (99, 'later', 0)")
    capsys.readouterr()
    for command in (["token", "create", "--device", "cam1"], ["serve", "--port", "0"]):
        assert main([*command, "--data", str(data)]) == 2
        assert _one_line(capsys) == (f"aeic-receiver: database schema v99 is newer than this code (v{NEWEST}); "
                                     "upgrade aeic")


def test_an_unreachable_database_is_one_line_without_its_password(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgresql+psycopg://aeic:hunter2-secret@127.0.0.1:{port}/aeic"
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path), "--database-url", url]) == 2
    line = _one_line(capsys)
    assert "hunter2" not in line and f"postgresql+psycopg://aeic:***@127.0.0.1:{port}/aeic" in line
    assert "Connection refused" in line
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path), "--database-url", "nosuch://x"]) == 2
    assert "cannot use the database nosuch://x" in _one_line(capsys)


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path: Path, no_model_load: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Was: uvicorn binds after the app's start-up, so the model loaded, the worker started (claiming a
    batch), and the error was one of seven lines, with status 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--data", str(tmp_path / "data"), "--port", str(port)]) == 2
    assert _one_line(capsys) == f"aeic-receiver: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert main(["serve", "--data", str(tmp_path / "data"), "--host", "no-such-host.invalid", "--port", "0"]) == 2
    assert _one_line(capsys).startswith("aeic-receiver: cannot listen on no-such-host.invalid:0: ")


def _wait_for_200(process: subprocess.Popen[str], url: str, within_s: float = 120) -> None:
    """Until the ``serve`` process answers ``url`` with 200; it must not exit meanwhile."""
    deadline = time.monotonic() + within_s
    while True:
        assert process.poll() is None and time.monotonic() < deadline, f"no 200 from {url}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def test_serve_answers_on_the_port_it_bound_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """The socket bound before the model loads is the one uvicorn serves; port 0 is logged as the port it got;
    Ctrl-C stops it with status 0 (no KeyboardInterrupt traceback)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "aeic.receiver.cli", "serve", "--data", str(tmp_path / "data"), "--port", "0",
         "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"bound http://127\.0\.0\.1:(\d+);", line)
        assert found is not None, line
        base = f"http://127.0.0.1:{found.group(1)}"
        _wait_for_200(process, f"{base}/readyz")
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class _Stop(Exception):
    """Ends a `serve` the test has seen far enough."""


def test_a_second_serve_during_the_first_ones_model_load_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: the worker locks were checked and given back at once, so a `serve` started while the first was
    loading its model passed the check, and one of the two failed in uvicorn's start-up with a 43-line
    traceback and status 3. Now the first holds them through the model load."""
    data = tmp_path / "data"
    second: list[int] = []
    builds: list[object] = []

    def create_app(settings: object, *_args: object, **_kwargs: object) -> None:
        builds.append(settings)
        if len(builds) == 1:  # the first serve is loading its model: start the second now
            second.append(main(["serve", "--data", str(data), "--port", "0"]))
        raise _Stop

    monkeypatch.setattr(api, "create_app", create_app)
    with pytest.raises(_Stop):
        main(["serve", "--data", str(data), "--port", "0"])
    assert second == [2] and len(builds) == 1
    assert f"another aeic-receiver (pid {os.getpid()}) is serving {data}" in _one_line(capsys)


def test_a_worker_lock_that_cannot_be_taken_is_one_line_naming_it(tmp_path: Path, no_model_load: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only data directory (or, here, a lock path that is a folder) says which file and why."""
    data = tmp_path / "data"
    (data / "receiver.lock").mkdir(parents=True)
    assert main(["serve", "--data", str(data), "--port", "0"]) == 2
    assert _one_line(capsys) == f"aeic-receiver: cannot take the worker lock: Is a directory: {data / 'receiver.lock'}"


def test_a_list_setting_that_is_not_json_in_the_environment_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a 47-line traceback from pydantic-settings and status 1."""
    monkeypatch.setenv("AEIC_MODEL_PACKAGES", "/opt/aeic/models/a")
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 2
    line = _one_line(capsys)
    assert '"model_packages"' in line and "AEIC_MODEL_PACKAGES='[" in line


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_device_torch_does_not_know_is_one_line_before_the_model_loads(
        command: str, tmp_path: Path, no_model_load: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Was: the decoders load in the worker's thread after start-up, so the receiver served, accepted every
    upload and decoded none, with a traceback in its log."""
    from aeic.receiver import stream_worker

    def refuse(*_args: object, **_kwargs: object) -> int:
        raise AssertionError("the worker started before the device was checked")

    monkeypatch.setattr(stream_worker, "run_worker", refuse)
    extra = ["--queue", "redis://127.0.0.1:9/0"] if command == "worker" else ["--port", "0"]
    assert main([command, "--data", str(tmp_path / "data"), "--device", "cdua", *extra]) == 2
    assert _one_line(capsys) == ("aeic-receiver: device 'cdua' is not a torch device (RuntimeError); use auto, "
                                 "cpu, cuda, cuda:N or mps")


def test_a_cuda_device_this_machine_lacks_is_one_line(tmp_path: Path, no_model_load: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert main(["serve", "--data", str(tmp_path / "data"), "--port", "0", "--device", f"cuda:{count}"]) == 2
    line = _one_line(capsys)
    if count:
        assert line == f"aeic-receiver: device 'cuda:{count}': torch sees {count} CUDA device(s)"
    else:
        assert line == ("aeic-receiver: device 'cuda:0': no CUDA device is available to torch here; "
                        "use --device cpu")


def test_a_model_package_whose_manifest_is_not_json_is_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Was: a 32-line JSONDecodeError traceback and status 1 (shared.model_package raised it unwrapped)."""
    package = tmp_path / "package"
    package.mkdir()
    (package / "manifest.json").write_text("{not json")
    assert main(["serve", "--data", str(tmp_path / "data"), "--port", "0", "--device", "cpu",
                 "--model", str(package)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"aeic-receiver: cannot load a model package: {package}: manifest.json is not valid JSON")
    (package / "manifest.json").write_text("[1]")
    assert main(["serve", "--data", str(tmp_path / "data"), "--port", "0", "--device", "cpu",
                 "--model", str(package)]) == 2
    assert "manifest.json is not a JSON object" in _one_line(capsys)


def test_an_unreachable_queue_is_one_line_without_its_password(tmp_path: Path, no_model_load: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Was: an 82-line traceback from uvicorn's start-up (status 3), after the model had loaded."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["serve", "--data", str(tmp_path / "data"), "--port", "0", "--no-worker", "--database-url",
                 f"sqlite:///{tmp_path / 'receiver.db'}", "--config", str(_config(tmp_path, port))]) == 2
    assert _one_line(capsys) == (f"aeic-receiver: cannot use the queue redis://:***@127.0.0.1:{port}/0: "
                                 f"ConnectionError: Error 111 connecting to 127.0.0.1:{port}. Connection refused.")


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "receiver.toml"
    config.write_text(f'queue = "redis://:hunter2-secret@127.0.0.1:{port}/0"\n')
    return config


def test_an_unreachable_blob_store_is_one_line(tmp_path: Path, no_model_load: None, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AEIC_BLOB_URL", "s3://photos/aeic")
    monkeypatch.setenv("AEIC_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    assert main(["serve", "--data", str(tmp_path / "data"), "--port", "0", "--device", "cpu"]) == 2
    assert _one_line(capsys).startswith("aeic-receiver: cannot use the blob store s3://photos/aeic: ")


def test_a_home_folder_in_a_configured_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: `data_dir = "~/aeic"` in the config file (or AEIC_DATA_DIR) made a folder named `~` in the working
    directory, as no shell expands a value there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "receiver.toml"
    config.write_text('data_dir = "~/aeic"\nmodel_packages = ["~/models/a"]\n')
    settings = load_settings(config)
    assert settings.data_dir == tmp_path / "home" / "aeic"
    assert settings.model_packages == [tmp_path / "home" / "models" / "a"]
    assert main(["token", "create", "--device", "cam1", "--config", str(config)]) == 0
    assert (tmp_path / "home" / "aeic" / "receiver.db").is_file() and not (tmp_path / "~").exists()


def test_a_queue_or_blob_url_of_another_scheme_is_one_line_without_its_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `serve` printed JobQueue's ValueError, the URL and its password quoted, on a traceback (and
    `worker` the same in one line)."""
    monkeypatch.setenv("AEIC_QUEUE", "redis+sentinel://:hunter2-secret@sentinel:26379/0")
    for command in (["serve", "--no-worker", "--port", "0"], ["worker"]):
        assert main([*command, "--data", str(tmp_path / "data")]) == 2
        line = _one_line(capsys)
        assert "hunter2" not in line and line.endswith("queue: value error, must be redis://[:password@]host:port/db "
                                                       "(or rediss://, unix://)")
    monkeypatch.setenv("AEIC_QUEUE", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("AEIC_BLOB_URL", "https://key:secret@bucket.example/aeic")
    assert main(["worker", "--data", str(tmp_path / "data")]) == 2
    line = _one_line(capsys)
    assert "secret" not in line and line.endswith("blob_url: value error, must be s3://bucket or s3://bucket/prefix")


@pytest.mark.parametrize(("variable", "value"), [("AEIC_SESSION_TTL_S", "inf"),
                                                 ("AEIC_LOGIN_ATTEMPTS_PER_MINUTE", "Infinity"),
                                                 ("AEIC_RECLAIM_AFTER_S", "nan")])
def test_a_float_setting_that_is_not_finite_is_one_line(variable: str, value: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Was: accepted; session_ttl_s=inf then failed every gallery sign-in with a 500, and
    login_attempts_per_minute=inf the start-up with an OverflowError traceback."""
    monkeypatch.setenv(variable, value)
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 2
    assert _one_line(capsys).endswith(f"{variable[5:].lower()}: input should be a finite number (got '{value}')")


def test_a_full_disk_under_the_worker_lock_is_one_line_naming_it(tmp_path: Path, no_model_load: None,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `aeic-receiver: No space left on device`, naming no file (measured on a full 80 MB tmpfs)."""
    from aeic.receiver import data_dir

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data_dir.os, "pwrite", full)
    data = tmp_path / "data"
    assert main(["serve", "--data", str(data), "--port", "0"]) == 2
    assert _one_line(capsys) == (f"aeic-receiver: cannot write the worker lock: No space left on device: "
                                 f"{data / 'receiver.lock'}")


def _whole_answer(connection: socket.socket) -> str:
    """An HTTP/1.1 answer read whole: its head, then Content-Length bytes of body (one recv may hold only the
    head on a loaded machine)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := connection.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length is not None and len(body) < int(length.group(1)) and (chunk := connection.recv(4096)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_sigterm_lets_an_upload_in_progress_finish_and_keeps_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM while an upload's body is still arriving: uvicorn, serving the sockets `serve` bound before
    the model loaded, lets the request finish (202) and the image is stored; then the process exits."""
    from aeic.receiver.storage import SqlMetadataStore
    from aeic.shared.model_package import ModelPackage
    from receiver_support import make_bitstream

    data = tmp_path / "data"
    assert main(["token", "create", "--device", "cam1", "--data", str(data)]) == 0
    token = capsys.readouterr().out.strip()
    body = make_bitstream(model_id=ModelPackage.load(verify=False).model_id, payload=b"\x01" * 64)
    process = subprocess.Popen(
        [sys.executable, "-m", "aeic.receiver.cli", "serve", "--data", str(data), "--port", "0", "--no-worker"],
        stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        found = re.search(r"bound http://127\.0\.0\.1:(\d+);", process.stderr.readline())
        assert found is not None
        port = int(found.group(1))
        _wait_for_200(process, f"http://127.0.0.1:{port}/healthz")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as upload:
            upload.sendall(f"POST /v1/images HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                           f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                           + body[:20])
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            upload.sendall(body[20:])
            answer = _whole_answer(upload)
        assert answer.startswith("HTTP/1.1 202"), answer
        image_id = re.search(r'"id":"([0-9a-f]{32})"', answer)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    store = SqlMetadataStore.from_url(f"sqlite:///{data / 'receiver.db'}")
    try:
        assert image_id is not None and store.get_image(image_id.group(1)) is not None
    finally:
        store.close()


def test_a_duration_past_a_year_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Was: accepted; poll_interval_s=1e10 then killed the worker's thread at its first idle wait (an
    OverflowError: past the platform's time_t), and /readyz answered 503 'not running' until a restart."""
    monkeypatch.setenv("AEIC_POLL_INTERVAL_S", "1e10")
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 2
    assert _one_line(capsys).endswith("poll_interval_s: input should be less than or equal to 31536000 (got '1e10')")


@pytest.mark.parametrize("value", ["", " , "])
def test_an_allowed_hosts_list_naming_no_host_is_one_line(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Was: accepted; the receiver then answered 400 "Invalid host header" to every request, probes included."""
    monkeypatch.setenv("AEIC_ALLOWED_HOSTS", value)
    assert main(["token", "create", "--device", "cam1", "--data", str(tmp_path)]) == 2
    assert _one_line(capsys).endswith("allowed_hosts: value error, names no host: give host names (comma list), "
                                      f"or '*' for any (got '{value}')")


# `serve` whose decoder load runs native torch code (GIL released) until killed: what a Ctrl-C during a slow
# model load meets (and a decode past the stop's 30 s wait, the same way out).
_SLOW_LOAD_SERVE = """
import sys, torch
from aeic.receiver import registry
from aeic.receiver.cli import main

def load(*_args, **_kwargs):
    a = torch.randn(1500, 1500)
    sys.stderr.write("loading\\n")
    while True:
        torch.mm(a, a)

registry._load_receiver_codec = load
sys.exit(main(sys.argv[1:]))
"""


def _serve_until_loading(script: str, tmp_path: Path) -> subprocess.Popen[str]:
    """``serve`` run by ``script`` (its decoder load patched), once that load has begun."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--data", str(tmp_path / "data"), "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    while "loading" not in (line := process.stderr.readline()):
        if not line:
            process.wait()
            raise AssertionError("serve ended before its decoder load began")
    return process


def test_a_ctrl_c_while_the_worker_is_still_in_torch_exits_0_not_sigabrt(tmp_path: Path) -> None:
    """Was: the worker thread, still in a decoder load (or a decode) when the stop stopped waiting for it, ran
    native torch code through the interpreter's shutdown: 'terminate called without an active exception' and
    SIGABRT (status -6) at random. Now serve ends the process without finalizing it under that thread."""
    process = _serve_until_loading(_SLOW_LOAD_SERVE, tmp_path)
    try:
        assert process.stderr is not None
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        err = process.stderr.read()
        assert "terminate called" not in err and "Traceback" not in err
        assert "the decode worker did not stop within 0.5 s (loading its decoders)" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


_ENDLESS_LOAD_SERVE = """
import sys, time
from aeic.receiver import registry
from aeic.receiver.cli import main

def load(*_args, **_kwargs):
    sys.stderr.write("loading\\n")
    time.sleep(3600)

registry._load_receiver_codec = load
sys.exit(main(sys.argv[1:]))
"""


def test_a_ctrl_c_during_the_decoder_load_does_not_wait_for_it(tmp_path: Path) -> None:
    """Was: the stop waited up to 30 s for the worker thread, in a decoder load (a minute for SD-Turbo) that
    holds no claim: nothing to finish or hand back. Now serve stops at once."""
    process = _serve_until_loading(_ENDLESS_LOAD_SERVE, tmp_path)
    try:
        assert process.stderr is not None
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        assert time.monotonic() - started < 10
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

"""aeic.sender.watch state: an SQLite database, imported from the JSON of earlier versions, O(1) per change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aeic.sender.watch import Candidate, FolderWatcher, Handled


def _ready(watcher: FolderWatcher) -> list[Candidate]:
    watcher.scan()
    return watcher.scan()


def _fingerprint(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def test_the_json_state_of_earlier_versions_is_imported_once(tmp_path: Path) -> None:
    """An upgrade re-sends nothing and keeps counting the starts an earlier run died in."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("old.jpg", "huge.jpg", "new.jpg"):
        (folder / name).write_bytes(name.encode())
    legacy = tmp_path / "watch" / "abc.json"
    legacy.parent.mkdir()
    files = {"old.jpg": {"fingerprint": _fingerprint(folder / "old.jpg"), "status": "sent", "detail": "k"}}
    started = {"huge.jpg": {"fingerprint": _fingerprint(folder / "huge.jpg"), "starts": 2}}
    legacy.write_text(json.dumps({"directory": str(folder), "files": files, "started": started}))

    watcher = FolderWatcher(folder, legacy.with_suffix(".db"))
    assert not legacy.exists() and legacy.with_name("abc.json.imported").exists()
    ready = {c.name: c for c in _ready(watcher)}
    assert sorted(ready) == ["huge.jpg", "new.jpg"]
    assert not watcher.begin(ready["huge.jpg"])  # died on twice before the upgrade
    restarted = FolderWatcher(folder, legacy.with_suffix(".db"))
    assert [c.name for c in _ready(restarted)] == ["new.jpg"]  # huge.jpg is now failed


def test_a_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    state = tmp_path / "state.db"
    state.write_bytes(b"not a database, but long enough to have a header" * 200)
    with pytest.raises(ValueError, match=r"state\.db is corrupt .*move it away .*-wal.* to rescan"):
        FolderWatcher(folder, state)
    state.unlink()
    state.with_suffix(".json").write_text('{"files": {"a.jpg": ')
    with pytest.raises(ValueError, match=r"state\.json is corrupt .*move it away to rescan"):
        FolderWatcher(folder, state)


_DIE_WHILE_ENCODING = """
import os, signal, sys
from aeic.sender.watch import FolderWatcher
watcher = FolderWatcher(sys.argv[1], sys.argv[2])
watcher.scan()
[huge] = watcher.scan()
assert watcher.begin(huge)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_between_begin_and_record_counts_as_a_start(tmp_path: Path) -> None:
    """The start mark is committed before encoding: a real kill -9 (no close, WAL left behind) keeps it."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "huge.jpg").write_bytes(b"too large for the memory cap")
    state = tmp_path / "state.db"
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _DIE_WHILE_ENCODING, str(folder), str(state)], check=False)
        assert run.returncode == -signal.SIGKILL
    survivor = FolderWatcher(folder, state)
    [huge] = _ready(survivor)
    assert not survivor.begin(huge)
    assert survivor.scan() == []


def test_a_state_change_writes_a_few_pages_not_the_whole_state(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    files = {}
    for i in range(3000):  # sent, and still in the folder
        (folder / f"IMG_{i:05d}.jpg").write_bytes(b"")
        files[f"IMG_{i:05d}.jpg"] = {"fingerprint": [0, i], "status": "sent", "detail": "k" * 64}
    (tmp_path / "state.json").write_text(json.dumps({"files": files}))
    watcher = FolderWatcher(folder, tmp_path / "state.db")
    wal = tmp_path / "state.db-wal"
    (folder / "new.jpg").write_bytes(b"new")
    [new] = _ready(watcher)
    size = wal.stat().st_size
    assert watcher.begin(new)
    watcher.record(new, Handled.SENT, "key")
    assert wal.stat().st_size - size < 8 * 4096  # a few pages, whatever the number of entries
    assert os.path.getsize(tmp_path / "state.json.imported") > 300_000  # what each change used to write


def test_a_record_that_could_not_be_saved_is_saved_with_the_next_write(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"a")
    state = tmp_path / "state.db"
    watcher = FolderWatcher(folder, state)
    [a] = _ready(watcher)
    save = watcher._save_state

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    watcher._save_state = disk_full  # type: ignore[method-assign]
    with pytest.raises(OSError):
        watcher.record(a, Handled.SENT)
    assert watcher.scan() == []  # remembered in memory
    watcher._save_state = save  # type: ignore[method-assign]
    (folder / "b.jpg").write_bytes(b"b")
    [b] = _ready(watcher)
    watcher.record(b, Handled.SENT)
    assert _ready(FolderWatcher(folder, state)) == []

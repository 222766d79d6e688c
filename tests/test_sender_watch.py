"""aeic.sender.watch: a file is handled once, only after it stopped changing, across restarts."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
from aeic.sender.images import ImageReadError, read_image
from aeic.sender.watch import Candidate, FolderWatcher, Handled, is_candidate_name, run_watch


def _names(candidates: list[Candidate]) -> list[str]:
    return [c.name for c in candidates]


def _rows(state: Path, table: str) -> dict[str, list]:
    """A table of the watch state, ``handled`` or ``started``, by name, read as an operator would."""
    with closing(sqlite3.connect(state)) as db:
        return {name: rest for name, *rest in db.execute(f"SELECT * FROM {table}")}


def test_candidate_names() -> None:
    assert is_candidate_name("a.JPG") and is_candidate_name("b.png") and is_candidate_name("c.webp")
    for name in (".hidden.jpg", "~lock.png", "a.jpg.part", "b.png.tmp", "c.crdownload", "notes.txt", "x"):
        assert not is_candidate_name(name)


def test_a_phone_heic_photo_is_handled_and_named_not_passed_over(tmp_path: Path) -> None:
    """A phone set to HEIC (an iPhone's default) filled the folder with photos the watcher ignored by suffix:
    nothing was sent and nothing said why. Each is now read once, and the reader's line names its format."""
    assert all(is_candidate_name(name) for name in ("IMG_0001.HEIC", "b.heif", "c.hif", "d.jxl"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    stop = threading.Event()
    failures: list[str] = []

    def handle(candidate: Candidate) -> tuple[Handled, str]:
        with pytest.raises(ImageReadError) as error:
            read_image(candidate.path)
        failures.append(str(error.value))
        threading.Timer(0.1, stop.set).start()
        return Handled.FAILED, "unreadable or not encodable"

    run_watch(FolderWatcher(folder, tmp_path / "state.db"), handle, stop, poll_interval=0.01)
    assert len(failures) == 1 and "HEIC/HEIF image, which Pillow does not read" in failures[0]


def test_file_is_ready_only_after_two_stable_scans(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    watcher = FolderWatcher(folder, tmp_path / "state.json")
    image = folder / "a.jpg"
    image.write_bytes(b"x" * 100)  # copy in progress
    assert watcher.scan() == []
    with image.open("ab") as handle:
        handle.write(b"y" * 100)  # still growing
    assert watcher.scan() == []
    ready = watcher.scan()  # unchanged since the last scan
    assert _names(ready) == ["a.jpg"] and ready[0].fingerprint[0] == 200
    watcher.record(ready[0], Handled.SENT, "key")
    assert watcher.scan() == []


def test_ignored_names_and_empty_files(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (".a.jpg", "b.jpg.part", "c.txt"):
        (folder / name).write_bytes(b"data")
    (folder / "empty.png").write_bytes(b"")
    (folder / "sub").mkdir()
    (folder / "sub" / "d.jpg").write_bytes(b"data")
    watcher = FolderWatcher(folder, tmp_path / "state.json")
    watcher.scan()
    assert watcher.scan() == []
    recursive = FolderWatcher(folder, tmp_path / "state2.json", recursive=True)
    recursive.scan()
    assert _names(recursive.scan()) == ["sub/d.jpg"]


def test_sent_files_are_remembered_across_restarts(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    state = tmp_path / "state.json"
    (folder / "old.jpg").write_bytes(b"old")
    watcher = FolderWatcher(folder, state)
    watcher.scan()
    [old] = watcher.scan()
    watcher.record(old, Handled.SENT, "k1")

    (folder / "new.jpg").write_bytes(b"arrived while the agent was down")
    restarted = FolderWatcher(folder, state)
    restarted.scan()
    assert _names(restarted.scan()) == ["new.jpg"]  # old.jpg is not sent again


def test_failed_file_is_retried_only_when_it_changes(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    image = folder / "bad.png"
    image.write_bytes(b"garbage")
    watcher = FolderWatcher(folder, tmp_path / "state.json")
    watcher.scan()
    [bad] = watcher.scan()
    watcher.record(bad, Handled.FAILED, "not an image")
    assert watcher.scan() == [] and watcher.scan() == []
    image.write_bytes(b"garbage, now fixed and longer")
    watcher.scan()
    assert _names(watcher.scan()) == ["bad.png"]


def test_later_is_retried_and_deleted_files_are_forgotten(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    state = tmp_path / "state.json"
    (folder / "a.jpg").write_bytes(b"a")
    watcher = FolderWatcher(folder, state)
    watcher.scan()
    [a] = watcher.scan()
    watcher.record(a, Handled.LATER)  # e.g. spool full: try again next scan
    [again] = watcher.scan()
    watcher.record(again, Handled.SENT)
    assert "a.jpg" in _rows(state, "handled")
    (folder / "other.jpg").write_bytes(b"o")  # a listing with no file forgets nothing: an unmounted card's
    (folder / "a.jpg").unlink()
    watcher.scan()
    assert "a.jpg" not in _rows(state, "handled")


def test_run_watch_handles_each_file_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("1.jpg", "2.png"):
        (folder / name).write_bytes(name.encode())
    stop = threading.Event()
    handled: list[str] = []

    def handle(candidate: Candidate) -> tuple[Handled, str]:
        handled.append(candidate.name)
        if len(handled) == 2:
            threading.Timer(0.1, stop.set).start()
        return Handled.SENT, ""

    run_watch(FolderWatcher(folder, tmp_path / "state.json"), handle, stop, poll_interval=0.01)
    assert handled == ["1.jpg", "2.png"]


def test_run_watch_goes_on_when_its_state_cannot_be_saved(tmp_path: Path) -> None:
    """A full disk must not end the agent: the file is reported, remembered in memory, not redone."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "1.jpg").write_bytes(b"one")
    watcher = FolderWatcher(folder, tmp_path / "state.json")

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    watcher._save_state = disk_full  # type: ignore[method-assign]
    stop = threading.Event()
    handled: list[str] = []
    errors: list[str] = []

    def handle(candidate: Candidate) -> tuple[Handled, str]:
        handled.append(candidate.name)
        if candidate.name == "1.jpg":
            (folder / "2.png").write_bytes(b"two")  # arrives after the failed save
        else:
            threading.Timer(0.1, stop.set).start()
        return Handled.FAILED, "unreadable"

    run_watch(watcher, handle, stop, poll_interval=0.01, on_error=errors.append)
    assert handled == ["1.jpg", "2.png"]
    assert len(errors) == 2 and all("No space left" in line for line in errors)


def test_a_file_the_agent_died_on_is_failed_after_two_starts(tmp_path: Path) -> None:
    """A photo that gets the agent OOM-killed must not kill it in a loop and hold back the rest."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "huge.jpg").write_bytes(b"too large for the memory cap")
    state = tmp_path / "state.json"
    for _ in range(2):  # two runs start on it and die before recording anything
        watcher = FolderWatcher(folder, state)
        watcher.scan()
        [huge] = watcher.scan()
        assert watcher.begin(huge)
    survivor = FolderWatcher(folder, state)
    survivor.scan()
    [huge] = survivor.scan()
    assert not survivor.begin(huge)
    assert survivor.scan() == [] and _rows(state, "handled")["huge.jpg"][2] == "failed"


def test_a_finished_file_clears_its_start_mark(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"a")
    state = tmp_path / "state.json"
    for _ in range(3):  # each run finishes (LATER: e.g. spool full), so no start counts against it
        watcher = FolderWatcher(folder, state)
        watcher.scan()
        [a] = watcher.scan()
        assert watcher.begin(a)
        watcher.record(a, Handled.LATER)
    assert "a.jpg" not in _rows(state, "started")


def test_a_vanished_folder_keeps_what_was_sent(tmp_path: Path) -> None:
    """An unmounted card lists no files: that must not forget them, or all are sent again on return."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"a")
    watcher = FolderWatcher(folder, tmp_path / "state.json")
    watcher.scan()
    [a] = watcher.scan()
    watcher.record(a, Handled.SENT)
    folder.rename(tmp_path / "unmounted")
    with pytest.raises(FileNotFoundError, match="gone"):
        watcher.scan()
    (tmp_path / "unmounted").rename(folder)
    assert watcher.scan() == [] and watcher.scan() == []


def test_an_emptied_mount_point_keeps_what_was_sent(tmp_path: Path) -> None:
    """A card unmounted from the watched folder leaves it empty, not gone (the mount point stays), and a Pi's
    agent may start before the card is mounted: an empty listing forgot every file, so each photo of the card
    was encoded and uploaded again once it was back (a tmpfs mounted, unmounted and mounted again under
    ``aeic-send watch``: both photos encoded twice)."""
    folder, away = tmp_path / "card", tmp_path / "unmounted"
    folder.mkdir()
    away.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(name.encode())
    state = tmp_path / "state.db"
    watcher = FolderWatcher(folder, state)
    watcher.scan()
    for candidate in watcher.scan():
        watcher.record(candidate, Handled.SENT)

    def unmount() -> None:
        for name in ("a.jpg", "b.jpg"):
            (folder / name).rename(away / name)

    def mount() -> None:
        for name in ("a.jpg", "b.jpg"):
            (away / name).rename(folder / name)  # as on the card: the same size and mtime

    unmount()
    assert watcher.scan() == [] and watcher.scan() == []
    mount()
    assert watcher.scan() == [] and watcher.scan() == []
    unmount()
    watcher.close()
    restarted = FolderWatcher(folder, state)  # started before the card was mounted
    assert restarted.scan() == []
    mount()
    assert restarted.scan() == [] and restarted.scan() == []
    (folder / "a.jpg").unlink()  # a file deleted while others stay is forgotten, as before
    restarted.scan()
    assert sorted(_rows(state, "handled")) == ["b.jpg"]


def test_a_sub_folder_that_cannot_be_listed_keeps_what_was_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In ``--recursive`` mode a sub-folder that could not be listed for a while (its permission taken away, a
    share inside the folder failing) was skipped as if it were empty: its files were forgotten, and each was
    encoded and uploaded again once it could be listed. (os.scandir is patched: the tests may run as root.)"""
    import os

    folder = tmp_path / "in"
    (folder / "cam1").mkdir(parents=True)
    (folder / "cam1" / "a.jpg").write_bytes(b"a")
    (folder / "b.jpg").write_bytes(b"b")
    state = tmp_path / "state.db"
    watcher = FolderWatcher(folder, state, recursive=True)
    watcher.scan()
    for candidate in watcher.scan():
        watcher.record(candidate, Handled.SENT)
    real_scandir = os.scandir

    def denied(path: str) -> object:
        if Path(path) == folder / "cam1":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr("aeic.sender.watch.os.scandir", denied)
    assert watcher.scan() == [] and watcher.scan() == []
    assert sorted(_rows(state, "handled")) == ["b.jpg", "cam1/a.jpg"]
    monkeypatch.setattr("aeic.sender.watch.os.scandir", real_scandir)
    assert watcher.scan() == [] and watcher.scan() == []


def test_a_sub_folder_that_lists_empty_keeps_what_was_sent(tmp_path: Path) -> None:
    """In ``--recursive`` mode a sub-folder that is itself a mount point (a card in ``in/cam1/``) lists empty while
    unmounted, and the folder as a whole does not: its files were forgotten, and each was encoded and uploaded
    again once the card was back. A sub-folder with no entry at all keeps its files (the card's own sub-folders
    too); one that still holds something forgets the files deleted from it."""
    folder, away = tmp_path / "in", tmp_path / "unmounted"
    (folder / "cam1" / "DCIM").mkdir(parents=True)
    (folder / "cam2").mkdir()
    away.mkdir()
    for name in ("cam1/a.jpg", "cam1/DCIM/c.jpg", "cam2/d.jpg", "b.jpg"):
        (folder / name).write_bytes(name.encode())
    state = tmp_path / "state.db"
    watcher = FolderWatcher(folder, state, recursive=True)
    watcher.scan()
    for candidate in watcher.scan():
        watcher.record(candidate, Handled.SENT)
    (folder / "cam1").rename(away / "cam1")  # unmounted: the mount point stays, empty
    (folder / "cam1").mkdir()
    (folder / "cam2" / "d.jpg").unlink()  # deleted, beside a note that stays
    (folder / "cam2" / "notes.txt").write_bytes(b"kept")
    assert watcher.scan() == [] and watcher.scan() == []
    assert sorted(_rows(state, "handled")) == ["b.jpg", "cam1/DCIM/c.jpg", "cam1/a.jpg"]
    (folder / "cam1").rmdir()
    (away / "cam1").rename(folder / "cam1")  # mounted again: the same files, sizes and mtimes
    assert watcher.scan() == [] and watcher.scan() == []


def test_an_unreadable_file_waits_until_it_can_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A photo copied in with the wrong permissions is sent after a chmod, which changes no fingerprint:
    it is reported, not failed. (os.access is patched: the tests may run as root, who reads anything.)"""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "locked.jpg").write_bytes(b"copied as another user")
    (folder / "open.jpg").write_bytes(b"readable")
    readable = {"open.jpg"}
    monkeypatch.setattr("aeic.sender.watch.os.access", lambda path, mode: Path(path).name in readable)
    watcher = FolderWatcher(folder, tmp_path / "state.db")
    watcher.scan()
    assert _names(watcher.scan()) == ["open.jpg"]
    assert watcher.unlisted == {"locked.jpg": "permission denied; it is sent once it can be read"}
    assert _names(watcher.scan()) == ["open.jpg"]  # not recorded by this test: still ready
    readable.add("locked.jpg")  # chmod a+r
    assert _names(watcher.scan()) == ["locked.jpg", "open.jpg"]
    assert watcher.unlisted == {}


def test_the_state_database_is_closed_with_the_watcher(tmp_path: Path) -> None:
    """Python 3.13 warns of an SQLite connection left to the garbage collector; `aeic-send watch` closes it."""
    folder = tmp_path / "in"
    folder.mkdir()
    with FolderWatcher(folder, tmp_path / "state.db") as watcher:
        watcher.scan()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        watcher._db.execute("SELECT 1")

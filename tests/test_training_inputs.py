"""A user's own photo folder and config: bad files are skipped with a warning each, a dataset or config that
cannot train is one line at the start, and an interrupted run keeps what it had."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import math
import os
import pickle
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
from aeic.codec.testing import make_tiny_package
from aeic.sender.encoder import SenderCodec
from aeic.sender.images import read_image
from aeic.training import cli as train_cli
from aeic.training import data as data_module
from aeic.training import schedule
from aeic.training import trainer as trainer_module
from aeic.training.data import (
    NO_TEACHER,
    CachedImage,
    CropSampler,
    LatentTeacher,
    TrainingDataError,
    build_cache,
    list_images,
    load_downsampled,
)
from aeic.training.schedule import resolve_device
from aeic.training.trainer import Trainer
from PIL import Image
from test_sender_images import _red_blue_swapped_profile
from training_support import write_training_photos

CONFIG = """name = "t"
model = "tiny-se"
data = "{data}"
cache = "{cache}"
short_side = 160
batch = 1
steps = 1
log_every = 1
out = "{out}"
"""
NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name from an old archive: not valid UTF-8


def _photo(path: Path, height: int = 200, width: int = 300, seed: int = 0) -> Image.Image:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    image.save(path)
    return image


def _bad_files(folder: Path) -> list[str]:
    """A truncated JPEG and PNG, an empty file, text named .jpg, a dangling link: what a real folder holds."""
    _photo(folder / "whole.jpg")
    _photo(folder / "whole.png")
    for name in ("whole.jpg", "whole.png"):
        data = (folder / name).read_bytes()
        (folder / f"cut{Path(name).suffix}").write_bytes(data[: len(data) // 2])
        (folder / name).unlink()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo")
    (folder / "gone.png").symlink_to(folder / "absent.png")
    return ["cut.jpg", "cut.png", "empty.png", "notes.jpg", "gone.png"]


def _config(tmp_path: Path, data: Path, extra: str = "") -> str:
    path = tmp_path / "run.toml"
    defaults = "".join(line for line in ('device = "cpu"\n', "crop = 128\n") if line.split()[0] not in extra)
    path.write_text(CONFIG.format(data=data, cache=tmp_path / "cache", out=tmp_path / "out") + defaults + extra)
    return str(path)


def _photos(tmp_path: Path, count: int) -> Path:
    (tmp_path / "photos").mkdir()
    return write_training_photos(tmp_path / "photos", count)


def _main(argv: list[str]) -> int:
    """aeic-train's status; a KeyboardInterrupt that escapes it fails the test instead of ending pytest."""
    try:
        return train_cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("aeic-train let a KeyboardInterrupt out")


def _one_line_error(capsys: pytest.CaptureFixture, status: int, fragment: str) -> str:
    """The one error line of a run that stopped with status 2, which holds ``fragment``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "aeic-train: error" in line]
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert fragment in lines[0], err
    return lines[0]


def test_bad_photos_are_skipped_with_one_warning_each_and_never_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = _photos(tmp_path, 2)
    bad = _bad_files(photos)
    _photo(photos / "small.png", 48, 64)  # under the crop: left out, counted
    (photos / "folder.png").mkdir()  # a folder with a photo's name is not a photo
    items = build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    assert len(items) == 2
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "warning: skipped" in line]
    assert sorted(Path(line.split("skipped ")[1].split(":")[0]).name for line in skipped) == sorted(bad)
    assert f"training on 2 of the 8 photos in {photos} (5 unreadable, 1 smaller than a 128 px crop" in err
    assert len(list((tmp_path / "cache").iterdir())) == 2  # nothing of a bad photo, no temporary files
    (photos / "cut.png").unlink()
    _photo(photos / "cut.png", seed=1)  # repaired under the same name: read, not remembered as bad
    assert len(build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)) == 3


def test_colour_modes_bit_depths_and_exif_rotation_load_as_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    grey = Image.fromarray(rgb).convert("L")
    grey.save(tmp_path / "grey.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    # Pillow's own convert("RGB") clips 16-bit grey to white: the cache would have trained on blank photos
    assert np.array_equal(load_downsampled(tmp_path / "grey16.png", 512)[..., 0], np.asarray(grey))
    assert np.array_equal(load_downsampled(tmp_path / "grey.png", 512)[..., 1], np.asarray(grey))
    assert np.array_equal(load_downsampled(tmp_path / "rgba.png", 512), rgb)
    palette = load_downsampled(tmp_path / "palette.png", 512)
    assert np.array_equal(palette, np.asarray(Image.open(tmp_path / "palette.png").convert("RGB")))
    assert np.abs(load_downsampled(tmp_path / "cmyk.jpg", 512).astype(float) - rgb).mean() < 12
    assert load_downsampled(tmp_path / "turned.jpg", 512).shape == (64, 48, 3)


def test_photos_load_as_the_sender_reads_them_colour_profile_and_alpha_too(tmp_path: Path) -> None:
    """The sender codes a photo's pixels converted to sRGB from its colour profile and composited over white; training
    read the stored numbers and dropped alpha, so it trained on other colours than it codes: 7 of the 274 shared
    training photos (Display P3, Adobe RGB, camera profiles) by 2.6-6.0 levels on average, up to 107, and every
    photo of a recent iPhone (Display P3)."""
    tagged = tmp_path / "tagged.png"  # stored blue, shown red
    Image.new("RGB", (24, 16), (0, 0, 255)).save(tagged, icc_profile=_red_blue_swapped_profile())
    rgba = np.zeros((16, 24, 4), dtype=np.uint8)
    rgba[:, :12, 3] = 255  # the right half transparent over black: white as the sender composites it
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    for path in (tagged, tmp_path / "alpha.png"):
        assert np.array_equal(load_downsampled(path, 512), read_image(path)), path
    assert (load_downsampled(tagged, 512) == (255, 0, 0)).all()


def test_nested_linked_hidden_and_non_utf8_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    (photos / "0001000").mkdir(parents=True)  # LSDIR's layout
    _photo(photos / "0001000" / "0000001.png")
    _photo(photos / NON_UTF8, seed=1)
    (photos / "0001000" / "loop").symlink_to(photos)  # followed once, not for ever
    (photos / ".thumbnails").mkdir()
    _photo(photos / ".thumbnails" / "small.png")
    (photos / "._0000002.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's copy of metadata
    (photos / "bad-\udce9.jpg").write_text("not a photo")
    assert [p.relative_to(photos) for p in list_images(photos)] == [
        Path("0001000/0000001.png"), Path("bad-\udce9.jpg"), Path(NON_UTF8)]
    assert len(build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)) == 2  # was: UnicodeEncodeError
    assert "skipped " in capsys.readouterr().err  # printed escaped, not a UnicodeEncodeError of its own


def test_a_photo_over_pillows_size_limit_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = _photos(tmp_path, 2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 200 x 300 is over twice this: DecompressionBombError
    with pytest.raises(TrainingDataError, match=f"none of the 2 photos in {photos} is usable \\(2 unreadable"):
        build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    assert capsys.readouterr().err.count("decompression bomb") == 2


def test_the_cache_follows_the_folder_and_survives_a_damaged_entry(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    first = _photo(photos / "a.bmp")  # uncompressed: a new photo of the same size has the same byte count
    (photos / "sub").mkdir()
    _photo(photos / "sub" / "a.bmp", seed=2)  # the same name and size in another folder: its own entry
    before = build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    assert not torch.equal(before[0].load().pixels, before[1].load().pixels)
    second = _photo(photos / "a.bmp", seed=1)
    os.utime(photos / "a.bmp", ns=(1, 1))
    after = build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    assert np.array_equal(after[0].load().pixels.permute(1, 2, 0).numpy(), load_downsampled(photos / "a.bmp", 160))
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    for entry in (tmp_path / "cache").iterdir():  # cut short (an older version killed mid-write, a full disk)
        entry.write_bytes(entry.read_bytes()[:100])
    again = build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    assert [torch.equal(a.load().pixels, b.load().pixels) for a, b in zip(after, again, strict=True)] == [True, True]


def test_an_unusable_dataset_fails_at_start_naming_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("photos elsewhere")
    _one_line_error(capsys, train_cli.main([_config(tmp_path, tmp_path / "texts")]),
                    f"no training photos (.avif, .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) in {tmp_path / 'texts'}")
    (tmp_path / "broken").mkdir()
    _bad_files(tmp_path / "broken")
    _one_line_error(capsys, train_cli.main([_config(tmp_path, tmp_path / "broken")]),
                    f"none of the 5 photos in {tmp_path / 'broken'} is usable (5 unreadable, 0 smaller")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize(("extra", "fragment"), [
    ("lambda_scale = -1", "lambda_scale: Input should be greater than 0"),  # was: a NaN loss, trained for hours
    ("lr = 0", "lr: Input should be greater than 0"),
    ("lr_final_fraction = -0.5", "lr_final_fraction: Input should be greater than or equal to 0"),
    ("texture_weight = -0.1", "texture_weight: Input should be greater than or equal to 0"),
    ("max_level = -1", "max_level: Input should be greater than or equal to 0"),
    ("crop = 200", "crop: must be a multiple of 128"),  # was: a traceback in the first step, after the cache
    ("crop = 256", "no 256 px crop fits in photos downsampled to short_side 160"),
    ('device = "mps"', "device 'mps': training runs on cpu, cuda, cuda:N or auto"),  # was: a traceback
    ("seed = -1", "seed: Input should be greater than or equal to 0"),  # was numpy's line, naming neither
    ("bacth = 2", "bacth: unknown key (batch?)"),  # the key it is most like, where one is close
    ('init = "{tmp}/nowhere.pt"', "nowhere.pt"),
    ('stage = "decoder"\npackage = "{tmp}/nowhere"', "nowhere"),
])
def test_a_bad_value_or_missing_file_in_a_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, fragment: str
) -> None:
    config = _config(tmp_path, _photos(tmp_path, 1), extra.format(tmp=tmp_path))
    _one_line_error(capsys, train_cli.main([config]), fragment)


def test_minutes_and_steps_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, tmp_path)
    _one_line_error(capsys, train_cli.main([config, "--minutes", "0"]), "minutes: Input should be greater than 0")
    _one_line_error(capsys, train_cli.main([config, "--steps", "-3"]), "steps: Input should be greater than or equal to 1")


def test_a_cuda_device_the_machine_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available here"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="this machine has 1 CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"  # the documented fallback


def test_a_missing_cuda_is_fixed_where_the_device_was_chosen(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda on the command line is answered with the option to change, not the config's line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = _config(tmp_path, _photos(tmp_path, 1))
    line = _one_line_error(capsys, train_cli.main([config, "--device", "cuda"]), "CUDA is not available here")
    assert "--device cpu" in line and 'device = "cpu"' not in line, line
    in_file = tmp_path / "in_file"
    in_file.mkdir()
    config = _config(in_file, tmp_path / "photos", 'device = "cuda"\n')
    line = _one_line_error(capsys, train_cli.main([config]), "CUDA is not available here")
    assert 'device = "cpu"' in line and "--device" not in line, line


def test_ctrl_c_while_caching_is_one_line_and_keeps_the_photos_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = _photos(tmp_path, 3)
    config = _config(tmp_path, photos)
    load = data_module.load_downsampled

    def interrupted_on_the_third(path: Path, short_side: int) -> np.ndarray:
        if path.name == "2.png":
            raise KeyboardInterrupt
        return load(path, short_side)

    monkeypatch.setattr(data_module, "load_downsampled", interrupted_on_the_third)
    assert _main([config]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "aeic-train: interrupted; the cached photos" in err
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2 and not list((tmp_path / "cache").glob("*.tmp"))
    monkeypatch.setattr(data_module, "load_downsampled", load)
    torch.set_num_threads(1)
    assert train_cli.main([config]) == 0


def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1))
    assert train_cli.main([config]) == 0
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()
    save = torch.save

    def killed_half_way(state: dict, path: Path) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # a second Ctrl-C; a kill -9 stops at the same point without the cleanup

    monkeypatch.setattr(schedule.torch, "save", killed_half_way)
    assert _main([config, "--steps", "2"]) == 130
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before
    monkeypatch.setattr(schedule.torch, "save", save)
    capsys.readouterr()
    assert train_cli.main([config, "--steps", "2"]) == 0
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 2


def test_a_checkpoint_of_another_stage_or_preset_in_the_run_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config copied for the next stage whose `out` was left as it was: resuming the other stage's checkpoint
    was silent (distil: 0 steps trained, the pretrain weights relabelled as distil; adversarial: torch's
    'different number of parameter groups')."""
    torch.set_num_threads(1)
    photos = _photos(tmp_path, 1)
    assert train_cli.main([_config(tmp_path, photos)]) == 0
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(before)
    capsys.readouterr()
    for extra, fragment in [
        (f'stage = "distil"\nteacher = "{teacher}"\n',
         "holds a run of stage 'pretrain', preset 'tiny-se'; this config trains stage 'distil', preset 'tiny-se'"),
        ('stage = "adversarial"\n', "holds a run of stage 'pretrain'"),
        ("", "this config trains stage 'pretrain', preset 'tiny-me'"),
    ]:
        config = Path(_config(tmp_path, photos, extra))
        if not extra:
            config.write_text(config.read_text().replace('"tiny-se"', '"tiny-me"'))
        _one_line_error(capsys, train_cli.main([str(config)]), fragment)
        assert checkpoint.read_bytes() == before


def test_progress_is_whole_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under nohup, docker logs or a batch job's output file, tqdm's carriage returns put every refresh of a run
    (one a step) on one ever-growing line; there each refresh is a line of its own, at most every half minute."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 2))  # one photo would add its warning line
    assert train_cli.main([config, "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err, repr(err)
    lines = err.splitlines()
    # tiny-se decodes with its own pixel decoder: no teacher latent is made, and the bar said "teacher latents"
    assert any(line.startswith("photos: 100%") for line in lines), err
    assert lines[-1].startswith("t:pretrain: 100%") and "3/3" in lines[-1], err
    assert len(lines) <= 4, err  # start and end of each bar: the three steps take well under 30 s


def test_a_diverged_run_stops_at_the_first_non_finite_loss_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate far too high for the data: the loss turned NaN at step 2 and the run went on to its end,
    logging NaN (not JSON) and overwriting the checkpoint with NaN weights, with exit status 0."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1), "lr = 1e6\ncheckpoint_minutes = 1e-9\n")
    _one_line_error(capsys, train_cli.main([config, "--steps", "6"]), "training diverged")
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert 1 <= state["step"] < 6
    assert all(bool(value.isfinite().all()) for value in state["model"].values() if value.is_floating_point())
    log = (tmp_path / "out" / "log.jsonl").read_text()
    assert "NaN" not in log and "Infinity" not in log and log.count("\n") == state["step"]


def test_a_checkpoint_that_does_not_fit_on_the_disk_says_how_much_room_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch reports a full disk as 'unexpected pos 1153536 vs 1153424' (measured on a 6 MB tmpfs): the line
    says how much room is left there, and the previous checkpoint stays."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1))
    assert train_cli.main([config]) == 0
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()

    def full_disk(state: dict, path: Path) -> None:
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1153536 vs 1153424")

    monkeypatch.setattr(schedule.torch, "save", full_disk)
    monkeypatch.setattr(schedule.shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * 2**20))
    capsys.readouterr()
    _one_line_error(capsys, train_cli.main([config, "--steps", "2"]), "3 MiB free on its disk")
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before


def test_a_short_side_over_1024_is_kept_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The long side was cut to 1024 whatever `short_side` said: short_side 1280 gave 1024 x 1024 photos, and a
    crop of 1152 found none of them large enough ('smaller than a 1152 px crop after downsampling to 1280')."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "wide.png", 1400, 2100)
    assert load_downsampled(photos / "wide.png", 1280).shape == (1280, 1280, 3)
    assert load_downsampled(photos / "wide.png", 512).shape == (512, 768, 3)  # up to 1024: as before
    items = build_cache(photos, tmp_path / "cache", 1280, NO_TEACHER, 1152)
    assert [tuple(item.load().pixels.shape) for item in items] == [(3, 1280, 1280)]


def test_threads_bound_the_decoder_stages_sender_path_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--threads set torch's threads only: the decoder stage codes every crop through the sender's ONNX path,
    whose onnxruntime took every core of the machine whatever --threads said."""
    package = make_tiny_package(tmp_path / "pkg")
    opened: list[int | None] = []
    from_package = SenderCodec.from_package

    def recorded(path: Path, provider: str | None = None, threads: int | None = None, **options: Any) -> SenderCodec:
        opened.append(threads)
        return from_package(path, provider, threads, **options)

    monkeypatch.setattr(SenderCodec, "from_package", recorded)
    config = _config(tmp_path, _photos(tmp_path, 1), f'stage = "decoder"\npackage = "{package}"\nwindow = 12\n')
    threads = torch.get_num_threads()
    try:
        assert train_cli.main([config, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert opened == [1]


def test_a_config_saved_with_a_byte_order_mark_reads_and_one_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Windows editor's UTF-8 with a byte-order mark was 'not valid TOML ... line 1, column 1'; a Latin-1 file
    was "'utf-8' codec can't decode byte 0xe9", naming no file."""
    config = Path(_config(tmp_path, tmp_path))
    text = config.read_text()
    config.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert train_cli._load_config(config).name == "t"
    config.write_bytes(text.replace('name = "t"', 'name = "caf\xe9"').encode("latin-1"))
    _one_line_error(capsys, train_cli.main([str(config)]), f"{config} is not UTF-8 text")


def test_photos_past_the_memory_budget_stay_on_disk_and_crop_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every cached photo was held in memory: LSDIR's 85,000 (the docs point a real run at it) are about 130 GB
    at short_side 512 with TAEF2's latents, past any machine's memory. Past the budget, a photo is read from its
    cache file for each crop: the same crops, bit for bit."""
    photos = _photos(tmp_path, 3)
    whole = build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    one = whole[0].load().pixels.nbytes + whole[0].load().latent.nbytes
    monkeypatch.setattr(data_module, "memory_budget", lambda: one)
    budgeted = build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)
    assert [type(item).__name__ for item in budgeted] == ["CachedImage", "OnDisk", "OnDisk"]
    assert not any(isinstance(value, torch.Tensor) for value in vars(budgeted[1]).values())
    in_memory, on_disk = CropSampler(whole, 128, 7), CropSampler(budgeted, 128, 7)
    for _ in range(4):
        assert all(torch.equal(a, b) for a, b in zip(in_memory.batch(3), on_disk.batch(3), strict=True))


def test_the_memory_budget_follows_a_containers_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container (docker run --memory 16g) the machine's memory is the host's: a quarter of a 128 GB host
    is twice what the container may hold, and the cache would have been killed for memory."""
    machine = data_module.memory_budget()
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(data_module, "CGROUP_MEMORY_LIMITS", (v2, v1))
    assert data_module.memory_budget() == machine  # no limit files: not in a container
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert data_module.memory_budget() == machine
    v2.write_text(f"{2**30}\n")
    assert data_module.memory_budget() == 2**28


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch job requeued while the first still runs, or one command started in two terminals: both trained,
    each overwriting the other's checkpoint and interleaving their log lines."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1))
    assert train_cli.main([config]) == 0  # the folder's lock is let go when a run ends
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()
    with open(tmp_path / "out" / "run.lock", "a") as first:  # what a running aeic-train holds
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        _one_line_error(capsys, train_cli.main([config, "--steps", "2"]), f"another aeic-train is training in {tmp_path / 'out'}")
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before
    assert train_cli.main([config, "--steps", "2"]) == 0


def test_the_log_gives_the_learning_rate_each_step_trained_with(tmp_path: Path) -> None:
    """The logged `lr` was the next step's: step 1 of a cosine schedule logged less than `lr`, which it trained
    with, and the last step the final rate, which no step trained with."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1), "lr = 0.001\nlr_final_fraction = 0.5\n")
    assert train_cli.main([config, "--steps", "2"]) == 0
    logged = [json.loads(line)["lr"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert logged == [0.001, pytest.approx(0.001 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 2))))]


def test_a_tilde_in_a_config_path_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TOML leaves `~` to the program: `out = "~/runs/x"` made a folder named `~` in the working folder (which a
    later `rm -rf ~` meant for it would take as the home folder), and `data = "~/photos"` did not exist."""
    torch.set_num_threads(1)
    _photos(tmp_path, 1)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "home.toml"
    config.write_text(CONFIG.format(data="~/photos", cache="~/cache", out="~/runs/x") + 'device = "cpu"\ncrop = 128\n')
    assert train_cli.main([str(config)]) == 0
    assert (tmp_path / "runs" / "x" / "checkpoint.pt").exists() and not (tmp_path / "~").exists()
    loaded = train_cli._load_config(config, init="~/runs/x/checkpoint.pt", init_mean=None)
    assert loaded.init == tmp_path / "runs" / "x" / "checkpoint.pt"


def test_a_photo_between_one_and_two_times_pillows_limit_loads_without_a_python_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 100 MP photo (a medium-format camera's) is over Pillow's 89 MP warning limit but under its 179 MP error:
    it trains, but printed "DecompressionBombWarning: ... could be decompression bomb DOS attack" and the
    warnings module's source line through the progress bar."""
    _photo(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 200 x 300 is 1.5 times this
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_downsampled(tmp_path / "large.png", 160).shape == (160, 240, 3)
    assert [str(warning.message) for warning in caught] == []


def test_a_step_out_of_gpu_memory_is_one_line_naming_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The configs' batches are set for an 80 GB GPU: on a smaller one the first step ran out of memory with
    torch's traceback. The line names the batch to lower, and what checkpoint is kept."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1), "checkpoint_minutes = 1e-9\n")
    step = Trainer.train_step

    def out_of_memory_in_step_two(self: Trainer, *args: torch.Tensor) -> dict[str, float]:
        if self.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 23.65 GiB of which 1.06 GiB is free. Process 1234 has 22.5 GiB memory in use. Of the "
                                         "allocated memory 21.9 GiB is allocated by PyTorch, ...")
        return step(self, *args)

    monkeypatch.setattr(Trainer, "train_step", out_of_memory_in_step_two)
    _one_line_error(capsys, train_cli.main([config, "--steps", "3"]),
                    "step 2: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                    "capacity of 23.65 GiB of which 1.06 GiB is free.); the checkpoint of step 1 is kept: "
                    "lower the batch (1 now; --batch) or the crop (128)")
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 1


@pytest.mark.parametrize(("stage", "settings", "message"), [
    ("decoder", 'package = "{}"\nwindow = 12\n', "holds a run of stage 'decoder', package_id"),
    ("encoder", 'init = "{}"\n', "holds a run of stage 'encoder', preset 'tiny-se', package_id"),
])
def test_a_checkpoint_of_another_package_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: str,
                                                    settings: str, message: str) -> None:
    """The decoder stage's `package` (the encoder stage's `init`) changed with `out` left as it was: the run
    resumed from weights trained with the first package's other half, and the export paired them with the
    second package's."""
    torch.set_num_threads(1)
    photos = _photos(tmp_path, 1)
    first, second = make_tiny_package(tmp_path / "first", seed=0), make_tiny_package(tmp_path / "second", seed=1)
    config = Path(_config(tmp_path, photos, f'stage = "{stage}"\n' + settings.format(first)))
    assert train_cli.main([str(config)]) == 0
    config.write_text(config.read_text().replace(str(first), str(second)))
    capsys.readouterr()
    _one_line_error(capsys, train_cli.main([str(config), "--steps", "2"]), message)
    config.write_text(config.read_text().replace(str(second), str(first)))
    assert train_cli.main([str(config), "--steps", "2"]) == 0


def test_a_calibration_takes_the_folder_lock_and_out_of_memory_in_it_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `calibrate` run took no lock (a second one in its folder wrote the checkpoint and log too) and ran out of
    GPU memory with torch's traceback, where a training stage stops with one line."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1), 'stage = "calibrate"\n')
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "run.lock", "a") as first:  # what a running aeic-train holds
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _one_line_error(capsys, _main([config]), f"another aeic-train is training in {tmp_path / 'out'}")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()

    def out_of_memory(*args: object) -> list[tuple[float, float]]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 23.65 GiB of which 1.06 GiB is free. Process 1234 has 22.5 GiB memory in use.")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "calibrate_log_gains", out_of_memory)
        _one_line_error(capsys, _main([config]), "step 1: out of memory (CUDA out of memory. Tried to allocate 2.00 "
                        "GiB. GPU 0 has a total capacity of 23.65 GiB of which 1.06 GiB is free.); no checkpoint was "
                        "written: lower the batch (1 now; --batch) or the crop (128)")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    assert _main([config]) == 0
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 1


def test_a_teacher_latent_out_of_gpu_memory_is_one_line_and_keeps_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache's teacher latents run on the training device: a large photo through the SD VAE on a small GPU
    stopped the run with torch's traceback. The line names the photo and the setting to lower, and the photos
    cached before it stay cached."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 2))
    calls: list[int] = []

    def out_of_memory_on_the_second(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity "
                                         "of 7.65 GiB of which 1.06 GiB is free. Including non-PyTorch memory, ...")
        return NO_TEACHER.encode(pixels)

    monkeypatch.setattr(Trainer, "_cache_teacher", lambda self: LatentTeacher("none", out_of_memory_on_the_second))
    _one_line_error(capsys, _main([config]), f"out of memory computing the teacher latent of {tmp_path / 'photos' / '1.png'} "
                    "(CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 7.65 GiB of which "
                    "1.06 GiB is free.); the photos cached before it are kept: lower short_side (160 now)")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    monkeypatch.setattr(Trainer, "_cache_teacher", lambda self: NO_TEACHER)
    calls.clear()
    assert _main([config, "--steps", "1"]) == 0
    assert len(calls) == 0  # the first photo came from its cache file, the second through NO_TEACHER


def test_photos_pillow_does_not_read_are_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A phone's HEIC photos (and camera raw files) in a photo folder were passed over unseen: the count said
    nothing of them, and a folder of nothing else said it held no photos."""
    photos = _photos(tmp_path, 2)
    (photos / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (photos / "DSC_0002.nef").write_bytes(b"II*\x00" + bytes(64))
    (photos / "notes.txt").write_text("not a photo")  # no photo's suffix: not one of the photos
    assert len(build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)) == 2
    err = capsys.readouterr().err
    assert f"skipped {photos / 'IMG_0001.HEIC'}: Pillow does not read .HEIC photos: convert them to JPEG or PNG" in err
    assert f"skipped {photos / 'DSC_0002.nef'}: Pillow does not read .nef photos" in err
    assert f"training on 2 of the 4 photos in {photos} (2 unreadable, 0 smaller" in err and "notes.txt" not in err
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_cache_file_lost_while_training_is_one_line_naming_it_and_its_photo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """A photo past the memory budget is read from its cache file for every crop: a cache file deleted (a cache
    cleaned while a run trains) or damaged stopped the run with torch's bare error or its traceback."""
    torch.set_num_threads(1)
    photos = _photos(tmp_path, 1)
    config = _config(tmp_path, photos, "checkpoint_minutes = 1e-9\n")
    monkeypatch.setattr(data_module, "memory_budget", lambda: 0)  # every photo stays in its cache file
    step = Trainer.train_step

    def lose_the_cache_after_step_two(self: Trainer, *args: torch.Tensor) -> dict[str, float]:
        logs = step(self, *args)
        if self.step == 1:  # training step 2
            for entry in (tmp_path / "cache").iterdir():
                entry.unlink() if damage == "deleted" else entry.write_bytes(entry.read_bytes()[:100])
        return logs

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", lose_the_cache_after_step_two)
        line = _one_line_error(capsys, _main([config, "--steps", "4"]), f"step 3: cannot read the cache file {tmp_path / 'cache'}")
    assert f".pt of {photos / '0.png'} (" in line and line.endswith("the checkpoint of step 2 is kept: run the same command to resume")
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert _main([config, "--steps", "4"]) == 0  # the same command caches the photo again and goes on
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 4


def test_a_full_disk_while_logging_names_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk filled while a log line was written: the run stopped with a bare "[Errno 28] No space left on
    device", naming no file."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1), "checkpoint_minutes = 1e-9\n")
    log = tmp_path / "out" / "log.jsonl"
    write = os.write

    def full_after_one_line(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") != os.path.realpath(log) or log.stat().st_size == 0:
            return write(fd, data)
        if not log.read_bytes().endswith(b"\n"):  # the disk filled part way through this line
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data[:10])

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full_after_one_line)
        line = _one_line_error(capsys, _main([config, "--steps", "3"]), f"cannot write {log} (step 2): No space left on device (")
    assert line.endswith("MiB free on its disk); the checkpoint of step 1 is kept")
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["step"] == 1
    assert _main([config, "--steps", "3"]) == 0  # the line cut short is cut from the log as the run resumes
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_training_lists_every_format_the_sender_reads(tmp_path: Path) -> None:
    """A folder of GIF photos trained on nothing: the training reader kept its own list of suffixes, without
    the .gif the sender, `aeic eval` and `make demo` read."""
    Image.new("RGB", (64, 48), (200, 60, 30)).save(tmp_path / "photo.gif")
    (tmp_path / "notes.txt").write_text("not a photo")
    assert data_module.list_images(tmp_path) == [tmp_path / "photo.gif"]


def test_the_progress_bar_of_a_time_budget_counts_the_steps_that_budget_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`minutes = 30` with the configs' `steps` (an upper bound): the bar counted to that bound, 92/100000 with
    2:44:19 left when the run ended after 9 s; it counts to the step where the time runs out at the pace so far."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1))
    # each step takes a hundredth of a minute, so a budget of 0.05 minutes ends after 5 steps
    monkeypatch.setattr(schedule.ScheduledRun, "_elapsed_minutes", lambda self: self.step / 100)
    assert train_cli.main([config, "--steps", "100000", "--minutes", "0.05"]) == 0
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("t:pretrain: 100%") and "5/5 " in last, last


def test_a_cache_that_does_not_fit_on_its_disk_says_so_and_keeps_the_photos_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cache on a 700 KB tmpfs stopped with torch's 'unexpected pos 960 vs 854' alone; the line says how much room
    is left, which photo it was caching and that those cached before it stay."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 3))
    save = torch.save

    def full_after_two(item: object, file: BinaryIO) -> None:
        if len(list((tmp_path / "cache").glob("*.pt"))) == 2:
            file.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 960 vs 854")
        save(item, file)

    monkeypatch.setattr(data_module.torch, "save", full_after_two)
    monkeypatch.setattr(data_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=3 * 2**20))
    line = _one_line_error(capsys, train_cli.main([config]), "3 MiB free on its disk")
    assert "2.png" in line and "the 2 photos cached before it are kept" in line, line
    assert sorted(path.suffix for path in (tmp_path / "cache").iterdir()) == [".pt", ".pt"]


@pytest.mark.parametrize(("extra", "fragment"), [
    ('teacher = "{tmp}/me.pt"', "teacher is read by the distil stage only; this config trains stage 'pretrain'"),
    ('package = "{tmp}/package"', "package is read by the decoder stage only; this config trains stage 'pretrain'"),
    ('stage = "distil"\nteacher = "{tmp}/me.pt"\nadversarial_weight = 0.1',
     "adversarial_weight is read by the adversarial stage only; this config trains stage 'distil'"),
])  # fmt: skip
def test_a_key_only_another_stage_reads_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, fragment: str
) -> None:
    """`teacher` without `stage = "distil"`, or `package` meant as the weights to start from (that is `init`), trained
    from scratch in the default pretrain stage, unsaid."""
    config = _config(tmp_path, _photos(tmp_path, 1), extra.format(tmp=tmp_path))
    _one_line_error(capsys, train_cli.main([config]), fragment)
    assert not (tmp_path / "out").exists()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_twice_the_short_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 12 MP phone photo took 0.4 s to cache at short_side 512 (54 MP: 1.6-3.5 s), decoded whole to be shrunk
    eightfold; JPEG's own reduced decoding to at least twice the short side leaves LANCZOS the last step."""
    rows, cols = np.mgrid[0:1536, 0:2048]
    smooth = np.stack([rows % 256, cols % 256, (rows + cols) % 256], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    decoded: list[tuple[int, int]] = []
    reader = data_module.upright_rgb8

    def recording(image: Image.Image, path: Path) -> np.ndarray:
        decoded.append(image.size)
        return reader(image, path)

    monkeypatch.setattr(data_module, "upright_rgb8", recording)
    reduced = load_downsampled(tmp_path / "big.jpg", 256)
    assert decoded == [(1024, 768)]  # a half-scale decode: 768 >= 2 x 256, a quarter's 384 would not be
    whole = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((341, 256), Image.Resampling.LANCZOS))
    assert reduced.shape == (256, 336, 3)
    assert np.abs(reduced.astype(float) - whole[:, 2:338]).mean() < 2


def test_a_finished_run_run_again_reads_no_photo_and_keeps_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same command after a run ended read every photo of the cache again (for a large folder, minutes) and
    wrote the checkpoint again, unchanged but for its minutes (a full disk then failed a run that had nothing to do)."""
    torch.set_num_threads(1)
    config = _config(tmp_path, _photos(tmp_path, 1))
    assert train_cli.main([config, "--steps", "2"]) == 0
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()

    def no_photos(*args: object) -> list:
        raise AssertionError("a finished run read its photos again")

    monkeypatch.setattr(trainer_module, "build_cache", no_photos)
    assert train_cli.main([config, "--steps", "2"]) == 0
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before
    assert capsys.readouterr().out.strip().endswith(f"checkpoint: {tmp_path / 'out' / 'checkpoint.pt'}")


@pytest.mark.parametrize("extra", ["", 'init = "nowhere.pt"\n'])
def test_a_relative_path_not_found_names_the_folder_it_is_relative_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], extra: str
) -> None:
    """A config's paths are relative to the folder aeic-train runs in: run from another, it said only 'training
    photo folder runs/userdata does not exist' (or torch's No such file for `init`), though the folder was there."""
    _photos(tmp_path, 1)
    config = Path(_config(tmp_path, Path("photos") if not extra else tmp_path / "photos", extra))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _one_line_error(capsys, train_cli.main([str(config)]), f"(relative to {tmp_path / 'elsewhere'}, where aeic-train runs)")


class _RunsCodeWhenRead:
    """A pickled object whose unpickling makes a folder: what a checkpoint from a stranger could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_or_cache_file_that_holds_code_is_refused_without_running_it(tmp_path: Path) -> None:
    """Checkpoints and cache files are read as data only: an ``init`` from elsewhere used to be unpickled
    in full, so a file made to run code ran it at ``aeic export`` or ``aeic-train``."""
    from aeic.codec import cli as codec_cli
    from aeic.codec.checkpoint import CheckpointError, load_data_only, read_checkpoint

    marker = tmp_path / "ran"
    hostile = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "step": 1, "payload": _RunsCodeWhenRead(marker)}, hostile)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(hostile)
    assert codec_cli.main(["export", str(hostile), str(tmp_path / "pkg")]) != 0
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL posix.mkdir"):
        load_data_only(hostile, allowed=[CachedImage])
    assert not marker.exists()
    honest = tmp_path / "state.pt"  # what the trainer writes: tensors, plain values, numpy's random state
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple)
    torch.save({"rng": (numpy_state,), "image": CachedImage(torch.zeros(3, 2, 2, dtype=torch.uint8),
                                                                      torch.zeros(4, 1, 1))}, honest)
    state = load_data_only(honest, allowed=[CachedImage])
    assert isinstance(state, dict) and isinstance(state["image"], CachedImage)
    assert np.array_equal(state["rng"][0][1], numpy_state[1])


def test_a_fifo_named_like_a_photo_is_skipped_without_blocking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named pipe called x.jpg hung aeic-train at 0 % of its photo bar: Pillow's open waited for a writer."""
    photos = _photos(tmp_path, 2)
    fifo = photos / "x.jpg"
    os.mkfifo(fifo)
    found: list[int] = []
    reader = threading.Thread(target=lambda: found.append(len(build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128))),
                              daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # let the blocked open return, so the thread ends with the test
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("build_cache blocked on a FIFO")
    assert found == [2]
    err = capsys.readouterr().err
    assert f"skipped {fifo}: is a FIFO, socket or device, not an image file" in err, err
    assert f"training on 2 of the 3 photos in {photos} (1 unreadable" in err


def test_temporaries_of_a_killed_run_are_cleared_and_a_writers_kept(tmp_path: Path) -> None:
    """kill -9 while the cache filled left its temporary (a whole photo's pixels) for ever; a later run removes
    one untouched for ``STALE_TEMPORARY_SECONDS``, whoever wrote it, and keeps a fresh one (a run sharing the
    cache, on this machine or another, may be writing it), as well as files of other names. A process id
    in the name said nothing: in a container a training run is often pid 1, alive in every container."""
    photos = _photos(tmp_path, 1)
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = data_module.STALE_TEMPORARY_SECONDS + 60
    old, old_pid_named, fresh, other = (cache / name for name in
                                        (f"{'a' * 20}.{'0f' * 8}.tmp", f"{'b' * 20}.1.tmp", f"{'c' * 20}.{'e1' * 8}.tmp",
                                         "notes.tmp"))  # fmt: skip
    for path in (old, old_pid_named, fresh, other):
        path.write_bytes(b"half a photo")
    for path in (old, old_pid_named, other):
        os.utime(path, (path.stat().st_mtime - stale,) * 2)
    build_cache(photos, cache, 160, NO_TEACHER, 128)
    assert sorted(path.name for path in cache.glob("*.tmp")) == sorted([fresh.name, other.name])
    assert len(list(cache.glob("*.pt"))) == 1


def _photo_item(value: int) -> CachedImage:
    return CachedImage(torch.full((3, 8, 8), value, dtype=torch.uint8), torch.full((4, 1, 1), value).half())


def test_two_writers_of_one_process_id_never_share_a_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two containers sharing a cache volume can both run as the same pid: their temporaries were both
    ``<entry>.<pid>.tmp``, so one writer truncated the other's half-written file and renamed it away, and the
    first's rename then failed (FileNotFoundError) after writing its second half into the finished entry."""
    entry = tmp_path / f"{'d' * 20}.pt"
    first, second = _photo_item(1), _photo_item(2)
    save = torch.save

    def interleaved(item: object, target: Any) -> None:
        """Write half of `item`, let the other writer write the same entry whole, then write the rest."""
        buffer = io.BytesIO()
        save(item, buffer)
        data = buffer.getvalue()
        with contextlib.ExitStack() as stack:
            out = target if hasattr(target, "write") else stack.enter_context(open(target, "wb"))
            out.write(data[: len(data) // 2])
            if item is first:
                data_module._write_entry(entry, second)
            out.write(data[len(data) // 2:])

    monkeypatch.setattr(os, "getpid", lambda: 1)  # as in each container
    monkeypatch.setattr(torch, "save", interleaved)
    data_module._write_entry(entry, first)
    kept = data_module._read_entry(entry)
    assert kept is not None and torch.equal(kept.pixels, first.pixels)  # the last rename wins, whole
    assert [path.name for path in tmp_path.iterdir()] == [entry.name]


def test_a_temporary_removed_as_stale_while_its_writer_stood_still_costs_only_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped mid-write (Ctrl-Z) past ``STALE_TEMPORARY_SECONDS`` finds its temporary removed by a run
    sharing the cache: it goes on without keeping that entry (computed again next time) rather than failing."""
    entry = tmp_path / f"{'e' * 20}.pt"
    save = torch.save

    def removed_meanwhile(item: object, target: Any) -> None:
        save(item, target)
        for path in tmp_path.glob("*.tmp"):
            path.unlink()

    monkeypatch.setattr(torch, "save", removed_meanwhile)
    data_module._write_entry(entry, _photo_item(3))
    assert list(tmp_path.iterdir()) == []


def test_one_usable_photo_is_said_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder with a single usable photo (data pointed at the wrong folder) trained without a word."""
    torch.set_num_threads(1)
    photos = _photos(tmp_path, 1)
    assert train_cli.main([_config(tmp_path, photos), "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and f"only one usable photo in {photos}" in lines[0], lines
    _bad_files(photos)
    assert len(build_cache(photos, tmp_path / "cache", 160, NO_TEACHER, 128)) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line and "skipped" not in line]
    assert len(lines) == 1 and f"only one usable photo in {photos} (of 6: 5 unreadable, 0 smaller" in lines[0], lines

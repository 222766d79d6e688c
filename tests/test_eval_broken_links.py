"""Image names in the folder that are not regular files: each is an error row saying why, never silently left
out of the means (a folder of links to photos on an unmounted disk lost them without a word)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from aeic.evaluation import images, resume, runner
from PIL import Image


class HalfCodec:
    """Stand-in codec: every other pixel of every other row."""

    def encode(self, rgb: np.ndarray, rate_index: int) -> bytes:
        return bytes([rgb.shape[0], rgb.shape[1]]) + rgb[::2, ::2].tobytes()

    def decode(self, data: bytes) -> np.ndarray:
        h, w = data[0], data[1]
        small = np.frombuffer(data[2:], np.uint8).reshape(-(-h // 2), -(-w // 2), 3)
        return np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)[:h, :w]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "images"
    out.mkdir()
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(out / "a.png")
    (out / "gone.png").symlink_to(tmp_path / "unmounted" / "photo.png")
    (out / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(out / "pipe.png")
    (out / "folder.png").mkdir()  # a directory named like an image is not one
    (out / "notes.txt").write_text("not an image")
    return out


def test_broken_links_and_a_fifo_are_listed_and_get_error_rows(folder: Path, tmp_path: Path) -> None:
    assert [p.name for p in images.list_images(folder)] == ["a.png", "gone.png", "loop.jpg", "pipe.png"]
    config = runner.EvalConfig(images=folder, out=tmp_path / "out", points=runner.parse_points("0", None),
                               metrics=["psnr"])  # fmt: skip
    done: list[dict] = []
    worker = threading.Thread(target=lambda: done.append(runner.Evaluator(HalfCodec(), config).run(progress=False)),
                              daemon=True)  # fmt: skip
    worker.start()
    worker.join(30)
    if worker.is_alive():  # a blocked read of the FIFO: free it so pytest does not hang
        with open(folder / "pipe.png", "wb"):
            pass
        worker.join(10)
        pytest.fail("the evaluation waited on a FIFO")
    rows = {r["image"]: r for r in done[0]["rows"]}
    assert rows["a.png"]["status"] == "ok"
    assert "no such file" in rows["gone.png"]["detail"] and rows["gone.png"]["status"] == "error"
    assert "symbolic link loop" in rows["loop.jpg"]["detail"]
    assert "FIFO" in rows["pipe.png"]["detail"]
    assert done[0]["means"][0]["n_error"] == 3


def test_digests_skip_what_is_not_a_regular_file(folder: Path) -> None:
    assert set(resume.image_digests(images.list_images(folder))) == {"a.png"}

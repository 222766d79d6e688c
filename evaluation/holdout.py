"""The six non-Kodak photos that packages are chosen on, written out as PNG.

Kodak is for reporting only, so model and rule decisions need photos the training never saw. These
ship inside scikit-image and matplotlib, so anyone can rebuild the exact decision set offline:
``python -m aeic.evaluation.holdout runs/nonkodak`` then ``aeic eval --images runs/nonkodak ...``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle_left() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


HOLDOUT_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle_left": _motorcycle_left,
    "grace_hopper": _grace_hopper,
}


def write_holdout_photos(folder: Path) -> list[Path]:
    """Write every holdout photo as ``<name>.png`` (RGB, 8 bit) into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, load in HOLDOUT_PHOTOS.items():
        path = folder / f"{name}.png"
        Image.fromarray(load()).convert("RGB").save(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="where to write the PNG files")
    args = p.parse_args(argv)
    for path in write_holdout_photos(args.folder):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

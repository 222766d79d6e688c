"""`python -m aeic.demo --images DIR` runs with the receiver extra alone, which has no scikit-image.

The demo's PSNR used skimage.metrics: an installed receiver ran the whole demo (encode, upload, decode)
and then died with a traceback at the results table. Checked here with skimage blocked, from a working
directory outside the repository (as an installed package runs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from aeic.evaluation.metrics import PSNR_CAP_DB
from import_blocking import blocking_prelude

WITHOUT_SKIMAGE = blocking_prelude("skimage") + textwrap.dedent(
    """
    import numpy as np
    from aeic.demo import Result, load_photos

    original = np.zeros((4, 4, 3), np.uint8)
    result = Result("x", original, b"", 0.0)
    result.reconstruction = np.full_like(original, 16)
    print(round(result.psnr, 4))  # 10 log10(255^2 / 16^2)
    result.reconstruction = original.copy()
    print(result.psnr)
    try:
        load_photos(None, 1, 64)
    except SystemExit as exc:
        print(exc)
    """
)


def test_demo_psnr_and_sample_photos_without_scikit_image(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_SKIMAGE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    psnr, identical, message = result.stdout.strip().splitlines()
    assert float(psnr) == 24.0484
    assert float(identical) == PSNR_CAP_DB  # the same cap as aeic eval, not inf
    assert "--images DIR" in message and "scikit-image" in message

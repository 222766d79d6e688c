"""The non-Kodak decision photos rebuild offline, at the sizes the recorded results name."""

import json
from pathlib import Path

from aeic.evaluation.holdout import main
from PIL import Image

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "nonkodak_nano_se.json"


def test_holdout_photos_match_the_recorded_decision_set(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 0
    written = {p.name: Image.open(p) for p in sorted(tmp_path.glob("*.png"))}
    recorded = {(r["image"], r["width"], r["height"]) for r in json.loads(RESULTS.read_text())["rows"]}
    assert {(name, im.width, im.height) for name, im in written.items()} == recorded
    assert all(im.mode == "RGB" for im in written.values())

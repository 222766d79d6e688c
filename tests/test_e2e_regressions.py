"""Defects found by running the real programs together (end-to-end regression pass)."""

from __future__ import annotations

import pytest
from aeic.codec import cli as codec_cli


def test_aeic_decode_help_says_output_is_a_folder(capsys: pytest.CaptureFixture[str]) -> None:
    # `aeic decode x.aeic -o y.png` made a folder named y.png; the help did not say -o takes a folder
    # (encode's did).
    with pytest.raises(SystemExit):
        codec_cli.build_parser().parse_args(["decode", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "output folder" in help_text
    assert "model package folder" in help_text

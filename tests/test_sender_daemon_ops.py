"""The sender as a long-running agent, as an operator meets it: settings mistakes, a folder that goes
away, a folder of thousands of photos. The command layer runs in-process with a codec double."""

from __future__ import annotations

from pathlib import Path

import pytest
from aeic.sender import cli
from aeic.sender.config import SenderConfig
from aeic.sender.report import Reporter
from sender_support import ContainerCodec

pytest.importorskip("aeic.sender.encoder")  # the command layer catches the encoder's BudgetError


@pytest.mark.parametrize("command", ["watch", "camera"])
@pytest.mark.parametrize(("setting", "told"), [("AEIC_TOKEN", "no device token"), ("AEIC_RECEIVER_URL", "no receiver URL")])
def test_a_daemon_missing_a_receiver_setting_stops_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    command: str, setting: str, told: str,
) -> None:
    """systemd restarts a failed agent every 5 s: each start loaded the model (seconds of a Pi's CPU)
    before saying that the token or URL was missing."""
    loaded: list[str] = []

    def factory(config: SenderConfig, reporter: Reporter) -> ContainerCodec:
        loaded.append("model")
        return ContainerCodec()

    monkeypatch.delenv("AEIC_SENDER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name, value in (("AEIC_TOKEN", "device-token"), ("AEIC_RECEIVER_URL", "http://127.0.0.1:9")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(setting)
    (tmp_path / "outbox").mkdir()
    argv = ["watch", str(tmp_path / "outbox")] if command == "watch" else ["camera", "--source", "0"]
    assert cli.main(argv, codec_factory=factory) == cli.EXIT_USAGE
    assert loaded == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and told in err[0]

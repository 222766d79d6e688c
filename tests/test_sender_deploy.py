"""deploy/sender: the systemd unit is valid and the install guide matches the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aeic.sender.cli import COMMANDS, build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "sender"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "aeic-sender.service"
    unit.write_text((DEPLOY / "aeic-sender.service").read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The only complaint allowed here is that the agent is not installed on this machine.
    problems = [
        line for line in result.stderr.splitlines() if line.strip() and "is not executable" not in line
    ]
    assert problems == []


def test_unit_runs_a_real_command_with_the_documented_settings() -> None:
    text = (DEPLOY / "aeic-sender.service").read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "watch"
    assert "AEIC_SENDER_CONFIG=/etc/aeic/sender.toml" in text and "StateDirectory=aeic-sender" in text


def test_readme_lists_every_command() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert all(f"`aeic-send {command}" in readme or command == "send" for command in COMMANDS)


def test_an_installed_layout_finds_the_shipped_model(tmp_path: Path) -> None:
    """The guide installs the wheel: there ``aeic.shared`` sits inside ``site-packages/aeic``, not beside it
    as in a checkout, and the default model must still be found (laid out as pyproject.toml maps it)."""
    root = DEPLOY.parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    site = tmp_path / "site-packages"
    for package in ("aeic", "aeic.shared"):
        source = root / setuptools["package-dir"][package]
        target = site.joinpath(*package.split("."))
        target.mkdir(parents=True)
        for module in source.glob("*.py"):
            shutil.copy(module, target / module.name)
    (site / "aeic" / "models").symlink_to(root / "aeic" / "models")
    probe = "from aeic.shared.model_package import ModelPackage; print(ModelPackage.load().path)"
    done = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(site)}, cwd=tmp_path,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == site / "aeic" / "models" / "nano-se"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_is_hardened(tmp_path: Path) -> None:
    """systemd's own measure of what the agent may do: 7.4 (MEDIUM) before the unit dropped every capability,
    namespaces, realtime, SUID and the system calls outside @system-service; 2.0 (OK) after."""
    unit = tmp_path / "aeic-sender.service"
    unit.write_text((DEPLOY / "aeic-sender.service").read_text())
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-400:]


def test_the_hardening_leaves_the_camera_and_the_gpu_devices_open() -> None:
    """A device rule (PrivateDevices, DevicePolicy, DeviceAllow, or ProtectClock, which adds one) would close
    /dev/video* for camera mode and a Jetson's GPU devices for the CUDA provider; an empty UMask or a
    missing state directory would leave the spool's images readable or unwritable."""
    settings = [line.split("=", 1) for line in (DEPLOY / "aeic-sender.service").read_text().splitlines() if "=" in line]
    keys = {key for key, _ in settings if not key.startswith("#")}
    assert not keys & {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute",
                       "PrivateUsers", "ProcSubset", "PrivateNetwork", "IPAddressDeny"}  # fmt: skip
    assert dict(settings)["SupplementaryGroups"] == "video" and dict(settings)["UMask"] == "0077"
    assert dict(settings)["SystemCallErrorNumber"] == "EPERM"  # a call outside the set fails, not kills

"""The sender never needs torch: it imports with torch blocked, and no module names torch.

The edge device has numpy, onnxruntime, opencv-python-headless, constriction, httpx (with its
transport, httpcore), pydantic and Pillow only (and tomli on Python 3.10); any other third-party import
(even a lazy one inside a function) would break it there, so this is checked statically (the sender and
the shared modules it imports) as well as by importing. The import runs from a working directory outside
the repository, as the installed `aeic-send` does: from the repository root a bare `import sender...`
also resolves, which hid such a bug once.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from import_blocking import blocking_prelude

SENDER_DIR = Path(__file__).resolve().parent.parent / "sender"
SHARED_DIR = SENDER_DIR.parent / "shared"
# tomllib is standard from Python 3.11 on; on 3.10 config.py imports tomli (the sender extra's) in its place
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "cv2", "constriction", "httpx", "httpcore", "pydantic", "PIL", "tomli",
                       "threadpoolctl"}
STDLIB = sys.stdlib_module_names | {"tomllib"}
ALLOWED_AEIC = ("aeic.sender", "aeic.shared")

BLOCKED_IMPORT = blocking_prelude("torch") + textwrap.dedent(
    """
    import importlib, pkgutil
    import aeic.sender
    names = sorted(m.name for m in pkgutil.iter_modules(aeic.sender.__path__, "aeic.sender."))
    for name in names:
        importlib.import_module(name)
    assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    from aeic.sender.cli import build_parser
    build_parser().parse_args(["encode", "x.png", "-o", "out"])
    print("imported", len(names))
    """
)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_every_sender_module_imports_with_torch_blocked(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    count = int(result.stdout.split()[-1])
    assert count >= len(list(SENDER_DIR.glob("*.py"))) - 1  # every module but __init__


def test_sender_sources_import_only_the_edge_dependencies() -> None:
    offenders = []
    for path in sorted(SENDER_DIR.glob("*.py")) + sorted(SHARED_DIR.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "aeic":
                ok = name == "aeic" or name.startswith(ALLOWED_AEIC)
            else:
                ok = top in STDLIB or top in ALLOWED_THIRD_PARTY
            if not ok:
                offenders.append(f"{path.parent.name}/{path.name}: {name}")
    assert offenders == []


def test_aeic_decode_without_torch_names_the_extra(tmp_path: Path) -> None:
    """The sender extra installs the `aeic` command too; its receiver path says what to install."""
    script = textwrap.dedent(
        """
        import sys

        class NoTorch:  # as in a venv without torch
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoTorch())
        from aeic.codec.cli import main
        sys.exit(main(["decode", "photo.aeic"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: `aeic decode` needs torch, which this install lacks: " \
                                    "pip install 'aeic[receiver]'"


CAMERA_WITHOUT_OPENCV = blocking_prelude("cv2") + textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import aeic.sender
    names = [m.name for m in pkgutil.iter_modules(aeic.sender.__path__, "aeic.sender.")]
    for name in names:
        if name != "aeic.sender.camera":
            importlib.import_module(name)
    from aeic.sender.cli import main
    sys.exit(main(["camera", "--source", "0", "--to", "http://127.0.0.1:9", "--spool", "spool"]))
    """
)


def test_the_sender_without_opencv_works_and_camera_says_which_extra_it_needs(tmp_path: Path) -> None:
    """OpenCV is the `camera` extra's (173 MB of the sender's 360): the rest of the sender imports without it, and
    `aeic-send camera` is one line naming the extra, before any model loads."""
    result = subprocess.run(
        [sys.executable, "-c", CAMERA_WITHOUT_OPENCV], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=False, env={**os.environ, "AEIC_TOKEN": "device-token"},
    )
    assert result.returncode == 2, result.stderr
    assert "needs OpenCV" in result.stderr and "aeic[camera]" in result.stderr and "Traceback" not in result.stderr

"""Package code imports its own modules as `aeic.<subpackage>...`, never as bare `sender`, `receiver`,
`shared`, ...: those names resolve only from the repository root (its folders become namespace
packages there), so such an import passes every test run from the root and breaks the installed wheel
(`aeic-send` once failed with "No module named 'sender'"). Checked statically over every package folder,
and by importing every receiver module from a working directory outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# pyproject's package-dir: the folders whose modules are installed as aeic.<name>.
PACKAGE_DIRS = ("aeic", "shared", "sender", "receiver", "codec", "training", "evaluation")
BARE = {"shared", "sender", "receiver", "codec", "training", "evaluation"}

IMPORT_RECEIVER = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import aeic.receiver
    names = sorted(m.name for m in pkgutil.walk_packages(aeic.receiver.__path__, "aeic.receiver."))
    for name in names:
        importlib.import_module(name)
    assert not [m for m in sys.modules if m.split(".")[0] in %r], "a bare first-party module was imported"
    print("imported", len(names))
    """
) % (sorted(BARE),)


def test_package_modules_import_first_party_code_as_aeic() -> None:
    offenders = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in BARE]
    assert offenders == []


def test_every_receiver_module_imports_outside_the_repository(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", IMPORT_RECEIVER], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= len(list((ROOT / "receiver").rglob("*.py"))) - 3  # not __init__s

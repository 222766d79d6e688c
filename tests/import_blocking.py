"""A script prelude that makes importing some packages fail, for tests run in a fresh interpreter.

The sender must run without torch and the demo without scikit-image; a subprocess that starts with
:func:`blocking_prelude` proves it, however the test machine's environment is stocked.
"""

from __future__ import annotations


def blocking_prelude(*packages: str) -> str:
    """Python source that, run first, makes ``import P`` (and ``P.anything``) fail for each P as a package that is
    not installed does: ModuleNotFoundError naming the module."""
    return (
        "import sys\n\n"
        "class _BlockImports:\n"
        f"    blocked = {tuple(packages)!r}\n\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.blocked:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked in this test)', name=name)\n"
        "        return None\n\n"
        "sys.meta_path.insert(0, _BlockImports())\n"
    )

"""``make bench``: run every benchmark (each in its own process), then refresh the README table.

Every benchmark writes JSON to ``benchmarks/results/``; the table between the README's
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers is regenerated from those files
(``--table-only`` skips the runs), and the same table is written to
``benchmarks/results/table.md``. A failing benchmark is reported and the others still run.

Usage: python -m benchmarks.run_all [--only entropy,model,sender,receiver] [--table-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .machine import RESULTS_DIR
from .table import render, update_readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ("entropy", "model", "sender", "receiver")


def _receiver_package(tmp: Path) -> Path:
    """The shipped package, or a random-weight nano-se one (the JSON records which)."""
    from aeic.shared.model_package import default_model_dir

    shipped = default_model_dir()
    if (shipped / "manifest.json").is_file():
        return shipped
    import torch
    from aeic.codec.export import export_package
    from aeic.codec.model import AEICModel
    from aeic.codec.presets import preset

    torch.manual_seed(0)
    return export_package(AEICModel(preset("nano-se")), tmp / "nano-se-random")


def command(name: str, tmp: Path) -> list[str]:
    python = [sys.executable, "-m"]
    if name == "receiver":
        return python + ["benchmarks.receiver_bench", "--model", str(_receiver_package(tmp)), "--repeats", "1",
                         "--out", str(RESULTS_DIR / "receiver.json")]
    module = {"entropy": "entropy_coding_bench", "model": "model_bench", "sender": "sender_bench"}[name]
    return python + [f"benchmarks.{module}"]


def run(selected: list[str]) -> list[str]:
    failed = []
    with tempfile.TemporaryDirectory(prefix="aeic-bench-") as tmp:
        for name in selected:
            argv = command(name, Path(tmp))
            print(f"== {name}: {' '.join(argv[2:])}", flush=True)
            start = time.perf_counter()
            done = subprocess.run(argv, cwd=ROOT, check=False)
            print(f"== {name}: exit {done.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
            if done.returncode != 0:
                failed.append(name)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every benchmark and refresh the README table")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--table-only", action="store_true", help="only regenerate the README table")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    selected = [name for name in args.only.split(",") if name]
    if set(selected) - set(BENCHMARKS):
        parser.error(f"unknown benchmarks: {sorted(set(selected) - set(BENCHMARKS))}")
    failed = [] if args.table_only else run(selected)
    table = render(RESULTS_DIR)
    (RESULTS_DIR / "table.md").write_text(table + "\n")
    if update_readme(args.readme, table):
        print(f"README table updated: {args.readme}")
    else:
        print(f"no {args.readme}: table written to {RESULTS_DIR / 'table.md'} only", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

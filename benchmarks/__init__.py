"""AEIC benchmark suite: each module measures one part and writes JSON to ``benchmarks/results/``.

Run everything with ``python -m benchmarks.run_all`` (``make bench``) from the repository root.
"""

"""The paper's points on the RD plots: drawn beside whatever photos were evaluated, so they must say whose."""

from __future__ import annotations

from aeic.evaluation.paper_points import PAPER_POINTS


def test_the_paper_curve_says_it_is_kodak() -> None:
    """A user's own photos are plotted beside the paper's Kodak means; unlabelled, they read as comparable."""
    assert PAPER_POINTS and all("Kodak" in name for name in PAPER_POINTS)

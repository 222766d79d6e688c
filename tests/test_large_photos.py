"""20-24 MP camera photos are coded whole under a budget: at 4096x4096 padded coded pixels the decode limit
sent every one of them at half size, which the receiver scaled back with little texture left (a 20 MP photo
at 0.02 bpp: texture 0.14 at 1/2, 0.56 whole; docs/evaluation.md)."""

from __future__ import annotations

import pytest
from aeic.sender.coding_scale import budget_downscales, downscale_for_budget
from aeic.shared import decode_limits

# Camera sensors of 20-24 MP (landscape; the tests turn them too) and the 20 MP training photo measured.
CAMERA_PHOTOS = [(6000, 4000), (6048, 4024), (5472, 3648), (6028, 3391)]


@pytest.mark.parametrize(("width", "height"), CAMERA_PHOTOS + [(h, w) for w, h in CAMERA_PHOTOS])
@pytest.mark.parametrize("bpp", [0.01, 0.02])
def test_a_20_to_24_mp_camera_photo_is_coded_whole_under_a_budget(width: int, height: int, bpp: float) -> None:
    target_bytes = int(width * height * bpp / 8)
    assert decode_limits.oversize_reason(height, width, 1) is None
    assert downscale_for_budget(height, width, target_bytes) == 1
    assert budget_downscales(height, width, target_bytes)[:2] == [1, 2]  # half size only if whole overflows


def test_the_coded_limit_is_6144x4096_padded_whatever_the_shape() -> None:
    assert decode_limits.MAX_CODED_PIXELS == 6144 * 4096
    assert decode_limits.oversize_reason(4096, 6144, 1) is None
    assert decode_limits.oversize_reason(4992, 4992, 1) is None  # a square of the same pixel count
    for height, width in [(4096, 6145), (4097, 6144), (5120, 5120), (6720, 4480)]:  # 30 MP is over it
        assert "coded pixels" in (decode_limits.oversize_reason(height, width, 1) or "")
        assert decode_limits.oversize_reason(height, width, 2) is None  # coded at half size instead


def test_the_largest_coded_picture_costs_the_most() -> None:
    """The price a receiver charges (rate limit, fair queue, decode deadline) for the largest stream."""
    largest = decode_limits.decode_cost(4096, 6144, 1)
    assert largest == pytest.approx(11.42, abs=0.01)
    assert decode_limits.decode_cost(4000, 6000, 1) == pytest.approx(11.16, abs=0.01)  # a 24 MP photo whole
    assert decode_limits.decode_cost(8192, 8192, 2) < largest  # the most output pixels

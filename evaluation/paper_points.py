"""Published rate-distortion points of the paper, for the RD plots.

Source: "Ultra-Low Bitrate Perceptual Image Compression with Shallow Encoder" (AEIC), arXiv 2512.12229,
Kodak RD curve of AEIC-SE, as transcribed in this project's issue 4. Only numbers stated there are kept:
the paper's AEIC-ME curve and its perceptual-metric curves are not transcribed, so they are absent.
"""

from __future__ import annotations

# name -> metric -> list of (bpp, value), Kodak-24 means
PAPER_POINTS: dict[str, dict[str, list[tuple[float, float]]]] = {
    "AEIC-SE (paper, Kodak)": {
        "psnr": [(0.0041, 18.99), (0.0079, 20.17), (0.0143, 21.30), (0.0241, 22.16), (0.0370, 22.90)],
    },
}

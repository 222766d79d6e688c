"""AEIC: ultra-low bitrate perceptual image compression with a shallow encoder.

The distribution is one namespace: ``aeic.shared`` (wire format and entropy coding used by
both sides, numpy only), ``aeic.sender`` (edge device, onnxruntime, no torch),
``aeic.receiver`` (FastAPI service and diffusion decoder), ``aeic.codec`` (the PyTorch model
and its export), ``aeic.training`` and ``aeic.evaluation``.
"""

__version__ = "0.1.0"

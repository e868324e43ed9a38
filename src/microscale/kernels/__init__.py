"""Fast quantization paths, bit-identical to :mod:`microscale.reference`.

Each entry point returns ``None`` when it does not cover a request (format, rounding, scale mode,
dtype, compat mode); the public verbs in :mod:`microscale.quantize` then fall back to the reference.
"""

from __future__ import annotations

import torch

__all__ = ["fake_quantize", "quantize", "dequantize"]


def fake_quantize(x: torch.Tensor, fmt, axis: int, rounding: str, scale_mode: str, seed: int | None,
                  compat: str | None) -> torch.Tensor | None:
    """quantize + dequantize of ``x`` in its own dtype, or None when not covered."""
    return None


def quantize(x: torch.Tensor, fmt, axis: int, rounding: str, scale_mode: str, seed: int | None,
             compat: str | None):
    """Packed (codes, scales) in blocked order, or None when not covered."""
    return None


def dequantize(q, dtype: torch.dtype) -> torch.Tensor | None:
    """Dense tensor from an MXTensor, or None when not covered."""
    return None

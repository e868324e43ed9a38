"""Quantization options shared by the reference quantizer and every backend.

The option checks (rounding, scale mode, compatibility mode), the stochastic-rounding seed and the
counter-based random stream live here, not in the oracle (reference.py), so that fast backends use the
same definitions without importing the oracle's internals. The modes themselves are defined in
reference.py's module docstring (OCP MX v1.0 §6.3 for "even" rounding and "floor" scales).
"""

from __future__ import annotations

import math

import torch

from .formats import COMPAT_MODES, Rounding, ScaleMode
from .layout import BlockLayout, to_blocks

__all__ = ["COMPAT_MODES", "check_rounding", "check_scale_mode", "check_compat", "draw_seed", "resolve_seed",
           "stochastic_uniform", "element_uniforms"]

_M32 = 0xFFFFFFFF


def check_rounding(rounding: str | Rounding) -> Rounding:
    """``rounding`` as a :class:`~microscale.formats.Rounding` (it equals the string), else ValueError
    listing the choices."""
    return Rounding(rounding)


def check_scale_mode(scale_mode: str | ScaleMode) -> ScaleMode:
    """``scale_mode`` as a :class:`~microscale.formats.ScaleMode` (it equals the string), else ValueError
    listing the choices."""
    return ScaleMode(scale_mode)


def check_compat(compat: str | None) -> str | None:
    """``compat`` itself when it is one of :data:`COMPAT_MODES`, else ValueError."""
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    return compat


def draw_seed(generator: torch.Generator | None) -> int:
    """One 32-bit seed from ``generator`` (or torch's global RNG when None)."""
    return int(torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64).item())


def resolve_seed(rounding: str, generator: torch.Generator | None, seed: int | None) -> int | None:
    """The stochastic-rounding seed of one call: ``seed`` (mod 2^32) when given, else one drawn from
    ``generator``; None for deterministic roundings (nothing is drawn, so the RNG state is untouched)."""
    if rounding != "stochastic":
        return None
    return int(seed) & _M32 if seed is not None else draw_seed(generator)


def stochastic_uniform(seed, index: torch.Tensor) -> torch.Tensor:
    """32-bit hash h(seed, index) as int64 in [0, 2^32): u = h / 2^32 is the rounding offset.

    h = lowbias32((index * 0x9E3779B9 + seed) mod 2^32) with lowbias32 (C. Wellons' 32-bit integer
    hash: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16, all mod 2^32).
    ``index`` is each element's flat position in the input tensor, so the stream does not depend on
    blocking, threading or which backend runs; the C kernels implement the same function on uint32.
    Pure tensor ops on ``index``'s device; ``seed`` may be an int or a 0-d int64 tensor.
    """
    h = (index.to(torch.int64) * 0x9E3779B9 + (seed & _M32)) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def element_uniforms(x_shape, layout: BlockLayout, seed: int) -> torch.Tensor:
    """:func:`stochastic_uniform` offsets of every element of a tensor of ``x_shape``, in the blocked order
    of ``layout`` (layout.py), each indexed by the element's flat position in the input tensor (CPU)."""
    idx = torch.arange(math.prod(x_shape), dtype=torch.int64).reshape(x_shape)
    return stochastic_uniform(seed, to_blocks(idx, layout))

"""Public verbs: quantize, dequantize, fake_quantize.

They validate arguments, draw the stochastic-rounding seed once, and dispatch to a fast kernel when one
covers the request (microscale.kernels), else to the reference quantizer (microscale.reference). Both
paths give the same bits; tests hold them to that.

Shapes without data: on the ``meta`` device nothing is computed; ``fake_quantize`` returns a meta tensor
of x's shape and dtype and ``quantize`` an MXTensor whose components are meta tensors of the sizes
:func:`microscale.tensor.component_specs` gives (so a model can be planned on ``meta``). Empty tensors
(a zero dimension other than the block axis) work in every format and give empty components.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .formats import BlockFormat, get_format
from .reference import (COMPAT_MODES, cast_values, check_rounding, check_scale_mode, dequantize_blocks, draw_seed,
                        quantize_reference)
from .layout import from_blocks, make_layout
from .tensor import MXTensor, check_out, component_specs

__all__ = ["quantize", "dequantize", "fake_quantize", "packed_linear"]

_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_args(x, fmt, axis, rounding, scale_mode, compat) -> tuple[BlockFormat, str]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"expected a float32, bfloat16, float16 or float64 tensor, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"expected a dense (strided) tensor, got layout {x.layout}")
    fmt = get_format(fmt)
    check_rounding(rounding)
    scale_mode = check_scale_mode(scale_mode or fmt.scale_mode)
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    if fmt.element is not None:
        make_layout(x.shape, axis, fmt.block_size)  # validates axis and its length
    return fmt, scale_mode


def _seed(rounding: str, generator: torch.Generator | None, seed: int | None) -> int | None:
    if rounding != "stochastic":
        return None
    return int(seed) & 0xFFFFFFFF if seed is not None else draw_seed(generator)


def quantize(x: torch.Tensor, fmt: str | BlockFormat, axis: int = -1, rounding: str = "even",
             scale_mode: str | None = None, generator: torch.Generator | None = None,
             compat: str | None = None, seed: int | None = None) -> MXTensor:
    """Quantize ``x`` to a packed :class:`MXTensor` in blocks of ``fmt.block_size`` along ``axis``.

    OCP MX v1.0 §6.3 by default (floor scale, round half to even, saturating elements). ``rounding`` in
    {"even", "away", "zero", "stochastic"}; ``scale_mode`` in {"floor", "ceil", "even", "rceil"}
    (default: the format's); ``generator``/``seed`` make stochastic rounding reproducible;
    ``compat="microxcaling"`` reproduces microsoft/microxcaling's numerics. Ragged axis lengths are zero
    padded to whole blocks internally; the MXTensor keeps the original shape.
    """
    fmt, scale_mode = _check_args(x, fmt, axis, rounding, scale_mode, compat)
    if fmt.element is None:
        raise ValueError("format 'none' does not quantize: there is nothing to pack")
    if x.device.type == "meta":  # shapes only
        layout = make_layout(x.shape, axis, fmt.block_size)
        parts = {name: torch.empty(shape, dtype=dtype, device="meta")
                 for name, (dtype, shape) in component_specs(layout.shape, layout.axis, fmt).items()}
        return MXTensor(shape=layout.shape, axis=layout.axis, format=fmt, **parts)
    s = _seed(rounding, generator, seed)
    x = x.detach()
    fast = kernels.quantize(x, fmt, axis, rounding, scale_mode, s, compat)
    if fast is not None:
        codes, scales, layout, *micro = fast  # two-level formats: + packed microexponents
        return MXTensor(codes, scales, layout.shape, layout.axis, fmt, *micro)
    q, layout = quantize_reference(x, fmt, axis, rounding, scale_mode, compat=compat, seed=s)
    return MXTensor.from_blocks(q, layout, fmt)


def dequantize(q: MXTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an MXTensor to a dense tensor (same as ``q.dequantize(dtype)``)."""
    if not isinstance(q, MXTensor):
        raise TypeError(f"expected an MXTensor, got {type(q).__name__}")
    return q.dequantize(dtype)


def _fake_quantize_impl(x, fmt, axis, rounding, scale_mode, s, compat, out=None):
    if x.device.type == "meta":  # shapes only
        return torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    fast = kernels.fake_quantize(x, fmt, axis, rounding, scale_mode, s, compat, out)
    if fast is not None:
        return fast
    q, layout = quantize_reference(x, fmt, axis, rounding, scale_mode, compat=compat, seed=s)
    y = cast_values(from_blocks(dequantize_blocks(q, fmt), layout), x.dtype)
    return y if out is None else out.copy_(y)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Straight-through estimator: forward quantizes, backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx, x, fmt, axis, rounding, scale_mode, s, compat):
        return _fake_quantize_impl(x, fmt, axis, rounding, scale_mode, s, compat)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None


def fake_quantize(x: torch.Tensor, fmt: str | BlockFormat, axis: int = -1, rounding: str = "even",
                  scale_mode: str | None = None, generator: torch.Generator | None = None,
                  compat: str | None = None, seed: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize: same shape and dtype as ``x``, equal bit for bit to
    ``quantize(x, ...).dequantize(x.dtype)``. Differentiable with a straight-through gradient.
    Format "none" returns ``x`` itself. ``out``: a preallocated contiguous tensor like ``x`` to write
    into (saves the page faults of a fresh allocation in loops; not differentiable).
    """
    fmt, scale_mode = _check_args(x, fmt, axis, rounding, scale_mode, compat)
    check_out(out, x.shape, x.dtype, x.device)
    if fmt.element is None:
        return x if out is None else out.copy_(x)
    s = _seed(rounding, generator, seed)
    if x.requires_grad and torch.is_grad_enabled():
        if out is not None:
            raise ValueError("out= does not support automatic differentiation (x requires grad)")
        return _FakeQuantizeSTE.apply(x, fmt, axis, rounding, scale_mode, s, compat)
    return _fake_quantize_impl(x.detach(), fmt, axis, rounding, scale_mode, s, compat, out)


def packed_linear(x: torch.Tensor, weight: MXTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x · dequantize(weight)ᵀ + bias`` for a packed 2-D weight of shape [out, K] blocked along K.

    The result equals ``F.linear(x, weight.dequantize(x.dtype), bias)`` up to summation order; a fused
    kernel (microscale.kernels.packed_linear) decodes the codes in registers when it covers the request,
    else the weight is dequantized first. ``x``: [..., K] float32/bfloat16/float16; ``y``: [..., out] in
    x's dtype.
    """
    if not isinstance(weight, MXTensor):
        raise TypeError(f"weight must be an MXTensor, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if weight.ndim != 2 or weight.axis != 1:
        raise ValueError(f"weight must be a 2-D MXTensor [out, K] blocked along axis 1, got shape "
                         f"{weight.shape} along axis {weight.axis}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape [..., {weight.shape[1]}] (the weight's K), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")
    fast = kernels.packed_linear(x, weight, bias)
    if fast is not None:
        return fast
    return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

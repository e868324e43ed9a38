"""Public verbs: quantize, dequantize, fake_quantize, packed_linear.

They resolve their arguments once into a :class:`~microscale.formats.QuantSpec` (format object, typed
:class:`~microscale.formats.Rounding` / :class:`~microscale.formats.ScaleMode`; strings are accepted here,
at the edge, and nowhere below), draw the stochastic-rounding seed
once, and run the backend that :mod:`microscale.backends` selects (``c`` for CPU tensors, ``torch`` for
other devices, ``reference`` for what neither covers; or the one named by ``use_backend`` /
``MICROSCALE_BACKEND``). Every backend gives the same bits; tests hold them to that.

Shapes without data: on the ``meta`` device nothing is computed; ``fake_quantize`` returns a meta tensor
of x's shape and dtype and ``quantize`` an MXTensor whose components are meta tensors of the sizes
:func:`microscale.tensor.component_specs` gives (so a model can be planned on ``meta``). Empty tensors
(a zero dimension other than the block axis) work in every format and give empty components.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .formats import BlockFormat, QuantSpec, Rounding, ScaleMode
from .layout import make_layout
from .options import resolve_seed
from .tensor import MXTensor, check_out, component_specs

__all__ = ["quantize", "dequantize", "fake_quantize", "packed_linear"]

_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_args(x, fmt, axis, rounding, scale_mode, compat) -> QuantSpec:
    """Check x and resolve the request: ``fmt`` may be a name, a BlockFormat or an already resolved
    QuantSpec (then rounding / scale_mode / compat must be left at their defaults)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"expected a float32, bfloat16, float16 or float64 tensor, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"expected a dense (strided) tensor, got layout {x.layout}")
    if isinstance(fmt, QuantSpec):
        if (rounding, scale_mode, compat) != ("even", None, None):
            raise ValueError("give the options inside the QuantSpec, not next to it")
        spec = fmt
    else:
        spec = QuantSpec.resolve(fmt, rounding, scale_mode, compat)
    if spec.format.element is not None:
        make_layout(x.shape, axis, spec.format.block_size)  # validates axis and its length
    return spec


def quantize(x: torch.Tensor, fmt: str | BlockFormat | QuantSpec, axis: int = -1,
             rounding: str | Rounding = "even", scale_mode: str | ScaleMode | None = None, generator: torch.Generator | None = None,
             compat: str | None = None, seed: int | None = None) -> MXTensor:
    """Quantize ``x`` to a packed :class:`MXTensor` in blocks of ``fmt.block_size`` along ``axis``.

    OCP MX v1.0 §6.3 by default (floor scale, round half to even, saturating elements). ``rounding`` in
    {"even", "away", "zero", "stochastic"}; ``scale_mode`` in {"floor", "ceil", "even", "rceil"}
    (default: the format's); ``generator``/``seed`` make stochastic rounding reproducible;
    ``compat="microxcaling"`` reproduces microsoft/microxcaling's numerics. Ragged axis lengths are zero
    padded to whole blocks internally; the MXTensor keeps the original shape. ``fmt`` may also be a
    resolved :class:`~microscale.formats.QuantSpec` carrying the options.
    """
    spec = _check_args(x, fmt, axis, rounding, scale_mode, compat)
    if spec.format.element is None:
        raise ValueError("format 'none' does not quantize: there is nothing to pack")
    if x.device.type == "meta":  # shapes only
        layout = make_layout(x.shape, axis, spec.format.block_size)
        parts = {name: torch.empty(shape, dtype=dtype, device="meta")
                 for name, (dtype, shape) in component_specs(layout.shape, layout.axis, spec.format).items()}
        return MXTensor(shape=layout.shape, axis=layout.axis, format=spec.format, **parts)
    s = resolve_seed(spec.rounding, generator, seed)
    x = x.detach()
    p = backends.select(spec, x).quantize(x, spec, axis, s)
    return MXTensor(p.codes, p.scales, p.layout.shape, p.layout.axis, spec.format, p.micro, p.tensor_scale)


def dequantize(q: MXTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an MXTensor to a dense tensor (same as ``q.dequantize(dtype)``)."""
    if not isinstance(q, MXTensor):
        raise TypeError(f"expected an MXTensor, got {type(q).__name__}")
    return q.dequantize(dtype)


def _fake_quantize_impl(x, spec, axis, s, out=None):
    if x.device.type == "meta":  # shapes only (every format, whichever backend would run)
        return torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    return backends.select(spec, x).fake_quantize(x, spec, axis, s, out)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Straight-through estimator: forward quantizes, backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx, x, spec, axis, s):
        return _fake_quantize_impl(x, spec, axis, s)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quantize(x: torch.Tensor, fmt: str | BlockFormat | QuantSpec, axis: int = -1,
                  rounding: str | Rounding = "even", scale_mode: str | ScaleMode | None = None, generator: torch.Generator | None = None,
                  compat: str | None = None, seed: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize: same shape and dtype as ``x``, equal bit for bit to
    ``quantize(x, ...).dequantize(x.dtype)``. Differentiable with a straight-through gradient.
    Format "none" returns ``x`` itself. ``out``: a preallocated contiguous tensor like ``x`` to write
    into (saves the page faults of a fresh allocation in loops; not differentiable).
    """
    spec = _check_args(x, fmt, axis, rounding, scale_mode, compat)
    check_out(out, x.shape, x.dtype, x.device)
    if spec.format.element is None:
        return x if out is None else out.copy_(x)
    s = resolve_seed(spec.rounding, generator, seed)
    if x.requires_grad and torch.is_grad_enabled():
        if out is not None:
            raise ValueError("out= does not support automatic differentiation (x requires grad)")
        return _FakeQuantizeSTE.apply(x, spec, axis, s)
    return _fake_quantize_impl(x.detach(), spec, axis, s, out)


def packed_linear(x: torch.Tensor, weight: MXTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x · dequantize(weight)ᵀ + bias`` for a packed 2-D weight of shape [out, K] blocked along K.

    The result equals ``F.linear(x, weight.dequantize(x.dtype), bias)`` up to summation order; a fused
    kernel (the selected backend's packed_linear; for ``c``: microscale.kernels.packed_linear) decodes the
    codes in registers when it covers the request, else the weight is dequantized first. ``x``: [..., K]
    float32/bfloat16/float16; ``y``: [..., out] in x's dtype.
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
    fast = backends.packed_linear(x, weight, bias)   # the c backend: kernels.packed_linear
    if fast is not None:
        return fast
    return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

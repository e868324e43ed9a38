"""The backend interface: what every quantization backend implements, and the records it exchanges.

A backend answers :meth:`Backend.covers` (and :meth:`Backend.covers_dequantize`) with a
:class:`Coverage` that is truthy when it takes the request and carries the reason when it does not, then
runs ``quantize`` / ``fake_quantize`` / ``dequantize`` (and ``packed_linear`` where it has a fused GEMM).
Backends return storage components (:class:`Packed`), not MXTensors, so they sit below tensor.py.
Every backend is tested bit for bit against the reference quantizer (reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# QuantSpec lives with the formats (formats.py); re-exported here, where the backends always found it
from ..formats import QuantSpec
from ..layout import BlockLayout

__all__ = ["QuantSpec", "Coverage", "COVERED", "not_covered", "Packed", "Backend"]


@dataclass(frozen=True)
class Coverage:
    """A backend's answer to "do you take this request?": truthy when covered, else ``reason`` says why."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


COVERED = Coverage(True)


def not_covered(reason: str) -> Coverage:
    return Coverage(False, reason)


@dataclass(frozen=True)
class Packed:
    """Stored components of a quantized tensor (the parts of an MXTensor, see tensor.py) and its layout."""

    codes: torch.Tensor
    scales: torch.Tensor
    layout: BlockLayout
    micro: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None


class Backend:
    """Base class: a named implementation of the quantization verbs. Subclasses override what they run.

    ``quantize(x, spec, axis, seed) -> Packed``: blocks of ``spec.format`` along ``axis`` (validated by
    the caller); ``seed``: the stochastic-rounding seed (None for other roundings).
    ``fake_quantize(x, spec, axis, seed, out=None) -> Tensor``: quantize + dequantize in x's dtype.
    ``dequantize(q, dtype, out=None) -> Tensor``: an MXTensor decoded to ``dtype``.
    ``packed_linear(x, weight, bias) -> Tensor | None``: a fused x · dequantize(weight)ᵀ + bias, or None
    when the backend has no fused kernel for it (the caller dequantizes and runs F.linear).
    """

    name: str = ""
    description: str = ""

    def unavailable_reason(self) -> str | None:
        """None when the backend can run in this process, else why not (missing package, no build...)."""
        return None

    def covers(self, spec: QuantSpec, x: torch.Tensor) -> Coverage:
        raise NotImplementedError

    def covers_dequantize(self, q, dtype: torch.dtype) -> Coverage:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, spec: QuantSpec, axis: int, seed: int | None) -> Packed:
        raise NotImplementedError

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec, axis: int, seed: int | None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, q, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def packed_linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def grouped_conv(self, x: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                     dilation, groups: int, spec: QuantSpec, return_windows: bool = False):
        """A fused MX grouped convolution (input windows quantized by ``spec`` along the per-group
        reduction, see :mod:`microscale.kernels.conv`), or None when this backend has none for the request."""
        return None

    def grouped_conv_wgrad(self, x: torch.Tensor, gyq: torch.Tensor, weight_shape, stride, padding, dilation,
                           groups: int, spec: QuantSpec, return_columns: bool = False):
        """The weight gradient of that convolution without im2col (its columns quantized by ``spec`` along
        the tokens, ``gyq`` [G, O/G, tokens] quantized already), or None when this backend has none."""
        return None

    def __repr__(self) -> str:
        return f"<microscale backend {self.name!r}>"

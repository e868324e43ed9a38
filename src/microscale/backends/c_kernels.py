"""The ``c`` backend: the compiled CPU kernels of :mod:`microscale.kernels` (C/OpenMP, bit-pattern method).

Coverage is the kernels' own (kernels/__init__.py docstring): CPU tensors, float32/bfloat16/float16
inputs, power-of-two block formats within the kernels' size limits, ``compat=None``. This module only
states that coverage with reasons and adapts the kernels' returns to :class:`~.base.Packed`.
"""

from __future__ import annotations

import torch

from .. import kernels
from .base import COVERED, Backend, Coverage, Packed, QuantSpec, not_covered

__all__ = ["CBackend"]

_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _format_reason(fmt) -> str | None:
    if kernels._params(fmt) is None:
        return (f"{fmt.name} is outside the C kernels' formats (power-of-two block scales; elements of 2..8 "
                "bits; k1 <= 1024, or <= 256 with microexponents; every value an fp32 value)")
    return None


class CBackend(Backend):
    name = "c"
    description = "compiled C/OpenMP kernels (CPU; AVX-512 / AVX2 / baseline chosen at import)"

    def unavailable_reason(self) -> str | None:
        if kernels.available():
            return None
        return ("the C extension is disabled (MICROSCALE_KERNELS=0) or failed to load; reinstall with a C "
                "compiler (`pip install --no-build-isolation -e .`)")

    def covers(self, spec: QuantSpec, x: torch.Tensor) -> Coverage:
        if x.device.type != "cpu":
            return not_covered(f"the C kernels run on CPU tensors, got a {x.device.type} tensor")
        if x.dtype not in _IN_DTYPES:
            return not_covered(f"inputs float32/bfloat16/float16, got {x.dtype}")
        if spec.compat is not None:
            return not_covered(f"compat={spec.compat!r} is implemented by the reference only")
        if x.dim() == 0:
            return not_covered("0-d tensors have no axis to block")
        reason = _format_reason(spec.format)
        return not_covered(reason) if reason else COVERED

    def covers_dequantize(self, q, dtype: torch.dtype) -> Coverage:
        if q.codes.device.type != "cpu" or q.scales.device.type != "cpu":
            return not_covered(f"the C kernels run on CPU tensors, got {q.codes.device.type} components")
        if dtype not in _OUT_DTYPES:
            return not_covered(f"outputs {_OUT_DTYPES}, got {dtype}")
        reason = _format_reason(q.format)
        return not_covered(reason) if reason else COVERED

    def _ran(self, result, what: str):
        if result is None:  # covers() said yes, so the kernels must take it
            raise RuntimeError(f"microscale.kernels.{what} declined a request the c backend covers")
        return result

    # The kernels' module (kernels/__init__.py) speaks plain mode strings and maps them to the C enums; the
    # typed spec is turned into those strings here, at the one boundary.
    def quantize(self, x, spec, axis, seed):
        codes, scales, layout, *micro = self._ran(
            kernels.quantize(x, spec.format, axis, spec.rounding.value, spec.scale_mode.value, seed,
                             spec.compat), "quantize")
        return Packed(codes, scales, layout, *micro)

    def fake_quantize(self, x, spec, axis, seed, out=None):
        return self._ran(kernels.fake_quantize(x, spec.format, axis, spec.rounding.value,
                                               spec.scale_mode.value, seed, spec.compat, out), "fake_quantize")

    def dequantize(self, q, dtype, out=None):
        return self._ran(kernels.dequantize(q, dtype, out), "dequantize")

    def packed_linear(self, x, weight, bias):
        return kernels.packed_linear(x, weight, bias)

    def grouped_conv(self, x, wq, bias, stride, padding, dilation, groups, spec, return_windows=False):
        from ..kernels import conv
        if spec.compat is not None:
            return None
        return conv.conv_forward(x, wq, bias, stride, padding, dilation, groups, spec.format,
                                 spec.rounding.value, spec.scale_mode.value, return_windows)

    def grouped_conv_wgrad(self, x, gyq, weight_shape, stride, padding, dilation, groups, spec,
                           return_columns=False):
        from ..kernels import conv
        if spec.compat is not None:
            return None
        return conv.conv_wgrad(x, gyq, weight_shape, stride, padding, dilation, groups, spec.format,
                               spec.rounding.value, spec.scale_mode.value, return_columns)

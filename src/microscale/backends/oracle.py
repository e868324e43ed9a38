"""The ``reference`` backend: the float64 oracle of :mod:`microscale.reference`, unchanged.

Covers every format and option (including ``compat="microxcaling"`` and float64 inputs). It runs on CPU:
inputs on other devices are copied to the CPU and results copied back; ``meta`` tensors carry no data,
so it does not cover them.
"""

from __future__ import annotations

import torch

from ..layout import QuantizedBlocks, from_blocks
from ..packing import pack_codes
from ..reference import cast_values, dequantize_blocks, quantize_reference
from .base import COVERED, Backend, Coverage, Packed, QuantSpec, not_covered

__all__ = ["ReferenceBackend"]


def _no_data(t: torch.Tensor) -> Coverage:
    if t.device.type == "meta":
        return not_covered("the float64 oracle needs data; meta tensors carry none")
    return COVERED


class ReferenceBackend(Backend):
    name = "reference"
    description = "the float64 oracle (reference.py): every format and option; runs on CPU (slow)"

    def covers(self, spec: QuantSpec, x: torch.Tensor) -> Coverage:
        return _no_data(x)

    def covers_dequantize(self, q, dtype: torch.dtype) -> Coverage:
        return _no_data(q.codes)

    def quantize(self, x, spec, axis, seed):
        dev = x.device
        qb, layout = quantize_reference(x.cpu(), spec.format, axis, spec.rounding, spec.scale_mode,
                                        compat=spec.compat, seed=seed)
        fmt = spec.format
        micro = None if qb.micro is None else pack_codes(qb.micro, fmt.micro_bits).to(dev)
        ts = None if qb.tensor_scale is None else qb.tensor_scale.to(dev)
        return Packed(pack_codes(qb.codes, fmt.element.bits).to(dev), qb.scales.reshape(-1).contiguous().to(dev),
                      layout, micro, ts)

    def fake_quantize(self, x, spec, axis, seed, out=None):
        qb, layout = quantize_reference(x.cpu(), spec.format, axis, spec.rounding, spec.scale_mode,
                                        compat=spec.compat, seed=seed)
        y = cast_values(from_blocks(dequantize_blocks(qb, spec.format), layout), x.dtype).to(x.device)
        return y if out is None else out.copy_(y)

    def dequantize(self, q, dtype, out=None):
        qb = q.to_blocks()   # unpacked on q's device; the oracle decodes on the CPU
        qb = QuantizedBlocks(*(None if t is None else t.cpu()
                               for t in (qb.codes, qb.scales, qb.micro, qb.tensor_scale)))
        y = cast_values(from_blocks(dequantize_blocks(qb, q.format), q.layout), dtype).to(q.codes.device)
        return y if out is None else out.copy_(y)

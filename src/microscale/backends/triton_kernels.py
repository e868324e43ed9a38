"""The ``triton`` backend (placeholder until the kernels below are written)."""
from __future__ import annotations

from .base import Backend, not_covered

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    name = "triton"
    description = "hand-written Triton kernels"

    def unavailable_reason(self):
        return "not written yet"

    def covers(self, spec, x):
        return not_covered("not written yet")

    def covers_dequantize(self, q, dtype):
        return not_covered("not written yet")

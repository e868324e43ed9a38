"""The ``triton`` backend: hand-written Triton kernels for quantize / fake-quantize / dequantize.

An optional extra (``pip install triton``): it runs on a GPU that Triton supports, or on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``, slow: for testing). The automatic choice never picks it;
select it with ``use_backend("triton")`` or ``MICROSCALE_BACKEND=triton``.

The kernels do what the torch backend does (torch_native.py, the method of kernels/_mxloops.c) on one
tile of ``ROWS`` blocks x ``K`` elements per program: integer arithmetic on fp32 bit patterns, block amax
as an integer max, sub-block amax through a [ROWS, K/K2, K2] view, rounding by significand shifts,
values assembled from bit fields; every format fact is a compile-time constant (BitFacts). Data move
through the kernels as fp32 bits in blocked order ([n_blocks, K], layout.py): torch does the blocking,
the dtype conversions (exact for inputs; round-to-nearest-even with one canonical NaN for outputs) and the
sub-byte packing (packing.pack_bits), so the kernels stay small.

Covered: what the torch backend covers, with power-of-two block and sub-block sizes (tl.arange shapes).
"""

from __future__ import annotations

import functools
import os

import torch

from ..layout import from_blocks, make_layout, to_blocks
from ..packing import pack_bits, unpack_codes
from .base import COVERED, Backend, Coverage, Packed, QuantSpec, not_covered
from .bitfacts import BitFacts, bit_facts
from .torch_native import values_to_dtype

__all__ = ["TritonBackend", "triton_status"]

_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ROUND = {"even": 0, "away": 1, "zero": 2, "stochastic": 3}
_SMODE = {"floor": 0, "ceil": 1, "even": 2, "rceil": 3}
_ROWS = 16          # blocks per program


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken install)
        return f"triton is not installed or does not import ({type(e).__name__}: {e}); `pip install triton`"
    return None


def triton_status() -> str | None:
    """None when Triton kernels can run here (a GPU, or TRITON_INTERPRET=1 on CPU), else why not."""
    err = _import_error()
    if err:
        return err
    if _interpret():
        return None
    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return None
    return "no GPU for Triton here; set TRITON_INTERPRET=1 (before importing triton) to run its CPU interpreter"


@functools.lru_cache(maxsize=1)
def _kernels():
    """The @triton.jit kernels, imported on first use (importing microscale never imports triton)."""
    import triton

    from . import _triton_jit
    return triton, _triton_jit.quant_kernel, _triton_jit.dequant_kernel


def _facts_kwargs(f: BitFacts) -> dict:
    return dict(K=f.k, K2=f.k2, D2=f.d2, EMIN=f.emin, MBITS=f.mbits, MAXMAG=f.maxmag, FP=f.fp, TWOS=f.twos,
                BITS=f.bits)


def _run_quant(x: torch.Tensor, spec: QuantSpec, axis: int, seed, want_val: bool):
    f = bit_facts(spec.format)
    triton, quant_kernel, _ = _kernels()
    layout = make_layout(x.shape, axis, spec.format.block_size)
    blocks = to_blocks(x.detach().to(torch.float32).view(torch.int32), layout).contiguous()
    n = layout.n_blocks
    dev = x.device
    idx = blocks  # placeholder pointer when not stochastic (never read)
    if spec.rounding == "stochastic":
        flat = torch.arange(x.numel(), dtype=torch.int64, device=dev).reshape(x.shape)
        idx = to_blocks(flat, layout).contiguous() & 0xFFFFFFFF
    val = torch.empty_like(blocks) if want_val else blocks
    codes = blocks if want_val else torch.empty_like(blocks)
    scales = torch.empty(n, dtype=torch.int32, device=dev)
    shifts = torch.empty((n, f.k // f.k2) if f.d2 else (1,), dtype=torch.int32, device=dev)
    if n:
        grid = (triton.cdiv(n, _ROWS),)
        quant_kernel[grid](blocks, idx, val, codes, scales, shifts, n, int(seed or 0) & 0xFFFFFFFF, ROWS=_ROWS,
                           MAX_N=f.max_n, MAX_P=f.max_p, EMAX=f.emax, EVEN_M=f.even_m, FLM=f.flm, SIGM=f.sigm,
                           S_EMIN=f.s_emin, S_EMAX=f.s_emax, S_BIAS=f.s_bias, S_NAN=f.s_nan,
                           SMODE=_SMODE[spec.scale_mode], RND=_ROUND[spec.rounding], WANT_VAL=want_val,
                           **_facts_kwargs(f))
    return f, layout, val, codes, scales, shifts


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


class TritonBackend(Backend):
    name = "triton"
    description = "hand-written Triton kernels (optional extra; GPU, or CPU under TRITON_INTERPRET=1)"

    def unavailable_reason(self) -> str | None:
        return triton_status()

    def _facts(self, fmt) -> Coverage:
        f = bit_facts(fmt)
        if isinstance(f, str):
            return not_covered(f)
        if not (_pow2(f.k) and _pow2(f.k2)):
            return not_covered(f"{fmt.name}: the Triton kernels take power-of-two block and sub-block sizes, "
                               f"got k1={f.k}, k2={f.k2}")
        return COVERED

    def _device(self, t: torch.Tensor) -> Coverage:
        if t.device.type == "cpu" and not _interpret():
            return not_covered("CPU tensors run under TRITON_INTERPRET=1 only")
        if t.device.type == "meta":
            return not_covered("Triton kernels need data; meta tensors carry none (use the torch backend)")
        return COVERED

    def covers(self, spec: QuantSpec, x: torch.Tensor) -> Coverage:
        if spec.compat is not None:
            return not_covered(f"compat={spec.compat!r} is implemented by the reference only")
        if x.dtype not in _IN_DTYPES:
            return not_covered(f"inputs float32/bfloat16/float16, got {x.dtype}")
        return self._device(x) and self._facts(spec.format)

    def covers_dequantize(self, q, dtype: torch.dtype) -> Coverage:
        if dtype not in _OUT_DTYPES:
            return not_covered(f"outputs {_OUT_DTYPES}, got {dtype}")
        return self._device(q.codes) and self._facts(q.format)

    def fake_quantize(self, x, spec, axis, seed, out=None):
        _, layout, val, _, _, _ = _run_quant(x, spec, axis, seed, True)
        y = values_to_dtype(val, layout, x.dtype)
        return y if out is None else out.copy_(y)

    def quantize(self, x, spec, axis, seed):
        f, layout, _, codes, scales, shifts = _run_quant(x, spec, axis, seed, False)
        micro = pack_bits(shifts.to(torch.uint8), f.d2) if f.d2 else None
        return Packed(pack_bits(codes.to(torch.uint8), f.bits), scales.to(torch.uint8), layout, micro)

    def dequantize(self, q, dtype, out=None):
        f = bit_facts(q.format)
        triton, _, dequant_kernel = _kernels()
        layout = q.layout
        n, k = layout.n_blocks, layout.block_size
        codes = unpack_codes(q.codes, f.bits, layout.n_elements_padded).to(torch.int32).reshape(n, k)
        scales = q.scales.to(torch.int32).contiguous()
        micro = (unpack_codes(q.micro, f.d2, n * (k // f.k2)).to(torch.int32).reshape(n, k // f.k2) if f.d2
                 else scales)
        out64 = dtype == torch.float64
        res = torch.empty((n, k), dtype=torch.int64 if out64 else torch.int32, device=q.codes.device)
        if n:
            dequant_kernel[(triton.cdiv(n, _ROWS),)](codes, scales, micro, res, n, ROWS=_ROWS, INF_MAG=f.inf_mag,
                                                      S_BIAS=f.s_bias, S_NAN=f.s_nan, OUT64=out64,
                                                      **_facts_kwargs(f))
        y = from_blocks(res.view(torch.float64), layout) if out64 else values_to_dtype(res, layout, dtype)
        return y if out is None else out.copy_(y)

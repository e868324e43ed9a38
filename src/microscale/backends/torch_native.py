"""The ``torch`` backend: quantization in pure tensor ops on the fp32 bit pattern, on any device.

Same method as the C kernels (kernels/_mxloops.c) and bit for bit equal to the reference quantizer
(reference.py, OCP MX v1.0 §6.3; BDR two-level rules of docs/bdr.md): a value's fp32 bits are split into
an exact exponent (= floor(log2 |v|), subnormals normalized through an exact int -> float conversion)
and a 24-bit significand; the block's shared exponent comes from the integer max of the magnitude bits;
each element is rounded by shifting its significand (even / away / zero, or stochastic with the shared
counter-based hash of options.stochastic_uniform), saturated by clamping its magnitude code, and its
dequantized value N * 2^P is assembled from bit fields. There is no floating-point arithmetic on data,
so results do not depend on flush-to-zero, fast-math or evaluation order; no data-dependent Python
control flow, so ``torch.compile(fullgraph=True)`` traces it (inductor turns it into Triton code on a
GPU) and ``meta`` tensors give results of the right shapes and dtypes.

A single-level format is the two-level case with one sub-block per block and no microexponent, so one
code path serves OCP MX, MSFP/BFP and MX9/MX6/MX4 (see bitfacts.py for the coverage rule).
"""

from __future__ import annotations

import torch

from ..layout import from_blocks, make_layout, to_blocks
from ..options import stochastic_uniform
from ..packing import pack_bits, unpack_codes
from .base import COVERED, Backend, Coverage, Packed, QuantSpec, not_covered
from .bitfacts import BitFacts, bit_facts

__all__ = ["TorchBackend", "quantize_bits", "fake_quantize_bits", "dequantize_parts", "values_to_dtype"]

_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT32_MIN = -(2**31)
_NAN32 = 0x7FC00000
_INF32 = 0x7F800000


# ---- bit-field helpers (int32 unless said otherwise) -------------------------------------------------
def _split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|v| = sig * 2^(e - 23) for fp32 magnitude bits ``a`` (finite, > 0): exact exponent e = floor(log2|v|)
    and 24-bit significand sig in [2^23, 2^24); subnormals are normalized by an exact int -> fp32
    conversion of their mantissa. (a == 0 gives e = -276 and sig = 2^23: callers mask zeros.)"""
    ef = a >> 23
    man = a & 0x7FFFFF
    fb = man.to(torch.float32).view(torch.int32)
    e = torch.where(ef > 0, ef - 127, (fb >> 23) - 276)
    sig = torch.where(ef > 0, man, fb & 0x7FFFFF) | 0x800000
    return e, sig


def _shl(a: torch.Tensor, s) -> torch.Tensor:
    return torch.bitwise_left_shift(a, s)


def _shr(a: torch.Tensor, s) -> torch.Tensor:
    return torch.bitwise_right_shift(a, s)


def _shared_exponent(amax: torch.Tensor, f: BitFacts, scale_mode: str) -> torch.Tensor:
    """Block exponent X from amax bits (finite, >= 0), reference.shared_exponent's four rules, clamped to
    the scale's range; an all-zero block gets the smallest scale."""
    e, sig = _split(amax)
    if scale_mode == "floor":
        x = e - f.emax
    elif scale_mode == "ceil":        # +1 unless amax is a power of two
        x = e + (sig != 0x800000).to(torch.int32) - f.emax
    elif scale_mode == "even":        # amax rounded (half away) to even_m mantissa bits carries a binade
        x = e + _shr(sig + (1 << (22 - f.even_m)), 24) - f.emax
    else:                             # rceil: ceil(log2(amax / max element))
        x = e - f.flm + (sig > f.sigm).to(torch.int32)
    x = x.clamp(f.s_emin, f.s_emax)
    return torch.where(amax == 0, f.s_emin, x)


def _value_bits(n: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """fp32 bits of n * 2^p (n in [0, 2^24), exact fp32 values; Inf when it overflows fp32), built from
    bit fields: a normal result adds p to n's exponent field, a subnormal one is n shifted into place."""
    nb = n.to(torch.float32).view(torch.int32)
    fe = (nb >> 23) + p
    normal = (fe.clamp(1, 254) << 23) | (nb & 0x7FFFFF)
    sub = _shl(n, (p + 149).clamp(0, 22))
    v = torch.where(fe >= 1, normal, sub)
    v = torch.where(fe >= 255, _INF32, v)
    return torch.where(n == 0, 0, v)


def _value_bits64(n: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """fp64 bits (int64) of n * 2^p: every such value is a normal float64."""
    nb = n.to(torch.float64).view(torch.int64)
    return torch.where(n == 0, 0, nb + (p.to(torch.int64) << 52))


_CANONICAL_NAN16 = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


def values_to_dtype(v: torch.Tensor, layout, dtype: torch.dtype) -> torch.Tensor:
    """fp32 value bits in blocked order -> a tensor of ``layout.shape`` and ``dtype`` (float32, bfloat16 or
    float16): round to nearest even (torch's conversion; exact for every MX value) with each dtype's
    canonical quiet NaN written as an integer, as reference.cast_values does (a float NaN fill would let
    the conversion or a compiler choose the payload)."""
    y = from_blocks(v.view(torch.float32), layout)
    if dtype == torch.float32:
        return y
    nan = from_blocks((v & 0x7FFFFFFF) > _INF32, layout)
    return torch.where(nan, _CANONICAL_NAN16[dtype], y.to(dtype).view(torch.int16)).view(dtype)


def _round_significand(sig, sh, rounding: str, u):
    """sig * 2^-sh rounded to an integer (sig < 2^24, sh >= 1). Deterministic modes add half (away), half
    minus one plus the kept lsb (even) or nothing (zero) before shifting; sh >= 25 leaves 0. Stochastic:
    floor(t + u 2^-32) evaluated as the reference does in float64, where the sum rounds to 53 bits: with
    W = t 2^54, the result carries once u 2^22 + frac(W) >= 2^54 - 1 (see the C kernel's quant_elem)."""
    if rounding == "stochastic":
        s64 = sig.to(torch.int64)
        sh64 = sh.to(torch.int64)
        w = torch.where(sh64 <= 54, _shl(s64, (54 - sh64).clamp(0, 62)), _shr(s64, (sh64 - 54).clamp(0, 62)))
        carry = ((u << 22) + (w & ((1 << 54) - 1))) >= (1 << 54) - 1
        return (_shr(w, 54) + carry.to(torch.int64)).to(torch.int32)
    sh = sh.clamp(max=25)
    if rounding == "zero":
        return _shr(sig, sh)
    half = _shl(torch.ones_like(sh), sh - 1)
    if rounding == "away":
        return _shr(sig + half, sh)
    return _shr(sig + half - 1 + (_shr(sig, sh) & 1), sh)  # even


def _blocked_exponents(a: torch.Tensor, f: BitFacts, scale_mode: str):
    """Per block [n, k] magnitude bits: (special block mask [n], scale exponent X [n], microexponent
    shifts [n, k1/k2], element exponent X - s_j per element [n, k])."""
    n = a.shape[0]
    amax = a.amax(dim=1)
    special = amax >= _INF32
    x = _shared_exponent(torch.where(special, 0, amax), f, scale_mode)
    if f.d2:
        sub = a.reshape(n, f.k // f.k2, f.k2).amax(dim=2)
        e_sub, _ = _split(sub)
        shift = torch.where(sub > 0, (x[:, None] + f.emax - e_sub).clamp(0, f.beta), f.beta)
        shift = torch.where(special[:, None], 0, shift)
        xe = (x[:, None] - shift).repeat_interleave(f.k2, dim=1)
    else:
        shift = None
        xe = x[:, None].expand(n, f.k)
    return special, x, shift, xe


def _quantize_elements(b: torch.Tensor, xe: torch.Tensor, f: BitFacts, rounding: str, u):
    """Element codes and the (N, P, negative) parts of their values for fp32 bits ``b`` at exponents ``xe``."""
    neg = b < 0
    a = b & 0x7FFFFFFF
    e, sig = _split(a)
    d = e - xe - f.emin
    sh = 23 - f.mbits + (-d).clamp(min=0)
    r = _round_significand(sig, sh, rounding, u)
    r = torch.where(a == 0, 0, r)
    dd = d.clamp(min=0, max=255)
    cm = (dd << f.mbits) + r
    sat = cm > f.maxmag
    cm = cm.clamp(max=f.maxmag)
    if f.twos:
        code = torch.where(neg, -cm, cm) & ((1 << f.bits) - 1)
    else:
        code = cm | torch.where(neg, 1 << (f.bits - 1), 0)
    n_val = torch.where(sat, f.max_n, r)
    p_val = torch.where(sat, f.max_p, dd + f.emin - f.mbits) + xe
    return code, n_val, p_val, neg


def _prepare(x: torch.Tensor, fmt, axis: int, rounding: str, seed):
    layout = make_layout(x.shape, axis, fmt.block_size)
    bits = x.detach().to(torch.float32).view(torch.int32)
    blocks = to_blocks(bits, layout)
    u = None
    if rounding == "stochastic":
        idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
        u = stochastic_uniform(seed, to_blocks(idx, layout))
    return layout, blocks, u


def fake_quantize_bits(x: torch.Tensor, spec: QuantSpec, axis: int, seed=None) -> torch.Tensor:
    """quantize + dequantize of ``x`` (float32/bfloat16/float16, any device) in x's dtype and shape.
    ``seed``: int or 0-d int64 tensor (stochastic rounding only; a tensor avoids recompiling per seed)."""
    f = bit_facts(spec.format)
    layout, blocks, u = _prepare(x, spec.format, axis, spec.rounding, seed)
    a = blocks & 0x7FFFFFFF
    special, _, _, xe = _blocked_exponents(a, f, spec.scale_mode)
    _, n_val, p_val, neg = _quantize_elements(blocks, xe, f, spec.rounding, u)
    v = _value_bits(n_val, p_val)
    signed = neg if f.fp else neg & (n_val != 0)   # int codes decode to +0
    v = torch.where(signed, v | _INT32_MIN, v)
    v = torch.where(special[:, None], _NAN32, v)
    return values_to_dtype(v, layout, x.dtype)


def quantize_bits(x: torch.Tensor, spec: QuantSpec, axis: int, seed=None) -> Packed:
    """Packed codes, E8M0-kind scale codes and (two-level) packed microexponents on x's device."""
    f = bit_facts(spec.format)
    layout, blocks, u = _prepare(x, spec.format, axis, spec.rounding, seed)
    a = blocks & 0x7FFFFFFF
    special, x_blk, shift, xe = _blocked_exponents(a, f, spec.scale_mode)
    code, _, _, _ = _quantize_elements(blocks, xe, f, spec.rounding, u)
    code = torch.where(special[:, None], 0, code)
    scales = torch.where(special, f.s_nan, x_blk + f.s_bias).to(torch.uint8)
    micro = None if shift is None else pack_bits(shift.to(torch.uint8), f.d2)
    return Packed(pack_bits(code.to(torch.uint8), f.bits), scales, layout, micro)


def dequantize_parts(codes: torch.Tensor, scales: torch.Tensor, micro: torch.Tensor | None, shape, axis: int,
                     fmt, dtype: torch.dtype) -> torch.Tensor:
    """Decode stored components (tensor.py's layout) to ``dtype`` on their device, bit for bit as the
    reference's dequantize_blocks + cast_values: value = element · 2^(scale - bias - microexponent), NaN
    for the NaN scale code and NaN element codes, ±Inf for Inf codes."""
    f = bit_facts(fmt)
    layout = make_layout(shape, axis, fmt.block_size)
    n, k = layout.n_blocks, layout.block_size
    code = unpack_codes(codes, f.bits, layout.n_elements_padded).to(torch.int32).reshape(n, k)
    sc = scales.to(torch.int32)
    xe = (sc - f.s_bias)[:, None]
    if f.d2:
        m = unpack_codes(micro, f.d2, n * (k // f.k2)).to(torch.int32).reshape(n, k // f.k2)
        xe = (xe - m).repeat_interleave(f.k2, dim=1)
    else:
        xe = xe.expand(n, k)
    sbit = _shr(code, f.bits - 1) & 1
    if f.twos:
        cm = (code - _shl(sbit, f.bits)).abs()
    else:
        cm = code & ((1 << (f.bits - 1)) - 1)
    e1 = (_shr(cm, f.mbits) - 1).clamp(min=0)
    n_val = cm - _shl(e1, f.mbits)
    p_val = e1 + f.emin - f.mbits + xe
    neg = (sbit == 1) if f.fp else (sbit == 1) & (n_val != 0)
    nan = (sc == f.s_nan)[:, None]
    inf = torch.zeros_like(nan)
    if f.fp:
        elem_special = cm > f.maxmag
        inf = elem_special & (cm == f.inf_mag)
        nan = nan | (elem_special & ~inf)
    if dtype == torch.float64:
        v = _value_bits64(n_val, p_val)
        v = torch.where(inf, 0x7FF0000000000000, v)
        v = torch.where(neg, v | -(2**63), v)
        v = torch.where(nan, 0x7FF8000000000000, v)
        return from_blocks(v.view(torch.float64), layout)
    v = _value_bits(n_val, p_val)
    v = torch.where(inf, _INF32, v)
    v = torch.where(neg, v | _INT32_MIN, v)
    v = torch.where(nan, _NAN32, v)
    return values_to_dtype(v, layout, dtype)


class TorchBackend(Backend):
    name = "torch"
    description = "pure tensor ops on the fp32 bit pattern: any device (CPU, CUDA, MPS, XPU, meta), torch.compile"

    def covers(self, spec: QuantSpec, x: torch.Tensor) -> Coverage:
        if spec.compat is not None:
            return not_covered(f"compat={spec.compat!r} is implemented by the reference only")
        if x.dtype not in _IN_DTYPES:
            return not_covered(f"inputs float32/bfloat16/float16, got {x.dtype}")
        facts = bit_facts(spec.format)
        return not_covered(facts) if isinstance(facts, str) else COVERED

    def covers_dequantize(self, q, dtype: torch.dtype) -> Coverage:
        facts = bit_facts(q.format)
        if isinstance(facts, str):
            return not_covered(facts)
        if dtype not in _OUT_DTYPES:
            return not_covered(f"outputs {_OUT_DTYPES}, got {dtype}")
        return COVERED

    def quantize(self, x, spec, axis, seed):
        return quantize_bits(x, spec, axis, seed)

    def fake_quantize(self, x, spec, axis, seed, out=None):
        y = fake_quantize_bits(x, spec, axis, seed)
        return y if out is None else out.copy_(y)

    def dequantize(self, q, dtype, out=None):
        y = dequantize_parts(q.codes, q.scales, q.micro, q.shape, q.axis, q.format, dtype)
        return y if out is None else out.copy_(y)

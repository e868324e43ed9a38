"""The reference quantizer: readable, spec-cited, exact. Slow is fine; kernels are tested against it.

All arithmetic is in float64, where every step used here (scaling by powers of two, rounding an fp32
value to a few mantissa bits) is exact, so the result does not depend on evaluation order.

OCP Microscaling Formats (MX) v1.0, §6.3 "Conversion from a vector of scalars to MX":
    X   = 2^(floor(log2(max_i |V_i|)) - emax_elem)        (shared scale, an E8M0 power of two)
    P_i = quantize_to_element_format(V_i / X)             (round, then saturate to ±max normal)
with X clamped to the E8M0 range [2^-127, 2^127], and X = NaN (code 0xFF) when the block holds a NaN or
an Inf. A NaN scale makes every element of the block NaN (§5.2). A block of zeros gets the smallest
scale (code 0) and zero elements.

Rounding modes (``rounding``):
    "even"        round half to even (IEEE 754 roundTiesToEven; the spec's default, §6.3).
    "away"        round half away from zero (microsoft/microxcaling's "nearest").
    "zero"        truncate toward zero (microxcaling's "floor").
    "stochastic"  floor(|t| + u) with u uniform on [0, 1) in steps of 2^-32, where t is the element in
                  units of its quantum; unbiased. u comes from a counter-based hash of (seed, flat index
                  of the element in the input tensor), so results are reproducible and independent of
                  blocking or threading; the seed is drawn from ``generator`` (or torch's global RNG).

Scale modes (``scale_mode``), all giving a power of two 2^X clamped to the scale format's range:
    "floor"  X = floor(log2 amax) - emax_elem                                (OCP MX v1.0 §6.3)
    "ceil"   X = ceil(log2 amax) - emax_elem: never saturates (amax/2^X <= 2^emax_elem)
    "even"   amax first rounded to the element's mantissa width (ties away), then "floor": avoids the
             saturation that "floor" incurs when amax rounds up into the next binade (torchao's EVEN)
    "rceil"  X = ceil(log2(amax / max_normal)): the smallest power of two that maps amax within
             ±max_normal (NVIDIA's RCEIL used for MXFP8 in cuBLAS/torchao)

Subnormal fp32 inputs are exact in float64 and are treated like any other value: a block whose amax is
subnormal gets the smallest scale 2^-127, and elements are rounded at that scale (usually to zero or to
an element subnormal). No flush-to-zero happens anywhere.
"""

from __future__ import annotations

import torch

from .formats import ROUNDINGS, BlockFormat, ElementFormat, ScaleFormat, get_format
# QuantizedBlocks lives with the blocked layout; re-exported here for old callers
from .layout import BlockLayout, QuantizedBlocks, make_layout, to_blocks
# option checks and the random stream are shared with the backends; re-exported here for old callers
from .options import (COMPAT_MODES, check_rounding, check_scale_mode, draw_seed,  # noqa: F401
                      element_uniforms, stochastic_uniform)

__all__ = [
    "QuantizedBlocks",
    "round_to_element",
    "encode_element",
    "decode_element",
    "shared_exponent",
    "quantize_blocks",
    "dequantize_blocks",
    "quantize_blocks_bdr",
    "dequantize_blocks_bdr",
    "quantize_reference",
    "fake_quantize_reference",
    "stochastic_uniform",
    "check_rounding",
    "check_scale_mode",
    "COMPAT_MODES",
    "cast_values",
]


# ---- elements -------------------------------------------------------------------------------------
def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(a)) for positive finite float64 a (via frexp, never via a rounded log)."""
    _, e = torch.frexp(a)
    return e.to(torch.int64) - 1


def _round_units(t: torch.Tensor, rounding: str, u: torch.Tensor | None) -> torch.Tensor:
    """Round non-negative float64 ``t`` (a magnitude in units of the quantum) to an integer."""
    if rounding == "even":
        return torch.round(t)
    if rounding == "away":
        return torch.floor(t + 0.5)
    if rounding == "zero":
        return torch.floor(t)
    if rounding == "stochastic":
        return torch.floor(t + u.to(torch.float64) * 2.0**-32)
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def round_to_element(v: torch.Tensor, elem: ElementFormat, rounding: str = "even",
                     u: torch.Tensor | None = None, compat: str | None = None) -> torch.Tensor:
    """Round float64 values to the nearest representable ``elem`` values, saturating to ±max_normal.

    Finite inputs only (NaN/Inf are handled at block level). Keeps the sign of zero.
    ``u``: int64 random 32-bit offsets (same shape as v) for rounding="stochastic".
    ``compat="microxcaling"``: the element's binade is floor(float32 log2(|v|)) as that emulator computes
    it, which rounds up for values just below a power of two (only "zero" rounding can tell).
    """
    v = v.to(torch.float64)
    a = v.abs()
    if elem.kind == "fp":
        safe = torch.where(a > 0, a, 1.0)
        if compat == "microxcaling":
            log2 = torch.floor(torch.log2(safe.to(torch.float32))).to(torch.int64)
        else:
            log2 = _floor_log2(safe)
        e = torch.where(a > 0, log2, elem.emin).clamp_min(elem.emin)
        quantum = torch.exp2((e - elem.mbits).to(torch.float64))
    else:
        quantum = torch.full_like(a, 2.0 ** -elem.frac_bits)
    r = _round_units(a / quantum, rounding, u) * quantum
    r = torch.clamp(r, max=elem.max_normal)
    return torch.copysign(r, v)


def encode_element(v: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Codes of exactly representable values (float64 in, int64 out). NaN -> canonical NaN code.

    fp: sign | biased exponent | mantissa (subnormals when the exponent is below emin), -0.0 -> sign bit.
    int: two's complement or sign-magnitude integer of v * 2^frac_bits. Raises ValueError when a value
    is not representable (this function encodes, it does not round).
    """
    v = v.to(torch.float64)
    nan = torch.isnan(v)
    if nan.any() and not elem.has_nan:
        raise ValueError(f"{elem.name} has no NaN encoding")
    inf = torch.isinf(v)
    if inf.any() and not elem.has_inf:
        raise ValueError(f"{elem.name} has no Inf encoding")
    v = torch.where(nan, 0.0, v)
    if elem.kind == "int":
        n = v * 2.0 ** elem.frac_bits
        if (n != torch.round(n)).any() or (n.abs() > 2 ** (elem.int_bits - 1)).any():
            raise ValueError(f"value not representable in {elem.name}")
        n = n.to(torch.int64)
        if elem.encoding == "twos":
            code = n & ((1 << elem.int_bits) - 1)
        else:
            code = n.abs() | (torch.signbit(v).to(torch.int64) << (elem.int_bits - 1))
        return code
    sign = torch.signbit(v).to(torch.int64) << (elem.bits - 1)
    a = v.abs()
    safe = torch.where((a > 0) & ~inf, a, 1.0)
    e = _floor_log2(safe)
    normal = e >= elem.emin
    man_n = safe / torch.exp2((e - elem.mbits).to(torch.float64)) - 2.0**elem.mbits
    man_s = safe / 2.0 ** (elem.emin - elem.mbits)
    man = torch.where(normal, man_n, man_s)
    exp_field = torch.where(normal, e + elem.bias, 0)
    ok = (man == torch.floor(man)) & (exp_field < (1 << elem.ebits))
    finite_nonzero = (a > 0) & ~inf
    if (finite_nonzero & ~ok).any():
        raise ValueError(f"value not representable in {elem.name}")
    code = (exp_field << elem.mbits) | man.to(torch.int64)
    code = torch.where(finite_nonzero, code, 0)
    if elem.has_inf:
        code = torch.where(inf, ((1 << elem.ebits) - 1) << elem.mbits, code)
    code = code | sign
    if elem.has_nan:
        code = torch.where(nan, elem.nan_code, code)
    return code


def decode_element(codes: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """float64 value of each code (table lookup in the format's code_values)."""
    table = torch.tensor(elem.code_values)
    return table[codes.to(torch.int64)]


# ---- scales ---------------------------------------------------------------------------------------
def shared_exponent(amax: torch.Tensor, elem: ElementFormat, scale: ScaleFormat,
                    scale_mode: str = "floor") -> torch.Tensor:
    """Unclamped-then-clamped shared exponent X (int64) of each block from its float64 amax > 0.

    See the module docstring for the scale modes. The result is clamped to [scale.emin, scale.emax].
    Blocks with amax == 0 get scale.emin. (NaN/Inf blocks are handled by the caller.)
    """
    check_scale_mode(scale_mode)
    pos = amax > 0
    a = torch.where(pos, amax, 1.0)
    if scale_mode == "floor":
        x = _floor_log2(a) - elem.emax
    elif scale_mode == "ceil":
        fl = _floor_log2(a)
        x = torch.where(torch.exp2(fl.to(torch.float64)) == a, fl, fl + 1) - elem.emax
    elif scale_mode == "even":
        mbits = elem.mbits if elem.kind == "fp" else elem.frac_bits
        fl = _floor_log2(a)
        q = torch.exp2((fl - mbits).to(torch.float64))
        rounded = torch.floor(a / q + 0.5) * q
        x = _floor_log2(rounded) - elem.emax
    else:  # rceil
        ratio = a / elem.max_normal
        fl = _floor_log2(ratio)
        x = torch.where(torch.exp2(fl.to(torch.float64)) == ratio, fl, fl + 1)
    x = torch.where(pos, x, scale.emin)
    return x.clamp(scale.emin, scale.emax)


# ---- blocks ---------------------------------------------------------------------------------------
def quantize_blocks(blocks: torch.Tensor, fmt: BlockFormat, rounding: str = "even",
                    scale_mode: str | None = None, u: torch.Tensor | None = None,
                    compat: str | None = None, group_size: int | None = None) -> QuantizedBlocks:
    """Quantize ``[n_blocks, k]`` values of any block format.

    Single-level power-of-two block formats (``fmt.is_mx``) follow OCP MX §6.3 (below); the others go to
    :func:`quantize_blocks_bdr` (two-level microexponent formats, FP32 / E4M3 / integer scales, tensor
    scales, unscaled casts). ``group_size``: consecutive blocks sharing one ``tensor_scale`` (default:
    all blocks); ignored by formats without one.
    ``u``: int64 random offsets of the same shape for rounding="stochastic".
    ``compat="microxcaling"`` reproduces that emulator's numerics (see ``_microxcaling_exponent``).
    """
    fmt = get_format(fmt)
    if not fmt.is_mx:
        if compat is not None:
            raise ValueError(f"compat={compat!r} applies to single-level MX formats only, not {fmt.name!r}")
        return quantize_blocks_bdr(blocks, fmt, rounding, scale_mode, u, group_size)
    check_rounding(rounding)
    scale_mode = check_scale_mode(scale_mode or "floor")
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    elem, scale = fmt.element, fmt.scale
    v = blocks.to(torch.float64)
    special = (~torch.isfinite(v)).any(dim=1)
    finite_v = torch.where(torch.isfinite(v), v, 0.0)
    amax = finite_v.abs().amax(dim=1)
    if compat == "microxcaling":
        x = _microxcaling_exponent(amax, elem, scale)
    else:
        x = shared_exponent(amax, elem, scale, scale_mode)
    scaled = finite_v / torch.exp2(x.to(torch.float64))[:, None]
    r = round_to_element(scaled, elem, rounding, u, compat)
    codes = encode_element(r, elem)
    codes = torch.where(special[:, None], 0, codes)
    scale_codes = torch.where(special, scale.nan_code, x + scale.bias)
    code_dtype = torch.uint8 if elem.bits <= 8 else torch.int32
    return QuantizedBlocks(codes.to(code_dtype), scale_codes.to(torch.uint8))


def dequantize_blocks(q: QuantizedBlocks, fmt: BlockFormat) -> torch.Tensor:
    """float64 values of quantized blocks: element value x 2^(scale code - bias); NaN for scale 0xFF."""
    fmt = get_format(fmt)
    if not fmt.is_mx:
        return dequantize_blocks_bdr(q, fmt)
    elem, scale = fmt.element, fmt.scale
    vals = decode_element(q.codes, elem)
    sc = torch.tensor(scale.code_values)[q.scales.to(torch.int64)]
    return vals * sc[:, None]


def cast_values(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast exact float64 values to ``dtype``, writing NaNs as the dtype's canonical quiet NaN.

    (torch's float64 -> bfloat16 conversion writes 0x7FC0 in its scalar path but 0xFFFF in its vectorized
    path, so without this a NaN's bits would depend on the tensor's length.) Values beyond the dtype's
    range become ±Inf by IEEE conversion; only non-"floor" scale modes can produce an MX value above
    float32's maximum (e.g. 2^128 from an input near 3.4e38 with scale_mode="ceil").
    """
    out = v.to(dtype)
    return out.masked_fill(torch.isnan(out), float("nan"))


def _microxcaling_exponent(amax: torch.Tensor, elem: ElementFormat, scale: ScaleFormat) -> torch.Tensor:
    """Shared exponent as microsoft/microxcaling computes it (shared_exp_method="max").

    Its exponent is floor(log2(amax)) evaluated in float32 by torch.log2, so an amax just below a large
    power of two (e.g. 2^100 * (1 - 2^-24)) has its log2 rounded up to the integer and gets a scale one
    binade too large. Zero blocks use log2(2^-126). The exponent is then clamped to [-127, 127].
    Verified against the emulator itself (tests/data/microxcaling_log2_edges.npz).
    """
    a32 = amax.to(torch.float32)
    a32 = torch.where(a32 == 0, torch.finfo(torch.float32).tiny, a32)
    e = torch.floor(torch.log2(a32)).to(torch.int64) - elem.emax
    return e.clamp(scale.emin, scale.emax)


# ---- whole tensors --------------------------------------------------------------------------------
def quantize_reference(x: torch.Tensor, fmt, axis: int = -1, rounding: str = "even",
                       scale_mode: str | None = None, generator: torch.Generator | None = None,
                       compat: str | None = None, seed: int | None = None
                       ) -> tuple[QuantizedBlocks, BlockLayout]:
    """Quantize a tensor of any rank along ``axis`` with the reference algorithm.

    Returns the codes in blocked order and the layout (see layout.py). ``seed`` overrides the seed drawn
    from ``generator`` for stochastic rounding.
    """
    fmt = get_format(fmt)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor (float32/bfloat16/float16), got {x.dtype}")
    layout = make_layout(x.shape, axis, fmt.block_size)
    u = None
    if rounding == "stochastic":
        if seed is None:
            seed = draw_seed(generator)
        u = element_uniforms(x.shape, layout, seed)
    blocks = to_blocks(x.detach().to(torch.float64), layout)
    group = layout.blocks_per_vector if fmt.tensor_scale_granularity == "channel" else None
    return quantize_blocks(blocks, fmt, rounding, scale_mode, u, compat, group), layout


def fake_quantize_reference(x: torch.Tensor, fmt, axis: int = -1, rounding: str = "even",
                            scale_mode: str | None = None, generator: torch.Generator | None = None,
                            compat: str | None = None, seed: int | None = None) -> torch.Tensor:
    """quantize_reference followed by dequantization, returned in x's dtype and shape."""
    from .layout import from_blocks
    q, layout = quantize_reference(x, fmt, axis, rounding, scale_mode, generator, compat, seed)
    return cast_values(from_blocks(dequantize_blocks(q, get_format(fmt)), layout), x.dtype)


# ---- block formats beyond OCP MX: BDR two-level, FP32 / E4M3 / integer scales, tensor scales ------
def quantize_blocks_bdr(blocks: torch.Tensor, fmt: BlockFormat, rounding: str = "even",
                        scale_mode: str | None = None, u: torch.Tensor | None = None,
                        group_size: int | None = None) -> QuantizedBlocks:
    """Quantize ``[n_blocks, k]`` values of a format that is not single-level MX (rules: docs/bdr.md).

    Two-level BDR formats (MX9/MX6/MX4 and any k1/d1/k2/d2), Rouhani et al. ISCA 2023 §3:
        E     = the block's shared exponent X (``shared_exponent``, "floor" = floor(log2 amax) - emax_elem,
                clamped to the d1-bit scale range) plus emax_elem, i.e. the largest exponent in the block
        E_j   = floor(log2(max |x| in sub-block j))
        s_j   = min(E - E_j, 2^d2 - 1), clamped below at 0; an all-zero sub-block gets s_j = 2^d2 - 1
        x_i   = element_round(x_i / 2^(X - s_j)) * 2^(X - s_j)   (rounding as for MX, then clamped to
                the element's max: sign + m magnitude bits give x_i = ±mag · 2^(E - s_j + 1 - m))
      A block holding NaN/Inf gets the NaN scale code (2^d1 - 1), zero codes and zero microexponents,
      and decodes to NaN. Codes: ``scales`` = X + bias, ``micro`` = s_j.
    Amax-scaled formats (FP32 / E4M3 / unsigned-integer block scales, per-tensor or per-channel FP32
    ``tensor_scale``; unscaled casts), with maxE = the element's max normal:
        tensor scale t = fp32(amax_group / (maxE · maxS)), maxS = the block scale's max (448 for E4M3,
                         2^b - 1 for a b-bit integer scale, 1 without a block scale); t = 1 for a zero group
        FP32 block scale  s = fp32(amax_block / maxE)  (1 for a zero block)
        E4M3 block scale  s = E4M3_rne(amax_block / maxE / t), saturating at 448 (NVFP4)
        integer scale     s = clamp(round_half_even(amax_block / maxE / t), 1, 2^b - 1); 0 for a zero block
        x_i = element_round(x_i / (s · t)) (saturating); 0 where s · t == 0
      NaN/Inf: a block with a block scale gets a NaN scale (FP32 NaN or the E4M3 NaN code) and zero
      codes; with an integer block scale (no NaN code) or no block scale and an element without NaN, the
      group's FP32 tensor scale becomes NaN; elements with NaN/Inf codes (FP8) keep them in unscaled
      and per-tensor formats (Inf -> NaN for E4M3, which has no Inf).
    ``scale_mode`` applies to the power-of-two scales of two-level formats only.
    """
    fmt = get_format(fmt)
    if fmt.element is None:
        raise ValueError("format 'none' does not quantize")
    check_rounding(rounding)
    scale_mode = check_scale_mode(scale_mode or "floor")
    v = blocks.to(torch.float64)
    if v.dim() != 2:
        raise ValueError(f"blocks must be [n_blocks, block_size], got shape {tuple(v.shape)}")
    if fmt.is_two_level:
        return _quantize_two_level(v, fmt, rounding, scale_mode, u)
    if fmt.scale is not None and fmt.scale.kind == "e8m0":
        raise ValueError(f"{fmt.name!r}: power-of-two single-level formats go through the MX path")
    return _quantize_amax_scaled(v, fmt, rounding, u, group_size)


def _code_dtype(elem: ElementFormat) -> torch.dtype:
    return torch.uint8 if elem.bits <= 8 else torch.int16


def _quantize_two_level(v, fmt, rounding, scale_mode, u) -> QuantizedBlocks:
    elem, scale = fmt.element, fmt.scale
    n, k1 = v.shape
    k2 = fmt.subblock_size
    if k1 != fmt.block_size:
        raise ValueError(f"{fmt.name} blocks have {fmt.block_size} elements, got {k1}")
    beta = (1 << fmt.micro_bits) - 1
    finite = torch.isfinite(v)
    special = (~finite).any(dim=1)
    fv = torch.where(finite, v, 0.0)
    a = fv.abs()
    x = shared_exponent(a.amax(dim=1), elem, scale, scale_mode)             # [n]
    sub = a.reshape(n, k1 // k2, k2).amax(dim=2)                             # [n, k1/k2]
    e_sub = _floor_log2(torch.where(sub > 0, sub, 1.0))
    shift = torch.where(sub > 0, x[:, None] + elem.emax - e_sub, beta).clamp(0, beta)
    exp = (x[:, None] - shift).repeat_interleave(k2, dim=1)                  # [n, k1]
    r = round_to_element(fv / torch.exp2(exp.to(torch.float64)), elem, rounding, u)
    codes = torch.where(special[:, None], 0, encode_element(r, elem))
    shift = torch.where(special[:, None], 0, shift)
    scale_codes = torch.where(special, scale.nan_code, x + scale.bias)
    return QuantizedBlocks(codes.to(_code_dtype(elem)), scale_codes.to(torch.uint8), shift.to(torch.uint8))


def _scale_max(fmt: BlockFormat) -> float:
    s = fmt.scale
    if s is None or s.kind == "fp32":
        return 1.0
    if s.kind == "fp":
        return s.element.max_normal
    return float((1 << s.bits) - 1)  # uint


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).to(torch.float64)


def _quantize_amax_scaled(v, fmt, rounding, u, group_size) -> QuantizedBlocks:
    elem, scale = fmt.element, fmt.scale
    n = v.shape[0]
    finite = torch.isfinite(v)
    fv = torch.where(finite, v, 0.0)
    bamax = fv.abs().amax(dim=1)
    bspecial = (~finite).any(dim=1)
    maxe = elem.max_normal
    # Where can a NaN/Inf go? A block scale with a NaN code takes it; otherwise element codes do (FP8);
    # otherwise (integer elements, integer block scales) the FP32 tensor scale of the group becomes NaN.
    scale_has_nan = scale is not None and scale.kind in ("fp32", "fp")
    t_blk = torch.ones(n, dtype=torch.float64)
    tensor_scale = None
    if fmt.tensor_scale is not None:
        g = (n or 1) if group_size is None else int(group_size)  # an empty tensor: no groups at all
        if g <= 0 or n % g:
            raise ValueError(f"group_size {group_size} must divide the number of blocks {n}")
        gamax = bamax.reshape(n // g, g).amax(dim=1)
        t = _to_fp32(gamax / (maxe * _scale_max(fmt)))
        t = torch.where((t > 0) & torch.isfinite(t), t, 1.0)
        if not scale_has_nan and not (scale is None and elem.has_nan):
            t = torch.where(bspecial.reshape(n // g, g).any(dim=1), torch.nan, t)
        tensor_scale = t.to(torch.float32)
        if fmt.tensor_scale_granularity == "tensor" and group_size is None:
            # an empty tensor is a zero group: t = 1
            tensor_scale = tensor_scale.reshape(()) if n else torch.ones((), dtype=torch.float32)
        t_blk = t.repeat_interleave(g)
    if scale is None:
        s = torch.ones(n, dtype=torch.float64)
        scale_codes = torch.empty(0, dtype=torch.uint8)
    elif scale.kind == "fp32":
        s = _to_fp32(bamax / maxe)
        s = torch.where(s > 0, s, 1.0)
        s = torch.where(bspecial, torch.nan, s)
        scale_codes = s.to(torch.float32)
    elif scale.kind == "fp":
        s = round_to_element(bamax / maxe / t_blk, scale.element, "even")
        code = encode_element(s, scale.element)
        scale_codes = torch.where(bspecial, scale.element.nan_code, code).to(torch.uint8)
        s = torch.where(bspecial, torch.nan, s)
    elif scale.kind == "uint":
        s = torch.round(bamax / maxe / t_blk).clamp(1, (1 << scale.bits) - 1)
        s = torch.where(bamax > 0, s, 0.0)
        s = torch.where(torch.isfinite(s), s, 0.0)
        scale_codes = s.to(torch.uint8)
    else:
        raise ValueError(f"unsupported scale kind {scale.kind!r}")
    total = s * t_blk
    ok = (total > 0) & torch.isfinite(total)
    scaled = torch.where(ok[:, None], fv / torch.where(ok, total, 1.0)[:, None], 0.0)
    codes = encode_element(round_to_element(scaled, elem, rounding, u), elem)
    if scale_has_nan:
        codes = torch.where(bspecial[:, None], 0, codes)
    elif scale is None and elem.has_nan:  # unscaled / per-tensor FP8: NaN and Inf stay element codes
        nan_or_inf = torch.full_like(codes, elem.nan_code)
        if elem.has_inf:
            inf_code = (((1 << elem.ebits) - 1) << elem.mbits) | (torch.signbit(v).to(torch.int64) << (elem.bits - 1))
            nan_or_inf = torch.where(torch.isinf(v), inf_code, nan_or_inf)
        codes = torch.where(finite, codes, nan_or_inf)
    else:
        codes = torch.where(finite, codes, 0)
    return QuantizedBlocks(codes.to(_code_dtype(elem)), scale_codes, None, tensor_scale)


def dequantize_blocks_bdr(q: QuantizedBlocks, fmt: BlockFormat) -> torch.Tensor:
    """float64 values of blocks quantized by :func:`quantize_blocks_bdr` (NaN where a scale is NaN)."""
    fmt = get_format(fmt)
    elem, scale = fmt.element, fmt.scale
    vals = decode_element(q.codes, elem)
    n = vals.shape[0]
    if fmt.is_two_level:
        sc = q.scales.to(torch.int64)
        exp = (sc - scale.bias)[:, None] - q.micro.to(torch.int64)
        exp = exp.repeat_interleave(fmt.subblock_size, dim=1)
        out = vals * torch.exp2(exp.to(torch.float64))
        return torch.where((sc == scale.nan_code)[:, None], torch.nan, out)
    if scale is None:
        s = torch.ones(n, dtype=torch.float64)
    elif scale.kind == "fp32":
        s = q.scales.to(torch.float64)
    elif scale.kind == "fp":
        s = decode_element(q.scales, scale.element)
    else:
        s = q.scales.to(torch.float64)
    if fmt.tensor_scale is not None:
        t = q.tensor_scale.reshape(-1).to(torch.float64)
        if n:  # (an empty tensor may have no tensor scales at all)
            s = s * t.repeat_interleave(n // t.numel())
    return vals * s[:, None]

"""A first-order hardware-cost model of a dot-product unit for any block format (docs/bdr.md).

The unit multiplies N = ``lanes`` element pairs (both operands in the same format) per cycle, sums the
products in an adder tree and adds the result into an FP32 accumulator. Area is counted in full-adder
equivalents (one multiplier cell = one adder bit = 1, one 2:1 mux bit = ``mux``), per lane:

    multiplier        p^2                        p = significand bits (sign-magnitude m, or FP mbits + 1)
    FP elements       2 (e + 1) + mux (2p + W) ceil(log2(W + 1))
                      (exponent add + max-exponent compare; align each product within a window of
                       W = min(2^(e+1) - 2, fp_window) bits)
    adder tree        w + log2(N) / 2            w = lane width (2p, or 2p + W for FP elements)
    two-level (k2,d2) the k2 products of a sub-block are summed at width w, then shifted by the sum of the
                      two microexponents (range R2 = 2 (2^d2 - 1)): per lane
                      [(d2 + 1) + mux (w + log2 k2) ceil(log2(R2 + 1))] / k2  for the adder + shifter, and
                      the tree above the shifters is R2 bits wider: (R2 + 1/2 log2(N/k2)) / k2 more
    block scale       per block of k1 lanes: combine the two scales (d1 + 1 for exponents, an E4M3 multiply
                      for NVFP4, a b x b multiply for integer scales) and convert the block sum into the
                      accumulator (``accumulate``: an aligner + adder of ``acc_bits``), amortized over
                      min(k1, N) lanes; formats without block scales convert once per N lanes. Per-tensor
                      and per-channel FP32 scales are applied once per output, outside the unit (0).

cost(fmt) = [area(fmt) / area(baseline)] * [bits/element(fmt) / bits/element(baseline)]: the
area-memory product normalised to an FP8 dot-product unit that takes both E4M3 and E5M2 (p = 4, e = 5;
8 bits per element) = 1. The constants (mux, fp_window, acc_bits, lanes) are calibrated so that the BDR
paper's relations hold approximately (MX6 ~ 2x and MX4 ~ 4x cheaper than FP8; see docs/bdr.md for what
holds and what does not). This is a ranking model, not a synthesis result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..formats import E4M3, E5M2, BlockFormat, ElementFormat, get_format

__all__ = ["CostModel", "DEFAULT_MODEL", "area", "area_breakdown", "cost", "baseline_area"]


def _clog2(v: float) -> int:
    return max(0, math.ceil(math.log2(v))) if v > 1 else 0


@dataclass(frozen=True)
class CostModel:
    """Constants of the area model (units: full-adder equivalents)."""

    lanes: int = 64                 # N products per cycle
    mux: float = 1.0                # one 2:1 mux bit of a shifter (with its wiring)
    fp_window: int = 6              # alignment window of FP products (bits beyond the product)
    acc_bits: int = 28              # accumulator datapath (FP32 mantissa + guard bits)
    register: float = 1.0           # operand register/bus per stored bit (two operands per lane)
    lane_overhead: float = 30.0     # per-lane pipeline/control/sign logic independent of the format
    baseline: tuple[ElementFormat, ...] = field(default=(E4M3, E5M2))
    baseline_bits: float = 8.0


DEFAULT_MODEL = CostModel()


def _sig_exp(elem: ElementFormat) -> tuple[int, int]:
    """(significand bits p, exponent bits e) of an element."""
    if elem.kind == "fp":
        return elem.mbits + 1, elem.ebits
    return elem.int_bits - 1, 0


def _lane(p: int, e: int, model: CostModel) -> tuple[dict, int]:
    """Per-lane multiplier/exponent/alignment areas and the lane width entering the adder tree."""
    parts = {"multiplier": float(p * p)}
    w = 2 * p
    if e > 0:
        win = min((1 << (e + 1)) - 2, model.fp_window)
        parts["exponent"] = 2.0 * (e + 1)
        parts["alignment"] = model.mux * (2 * p + win) * _clog2(win + 1)
        w += win
    return parts, w


def _accumulate(model: CostModel) -> float:
    a = model.acc_bits
    return a + model.mux * a * _clog2(a)


def area_breakdown(fmt: str | BlockFormat, model: CostModel = DEFAULT_MODEL) -> dict[str, float]:
    """Per-lane area of each component of the dot-product unit for ``fmt`` (see module docstring)."""
    fmt = get_format(fmt)
    if fmt.element is None:
        raise ValueError("format 'none' has no dot-product unit")
    n = model.lanes
    p, e = _sig_exp(fmt.element)
    parts, w = _lane(p, e, model)
    parts["operands"] = 2 * model.register * fmt.element.bits + model.lane_overhead
    if fmt.is_two_level:
        k2, d2 = fmt.subblock_size, fmt.micro_bits
        r2 = 2 * ((1 << d2) - 1)
        wg = w + math.log2(k2)
        parts["microexponent"] = ((d2 + 1) + 2 * model.register * d2 + model.mux * wg * _clog2(r2 + 1)) / k2
        parts["adder_tree"] = (w + math.log2(n) / 2) + (r2 + math.log2(max(n / k2, 1)) / 2) / k2
    else:
        parts["adder_tree"] = w + math.log2(n) / 2
    s = fmt.scale
    if s is not None and fmt.block_size:
        k1 = fmt.block_size
        if s.kind == "e8m0":
            combine = s.bits + 1.0
        elif s.kind == "fp":
            ps, es = _sig_exp(s.element)
            combine = ps * ps + 2.0 * (es + 1)
        elif s.kind == "uint":
            combine = float(s.bits * s.bits)
        else:  # fp32 per block
            combine = 24.0 * 24.0
        parts["block_scale"] = combine / k1
        parts["accumulate"] = _accumulate(model) / min(k1, n)
    else:
        parts["accumulate"] = _accumulate(model) / n
    return parts


def area(fmt: str | BlockFormat, model: CostModel = DEFAULT_MODEL) -> float:
    """Per-lane area of the dot-product unit (full-adder equivalents)."""
    return sum(area_breakdown(fmt, model).values())


def baseline_area(model: CostModel = DEFAULT_MODEL) -> float:
    """Per-lane area of the baseline unit: the widest significand and exponent of ``model.baseline``."""
    p = max(_sig_exp(el)[0] for el in model.baseline)
    e = max(_sig_exp(el)[1] for el in model.baseline)
    parts, w = _lane(p, e, model)
    parts["operands"] = 2 * model.register * max(el.bits for el in model.baseline) + model.lane_overhead
    parts["adder_tree"] = w + math.log2(model.lanes) / 2
    parts["accumulate"] = _accumulate(model) / model.lanes
    return sum(parts.values())


def cost(fmt: str | BlockFormat, model: CostModel = DEFAULT_MODEL, memory: bool = True) -> float:
    """Normalised area-memory product (``memory=False``: area only), FP8 (E4M3+E5M2) unit = 1."""
    fmt = get_format(fmt)
    c = area(fmt, model) / baseline_area(model)
    if memory:
        c *= fmt.bits_per_element / model.baseline_bits
    return c

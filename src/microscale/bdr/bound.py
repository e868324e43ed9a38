"""A worst-case QSNR lower bound for (two-level) block formats with sign-magnitude elements.

Setting (BDR, Rouhani et al., ISCA 2023, the kind of statement of its Theorem 1): a block of k1 elements
with shared exponent E = floor(log2 max|x|) (not clamped by the d1-bit scale range), k2-element
sub-blocks with shifts s_j = min(E - E_j, beta), beta = 2^d2 - 1 (single level: k2 = k1, beta = 0),
and sign + m magnitude bits, so sub-block j has quantum D_j = 2^(E - s_j + 1 - m). The bound below is
the one proved here (docs/bdr.md has the proof); it is the supremum of ||x - Q(x)||^2 / ||x||^2 over
*all* nonzero finite blocks, so it holds for every input distribution:

    ||x - Q(x)||^2 / ||x||^2  <=  R,   QSNR >= -10 log10 R,   D = 2^(1-m) (quantum of the max sub-block)

    round to nearest (even/away), q = (D/2)^2 = 4^-m,  X = (k2 - 1) q + (k1 - k2) q 4^-beta:
        R = max( (q + X) / ((1 + D/2)^2 + X),  (4q + X) / (4 + X) )
    truncation ("zero"), q = D^2 = 4^(1-m), X as above:   R = (q + X) / ((1 + D)^2 + X)
    stochastic (per realization), q = D^2, X as above:     R = q + X

Reading: X collects the elements that lose all of themselves (an element at half a quantum of its
sub-block rounds to 0): k2 - 1 of them beside the block maximum, k1 - k2 in sub-blocks shifted by the
largest microexponent beta; the block maximum loses at most D/2 (the first term, maximum at 1 + D/2)
or, saturating just below 2, D (the second). Since R ~ 4^-m (k2 + (k1 - k2) 4^-beta) for large m,
QSNR >= 6.02 m - 10 log10(k2 + (k1 - k2) 4^-beta) - O(4^-m k1): each microexponent bit lets the k1 - k2
elements outside the max sub-block lose 6 dB less. The bound is the supremum over all blocks:
:func:`worst_case_block` attains the first term exactly (ties round to even). Stochastic rounding can
round a tiny element up to a whole quantum, so its per-realization bound has no denominator. Per-tensor
QSNR is a ratio of sums over blocks, so it obeys the same bound. Proof: docs/bdr.md.
"""

from __future__ import annotations

import math

from ..formats import BlockFormat, get_format

__all__ = ["qsnr_lower_bound", "worst_case_block"]


def _params(fmt: BlockFormat):
    fmt = get_format(fmt)
    e = fmt.element
    if (e is None or e.kind != "int" or e.encoding != "sign_magnitude" or fmt.scale is None
            or fmt.scale.kind != "e8m0" or not fmt.block_size or fmt.tensor_scale is not None
            or e.frac_bits != e.int_bits - 2):
        raise ValueError(f"the bound covers BDR formats with sign + m magnitude elements and power-of-two "
                         f"block scales (MX9/MX6/MX4, MSFP, BFP); {fmt.name!r} is not one")
    m = e.int_bits - 1
    k1 = fmt.block_size
    k2 = fmt.subblock_size or k1
    beta = (1 << fmt.micro_bits) - 1 if fmt.subblock_size else 0
    return m, k1, k2, beta


def qsnr_lower_bound(fmt: str | BlockFormat, rounding: str = "even") -> float:
    """Worst-case QSNR lower bound in dB (module docstring) for BDR sign-magnitude formats."""
    m, k1, k2, beta = _params(fmt)
    d = 2.0 ** (1 - m)
    if rounding in ("even", "away"):
        q = d * d / 4
    elif rounding in ("zero", "stochastic"):
        q = d * d
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    x = (k2 - 1) * q + (k1 - k2) * q * 4.0 ** -beta
    if rounding == "stochastic":
        ratio = q + x
    elif rounding == "zero":
        ratio = (q + x) / ((1 + d) ** 2 + x)
    else:
        ratio = max((q + x) / ((1 + d / 2) ** 2 + x), (4 * q + x) / (4 + x))
    return -10.0 * math.log10(ratio)


def worst_case_block(fmt: str | BlockFormat) -> list[float]:
    """A block (E = 0) whose round-to-nearest-even QSNR equals :func:`qsnr_lower_bound` exactly: the
    maximum at 1 + D0/2 (a tie, rounded to 1), its sub-block mates at D0/2 (ties rounded to 0), and every
    other sub-block at the largest shift beta with all elements at D_beta/2 (also rounded to 0)."""
    m, k1, k2, beta = _params(fmt)
    d0 = 2.0 ** (1 - m)
    return [1.0 + d0 / 2] + [d0 / 2] * (k2 - 1) + [d0 * 2.0 ** -beta / 2] * (k1 - k2)

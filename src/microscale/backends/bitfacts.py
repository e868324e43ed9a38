"""Integer facts of a power-of-two block format for the bit-pattern backends (torch, triton).

The torch and Triton backends quantize the way the C kernels do (kernels/_mxloops.c, header comment):
integer arithmetic on the fp32 bit pattern, where the exponent field is an exact floor(log2) and rounding
is a shift of the 24-bit significand. :func:`bit_facts` derives the integers that method needs from a
:class:`~microscale.formats.BlockFormat` (formats.py stays the one source of the parameters), or says
why the method does not apply.

An int element is handled as an fp-like format that never leaves its "subnormal" range (emin = emax,
mbits = int_bits - 2, quantum 2^-frac_bits); a single-level format is the two-level case with one
sub-block per block (k2 = k1) and no microexponent (beta = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..formats import BlockFormat

__all__ = ["BitFacts", "bit_facts"]


@dataclass(frozen=True)
class BitFacts:
    """Integers describing a format for bit-pattern quantization (see the module docstring)."""

    emin: int        # exponent of the element's smallest normal (ints: emax)
    mbits: int       # mantissa bits below the leading one (ints: int_bits - 2)
    maxmag: int      # largest finite magnitude code
    inf_mag: int     # magnitude code of Inf, -1 when the element has none
    max_n: int       # largest element value = max_n * 2^max_p (max_n odd or 0)
    max_p: int
    fp: bool         # fp element (keeps the sign of zero; may have Inf/NaN codes)
    twos: bool       # two's-complement int element (else sign-magnitude)
    bits: int        # element code width
    emax: int        # floor(log2(max element))
    even_m: int      # mantissa width used by scale_mode="even"
    flm: int         # floor(log2(max element)) again, for scale_mode="rceil"
    sigm: int        # 24-bit significand of the max element, for scale_mode="rceil"
    s_emin: int      # power-of-two scale: exponent range, bias, NaN code
    s_emax: int
    s_bias: int
    s_nan: int
    k: int           # block size k1
    k2: int          # sub-block size (k for a single level)
    d2: int          # microexponent bits (0 for a single level)

    @property
    def beta(self) -> int:
        """The largest microexponent, 2^d2 - 1 (0 for a single level)."""
        return (1 << self.d2) - 1


def _floor_log2(v: float) -> int:
    return math.frexp(v)[1] - 1


_CACHE: dict = {}


def bit_facts(fmt: BlockFormat) -> BitFacts | str:
    """The :class:`BitFacts` of ``fmt``, or a sentence saying why bit-pattern quantization does not cover it.

    Covered: power-of-two (E8M0-kind, any d1 bits) block scales, one or two levels (OCP MX, MSFP/BFP,
    MX9/MX6/MX4, any ``bdr_format``), fp or int elements of 2..8 bits, as long as every quantized value is
    an fp32 value (smallest element quantum times the smallest scale, lowered by the largest
    microexponent, >= 2^-149).
    """
    if fmt not in _CACHE:
        _CACHE[fmt] = _derive(fmt)
    return _CACHE[fmt]


# torch.compile evaluates bit_facts at trace time and keeps the result as a constant (rather than tracing
# into numpy). This is what torch.compiler.assume_constant_result(bit_facts) does; setting its marker
# directly avoids importing torch._dynamo (and with it triton) whenever microscale is imported.
bit_facts._dynamo_marked_constant = True


def _derive(fmt: BlockFormat) -> BitFacts | str:
    elem, scale, k = fmt.element, fmt.scale, fmt.block_size
    if elem is None:
        return "format 'none' does not quantize"
    if scale is None or scale.kind != "e8m0" or fmt.tensor_scale is not None:
        kind = "no block scale" if scale is None else f"a {scale.kind} block scale"
        return (f"{fmt.name} has {kind}{' and a tensor scale' if fmt.tensor_scale is not None else ''}; "
                "bit-pattern backends take power-of-two (E8M0-kind) block scales only")
    if not k:
        return f"{fmt.name} has no fixed block size (per-axis/per-tensor scale)"
    if not 2 <= elem.bits <= 8:
        return f"{fmt.name} has {elem.bits}-bit elements; bit-pattern backends take 2..8 bits"
    k2 = fmt.subblock_size or k
    d2 = fmt.micro_bits if fmt.is_two_level else 0
    if d2 > 8:
        return f"{fmt.name} has {d2}-bit microexponents; at most 8 are taken"
    beta = (1 << d2) - 1
    if elem.kind == "fp":
        emin, mbits, even_m = elem.emin, elem.mbits, elem.mbits
        maxmag = max(c for c in range(1 << (elem.bits - 1)) if math.isfinite(elem.code_values[c]))
        inf_mag = maxmag + 1 if elem.has_inf else -1
    else:
        emin, mbits, even_m = elem.emax, elem.int_bits - 2, elem.frac_bits
        maxmag, inf_mag = (1 << (elem.int_bits - 1)) - 1, -1
        if emin - mbits != -elem.frac_bits:
            return f"{fmt.name}: int element {elem.name} has frac_bits != int_bits - 2 - emax"
    if emin - mbits + scale.emin - beta < -149:
        return (f"{fmt.name}: its smallest quantum 2^{emin - mbits + scale.emin - beta} is below fp32's "
                "2^-149 (values would not be fp32 values)")
    if not 0 <= even_m <= 22 or elem.emax < 0:
        return f"{fmt.name}: element {elem.name} is outside the bit-pattern method's range"
    mx = elem.max_normal
    m, e = math.frexp(mx)
    max_n, max_p = int(m * 2**53), e - 53
    while max_n and max_n % 2 == 0:
        max_n, max_p = max_n // 2, max_p + 1
    sigm = int(mx / 2.0 ** _floor_log2(mx) * 2**23)
    return BitFacts(emin=emin, mbits=mbits, maxmag=maxmag, inf_mag=inf_mag, max_n=max_n, max_p=max_p,
                    fp=elem.kind == "fp", twos=elem.kind == "int" and elem.encoding == "twos", bits=elem.bits,
                    emax=elem.emax, even_m=even_m, flm=_floor_log2(mx), sigm=sigm, s_emin=scale.emin,
                    s_emax=scale.emax, s_bias=scale.bias, s_nan=scale.nan_code, k=k, k2=k2, d2=d2)

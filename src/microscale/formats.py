"""Number formats as data: element formats, scale formats and block formats (BDR specs).

This module is the one source of truth for format parameters. Everything else (the reference
quantizer, kernels, packing, the BDR cost model) reads the facts it needs from these objects.

Sources:
- OCP Microscaling Formats (MX) Specification v1.0 (2023), §5 (element and scale data types),
  Table 1 (concrete MX formats), §5.3 (FP8/FP6/FP4 element encodings), §5.4 (INT8), §6.3 (conversion).
- Rouhani et al., "With Shared Microexponents, A Little Shifting Goes a Long Way", ISCA 2023 (BDR,
  MX9/MX6/MX4): a format is (element, k1 elements sharing a d1-bit scale, k2-element sub-blocks sharing
  a d2-bit microexponent).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

__all__ = [
    "ElementFormat",
    "ScaleFormat",
    "BlockFormat",
    "E4M3",
    "E5M2",
    "E3M2",
    "E2M3",
    "E2M1",
    "INT8",
    "E8M0",
    "FP32_SCALE",
    "E4M3_SCALE",
    "INT8_SYM",
    "INT4_SYM",
    "sign_magnitude",
    "bdr_format",
    "bfp_format",
    "get_format",
    "list_formats",
    "register_format",
    "ROUNDINGS",
    "SCALE_MODES",
    "COMPAT_MODES",
    "Rounding",
    "ScaleMode",
    "QuantSpec",
    "format_key",
]


class _Choice(enum.StrEnum):
    """A string-valued option: members equal (and hash like) their strings, ``str()`` is the value, and
    a bad value raises ValueError listing the choices."""

    @classmethod
    def _missing_(cls, value):
        what = "".join("_" + c.lower() if c.isupper() else c for c in cls.__name__).lstrip("_")
        raise ValueError(f"{what} must be one of {tuple(m.value for m in cls)}, got {value!r}")

    @classmethod
    def parse(cls, value):
        """``value`` (a member or its string) as a member; ValueError listing the choices otherwise."""
        return cls(value)


class Rounding(_Choice):
    """Element rounding modes (defined in reference.py's module docstring; "even" is OCP MX v1.0 §6.3)."""

    EVEN = "even"
    AWAY = "away"
    ZERO = "zero"
    STOCHASTIC = "stochastic"


class ScaleMode(_Choice):
    """Shared-scale selection rules for power-of-two scales (reference.py; "floor" is OCP MX v1.0 §6.3)."""

    FLOOR = "floor"
    CEIL = "ceil"
    EVEN = "even"
    RCEIL = "rceil"


#: Element rounding modes accepted everywhere (the values of :class:`Rounding`, in the C kernels' order).
ROUNDINGS = tuple(m.value for m in Rounding)
#: Shared-scale selection rules (the values of :class:`ScaleMode`, in the C kernels' order).
SCALE_MODES = tuple(m.value for m in ScaleMode)
#: Numerics compatibility modes: None (this library, OCP-exact) or "microxcaling".
COMPAT_MODES = (None, "microxcaling")


@dataclass(frozen=True)
class ElementFormat:
    """A scalar element type.

    kind="fp": sign, ``ebits`` exponent bits (bias 2^(ebits-1)-1), ``mbits`` mantissa bits, subnormals.
      ``specials`` says which codes are not finite numbers:
        - "ieee":  top exponent is Inf (mantissa 0) / NaN (otherwise), like FP8 E5M2 (OCP MX §5.3.1).
        - "nan_only": only S.1111.111 is NaN, no Inf, the rest of the top binade is finite (E4M3 "fn").
        - "finite": every code is a number (FP6 E3M2/E2M3, FP4 E2M1; OCP MX §5.3.2-3).
    kind="int": ``bits``-bit integers scaled by 2^-frac_bits (fixed point).
      ``encoding`` "twos" (two's complement; MXINT8, OCP MX §5.4: value = code·2^-6) or
      "sign_magnitude" (BDR MX9/MX6/MX4 and MSFP: sign bit + (bits-1)-bit magnitude).
      Values are symmetric: the two's-complement code -2^(bits-1) (0x80 for INT8) decodes to -2^(bits-1-frac)
      as the spec's encoding says but is never produced by quantization (OCP MX §5.4 allows implementations
      to keep the range symmetric).
    """

    name: str
    kind: Literal["fp", "int"]
    ebits: int = 0
    mbits: int = 0
    specials: Literal["ieee", "nan_only", "finite"] = "finite"
    int_bits: int = 0
    frac_bits: int = 0
    encoding: Literal["twos", "sign_magnitude"] = "twos"

    def __post_init__(self):
        if self.specials not in ("ieee", "nan_only", "finite"):
            raise ValueError(f"specials must be 'ieee', 'nan_only' or 'finite', got {self.specials!r}")
        if self.encoding not in ("twos", "sign_magnitude"):
            raise ValueError(f"encoding must be 'twos' or 'sign_magnitude', got {self.encoding!r}")
        if self.kind == "fp":
            if self.ebits < 1 or self.mbits < 0:
                raise ValueError(f"fp element {self.name!r} needs ebits >= 1 and mbits >= 0, got "
                                 f"ebits={self.ebits}, mbits={self.mbits}")
            if 1 + self.ebits + self.mbits > 16:
                raise ValueError(f"fp element {self.name!r} wider than 16 bits is not supported")
        elif self.kind == "int":
            if not 2 <= self.int_bits <= 16:
                raise ValueError(f"int element {self.name!r} needs 2 <= int_bits <= 16, got {self.int_bits}")
        else:
            raise ValueError(f"element kind must be 'fp' or 'int', got {self.kind!r}")

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Storage width of one element code in bits."""
        return 1 + self.ebits + self.mbits if self.kind == "fp" else self.int_bits

    @property
    def bias(self) -> int:
        """Exponent bias (fp only): 2^(ebits-1) - 1."""
        return (1 << (self.ebits - 1)) - 1 if self.kind == "fp" else 0

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (fp); 0 - frac_bits + ... is not used for ints."""
        return 1 - self.bias if self.kind == "fp" else -self.frac_bits

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number: floor(log2(max_normal)) (OCP MX Table 1: emax_elem)."""
        return math.floor(math.log2(self.max_normal))

    @property
    def max_normal(self) -> float:
        """Largest finite magnitude."""
        if self.kind == "int":
            return float(((1 << (self.int_bits - 1)) - 1) * 2.0 ** -self.frac_bits)
        top = (1 << self.ebits) - 1 - self.bias  # exponent of the top binade
        if self.specials == "ieee":  # top binade is Inf/NaN
            return float((2 - 2.0 ** -self.mbits) * 2.0 ** (top - 1))
        if self.specials == "nan_only":  # only all-ones mantissa is NaN
            return float((2 - 2.0 ** (1 - self.mbits)) * 2.0 ** top)
        return float((2 - 2.0 ** -self.mbits) * 2.0 ** top)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal magnitude (for ints: the step 2^-frac_bits)."""
        return float(2.0 ** self.emin) if self.kind == "fp" else float(2.0 ** -self.frac_bits)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive magnitude."""
        return float(2.0 ** (self.emin - self.mbits)) if self.kind == "fp" else float(2.0 ** -self.frac_bits)

    @property
    def n_codes(self) -> int:
        return 1 << self.bits

    @cached_property
    def code_values(self) -> np.ndarray:
        """float64 value of every code 0 .. 2^bits - 1 (NaN / ±Inf where the format has them)."""
        codes = np.arange(self.n_codes, dtype=np.int64)
        if self.kind == "int":
            if self.encoding == "twos":
                signed = np.where(codes >= (1 << (self.int_bits - 1)), codes - (1 << self.int_bits), codes)
            else:
                mag = codes & ((1 << (self.int_bits - 1)) - 1)
                signed = np.where(codes >> (self.int_bits - 1), -mag, mag)
            return signed.astype(np.float64) * 2.0 ** -self.frac_bits
        sign = np.where(codes >> (self.ebits + self.mbits), -1.0, 1.0)
        exp_field = (codes >> self.mbits) & ((1 << self.ebits) - 1)
        man = (codes & ((1 << self.mbits) - 1)).astype(np.float64)
        normal = exp_field > 0
        mag = np.where(
            normal,
            (1.0 + man * 2.0 ** -self.mbits) * np.exp2(exp_field.astype(np.float64) - self.bias),
            man * 2.0 ** (self.emin - self.mbits),
        )
        vals = sign * mag
        top = exp_field == (1 << self.ebits) - 1
        if self.specials == "ieee":
            vals = np.where(top & (man == 0), sign * np.inf, vals)
            vals = np.where(top & (man != 0), np.nan, vals)
        elif self.specials == "nan_only":
            vals = np.where(top & (man == (1 << self.mbits) - 1), np.nan, vals)
        vals.setflags(write=False)
        return vals

    @property
    def has_nan(self) -> bool:
        return self.kind == "fp" and self.specials != "finite"

    @property
    def has_inf(self) -> bool:
        return self.kind == "fp" and self.specials == "ieee"

    @property
    def nan_code(self) -> int | None:
        """Canonical NaN code (positive sign, all-ones exponent and mantissa), or None."""
        return (1 << (self.bits - 1)) - 1 if self.has_nan else None

    def describe(self) -> str:
        if self.kind == "fp":
            return f"FP{self.bits} E{self.ebits}M{self.mbits} ({self.specials})"
        enc = "2's compl." if self.encoding == "twos" else "sign-mag."
        return f"INT{self.bits} {enc} x2^-{self.frac_bits}"


@dataclass(frozen=True)
class ScaleFormat:
    """Type of a shared scale.

    kind="e8m0": unsigned 8-bit exponent, value 2^(code-127), code 0xFF = NaN, no zero or Inf
      (OCP MX §5.2). ``bits`` may be set below 8 for BDR sweeps (a d1-bit exponent, bias 2^(d1-1)-1,
      all-ones = NaN).
    kind="fp": a scale stored in a small float format (``element``), e.g. E4M3 for NVFP4.
    kind="fp32": a full-precision scale (per-tensor or per-channel formats).
    kind="uint": a ``bits``-bit unsigned integer multiplier (1 .. 2^bits - 1) of a second-level FP32 scale
      (VS-Quant's per-vector integer scale factors, Dai et al., MLSys 2021); it has no NaN code.
    """

    name: str
    kind: Literal["e8m0", "fp", "fp32", "uint"]
    bits: int = 8
    element: ElementFormat | None = None

    def __post_init__(self):
        if self.kind not in ("e8m0", "fp", "fp32", "uint"):
            raise ValueError(f"scale kind must be 'e8m0', 'fp', 'fp32' or 'uint', got {self.kind!r}")
        if self.kind == "e8m0" and not 2 <= self.bits <= 8:
            raise ValueError(f"exponent scale needs 2..8 bits, got {self.bits}")
        if self.kind == "fp" and self.element is None:
            raise ValueError("an 'fp' scale format needs an element format")
        if self.kind == "uint" and not 1 <= self.bits <= 8:
            raise ValueError(f"an integer scale needs 1..8 bits, got {self.bits}")

    @property
    def bias(self) -> int:
        """Exponent bias of a power-of-two scale: 127 for E8M0."""
        return (1 << (self.bits - 1)) - 1

    @property
    def emin(self) -> int:
        """Smallest representable scale exponent (E8M0: -127, code 0)."""
        return -self.bias

    @property
    def emax(self) -> int:
        """Largest representable scale exponent (E8M0: 127, code 0xFE)."""
        return (1 << self.bits) - 2 - self.bias

    @property
    def nan_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def storage_bytes(self) -> int:
        return (self.bits + 7) // 8

    @cached_property
    def code_values(self) -> np.ndarray:
        """float64 value of every code (E8M0 only)."""
        if self.kind != "e8m0":
            raise ValueError(f"code_values is defined for exponent scales, not {self.kind!r}")
        codes = np.arange(1 << self.bits, dtype=np.float64)
        vals = np.exp2(codes - self.bias)
        vals[-1] = np.nan
        vals.setflags(write=False)
        return vals


@dataclass(frozen=True)
class BlockFormat:
    """A block data representation (BDR): elements sharing scales in one or two levels.

    - ``element``: element type (``None`` means no quantization: the "none" format).
    - ``block_size`` (k1): elements sharing one ``scale``. ``None`` means one scale for the whole axis
      (per-channel / per-vector); 0 means one scale for the whole tensor.
    - ``subblock_size`` (k2) and ``micro_bits`` (d2): an optional second level where each k2-element
      sub-block shares a d2-bit microexponent that shifts it down from the block exponent (BDR paper §3).
    - ``tensor_scale``: an optional extra FP32 scale above the block scales: one per tensor (NVFP4's
      second level, and the only scale of per-tensor formats such as "int8_tensor", whose ``scale`` is
      None) or, with ``tensor_scale_granularity="channel"``, one per vector along the block axis (VSQ's
      per-channel scale). A format with ``scale=None`` and no ``tensor_scale`` is unscaled (a plain cast).
    A format is what is stored; how values are rounded into it (element rounding, the shared-scale rule)
    is a quantization option of :class:`QuantSpec`, not part of the format.
    """

    name: str
    element: ElementFormat | None
    block_size: int | None = 32
    scale: ScaleFormat | None = None
    subblock_size: int | None = None
    micro_bits: int = 0
    tensor_scale: ScaleFormat | None = None
    description: str = field(default="", compare=False)
    tensor_scale_granularity: Literal["tensor", "channel"] = "tensor"

    def __post_init__(self):
        if self.block_size is not None and self.block_size < 0:
            raise ValueError(f"block_size must be >= 0 or None, got {self.block_size}")
        if self.subblock_size is not None:
            if self.subblock_size < 1:
                raise ValueError(f"subblock_size must be >= 1 or None, got {self.subblock_size}")
            if not 1 <= self.micro_bits <= 8:
                raise ValueError(f"a second level needs 1 <= micro_bits <= 8, got {self.micro_bits}")
            if not self.block_size or self.block_size % self.subblock_size:
                raise ValueError(f"subblock_size {self.subblock_size} must divide block_size {self.block_size}")
            if self.micro_bits < 1:
                raise ValueError("a second level needs micro_bits >= 1")
        if self.tensor_scale_granularity not in ("tensor", "channel"):
            raise ValueError(f"tensor_scale_granularity must be 'tensor' or 'channel', got "
                             f"{self.tensor_scale_granularity!r}")
        if self.element is not None:
            if self.subblock_size is not None and (self.scale is None or self.scale.kind != "e8m0"):
                raise ValueError("a second level (microexponents) needs a power-of-two (e8m0-kind) scale")
            if self.tensor_scale is not None and self.tensor_scale.kind != "fp32":
                raise ValueError("tensor_scale must be an 'fp32' scale format")
            if self.scale is not None and self.scale.kind == "uint" and self.tensor_scale is None:
                raise ValueError("integer ('uint') block scales multiply a tensor_scale; give one")
            if self.scale is not None and self.scale.kind in ("e8m0", "fp32") and self.tensor_scale is not None:
                raise ValueError(f"a {self.scale.kind} block scale with a tensor_scale is not supported")

    @property
    def is_two_level(self) -> bool:
        """True for BDR formats with shared microexponents (k2-element sub-blocks, d2-bit shifts)."""
        return self.subblock_size is not None

    @property
    def is_mx(self) -> bool:
        """True for single-level power-of-two (E8M0-style) block formats: the OCP MX family."""
        return (self.element is not None and self.scale is not None and self.scale.kind == "e8m0"
                and bool(self.block_size) and self.subblock_size is None and self.tensor_scale is None)

    @property
    def bits_per_element(self) -> float:
        """Average storage bits per element for full blocks: element + scale/k1 + micro/k2 (BDR eq. 1).

        Per-axis, per-channel and per-tensor FP32 scales are amortized over an unknown length and not
        counted (they are in ``MXTensor.nbytes``)."""
        if self.element is None:
            return 32.0
        b = float(self.element.bits)
        if self.scale is not None and self.block_size:
            b += self.scale.bits / self.block_size
        if self.subblock_size:
            b += self.micro_bits / self.subblock_size
        return b

    @property
    def emax(self) -> int:
        """emax of the element format (OCP MX Table 1: emax_elem)."""
        return self.element.emax

    @property
    def max_value(self) -> float:
        """Largest finite magnitude representable: max element times the largest scale."""
        if self.element is None:
            return float(np.finfo(np.float32).max)
        if self.scale is None and self.tensor_scale is None:  # unscaled: a plain cast
            return self.element.max_normal
        if self.scale is None or self.scale.kind != "e8m0":
            return float("inf")
        return self.element.max_normal * 2.0 ** self.scale.emax

    def describe(self) -> str:
        if self.element is None:
            return "no quantization"
        parts = [self.element.describe()]
        if self.scale is not None:
            k = {None: "axis", 0: "tensor"}.get(self.block_size, self.block_size)
            parts.append(f"k1={k} {self.scale.name}")
        if self.subblock_size:
            parts.append(f"k2={self.subblock_size} d2={self.micro_bits}")
        if self.tensor_scale is not None:
            parts.append(f"+{self.tensor_scale.name}/{self.tensor_scale_granularity}")
        return ", ".join(parts)


# ---- concrete element and scale types (OCP MX v1.0 §5) -------------------------------------------
E4M3 = ElementFormat("e4m3", "fp", ebits=4, mbits=3, specials="nan_only")
E5M2 = ElementFormat("e5m2", "fp", ebits=5, mbits=2, specials="ieee")
E3M2 = ElementFormat("e3m2", "fp", ebits=3, mbits=2, specials="finite")
E2M3 = ElementFormat("e2m3", "fp", ebits=2, mbits=3, specials="finite")
E2M1 = ElementFormat("e2m1", "fp", ebits=2, mbits=1, specials="finite")
INT8 = ElementFormat("int8", "int", int_bits=8, frac_bits=6, encoding="twos")

E8M0 = ScaleFormat("e8m0", "e8m0", bits=8)
FP32_SCALE = ScaleFormat("fp32", "fp32", bits=32)

# ---- registry ------------------------------------------------------------------------------------
_REGISTRY: dict[str, BlockFormat] = {}
_ALIASES: dict[str, str] = {}


def register_format(fmt: BlockFormat, *aliases: str, replace: bool = False) -> BlockFormat:
    """Add a BlockFormat to the named registry (and optional aliases); returns it."""
    for n in (fmt.name, *aliases):
        key = n.lower()
        if not replace and (key in _REGISTRY or key in _ALIASES):
            raise ValueError(f"format name {n!r} is already registered")
    _REGISTRY[fmt.name.lower()] = fmt
    for a in aliases:
        _ALIASES[a.lower()] = fmt.name.lower()
    return fmt


def list_formats(include_aliases: bool = False) -> list[str]:
    """Names of every registered format (sorted), optionally with aliases."""
    names = list(_REGISTRY)
    if include_aliases:
        names += list(_ALIASES)
    return sorted(names)


def get_format(fmt: str | BlockFormat) -> BlockFormat:
    """Look up a format by name (case-insensitive) or by :func:`format_key`, or pass a BlockFormat through.

    Raises ValueError listing the known names for an unknown one, TypeError for other types.
    """
    if isinstance(fmt, BlockFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a name (str) or a BlockFormat, got {type(fmt).__name__}")
    if fmt in _INTERNED:
        return _INTERNED[fmt]
    key = fmt.lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(list_formats(True))}")
    return _REGISTRY[key]


# ---- interned keys: a string for every format, registered or not ----------------------------------
_INTERNED: dict[str, BlockFormat] = {}
_KEYS: dict[BlockFormat, str] = {}


def format_key(fmt: BlockFormat) -> str:
    """A string that :func:`get_format` turns back into ``fmt``: its registered name when the registry
    holds this very format under it, else ``"<name>@<digest of its fields>"``, interned in a table of this
    process. Ops that must see static strings (torch custom ops under torch.compile) carry this key, so
    an unregistered format (e.g. from :func:`bdr_format`) needs no registration."""
    if not isinstance(fmt, BlockFormat):
        raise TypeError(f"format_key takes a BlockFormat, got {type(fmt).__name__}")
    key = _KEYS.get(fmt)
    if key is not None:
        return key
    if _REGISTRY.get(fmt.name.lower()) == fmt:
        return fmt.name
    digest = hashlib.sha1(repr(dataclasses.replace(fmt, description="")).encode()).hexdigest()[:12]
    key = f"{fmt.name}@{digest}"
    _INTERNED[key] = fmt
    _KEYS[fmt] = key
    return key


def _mx(name: str, element: ElementFormat, *aliases: str) -> BlockFormat:
    return register_format(
        BlockFormat(name, element, block_size=32, scale=E8M0,
                    description=f"OCP MX v1.0 Table 1: {element.describe()}, 32-element blocks, E8M0 scale"),
        *aliases)


# OCP MX v1.0 Table 1: the concrete MX-compliant formats.
_mx("mxfp8_e4m3", E4M3, "mxfp8")
_mx("mxfp8_e5m2", E5M2)
_mx("mxfp6_e3m2", E3M2, "mxfp6")
_mx("mxfp6_e2m3", E2M3)
_mx("mxfp4_e2m1", E2M1, "mxfp4")
_mx("mxint8", INT8)
register_format(BlockFormat("none", None, block_size=None, description="no quantization (FP32 passthrough)"),
                "fp32")


# ---- block data representations beyond OCP MX (BDR paper; vendor formats) ------------------------
def sign_magnitude(m: int) -> ElementFormat:
    """BDR element "sign + m magnitude bits": value = ±mag · 2^(1-m), mag in 0 .. 2^m - 1.

    The magnitude is a fixed-point mantissa with an explicit leading bit, aligned so that the element's
    top binade is [1, 2) (emax 0, like MXINT8): a block with shared exponent E stores x as
    sign · mag · 2^(E + 1 - m) (Rouhani et al., ISCA 2023, §3; MSFP, Darvish Rouhani et al., NeurIPS 2020).
    m = 7 / 4 / 2 gives the elements of MX9 / MX6 / MX4 (and m = 7 / 3 those of MSFP16 / MSFP12).
    """
    if not 1 <= m <= 15:
        raise ValueError(f"sign-magnitude elements need 1 <= m <= 15 magnitude bits, got {m}")
    return ElementFormat(f"sm{m + 1}", "int", int_bits=m + 1, frac_bits=m - 1, encoding="sign_magnitude")


#: Symmetric integers for per-tensor / per-channel / per-vector scaled formats (value = code, |code| <= 2^(b-1)-1).
INT8_SYM = ElementFormat("int8_sym", "int", int_bits=8, frac_bits=0, encoding="twos")
INT4_SYM = ElementFormat("int4_sym", "int", int_bits=4, frac_bits=0, encoding="twos")
#: NVFP4's block scale: an (unsigned) E4M3 value.
E4M3_SCALE = ScaleFormat("e4m3", "fp", bits=8, element=E4M3)


def _scale_name(d1: int) -> str:
    return "e8m0" if d1 == 8 else f"e{d1}m0"


def _exp_scale(d1: int) -> ScaleFormat:
    return E8M0 if d1 == 8 else ScaleFormat(_scale_name(d1), "e8m0", bits=d1)


def bdr_format(element: ElementFormat | int, k1: int, d1: int = 8, k2: int | None = None, d2: int = 0,
               name: str | None = None, description: str = "") -> BlockFormat:
    """A BDR format (Rouhani et al., ISCA 2023): ``element`` (an ElementFormat, or m for sign + m
    magnitude bits), k1-element blocks sharing a d1-bit power-of-two scale, and optionally k2-element
    sub-blocks sharing a d2-bit microexponent. Not registered; pass it anywhere a format is accepted."""
    elem = sign_magnitude(element) if isinstance(element, int) else element
    if k2 is None:
        d2 = 0
    if name is None:
        name = f"bdr_{elem.name}_k{k1}_d{d1}" + (f"_k2{k2}_d2{d2}" if k2 else "")
    return BlockFormat(name, elem, block_size=k1, scale=_exp_scale(d1),
                       subblock_size=k2, micro_bits=d2 if k2 else 0, description=description)


def bfp_format(m: int, k: int, d1: int = 8, name: str | None = None) -> BlockFormat:
    """Block floating point with k-element blocks, a d1-bit shared exponent and sign + m mantissa bits
    (mantissa with explicit leading bit, aligned to the block's largest exponent; = MSFP for k = 16)."""
    return bdr_format(m, k, d1, name=name or f"bfp{m + 1}_k{k}" + ("" if d1 == 8 else f"_d{d1}"),
                      description=f"block floating point: sign + {m}-bit mantissa, k={k}, {d1}-bit exponent")


# BDR paper (ISCA 2023) Table 2: MX9 / MX6 / MX4 = sign + m magnitude bits, k1 = 16 with an 8-bit shared
# exponent, k2 = 2 with a 1-bit microexponent: 8 + 8/16 + 1/2 = 9, 6, 4 bits per element (element + overhead).
for _m, _n in ((7, "mx9"), (4, "mx6"), (2, "mx4")):
    register_format(bdr_format(_m, 16, 8, 2, 1, name=_n, description=(
        f"BDR {_n.upper()}: sign + {_m}-bit magnitude, k1=16 E8M0 scale, k2=2 1-bit microexponent "
        f"(Rouhani et al., ISCA 2023)")))
# MSFP (Darvish Rouhani et al., NeurIPS 2020): bounding box of 16, 8-bit shared exponent.
register_format(bfp_format(3, 16, name="msfp12"))
register_format(bfp_format(7, 16, name="msfp16"))
register_format(BlockFormat("int8_tensor", INT8_SYM, block_size=None, scale=None, tensor_scale=FP32_SCALE,
                            description="INT8 (±127) with one FP32 scale amax/127 per tensor"))
register_format(BlockFormat("int8_channel", INT8_SYM, block_size=None, scale=FP32_SCALE,
                            description="INT8 (±127) with one FP32 scale amax/127 per vector along the axis "
                                        "(per output channel for a weight quantized along its input axis)"))
register_format(BlockFormat("fp8_e4m3_tensor", E4M3, block_size=None, scale=None, tensor_scale=FP32_SCALE,
                            description="FP8 E4M3 with one FP32 scale amax/448 per tensor"))
register_format(BlockFormat("fp8_e5m2_tensor", E5M2, block_size=None, scale=None, tensor_scale=FP32_SCALE,
                            description="FP8 E5M2 with one FP32 scale amax/57344 per tensor"))
register_format(BlockFormat("fp8_e4m3", E4M3, block_size=None, scale=None,
                            description="FP8 E4M3, unscaled (a saturating cast)"))
register_format(BlockFormat("fp8_e5m2", E5M2, block_size=None, scale=None,
                            description="FP8 E5M2, unscaled (a saturating cast)"))
register_format(BlockFormat("nvfp4", E2M1, block_size=16, scale=E4M3_SCALE, tensor_scale=FP32_SCALE,
                            description="NVIDIA NVFP4: E2M1, 16-element blocks with an E4M3 scale, FP32 tensor scale"))
register_format(BlockFormat("vsq_int4", INT4_SYM, block_size=16, scale=ScaleFormat("uint6", "uint", bits=6),
                            tensor_scale=FP32_SCALE, tensor_scale_granularity="channel",
                            description="VS-Quant: INT4 (±7), 16-element vectors with a 6-bit unsigned integer "
                                        "scale times an FP32 per-channel scale"))


# ---- a resolved quantization request ---------------------------------------------------------------
@dataclass(frozen=True)
class QuantSpec:
    """One resolved quantization request: a format object and typed options. Frozen and hashable.

    Built once at a public edge (:meth:`resolve`: the verbs of quantize.py, ``nn.OperandSpec``, the CLI)
    from names and strings; everything below takes it as is, so nothing re-validates. The constructor
    accepts only resolved values (a BlockFormat, a :class:`Rounding`, a :class:`ScaleMode`, a compat
    mode) and raises TypeError otherwise. ``scale_mode`` defaults to "floor" (OCP MX v1.0 §6.3); it
    applies to power-of-two scales only (amax-scaled formats ignore it, reference.py).
    """

    format: BlockFormat
    rounding: Rounding = Rounding.EVEN
    scale_mode: ScaleMode = ScaleMode.FLOOR
    compat: str | None = None

    def __post_init__(self):
        for name, want in (("format", BlockFormat), ("rounding", Rounding), ("scale_mode", ScaleMode)):
            value = getattr(self, name)
            if not isinstance(value, want):
                raise TypeError(f"QuantSpec.{name} must be a resolved {want.__name__}, got "
                                f"{type(value).__name__} {value!r}; build specs with QuantSpec.resolve")
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {self.compat!r}")

    @classmethod
    def resolve(cls, fmt: "str | BlockFormat", rounding: "str | Rounding" = "even",
                scale_mode: "str | ScaleMode | None" = None, compat: str | None = None) -> "QuantSpec":
        """Look the format up and parse the options (ValueError naming the accepted values);
        ``scale_mode=None`` means "floor"."""
        return cls(get_format(fmt), Rounding(rounding),
                   ScaleMode.FLOOR if scale_mode is None else ScaleMode(scale_mode), compat)

    @property
    def key(self) -> str:
        """The format's :func:`format_key` (a static string for custom ops)."""
        return format_key(self.format)

    def describe(self) -> str:
        extra = "" if self.compat is None else f", compat={self.compat}"
        return f"{self.format.name} (rounding={self.rounding}, scale_mode={self.scale_mode}{extra})"

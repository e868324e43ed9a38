"""Fast quantization paths, bit-identical to :mod:`microscale.reference`.

Each entry point returns ``None`` when it does not cover a request (format, rounding, scale mode,
dtype, compat mode); the public verbs in :mod:`microscale.quantize` then fall back to the reference.

Technology: a plain C extension (``_mxkernels``: module glue in ``_mxkernels.c``, the loops in
``_mxloops.c``, scalar pieces in ``_mxscalar.h``, packing in ``_mxpack.h``; built by setuptools
``ext_modules`` in setup.py at install time, ``-O3 -fopenmp``). Why C rather than torch ops or a torch C++ extension:
- torch ops cannot reach memory bandwidth here: quantization is ~40 integer operations per element
  that torch would run as ~20 separate passes over memory; one fused pass is what makes 2x-the-copy
  possible.
- No torch headers: the kernels take raw data pointers (``tensor.data_ptr()``), so building needs only
  a C compiler and Python's headers, takes ~10 s at install, and nothing is compiled at first call.
  A CPython extension (not ctypes) because setuptools builds and places it like any module (editable
  installs included) and a call costs ~1 us.
- Exactness by construction: the kernels use integer arithmetic on the fp32 bit pattern (exponent
  field = exact floor(log2), significand shifts for rounding), never floating-point arithmetic on
  data, so results do not depend on FTZ/DAZ or on evaluation order (see the C file's header).
- Portable speed: the workers are compiled for AVX-512, AVX2 and baseline x86-64 in one library and
  chosen at import with ``__builtin_cpu_supports`` (no -march=native); loops are auto-vectorized
  (``#pragma omp simd``) and split among ``torch.get_num_threads()`` OpenMP threads.

Memory safety: the C functions take raw addresses and trust them, so every call into ``_mxkernels``
goes through :func:`checked_pointers` first, which re-checks each buffer it is about to hand over
(a CPU, dense, contiguous tensor of exactly the dtype and byte size the format and shape imply, with a
non-NULL address) and the loop geometry against the input, and raises ValueError / TypeError otherwise.
The coverage checks before it return None ("not covered") for tensors on any other device, so those
reach the device-agnostic path; the guard is the last line that holds even when a component tensor was
resized in place after an MXTensor was built.

If the extension is missing or fails to load, every entry point returns None (reference fallback)
after one RuntimeWarning. Set ``MICROSCALE_KERNELS=0`` to disable the kernels (benchmarks/tests).

Covered: single-level power-of-two block formats (``BlockFormat.is_mx``: OCP MX, and MSFP / BFP with
sign-magnitude elements and any d1-bit shared exponent) with fp or int elements of at most 8 bits and
blocks of up to 1024 elements in whole bytes; two-level BDR formats (MX9 / MX6 / MX4 and any
``bdr_format(m, k1, d1, k2, d2)``, docs/bdr.md "Two-level rules") with elements of at most 8 bits,
k1 <= 256 elements in whole bytes, any k2 dividing k1 and d2 <= 8, as long as every value is an fp32
value (smallest quantum 2^(1 - m) times the smallest scale 2^(-(2^(d1-1) - 1) - (2^d2 - 1)) >= 2^-149:
d2 <= 4 for sign + 7 bits with d1 = 8); quantize returns their microexponents packed at d2 bits. Inputs
float32/bfloat16/float16 of any shape and axis; rounding even/away/zero/stochastic; every scale mode;
``compat=None``. Not covered (reference): float64 inputs, ``compat="microxcaling"``, amax-scaled formats
(FP32 / E4M3 / integer block scales, tensor scales: NVFP4, VSQ, INT8/FP8 per tensor or channel), unscaled
casts, two-level formats outside the limits above. Dequantize also covers float64 outputs.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from ..formats import ROUNDINGS, SCALE_MODES, get_format
from ..layout import make_layout
from ..packing import packed_nbytes

__all__ = ["fake_quantize", "quantize", "dequantize", "packed_linear", "available", "info", "checked_pointers"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_ENC = {"fp": 0, "twos": 1, "sign_magnitude": 2}
_MAX_BLOCK = 1024
#: Largest block (k1) of the two-level (microexponent) formats the kernels take.
_MAX_BLOCK_TWO_LEVEL = 256
#: Below this many elements one thread does the work (thread start-up would dominate).
_PARALLEL_MIN = 1 << 15

_lib = None
_load_failed = False


def _load():
    """The compiled module, or None (with one warning) when it is missing or broken."""
    global _lib, _load_failed
    if _lib is not None or _load_failed:
        return _lib
    if os.environ.get("MICROSCALE_KERNELS", "1") == "0":
        _load_failed = True
        return None
    try:
        from . import _mxkernels
        _lib = _mxkernels
    except Exception as e:  # ImportError, or a broken shared object  # noqa: BLE001
        _load_failed = True
        warnings.warn(f"microscale: C kernels unavailable ({e}); using the (slow) reference quantizer. "
                      "Reinstall with a C compiler (`pip install --no-build-isolation -e .`) to build them.",
                      RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    """True when the compiled kernels are loaded (loading them on first call)."""
    return _load() is not None


def info() -> dict | None:
    """Build facts of the loaded kernels (selected ISA, OpenMP), or None."""
    lib = _load()
    return None if lib is None else lib.info()


def _floor_log2(v: float) -> int:
    return math.frexp(v)[1] - 1


_PARAMS: dict = {}


def _params(fmt) -> tuple | None:
    """The C kernels' description of ``fmt`` (a tuple of ints), or None when they do not cover it.

    Single-level power-of-two formats (``fmt.is_mx``: OCP MX, MSFP / BFP with any d1) and two-level BDR
    formats (power-of-two d1-bit scale, k2-element sub-blocks with d2-bit microexponents; the last two
    ints are k2 and d2, 0 and 0 for a single level)."""
    key = fmt
    if key in _PARAMS:
        return _PARAMS[key]
    p = None
    elem, scale, k = fmt.element, fmt.scale, fmt.block_size
    two_level = (fmt.is_two_level and elem is not None and scale is not None and scale.kind == "e8m0"
                 and fmt.tensor_scale is None and bool(k) and k <= _MAX_BLOCK_TWO_LEVEL
                 and k % fmt.subblock_size == 0 and 1 <= fmt.micro_bits <= 8)
    # the largest microexponent lowers the smallest scale: every value must still be an fp32 value
    beta = (1 << fmt.micro_bits) - 1 if two_level else 0
    if ((fmt.is_mx or two_level) and scale.kind == "e8m0" and 2 <= elem.bits <= 8 and k <= _MAX_BLOCK
            and (k * elem.bits) % 8 == 0):
        if elem.kind == "fp":
            emin, mbits = elem.emin, elem.mbits
            finite = [c for c in range(1 << (elem.bits - 1)) if math.isfinite(elem.code_values[c])]
            maxmag = max(finite)
            inf_mag = maxmag + 1 if elem.has_inf else -1
            quantum_exp = emin - mbits
            even_m = mbits
        else:
            # An int element is an fp-like format that never leaves its "subnormal" range:
            # quantum 2^-frac_bits = 2^(emin - mbits) with emin = emax and mbits = int_bits - 2.
            emin, mbits = elem.emax, elem.int_bits - 2
            maxmag = (1 << (elem.int_bits - 1)) - 1
            inf_mag = -1
            quantum_exp = -elem.frac_bits
            even_m = elem.frac_bits
            assert emin - mbits == -elem.frac_bits
        e1 = max((maxmag >> mbits) - 1, 0)
        nmax, pmaxbase = maxmag - (e1 << mbits), e1 + emin - mbits
        emax = elem.emax
        sigm = int(elem.max_normal / 2.0 ** _floor_log2(elem.max_normal) * 2**23)
        exact = (elem.max_normal / 2.0 ** _floor_log2(elem.max_normal) * 2**23 == sigm
                 and nmax * 2.0**pmaxbase == elem.max_normal)
        # every dequantized value must be an fp32 value (smallest quantum times smallest scale)
        if exact and quantum_exp + scale.emin - beta >= -149 and 0 <= even_m <= 22 and emax >= 0:
            p = (emin, mbits, maxmag, inf_mag, nmax, pmaxbase, _ENC[elem.encoding if elem.kind == "int" else "fp"],
                 elem.bits, emax, even_m, _floor_log2(elem.max_normal), sigm, scale.emin, scale.emax,
                 scale.bias, scale.nan_code, k,
                 fmt.subblock_size if two_level else 0, fmt.micro_bits if two_level else 0)
    _PARAMS[key] = p
    return p


def checked_pointers(entry: str, buffers, geometry: tuple[int, int, int] | None = None) -> list[int]:
    """Addresses of the buffers about to be handed to the C function ``entry``, after checking each one.

    ``buffers``: ``(role, tensor, dtype, nbytes)`` tuples; each tensor must be a dense, contiguous CPU
    tensor of ``dtype`` holding exactly ``nbytes`` bytes, with a non-NULL address when ``nbytes > 0``.
    ``tensor=None`` passes NULL, for the buffers the C function does not touch in this mode (its
    ``nbytes`` must be 0). ``geometry``: the ``(outer, L, inner)`` loop bounds the C side will walk; their
    product must be the element count of the first buffer (the input). Every entry into ``_mxkernels``
    goes through here; a violation raises ValueError / TypeError naming the entry point and the buffer
    instead of letting C read or write out of bounds. This is the one place those checks live.
    """
    ptrs = []
    for role, t, dtype, nbytes in buffers:
        where = f"microscale.kernels.{entry}: buffer {role!r}"
        if t is None:
            if nbytes:
                raise ValueError(f"{where}: missing, but {nbytes} bytes are needed")
            ptrs.append(0)
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{where}: the C kernels take CPU tensors only, got one on {t.device}")
        if t.layout != torch.strided:
            raise ValueError(f"{where}: expected a dense tensor, got layout {t.layout}")
        if t.dtype != dtype:
            raise TypeError(f"{where}: expected {dtype}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{where}: expected a contiguous tensor")
        got = t.numel() * t.element_size()
        if got != nbytes:
            raise ValueError(f"{where}: expected exactly {nbytes} bytes, got {got} "
                             f"({t.dtype} {tuple(t.shape)}); was a component replaced or resized?")
        ptr = t.data_ptr()
        if nbytes and not ptr:
            raise ValueError(f"{where}: has no data (NULL address)")
        ptrs.append(ptr)
    if geometry is not None:
        outer, length, inner = geometry
        first = buffers[0][1]
        if min(geometry) < 0 or outer * length * inner != first.numel():
            raise ValueError(f"microscale.kernels.{entry}: loop geometry {geometry} does not match the "
                             f"{first.numel()} elements of {buffers[0][0]!r}")
    return ptrs


def _on_cpu(*tensors) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.device.type == "cpu") for t in tensors)


def _covered(x: torch.Tensor, fmt, rounding: str, scale_mode: str, compat):
    """(format parameters, loaded library) when the kernels cover this request, else None."""
    if compat is not None or rounding not in ROUNDINGS or scale_mode not in SCALE_MODES or x.dim() == 0:
        return None
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not _on_cpu(x):
        return None
    params = _params(get_format(fmt))
    lib = _load() if params is not None else None
    return None if lib is None else (params, lib)


def _geometry(shape, axis: int) -> tuple[int, int, int]:
    ax = axis % len(shape)
    return math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= _PARALLEL_MIN else 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _packed_sizes(layout, fmt) -> dict[str, int]:
    """Bytes of the packed codes, uint8 scales and (two-level formats) microexponents of ``layout``:
    the sizes MXTensor storage has (tensor.component_specs), restated for the formats covered here."""
    sizes = {"codes": packed_nbytes(layout.n_elements_padded, fmt.element.bits), "scales": layout.n_blocks}
    if fmt.is_two_level:
        n_sub = layout.n_blocks * (layout.block_size // fmt.subblock_size)
        sizes["micro scratch"] = n_sub
        sizes["micro"] = packed_nbytes(n_sub, fmt.micro_bits)
    return sizes


def _run_quantize(mode, x, out, codes, scales, params, fmt, axis, rounding, scale_mode, seed, lib,
                  micro=None):
    """One call of the C quantizer: mode 0 fake-quantizes ``x`` into ``out``; mode 1 writes packed
    ``codes``/``scales`` (and, for two-level formats, ``micro`` = (scratch, packed)), sizes from the
    layout."""
    geometry = _geometry(tuple(x.shape), axis)
    if mode == 0:
        bufs = [("x", x, x.dtype, _nbytes(x)), ("out", out, x.dtype, _nbytes(x)),
                ("codes", None, torch.uint8, 0), ("scales", None, torch.uint8, 0)]
    else:
        sizes = _packed_sizes(make_layout(x.shape, axis, fmt.block_size), fmt)
        bufs = [("x", x, x.dtype, _nbytes(x)), ("out", None, x.dtype, 0),
                ("codes", codes, torch.uint8, sizes["codes"]), ("scales", scales, torch.uint8, sizes["scales"])]
        if micro is not None:
            bufs += [("micro scratch", micro[0], torch.uint8, sizes["micro scratch"]),
                     ("micro", micro[1], torch.uint8, sizes["micro"])]
    ptrs = checked_pointers("quantize", bufs, geometry)
    lib.quantize(mode, *ptrs[:4], _DTYPE_CODES[x.dtype], *geometry,
                 params, ROUNDINGS.index(rounding), SCALE_MODES.index(scale_mode),
                 (seed or 0) & 0xFFFFFFFF, _threads(x.numel()), *ptrs[4:])


def fake_quantize(x: torch.Tensor, fmt, axis: int, rounding: str, scale_mode: str, seed: int | None,
                  compat: str | None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """quantize + dequantize of ``x`` in its own dtype (into ``out`` when given: contiguous, same shape
    and dtype, checked by the caller), or None when not covered."""
    covered = _covered(x, fmt, rounding, scale_mode, compat)
    if covered is None or not _on_cpu(out):
        return None
    params, lib = covered
    x = x.detach().contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel():
        _run_quantize(0, x, out, None, None, params, get_format(fmt), axis, rounding, scale_mode, seed, lib)
    return out


def quantize(x: torch.Tensor, fmt, axis: int, rounding: str, scale_mode: str, seed: int | None,
             compat: str | None):
    """``(packed codes, scale codes, layout)`` in blocked order (layout.py, packing.py), and for two-level
    formats ``(codes, scales, layout, packed microexponents)``, or None when not covered. quantize.py wraps
    them into an MXTensor."""
    covered = _covered(x, fmt, rounding, scale_mode, compat)
    if covered is None:
        return None
    params, lib = covered
    fmt = get_format(fmt)
    layout = make_layout(x.shape, axis, fmt.block_size)
    x = x.detach().contiguous()
    codes = torch.empty(packed_nbytes(layout.n_elements_padded, fmt.element.bits), dtype=torch.uint8)
    scales = torch.empty(layout.n_blocks, dtype=torch.uint8)
    micro_bufs, micro = None, None
    if fmt.is_two_level:
        sizes = _packed_sizes(layout, fmt)
        scratch = torch.empty(sizes["micro scratch"], dtype=torch.uint8)  # one byte per sub-block, packed by C
        micro = torch.empty(sizes["micro"], dtype=torch.uint8)
        micro_bufs = (scratch, micro)
    if layout.n_blocks:
        _run_quantize(1, x, None, codes, scales, params, fmt, layout.axis, rounding, scale_mode, seed, lib,
                      micro_bufs)
    return (codes, scales, layout) if micro is None else (codes, scales, layout, micro)


def dequantize(q, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Dense tensor from an MXTensor (into ``out`` when given: contiguous, q.shape, ``dtype``, checked by
    the caller), or None when not covered."""
    fmt = q.format
    params = _params(fmt)
    if params is None or dtype not in _DTYPE_CODES or q.tensor_scale is not None:
        return None
    if (q.micro is not None) != fmt.is_two_level:
        return None
    if not _on_cpu(q.codes, q.scales, q.micro, out) or q.scales.dtype != torch.uint8:
        return None
    lib = _load()
    if lib is None:
        return None
    if dtype == torch.float32 and q.micro is None:   # 4 / 6-bit elements along the last axis: register decode
        from . import gemm
        fast = gemm.dequantize_rows(q, out, lib, _threads(math.prod(q.shape)))
        if fast is not None:
            return fast
    if out is None:
        out = torch.empty(q.shape, dtype=dtype)
    if out.numel():
        sizes = _packed_sizes(make_layout(q.shape, q.axis, fmt.block_size), fmt)
        parts = {"codes": q.codes.contiguous(), "scales": q.scales.contiguous()}
        if q.micro is not None:
            parts["micro"] = q.micro.contiguous()
        out_nbytes = math.prod(q.shape) * torch.empty((), dtype=dtype).element_size()
        bufs = [("out", out, dtype, out_nbytes)] + [(n, t, torch.uint8, sizes[n]) for n, t in parts.items()]
        geometry = _geometry(q.shape, q.axis)
        out_ptr, codes_ptr, scales_ptr, *micro_ptr = checked_pointers("dequantize", bufs, geometry)
        lib.dequantize(codes_ptr, scales_ptr, out_ptr, _DTYPE_CODES[dtype], *geometry,
                       params, _threads(out.numel()), *micro_ptr)
    return out


def packed_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Fused ``x · dequantize(weight)ᵀ + bias``, or None when no fused kernel covers the request (the
    caller then dequantizes the weight and runs F.linear). See :mod:`microscale.kernels.gemm`: it checks
    every argument the C code relies on and raises ValueError / TypeError before any C runs."""
    from . import gemm
    return gemm.packed_linear(x, weight, bias, _load())


def linear_plan(weight):
    """The checked :class:`~microscale.kernels.gemm.LinearPlan` of a packed 2-D weight (an MXTensor [out,
    K] blocked along K): its storage checked once, so that each call then checks only x and the bias.
    None when the fused kernels do not cover the weight (format, non-CPU components, no extension)."""
    from . import gemm
    return gemm.plan_for(weight, _load())

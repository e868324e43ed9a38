"""Fused packed-weight linear on CPU: ``y = x · dequantize(W)ᵀ + b`` without an FP32 copy of W.

The C side lives in ``_mxgemm.c`` (compiled into the same ``_mxkernels`` extension; its header describes
the decode). This module decides coverage, checks every argument the C code relies on (dtypes, device,
contiguity, byte sizes of codes and scales against the format and shape) and raises a clear error
before any C runs, then picks a path:

- GEMV (at most :data:`GEMV_MAX_ROWS` rows of x): one C call, parallel over the weight's output rows,
  codes decoded in registers; the weight bytes stream from memory once, so decode runs near memory
  bandwidth on 4.25 / 6.25 / 8.25 bits per weight instead of 32 (the batch-1 decode case of LLM
  inference, as in llama.cpp's MXFP4 CPU kernels).
- tiled GEMM (more rows): the weight is decoded a tile of rows at a time into one reused, cache-sized
  buffer (:data:`TILE_BYTES`; larger with several threads) and multiplied by torch's BLAS (``torch.mm``),
  so the cost stays that of an FP32 GEMM plus one decode pass of the packed bytes (no register-blocked
  micro-kernel of our own: torch's BLAS is reachable without a new dependency). bf16 x: the tiles are decoded to
  bf16 (exactly dequantize(W, bfloat16)) and torch's bf16 GEMM runs on them.

Per-call cost: :class:`LinearPlan` holds what the kernels need of one weight, its storage checked once;
a call checks only x and the bias. ``packed_linear`` keeps the plan of each MXTensor it saw (by identity,
re-checked cheaply: :meth:`LinearPlan.fits`), and ``nn.packed.PackedWeight`` keeps its own.

Covered: single-level OCP MX formats with E8M0 block scales and 4-, 6- or 8-bit elements (MXFP4,
MXFP6 E3M2 / E2M3, MXFP8 E4M3 / E5M2, MXINT8; any ``is_mx`` format the quantization kernels cover with
blocks of a multiple of 32 elements), x float32 / bfloat16 / float16 (computed in fp32 except the bf16 GEMM path, y in x's dtype),
CPU tensors. Not covered (returns None; the verb then dequantizes and calls F.linear): two-level formats
(MX9 / MX6 / MX4), formats with tensor scales (NVFP4), non-CPU tensors, a missing extension.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from . import checked_pointers  # the one place buffers are checked before C (kernels/__init__.py)

__all__ = ["packed_linear", "plan_for", "LinearPlan", "tile_rows", "dequantize_rows", "covers", "GEMV_MAX_ROWS",
           "TILE_BYTES", "TILE_BYTES_BF16",
           "TILE_BYTES_THREADED"]

#: Rows of x up to which the fused GEMV runs; more rows take the tiled GEMM path.
GEMV_MAX_ROWS = 8
#: Bytes of decoded fp32 weight per tile on the GEMM path with one thread: about one core's L2 (2 MiB
#: here), so the decode's writes stay in cache for the product that reads them right after. Measured at
#: 128 x 4096 x 16384, 1 thread, CPU time: 2-4 MiB tiles ran at 0.94-0.97x the time of one F.linear,
#: 0.5 MiB at 1.07x, 64 MiB (the tile spills to memory, written and read back) at 1.32x.
TILE_BYTES = 1 << 21
#: The same for the bf16 tiles of bf16 x. Larger: torch's bf16 GEMM (oneDNN, AMX where the CPU has it)
#: runs ~4x faster than fp32 and pays a fixed cost per call (it re-lays xᵀ out each time). Measured as
#: above against the BF16 F.linear: 2 MiB 1.57x, 4 MiB 1.27x, 8 MiB 1.17x, 16 MiB 1.37x.
TILE_BYTES_BF16 = 1 << 23
#: Tile bytes (either dtype) with more than one thread. Every tile costs an OpenMP fork / join in the
#: GEMM, so tiles are larger than one core's L2, decoded by one thread. Measured at 128 x 4096 x 16384,
#: 2 threads, wall time vs F.linear (2-core machine):
#: idle machine (load 0.7): 2 MiB 1.28x, 4 MiB 1.26x, 8 MiB 1.19x, 16 MiB 1.19x, 64 MiB 1.72x (the tile
#: spills to memory); one other busy process (load 2): 2 MiB 7.4x, 16 MiB 1.89x, 64 MiB 1.47x (each join
#: waits for a descheduled thread); load 7: 256-row tiles 1.76x, 64 MiB 1.51x. 16 MiB: best on a machine
#: the process has to itself, which is what a thread count of 2+ asks for.
TILE_BYTES_THREADED = 1 << 24
#: Below this many weight bytes one thread does the work.
_PARALLEL_MIN_BYTES = 1 << 16

# decode modes of the C kernels (enum in _mxgemm.c)
_GM_GENERIC, _GM_LUT6, _GM_SM8, _GM_INT8 = 0, 1, 2, 3
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_TABLES: dict = {}


class _Tables:
    """Per-format decode tables for the C kernels: fp32 value of each element code, its fp16 bits, the
    2^X value of each scale code, and the decode mode the AVX-512 path uses."""

    def __init__(self, fmt):
        elem = fmt.element
        vals = np.zeros(256, dtype=np.float64)
        vals[: elem.n_codes] = elem.code_values
        self.lut32 = torch.from_numpy(vals.astype(np.float32))
        self.scl = torch.from_numpy(np.asarray(fmt.scale.code_values, dtype=np.float32).copy())
        half = vals.astype(np.float16)
        # every MX element value is an fp16 value; the fp16 path is used only where that holds exactly
        exact = bool(np.all((half.astype(np.float64) == vals) | (np.isnan(vals) & np.isnan(half))))
        h16 = half.view(np.uint16).copy()
        # NaN codes: one quiet NaN carrying the code's sign bit (keeps the sign-magnitude symmetry below)
        sign_bit = (np.arange(256) >> (elem.bits - 1)) & 1
        h16[np.isnan(vals)] = (0x7E00 | (sign_bit * 0x8000))[np.isnan(vals)].astype(np.uint16)
        mode = _GM_GENERIC
        if elem.kind == "int" and elem.encoding == "twos" and elem.bits == 8:
            signed = np.arange(256, dtype=np.int64)
            signed = np.where(signed >= 128, signed - 256, signed)
            if np.array_equal(signed * vals[1], vals):
                mode = _GM_INT8
        elif exact and elem.bits <= 6:
            mode = _GM_LUT6
        elif exact and elem.bits == 8:
            # sign-magnitude: code | 0x80 is the negated code (fp elements), NaN kept NaN
            if np.array_equal(h16[128:], h16[:128] | 0x8000):
                mode = _GM_SM8
        self.mode = mode
        self.lut16 = torch.from_numpy(h16.view(np.int16).copy())


def covers(fmt) -> bool:
    """Whether the fused kernels cover weights of format ``fmt`` (a BlockFormat)."""
    from . import _params
    return (fmt.is_mx and not fmt.is_two_level and fmt.tensor_scale is None and fmt.element is not None
            and fmt.scale is not None and fmt.scale.kind == "e8m0" and fmt.scale.bits == 8
            and fmt.element.bits in (4, 6, 8) and bool(fmt.block_size) and fmt.block_size % 32 == 0
            and fmt.block_size <= 1024 and _params(fmt) is not None)


def _tables(fmt) -> _Tables | None:
    """Decode tables of ``fmt``, or None when the fused kernels do not cover it (cached by identity: the
    per-call cost matters for small decode-time GEMVs, and hashing a BlockFormat is not free)."""
    hit = _TABLES.get(id(fmt))
    if hit is not None and hit[0] is fmt:
        return hit[1]
    t = _Tables(fmt) if covers(fmt) else None
    _TABLES[id(fmt)] = (fmt, t)   # holding fmt keeps its id from being reused
    return t


def _check_x(x, k_in: int) -> None:
    """x as the kernels take it (ValueError / TypeError naming expected and got)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k_in:
        raise ValueError(f"x must have shape [..., {k_in}] (the weight's K), got {tuple(x.shape)}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}")


def _check_bias(bias, n_out: int) -> None:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
    if not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if bias.layout != torch.strided:
        raise TypeError(f"bias must be a dense (strided) tensor, got layout {bias.layout}")


def _check_weight(weight) -> None:
    """The packed weight's storage against its format and shape (checked once per plan, see LinearPlan)."""
    if len(weight.shape) != 2 or weight.axis != 1:
        raise ValueError(f"weight must be a 2-D MXTensor [out, K] blocked along axis 1, got shape {weight.shape} "
                         f"along axis {weight.axis}")
    n_out, k_in = weight.shape
    fmt = weight.format
    nb = math.ceil(k_in / fmt.block_size)
    want_codes = n_out * nb * fmt.block_size * fmt.element.bits // 8
    for name, t, want in (("codes", weight.codes, want_codes), ("scales", weight.scales, n_out * nb)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise TypeError(f"weight.{name} must be a 1-D uint8 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.numel() != want:
            raise ValueError(f"weight.{name} of a {fmt.name} weight of shape {weight.shape} must hold {want} bytes, "
                             f"got {t.numel()}; was a component replaced or resized?")
        if not t.is_contiguous():
            raise ValueError(f"weight.{name} must be contiguous (packed storage), got strides {t.stride()}")
    if weight.micro is not None or weight.tensor_scale is not None:
        raise ValueError(f"{fmt.name} weight has microexponents or a tensor scale, which the fused kernel does "
                         "not read")


def _table_buffers(tab) -> list:
    """The decode tables as checked_pointers buffers (lut32, lut16, scale table, in the C argument order)."""
    return [(name, t, t.dtype, t.numel() * t.element_size())
            for name, t in (("lut32", tab.lut32), ("lut16", tab.lut16), ("scl", tab.scl))]


class LinearPlan:
    """What the fused kernels need of one packed weight, checked once: shape, format parameters, decode
    tables and the addresses of its codes, scales and tables (checked by ``checked_pointers`` when the
    plan is made).

    A plan belongs to the exact ``codes`` / ``scales`` tensors it was made from; :meth:`fits` tells
    whether they are still those tensors with the same address, size and contiguity (a component
    replaced, resized or re-pointed in place invalidates it), in a few attribute reads instead of the
    full storage check. Calls (:meth:`__call__`) then check only x and the bias before C runs.
    Immutable weights (``nn.packed.PackedWeight``, MXTensor) keep their plan across calls.
    """

    __slots__ = ("codes", "scales", "n_out", "k_in", "k", "bits", "nb", "kp", "row_bytes", "tab", "mode",
                 "lib", "parallel", "p_codes", "p_scales", "p_tables", "n_codes", "n_scales", "__weakref__")

    def __init__(self, weight, tab: _Tables, lib):
        _check_weight(weight)
        fmt = weight.format
        self.codes, self.scales = weight.codes, weight.scales
        self.n_out, self.k_in = (int(s) for s in weight.shape)
        self.k, self.bits = fmt.block_size, fmt.element.bits
        self.nb = math.ceil(self.k_in / self.k)
        self.kp = self.nb * self.k
        self.row_bytes = self.nb * self.k * self.bits // 8
        self.tab, self.mode, self.lib = tab, tab.mode, lib
        self.n_codes, self.n_scales = self.n_out * self.row_bytes, self.n_out * self.nb
        self.parallel = self.n_codes >= _PARALLEL_MIN_BYTES
        self.p_codes, self.p_scales, *self.p_tables = checked_pointers("packed_linear", [
            ("codes", self.codes, torch.uint8, self.n_codes), ("scales", self.scales, torch.uint8, self.n_scales),
            *_table_buffers(tab)])

    def fits(self, codes, scales) -> bool:
        """Whether ``codes`` / ``scales`` are still the tensors (address, size, contiguity) this plan checked."""
        c, s = self.codes, self.scales
        return (codes is c and scales is s and c.data_ptr() == self.p_codes and s.data_ptr() == self.p_scales
                and c.numel() == self.n_codes and s.numel() == self.n_scales and c.is_contiguous()
                and s.is_contiguous())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x · dequantize(W)ᵀ + bias``; x [..., K] float32 / bfloat16 / float16 on the CPU, y [..., out] in x's
        dtype. Checks x and bias (ValueError / TypeError) before any C runs."""
        n_out, k_in = self.n_out, self.k_in
        _check_x(x, k_in)
        if bias is not None:
            _check_bias(bias, n_out)
        x = x.detach()
        xf = x if x.dim() == 2 else x.reshape(-1, k_in)
        m = xf.shape[0]
        if m == 0:
            return torch.empty(*x.shape[:-1], n_out, dtype=x.dtype)
        if xf.dtype != torch.float32:
            xf = xf.float()
        if self.kp != k_in:   # the padding codes decode to 0; zeros in x keep 0 * pad finite
            xf = torch.nn.functional.pad(xf, (0, self.kp - k_in))
        xf = xf.contiguous()
        if m <= GEMV_MAX_ROWS:
            y = self._gemv(xf, m, bias, torch.get_num_threads() if self.parallel else 1)
        else:
            y = self._tiled(xf, m, bias, x.dtype == torch.bfloat16)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)

    def _gemv(self, xf, m, bias, nt):
        n_out = self.n_out
        b32 = bias
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.requires_grad):
            b32 = bias.detach().to(torch.float32).contiguous()
        y = torch.empty(m, n_out, dtype=torch.float32)
        px, pb, py = checked_pointers("gemm_gemv", [
            ("x", xf, torch.float32, 4 * m * self.kp),
            ("bias", b32, torch.float32, 0 if b32 is None else 4 * n_out), ("y", y, torch.float32, 4 * m * n_out)])
        self.lib.gemm_gemv(px, m, self.p_codes, self.p_scales, n_out, self.nb, self.k, self.bits, self.mode,
                           *self.p_tables, pb, py, nt)
        return y

    def _tiled(self, xf, m, bias, half: bool):
        """Decode ``tile_rows`` weight rows at a time into one reused, cache-sized buffer and multiply it with
        torch's BLAS: yᵀ[rows, M] = tile[rows, Kp] · xᵀ[Kp, M], y written once at the end with the bias added
        in the same pass. A weight that fits one tile gives exactly F.linear(x, dequantize(W), b).

        bf16 x: the tile is decoded straight to bf16 (``gemm_decode_bf16``: exact, every MX element times
        2^X has at most 8 significant bits; it is dequantize(W, bfloat16), the weight F.linear in bf16 would
        use) and torch's bf16 GEMM runs on it, with the bf16 x."""
        n_out, kp = self.n_out, self.kp
        nt = torch.get_num_threads() if self.parallel else 1
        dtype = torch.bfloat16 if half else torch.float32
        rows = tile_rows(n_out, kp, nt, dtype.itemsize)
        tile = torch.empty(rows, kp, dtype=dtype)
        yt = torch.empty(n_out, m, dtype=dtype)
        xt = (xf.to(torch.bfloat16) if half else xf).t()
        if rows < n_out:
            # several tiles: xᵀ contiguous once (measured, 1 thread, 128 x 4096 x 16384 in 2 MiB tiles: 0.97x
            # the time of F.linear, against 1.34x with the strided view: BLAS packs a strided xᵀ per call).
            # One tile keeps the view: torch.mm(tile, xᵀ) is then the very BLAS call F.linear(x, W) makes
            # (operands swapped for column-major), so small weights give F.linear's bits exactly.
            xt = xt.contiguous()
        for n0 in range(0, n_out, rows):
            r = min(rows, n_out - n0)
            # one thread: a parallel decode is one more OpenMP join per tile (see TILE_BYTES_THREADED)
            self.decode_rows(n0, tile[:r], 1)
            torch.mm(tile[:r], xt, out=yt[n0:n0 + r])
        y = torch.empty(m, n_out, dtype=dtype)
        if bias is None:
            y.copy_(yt.t())
        else:
            torch.add(yt.t(), bias.detach().to(dtype), out=y)
        return y


    def decode_rows(self, n0: int, out: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """Weight rows [n0, n0 + len(out)) decoded into ``out`` (contiguous float32, or bfloat16 rounded to
        nearest even as torch converts): equal bit for bit to those rows of dequantize(W, out.dtype)
        padded with zeros to whole blocks (``out`` is [rows, nb * k])."""
        r = out.shape[0] if out.dim() == 2 else -1
        if out.dim() != 2 or out.shape[1] != self.kp or not 0 <= n0 or n0 + r > self.n_out or r < 1:
            raise ValueError(f"out must be [rows, {self.kp}] for rows within [0, {self.n_out}) starting at n0 "
                             f"= {n0}, got {tuple(out.shape)}")
        if out.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"out must be float32 or bfloat16, got {out.dtype}")
        entry = "gemm_decode_bf16" if out.dtype == torch.bfloat16 else "gemm_decode"
        (p_out,) = checked_pointers(entry, [("tile", out, out.dtype, out.numel() * out.element_size())])
        getattr(self.lib, entry)(self.p_codes + n0 * self.row_bytes, self.p_scales + n0 * self.nb, r, self.nb,
                                 self.k, self.bits, self.mode, *self.p_tables, p_out, threads)
        return out


def tile_rows(n_out: int, kp: int, threads: int = 1, itemsize: int = 4) -> int:
    """Weight rows decoded per tile on the GEMM path: :data:`TILE_BYTES` (fp32, ``itemsize`` 4) or
    :data:`TILE_BYTES_BF16` (``itemsize`` 2) with one thread, :data:`TILE_BYTES_THREADED` with more; a
    multiple of 16 rows (at least 16, at most ``n_out``)."""
    budget = TILE_BYTES_THREADED if threads > 1 else TILE_BYTES if itemsize == 4 else TILE_BYTES_BF16
    return max(16, min(n_out, (budget // (itemsize * kp)) // 16 * 16))


#: plans of MXTensors passed to packed_linear, by identity (an MXTensor is frozen; see LinearPlan.fits)
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_for(weight, lib) -> LinearPlan | None:
    """The checked :class:`LinearPlan` of a packed weight (an MXTensor or anything with its fields), or
    None when the fused kernels do not cover it (format, non-CPU components, no extension). Raises
    ValueError / TypeError when its storage does not match its format and shape."""
    if not all(hasattr(weight, a) for a in ("codes", "scales", "format", "shape", "axis", "micro")):
        raise TypeError(f"weight must be an MXTensor, got {type(weight).__name__}")
    try:
        hit = _PLANS.get(weight)
    except TypeError:   # not weak-referenceable
        hit = None
    if hit is not None and hit.lib is lib and hit.fits(weight.codes, weight.scales):
        return hit
    if lib is None or not hasattr(lib, "gemm_gemv"):
        return None
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in (weight.codes, weight.scales)):
        return None
    tab = _tables(weight.format)
    if tab is None:
        return None
    plan = LinearPlan(weight, tab, lib)
    try:
        _PLANS[weight] = plan
    except TypeError:
        pass
    return plan


def packed_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, lib) -> torch.Tensor | None:
    """``x · dequantize(weight)ᵀ + bias`` with the fused kernels of ``lib`` (the loaded extension), or
    None when they do not cover the request (format, non-CPU tensors, autograd). Raises before any C runs
    when an argument is malformed."""
    # duck-typed: kernels/ sits above tensor.py (docs/architecture.md) and does not import MXTensor
    if not all(hasattr(weight, a) for a in ("codes", "scales", "format", "shape", "axis", "micro")):
        raise TypeError(f"weight must be an MXTensor, got {type(weight).__name__}")
    if isinstance(x, torch.Tensor) and x.device.type != "cpu" or isinstance(bias, torch.Tensor) and \
            bias.device.type != "cpu":
        return None
    # the kernels have no backward: a call that autograd must see falls back to F.linear (differentiable)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, bias)):
        return None
    plan = plan_for(weight, lib)
    if plan is None:
        return None
    return plan(x, bias)


def dequantize_rows(q, out: torch.Tensor | None, lib, threads: int) -> torch.Tensor | None:
    """fp32 dequantize of an MXTensor blocked along its last axis in whole blocks, with the register decode
    of the GEMV (bit-identical to the reference: w = v(code) * 2^X is exact, NaN scales give the canonical
    quiet NaN), or None when that path does not apply. Used for 4- and 6-bit elements (MXFP4 / MXFP6),
    whose generic dequantize is bound by decode work rather than by memory; ``out`` is checked by the caller.

    Formats with NaN element codes (8-bit fp) are left to the generic kernel: there the NaN's sign would
    follow the code's, not the canonical NaN."""
    if lib is None or not hasattr(lib, "gemm_decode") or q.micro is not None or q.tensor_scale is not None:
        return None
    fmt = q.format
    tab = _tables(fmt)
    if tab is None or tab.mode != _GM_LUT6 or bool(np.isnan(tab.lut32.numpy()).any()):
        return None
    shape = q.shape
    k = fmt.block_size
    if q.axis != len(shape) - 1 or shape[-1] % k or q.codes.device.type != "cpu" or q.scales.dtype != torch.uint8 \
            or q.codes.dtype != torch.uint8:
        return None
    n_el = math.prod(shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    rows = n_el // shape[-1] if shape[-1] else 0   # from the MXTensor's shape, never from out's
    pc, ps, po, *pl = checked_pointers("dequantize", [   # checked even when there is nothing to decode
        ("codes", q.codes, torch.uint8, n_el * fmt.element.bits // 8), ("scales", q.scales, torch.uint8, n_el // k),
        ("out", out, torch.float32, 4 * n_el), *_table_buffers(tab)])
    if rows:
        lib.gemm_decode(pc, ps, rows, shape[-1] // k, k, fmt.element.bits, tab.mode, *pl, po, threads)
    return out

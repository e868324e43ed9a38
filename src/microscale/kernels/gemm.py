"""Fused packed-weight linear on CPU: ``y = x · dequantize(W)ᵀ + b`` without an FP32 copy of W.

The C side lives in ``_mxgemm.c`` (compiled into the same ``_mxkernels`` extension; its header describes
the decode). This module decides coverage, checks every argument the C code relies on (dtypes, device,
contiguity, byte sizes of codes and scales against the format and shape) and raises a clear error
before any C runs, then picks a path:

- GEMV (at most :data:`GEMV_MAX_ROWS` rows of x): one C call, parallel over the weight's output rows,
  codes decoded in registers; the weight bytes stream from memory once, so decode runs near memory
  bandwidth on 4.25 / 6.25 / 8.25 bits per weight instead of 32 (the batch-1 decode case of LLM
  inference, as in llama.cpp's MXFP4 CPU kernels).
- tiled GEMM (more rows): the weight is decoded a tile of rows at a time into one reused fp32 buffer of
  :data:`TILE_BYTES` and multiplied by torch's BLAS (``torch.mm``), so the cost
  stays that of an FP32 GEMM plus one decode pass of the packed bytes (no register-blocked micro-kernel
  of our own: torch's BLAS is reachable without a new dependency).

Covered: single-level OCP MX formats with E8M0 block scales and 4-, 6- or 8-bit elements (MXFP4,
MXFP6 E3M2 / E2M3, MXFP8 E4M3 / E5M2, MXINT8; any ``is_mx`` format the quantization kernels cover with
blocks of a multiple of 32 elements), x float32 / bfloat16 / float16 (computed in fp32, y in x's dtype),
CPU tensors. Not covered (returns None; the verb then dequantizes and calls F.linear): two-level formats
(MX9 / MX6 / MX4), formats with tensor scales (NVFP4), non-CPU tensors, a missing extension.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import checked_pointers  # the one place buffers are checked before C (kernels/__init__.py)

__all__ = ["packed_linear", "dequantize_rows", "covers", "GEMV_MAX_ROWS", "TILE_BYTES"]

#: Rows of x up to which the fused GEMV runs; more rows take the tiled GEMM path.
GEMV_MAX_ROWS = 8
#: Size of the fp32 weight tile decoded per torch.mm call on the GEMM path. Large on purpose: measured at
#: 128 x 4096 x 16384, torch.mm on 1024-row tiles ran at 0.6x the speed of one F.linear, on 4096-row
#: tiles (64 MiB) at 0.9x; the tile is written once and read once, so it need not fit a core's cache.
TILE_BYTES = 1 << 26
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


def _check(x: torch.Tensor, weight, bias: torch.Tensor | None) -> None:
    """Everything the C entry points rely on, as ValueError / TypeError naming expected and got."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if len(weight.shape) != 2 or weight.axis != 1:
        raise ValueError(f"weight must be a 2-D MXTensor [out, K] blocked along axis 1, got shape {weight.shape} "
                         f"along axis {weight.axis}")
    n_out, k_in = weight.shape
    if x.dim() == 0 or x.shape[-1] != k_in:
        raise ValueError(f"x must have shape [..., {k_in}] (the weight's K), got {tuple(x.shape)}")
    fmt = weight.format
    k = fmt.block_size
    nb = math.ceil(k_in / k)
    want_codes = n_out * nb * k * fmt.element.bits // 8
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
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")


def _table_buffers(tab) -> list:
    """The decode tables as checked_pointers buffers (lut32, lut16, scale table, in the C argument order)."""
    return [(name, t, t.dtype, t.numel() * t.element_size())
            for name, t in (("lut32", tab.lut32), ("lut16", tab.lut16), ("scl", tab.scl))]


def _threads(nbytes: int) -> int:
    return torch.get_num_threads() if nbytes >= _PARALLEL_MIN_BYTES else 1


def packed_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, lib) -> torch.Tensor | None:
    """``x · dequantize(weight)ᵀ + bias`` with the fused kernels of ``lib`` (the loaded extension), or
    None when they do not cover the request (format, non-CPU tensors). Raises before any C runs when an
    argument is malformed."""
    # duck-typed: kernels/ sits above tensor.py (docs/architecture.md) and does not import MXTensor
    if not all(hasattr(weight, a) for a in ("codes", "scales", "format", "shape", "axis", "micro")):
        raise TypeError(f"weight must be an MXTensor, got {type(weight).__name__}")
    tensors = [x, weight.codes, weight.scales] + ([] if bias is None else [bias])
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors):
        return None
    # the kernels have no backward: a call that autograd must see falls back to F.linear (differentiable)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, bias)):
        return None
    fmt = weight.format
    tab = _tables(fmt)
    if lib is None or tab is None or not hasattr(lib, "gemm_gemv"):
        return None
    _check(x, weight, bias)
    n_out, k_in = weight.shape
    k, bits = fmt.block_size, fmt.element.bits
    nb = math.ceil(k_in / k)
    kp = nb * k
    lead = tuple(x.shape[:-1])
    x2 = x.detach().reshape(-1, k_in)
    m = x2.shape[0]
    if m == 0:
        return torch.empty(*lead, n_out, dtype=x.dtype)
    xf = x2.to(torch.float32)
    if kp != k_in:   # the padding codes decode to 0; zeros in x keep 0 * pad finite
        xf = torch.nn.functional.pad(xf, (0, kp - k_in))
    xf = xf.contiguous()
    codes, scales = weight.codes, weight.scales
    nt = _threads(codes.numel())
    row_bytes = nb * k * bits // 8
    if m <= GEMV_MAX_ROWS:
        b32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
        y = torch.empty(m, n_out, dtype=torch.float32)
        px, pc, ps, pb, py, *pt = checked_pointers("gemm_gemv", [
            ("x", xf, torch.float32, 4 * m * kp), ("codes", codes, torch.uint8, n_out * row_bytes),
            ("scales", scales, torch.uint8, n_out * nb),
            ("bias", b32, torch.float32, 0 if b32 is None else 4 * n_out), ("y", y, torch.float32, 4 * m * n_out),
            *_table_buffers(tab)])
        lib.gemm_gemv(px, m, pc, ps, n_out, nb, k, bits, tab.mode, *pt, pb, py, nt)
    else:
        rows = max(16, min(n_out, (TILE_BYTES // (4 * kp)) // 16 * 16))
        tile = torch.empty(rows, kp, dtype=torch.float32)
        # bf16 x: the tile goes to bf16 (exact: every MX element times 2^X has at most 8 significant bits,
        # the weights F.linear(x, dequantize(W, bf16)) would use) and torch's bf16 GEMM runs on it
        half = x.dtype == torch.bfloat16
        tile_h = torch.empty(rows, kp, dtype=torch.bfloat16) if half else None
        yt = torch.empty(n_out, m, dtype=x.dtype if half else torch.float32)   # yᵀ: each tile writes whole rows
        xt = (xf.to(torch.bfloat16) if half else xf).t()
        for n0 in range(0, n_out, rows):
            r = min(rows, n_out - n0)
            # one thread: the decode is ~5% of the tile's GEMM, and on a loaded machine handing it to a
            # second OpenMP team between BLAS calls cost 40x more than the decode itself (measured)
            pc, ps, pt_, *pl = checked_pointers("gemm_decode", [
                ("codes", codes[n0 * row_bytes:(n0 + r) * row_bytes], torch.uint8, r * row_bytes),
                ("scales", scales[n0 * nb:(n0 + r) * nb], torch.uint8, r * nb),
                ("tile", tile[:r], torch.float32, 4 * r * kp), *_table_buffers(tab)])
            lib.gemm_decode(pc, ps, r, nb, k, bits, tab.mode, *pl, pt_, 1)
            if half:
                tile_h[:r].copy_(tile[:r])
                torch.mm(tile_h[:r], xt, out=yt[n0:n0 + r])
            else:
                torch.mm(tile[:r], xt, out=yt[n0:n0 + r])
        y = yt.t()
        if bias is not None:
            y = y + bias.detach().to(y.dtype)
        y = y.contiguous()
    return y.to(x.dtype).reshape(*lead, n_out)


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

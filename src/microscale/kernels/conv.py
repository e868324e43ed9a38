"""Fused MX grouped / depthwise convolution on CPU without im2col: the forward ``conv(q(x), wq) + b``
(:func:`conv_forward`) and the weight gradient ``q(gy) · q(cols)ᵀ`` (:func:`conv_wgrad`).

The C side is ``_mxconv.c`` (compiled into the same ``_mxkernels`` extension; its header describes the
loop). The semantics are those of :mod:`microscale.nn.modules`: group g's reduction vector at each output
position is its window of ``K = C/G · kh · kw`` input values in F.unfold's (c, i, j) order, zero where it
overlaps the zero padding, blocked along K from index 0 in the format's blocks of k (a 3x3 depthwise
window, K = 9, is one short block of an MX format's k = 32). The kernel quantizes each window block in
registers with the code of the quantization loops (``_mxscalar.h``), so the quantized windows are bit for
bit ``fake_quantize(im2col(x), axis=K)`` (``return_windows=True`` hands them back to show it), and
accumulates them against the already quantized weights; the outputs differ from the batched GEMM's only
in fp32 summation order.

Covered (else :func:`conv_forward` returns None and the caller takes the im2col path): the compiled
kernels loaded; float32 CPU tensors; single-level formats the quantization kernels cover (OCP MX:
MXFP8/6/4, MXINT8, MSFP/BFP); deterministic rounding (even / away / zero) and any scale mode; zero
padding; per-group reductions ``K <= max_reduction()`` (256). Every argument the C code relies on is
checked here, and bad calls raise ValueError / TypeError before any C runs.
"""

from __future__ import annotations

import torch

from . import _load, _params, _threads, checked_pointers
from ..formats import ROUNDINGS, SCALE_MODES, get_format

__all__ = ["conv_forward", "conv_wgrad", "covers", "max_reduction"]

#: Largest per-group reduction C/G · kh · kw of the fused kernel (CONV_MAXK in _mxconv.c).
MAX_REDUCTION = 256
_DETERMINISTIC = ("even", "away", "zero")


def max_reduction() -> int:
    """Largest per-group reduction C/G · kh · kw the fused kernel takes."""
    return MAX_REDUCTION


def _pair(v, name: str) -> tuple[int, int]:
    t = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise TypeError(f"conv_forward: {name} must be an int or a pair of ints, got {v!r}")
    return t


def covers(x: torch.Tensor, fmt, rounding: str, scale_mode: str, reduction: int) -> bool:
    """True when the fused kernel takes a float32 CPU input ``x``, format ``fmt``, these options and a
    per-group reduction of ``reduction`` elements (and the compiled kernels are loaded)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if str(rounding) not in _DETERMINISTIC or str(scale_mode) not in SCALE_MODES:
        return False
    if not 1 <= reduction <= MAX_REDUCTION:
        return False
    params = _params(get_format(fmt))
    if params is None or params[17] != 0:          # single-level formats only (no microexponents)
        return False
    lib = _load()
    return lib is not None and hasattr(lib, "conv_wgrad")


def _geometry(entry: str, x, w_shape, stride, padding, dilation, groups) -> tuple:
    """Checked ``(n, c, h, w, o, kh, kw, (sh, sw), (ph, pw), (dh, dw), ho, wo, K)`` of a grouped convolution
    of ``x`` with a weight of shape ``w_shape`` [O, C/G, kh, kw]; ValueError / TypeError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{entry}: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{entry}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{entry}: groups must be a positive int, got {groups!r}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{entry}: stride and dilation must be >= 1 and padding >= 0, got stride "
                         f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}")
    n, c, h, w = x.shape
    if len(w_shape) != 4:
        raise ValueError(f"{entry}: the weight must be [O, C/G, kh, kw], got shape {tuple(w_shape)}")
    o = w_shape[0]
    if c % groups or o % groups:
        raise ValueError(f"{entry}: in channels {c} and out channels {o} must be multiples of groups={groups}")
    if w_shape[1] != c // groups:
        raise ValueError(f"{entry}: the weight {tuple(w_shape)} expects {w_shape[1] * groups} input channels "
                         f"with groups={groups}, x has {c}")
    kh, kw = w_shape[2], w_shape[3]
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"{entry}: input of spatial size {(h, w)} with padding {(ph, pw)} is smaller than "
                         f"the dilated kernel {(kh, kw)} with dilation {(dh, dw)}")
    return n, c, h, w, o, kh, kw, (sh, sw), (ph, pw), (dh, dw), ho, wo, (c // groups) * kh * kw


def _call_args(n, c, h, w, o, groups, kh, kw, s, p, d, fmt, rounding, scale_mode, work):
    return (n, c, h, w, o, groups, kh, kw, s[0], s[1], p[0], p[1], d[0], d[1], _params(fmt),
            ROUNDINGS.index(str(rounding)), SCALE_MODES.index(str(scale_mode)), _threads(work))


def conv_forward(x: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int, fmt, rounding: str = "even", scale_mode: str = "floor",
                 return_windows: bool = False):
    """``F.conv2d(x, wq, bias, stride, padding, dilation, groups)`` with every input window block
    fake-quantized in ``fmt`` along the per-group reduction (see the module docstring).

    ``x`` [N, C, H, W] float32; ``wq`` [O, C/G, kh, kw] float32, already quantized by the caller; ``bias``
    [O] or None; zero padding. Returns y [N, O, Ho, Wo] (and, with ``return_windows``, the quantized
    windows [G, K, N·Ho·Wo], the layout of the batched GEMM's columns), or None when the kernel does not
    cover the request (:func:`covers`, or more than 256 output channels per group).
    """
    if not isinstance(wq, torch.Tensor):
        raise TypeError(f"conv_forward: x and wq must be tensors, got {type(x).__name__} and {type(wq).__name__}")
    n, c, h, w, o, kh, kw, s, p, d, ho, wo, k_red = _geometry("conv_forward", x, tuple(wq.shape), stride, padding,
                                                             dilation, groups)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (o,)):
        raise ValueError(f"conv_forward: bias must be None or a tensor of shape ({o},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if not covers(x, fmt, rounding, scale_mode, k_red) or o // groups > MAX_REDUCTION:
        return None
    if wq.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        raise TypeError(f"conv_forward: wq and bias must be float32 like x, got {wq.dtype} and "
                        f"{None if bias is None else bias.dtype}")
    fmt = get_format(fmt)
    x = x.detach().contiguous()
    wq = wq.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    y = torch.empty(n, o, ho, wo, dtype=torch.float32)
    tokens = n * ho * wo
    windows = torch.empty(groups, k_red, tokens, dtype=torch.float32) if return_windows else None
    bufs = [("x", x, torch.float32, 4 * x.numel()), ("wq", wq, torch.float32, 4 * o * k_red),
            ("bias", bias, torch.float32, 0 if bias is None else 4 * o),
            ("y", y, torch.float32, 4 * n * o * ho * wo),
            ("windows", windows, torch.float32, 0 if windows is None else 4 * groups * k_red * tokens)]
    ptrs = checked_pointers("conv_forward", bufs)
    _load().conv_forward(*ptrs, *_call_args(n, c, h, w, o, groups, kh, kw, s, p, d, fmt, rounding, scale_mode,
                                            y.numel() * k_red))
    return (y, windows) if return_windows else y


def conv_wgrad(x: torch.Tensor, gyq: torch.Tensor, weight_shape, stride, padding, dilation, groups: int, fmt,
               rounding: str = "even", scale_mode: str = "floor", return_columns: bool = False):
    """The weight gradient of the grouped convolution, ``gw[g] = gyq[g] · q(cols[g])ᵀ`` without im2col:
    ``cols`` [G, K, N·Ho·Wo] are the convolution's columns of ``x`` (zero padding), quantized in ``fmt``
    along the tokens (blocks of k consecutive tokens of each row from token 0, the wgrad blocks of
    :mod:`microscale.nn.recipe`); ``gyq`` [G, O/G, N·Ho·Wo] is the output gradient, already quantized
    along the tokens by the caller. Sums in fp32 per tile of 512 tokens, tiles in float64. Returns gw of
    ``weight_shape`` [O, C/G, kh, kw] (and, with ``return_columns``, the quantized columns), or None
    when not covered (as :func:`conv_forward`)."""
    if not isinstance(gyq, torch.Tensor):
        raise TypeError(f"conv_wgrad: gyq must be a tensor, got {type(gyq).__name__}")
    n, c, h, w, o, kh, kw, s, p, d, ho, wo, k_red = _geometry("conv_wgrad", x, tuple(weight_shape), stride,
                                                             padding, dilation, groups)
    tokens = n * ho * wo
    if tuple(gyq.shape) != (groups, o // groups, tokens):
        raise ValueError(f"conv_wgrad: gyq must be [G, O/G, N·Ho·Wo] = {(groups, o // groups, tokens)}, got "
                         f"{tuple(gyq.shape)}")
    if not covers(x, fmt, rounding, scale_mode, k_red) or o // groups > MAX_REDUCTION:
        return None
    if gyq.dtype != torch.float32:
        raise TypeError(f"conv_wgrad: gyq must be float32 like x, got {gyq.dtype}")
    fmt = get_format(fmt)
    x = x.detach().contiguous()
    gyq = gyq.detach().contiguous()
    gw = torch.empty(tuple(weight_shape), dtype=torch.float32)
    cols = torch.empty(groups, k_red, tokens, dtype=torch.float32) if return_columns else None
    bufs = [("x", x, torch.float32, 4 * x.numel()), ("gyq", gyq, torch.float32, 4 * gyq.numel()),
            ("unused", None, torch.float32, 0), ("gw", gw, torch.float32, 4 * o * k_red),
            ("columns", cols, torch.float32, 0 if cols is None else 4 * groups * k_red * tokens)]
    ptrs = checked_pointers("conv_wgrad", bufs)
    _load().conv_wgrad(*ptrs, *_call_args(n, c, h, w, o, groups, kh, kw, s, p, d, fmt, rounding, scale_mode,
                                          tokens * o * k_red))
    return (gw, cols) if return_columns else gw

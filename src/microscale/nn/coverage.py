"""How much of a model runs MX: modules swapped or not (with reasons), and the share of forward GEMM FLOPs
whose operands are MX-quantized, measured on one forward pass.

    report = ms.nn.coverage(model, example_input)          # model already quantized with quantize_model
    print(report)                                          # per-module table and the total share
    report.share                                           # 1.0 when every forward GEMM runs on MX operands

The measurement runs the forward under a ``TorchDispatchMode`` that sees every GEMM at the aten level
(``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``addbmm``, ``mv``, ``addmv``, ``dot``, ``linear``,
``convolution``, microscale's fused grouped convolution ``microscale_nn::grouped_conv``, and the fused
attention kernels, which count as full precision). A GEMM counts as MX
when each operand is a fixed point of :func:`microscale.fake_quantize` along its reduction axis (blocks
starting at index 0 of that axis) in one of the recipe's forward formats (``fwd_input``, ``fwd_weight``);
for a convolution the input is checked as its im2col columns, blocked along C_in/groups · kernel, the
reduction of :mod:`microscale.nn.modules`; the fused grouped convolution's input operand is the windows
its kernel quantized, handed back by the kernel. This is the acceptance probe of issue 11: it looks only at the
values that reach the GEMM, so it holds for any code path, swapped modules or not.

The static half (:func:`full_precision_modules`, also behind :func:`quantize_model`'s warning) is a
heuristic: a module is matmul-bearing when it is a Linear/Conv/Bilinear/RNN/MultiheadAttention or owns a
2-D floating Parameter (embeddings excepted), and it is covered when swapped, scoped, or inside an
attention scope. Only the probe measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..formats import QuantSpec
from ..quantize import fake_quantize
from .functional import grouped_conv_fused
from .packed import is_packed
from .modules import SWAPS, QuantizedModule, overridden_forward, swap_for
from .recipe import Recipe, get_recipe

__all__ = ["coverage", "CoverageReport", "ModuleCoverage", "GemmCall", "module_status",
           "full_precision_modules"]

_GEMM_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear, nn.RNNBase, nn.MultiheadAttention)
_NO_GEMM_TYPES = (nn.Embedding, nn.EmbeddingBag)


# ---- static: which modules are swapped, scoped, or left in full precision ----------------------------
def _is_scope(m: nn.Module) -> bool:
    return bool(getattr(type(m), "_mx_scope", False))


def _is_gemm_bearing(m: nn.Module) -> bool:
    if isinstance(m, _NO_GEMM_TYPES):
        return False
    if isinstance(m, _GEMM_TYPES):
        return True
    return any(p.dim() == 2 and p.is_floating_point() for p in m.parameters(recurse=False))


def _unswapped_reason(m: nn.Module) -> str:
    cls = type(m)
    if isinstance(m, nn.modules.lazy.LazyModuleMixin):
        return f"{cls.__name__} is not initialized yet: run one forward before quantize_model"
    if swap_for(cls) is not None:
        return f"{cls.__name__} not swapped (the model was not quantized with quantize_model, or not with this module)"
    for base in SWAPS:
        if isinstance(m, base):
            meth = overridden_forward(cls, base)
            if meth is not None:
                return (f"{cls.__name__} subclasses {base.__name__} with its own {meth}: left as it is "
                        f"(its forward may compute something else)")
    if isinstance(m, nn.MultiheadAttention):
        return "nn.MultiheadAttention outside an attention scope (attention=None?)"
    return f"{cls.__name__} has no MX swap"


def module_status(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{name: (status, detail)}`` for the swapped, scoped and matmul-bearing modules of ``model``.

    status: "swapped" (an MX module), "scope" (its forward runs in an attention scope), "in scope" (a
    matmul-bearing module inside a scope: its torch.matmul / F.linear / addmm / SDPA calls are quantized)
    or "full precision" (detail says why).
    """
    out: dict[str, tuple[str, str]] = {}

    def walk(m: nn.Module, name: str, in_scope: bool) -> None:
        if isinstance(m, QuantizedModule):
            packed = ", packed" if getattr(m, "_mx_packed", False) else ""
            out[name] = ("swapped", f"{type(m).__name__} ({m.recipe.name}{packed})")
        elif _is_scope(m):
            out[name] = ("scope", f"{type(m)._mx_base.__name__} forward in MXMatmulMode")
        elif _is_gemm_bearing(m):
            out[name] = (("in scope", f"{type(m).__name__} inside an attention scope") if in_scope
                         else ("full precision", _unswapped_reason(m)))
        scope = in_scope or _is_scope(m)
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, scope)

    walk(model, "", False)
    return out


def full_precision_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``[(name, reason)]`` of matmul-bearing modules that are neither swapped nor in an attention scope."""
    return [(n, d) for n, (s, d) in module_status(model).items() if s == "full precision"]


# ---- dynamic: the GEMMs one forward runs, and whether their operands are MX ----------------------------
@dataclass(frozen=True)
class GemmCall:
    """One GEMM the forward ran: aten op, innermost module that ran it, FLOPs, and per operand whether it
    is MX-quantized along its reduction axis (empty for fused kernels whose operands cannot be)."""

    op: str
    module: str
    flops: int
    operands_mx: tuple[bool, ...]
    note: str = ""

    @property
    def is_mx(self) -> bool:
        return bool(self.operands_mx) and all(self.operands_mx)


@dataclass(frozen=True)
class ModuleCoverage:
    """One row of the report: a module, its status, and the forward GEMM FLOPs run directly inside it."""

    name: str
    type: str
    status: str
    detail: str
    gemm_flops: int
    mx_flops: int

    @property
    def share(self) -> float | None:
        return self.mx_flops / self.gemm_flops if self.gemm_flops else None


@dataclass(frozen=True)
class CoverageReport:
    """What :func:`coverage` measured. ``share`` is the MX share of all forward GEMM FLOPs."""

    recipe: str | None
    rows: tuple[ModuleCoverage, ...]
    gemms: tuple[GemmCall, ...] = field(repr=False)

    @property
    def total_flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    @property
    def mx_flops(self) -> int:
        return sum(g.flops for g in self.gemms if g.is_mx)

    @property
    def share(self) -> float:
        """MX share of forward GEMM FLOPs (0.0 for a forward with no GEMMs)."""
        return self.mx_flops / self.total_flops if self.total_flops else 0.0

    @property
    def swapped(self) -> list[str]:
        return [r.name for r in self.rows if r.status == "swapped"]

    @property
    def full_precision(self) -> list[tuple[str, str]]:
        """``[(module, reason)]`` of rows left in full precision or running non-MX GEMMs."""
        return [(r.name, r.detail) for r in self.rows
                if r.status == "full precision" or (r.gemm_flops and r.mx_flops < r.gemm_flops)]

    def __str__(self) -> str:
        head = ("module", "type", "status", "GEMM MFLOP", "MX %", "detail")
        lines = [head]
        for r in self.rows:
            pct = "-" if r.share is None else f"{100 * r.share:.1f}"
            lines.append((r.name or "<model>", r.type, r.status, f"{r.gemm_flops / 1e6:.3f}", pct, r.detail))
        widths = [max(len(row[i]) for row in lines) for i in range(5)]
        fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5]  # noqa: E731
        out = [fmt(lines[0]), "  ".join("-" * w for w in widths) + "  ------"]
        out += [fmt(row) for row in lines[1:]]
        n_fp = sum(1 for r in self.rows if r.status == "full precision")
        out.append(f"recipe {self.recipe or 'none'}: {100 * self.share:.2f}% of forward GEMM FLOPs on MX operands "
                   f"({self.mx_flops / 1e6:.3f} of {self.total_flops / 1e6:.3f} MFLOP in {len(self.gemms)} GEMMs); "
                   f"{len(self.swapped)} modules swapped, {n_fp} matmul-bearing modules in full precision")
        return "\n".join(out)


def _is_fixed_point(t: torch.Tensor, axis: int, specs) -> bool:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return False
    if t.dim() == 0 or t.shape[axis] == 0:
        return False
    t = t.dequantize() if is_packed(t) else t.detach()   # a packed weight: check the values it decodes to
    for spec in specs:
        try:
            q = fake_quantize(t, spec.format, axis=axis, rounding="even", scale_mode=spec.scale_mode)
        except (TypeError, ValueError):
            continue
        if torch.equal(q, t):
            return True
    return False


def _conv_columns(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor | None:
    """im2col columns [N, G, C/G·k, L] of a 1-D/2-D convolution input (None for other ranks)."""
    spatial = w.dim() - 2
    if spatial not in (1, 2) or x.dim() not in (spatial + 1, spatial + 2):
        return None
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    k, s, p, d = tuple(w.shape[2:]), tuple(stride), tuple(padding), tuple(dilation)
    if spatial == 1:
        x, k, s, p, d = x.unsqueeze(2), (1, *k), (1, *s), (0, *p), (1, *d)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
    return cols.view(cols.shape[0], groups, -1, cols.shape[-1])


def _attention_flops(q, k, v) -> int:
    b = math.prod(q.shape[:-2])
    return 2 * b * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _self_attention_flops(tokens: int, length: int, e: int) -> int:
    """q/k/v and output projections (8·T·E²) plus the two attention matmuls (4·T·L·E)."""
    return 8 * tokens * e * e + 4 * tokens * length * e


_aten = torch.ops.aten
_GROUPED_CONV = torch.ops.microscale_nn.grouped_conv   # registered by .functional (imported via .modules)
_FUSED_ATTENTION = {
    getattr(_aten, n).default for n in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward")
    if hasattr(_aten, n)}


def _gemm_of(func, args, kwargs, out):
    """``(flops, [(operand, reduction axis)], note)`` for a GEMM aten op, else None."""
    packet = func.overloadpacket
    if packet in (_aten.mm, _aten.bmm):
        a, b = args[0], args[1]
        return 2 * a.numel() * b.shape[-1], [(a, -1), (b, -2)], ""
    if packet in (_aten.addmm, _aten.baddbmm, _aten.addbmm):
        a, b = args[1], args[2]
        return 2 * a.numel() * b.shape[-1], [(a, -1), (b, -2)], ""
    if packet is _aten.mv:
        return 2 * args[0].numel(), [(args[0], -1), (args[1], 0)], ""
    if packet is _aten.addmv:
        return 2 * args[1].numel(), [(args[1], -1), (args[2], 0)], ""
    if packet in (_aten.dot, _aten.vdot):
        return 2 * args[0].numel(), [(args[0], 0), (args[1], 0)], ""
    if packet is _aten.linear:
        x, w = args[0], args[1]
        return 2 * (x.numel() // x.shape[-1]) * w.numel(), [(x, -1), (w, -1)], ""
    if packet is _aten.matmul:
        a, b = args[0], args[1]
        return 2 * out.numel() * a.shape[-1], [(a, -1), (b, -2 if b.dim() > 1 else 0)], ""
    if packet in (_aten.convolution, _aten._convolution):
        x, w = args[0], args[1]
        stride, padding, dilation, transposed, _, groups = args[3:9]
        if transposed:
            return 2 * x.numel() * w[0].numel(), [], "transposed convolution (not quantized)"
        flops = 2 * out.numel() * w[0].numel()
        cols = _conv_columns(x, w, stride, padding, dilation, groups)
        if cols is None:
            return flops, [], f"{w.dim() - 2}-D convolution (not quantized)"
        return flops, [(cols, 2), (w.reshape(w.shape[0], -1), -1)], ""
    if packet is _GROUPED_CONV:
        # the fused MX grouped convolution: its input operand is the windows it quantized internally,
        # asked back from the kernel (the values that reached its arithmetic, not recomputed here)
        x, wq, bias, stride, padding, dilation, groups, fmt, rounding, scale_mode = args
        spec = QuantSpec.resolve(fmt, rounding, scale_mode)
        _, windows = grouped_conv_fused(x, wq, bias, stride, padding, dilation, groups, spec, return_windows=True)
        return (2 * out.numel() * wq[0].numel(), [(windows, 1), (wq.reshape(wq.shape[0], -1), -1)],
                "fused grouped convolution (windows quantized in the kernel)")
    if func in _FUSED_ATTENTION:
        return _attention_flops(args[0], args[1], args[2]), [], "fused attention kernel (operands not quantizable)"
    if packet is _aten._native_multi_head_attention:
        q, e = args[0], args[3]
        return (_self_attention_flops(q.numel() // e, q.shape[-2], e), [],
                "fused MultiheadAttention fast path (not quantized)")
    if packet is _aten._transformer_encoder_layer_fwd:
        src, e, w1 = args[0], args[1], args[14]
        parts = src.unbind() if src.is_nested else [src.reshape(-1, src.shape[-2], e)]
        flops = sum(_self_attention_flops(t.numel() // e, t.shape[-2], e) + 4 * (t.numel() // e) * e * w1.shape[0]
                    for t in parts)
        return flops, [], "fused TransformerEncoderLayer fast path (not quantized)"
    return None


class _GemmProbe(TorchDispatchMode):
    def __init__(self, specs, stack: list[str]):
        super().__init__()
        self.specs, self.stack, self.calls = specs, stack, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        gemm = _gemm_of(func, args, kwargs, out)
        if gemm is not None:
            flops, operands, note = gemm
            mx = tuple(_is_fixed_point(t, ax, self.specs) for t, ax in operands)
            self.calls.append(GemmCall(str(func.overloadpacket.__name__), self.stack[-1], int(flops), mx, note))
        return out


def _model_recipe(model: nn.Module) -> Recipe | None:
    for m in model.modules():
        state = getattr(m, "_mx_state", None)
        if state is not None:
            return state.recipe
    return None


def coverage(model: nn.Module, *example_inputs, recipe: str | Recipe | None = None, **kwargs) -> CoverageReport:
    """Run ``model(*example_inputs, **kwargs)`` once under a GEMM probe and report MX coverage.

    ``recipe``: the formats an operand may be quantized in (its ``fwd_input`` / ``fwd_weight``);
    default: the recipe the model was quantized with (a model never quantized reports 0%). The forward
    runs in the model's current train/eval mode and the caller's grad mode (wrap in ``torch.no_grad()``
    for inference). Returns a :class:`CoverageReport` (``print`` it for the table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"coverage expects an nn.Module, got {type(model).__name__}")
    recipe = get_recipe(recipe) if recipe is not None else _model_recipe(model)
    specs = [] if recipe is None else list(dict.fromkeys(
        s for s in (recipe.fwd_input, recipe.fwd_weight) if not s.is_none))
    stack = [""]

    def enter(name):
        def hook(module, args):
            stack.append(name)
        return hook

    def leave(module, args, output):
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        if m is not model:
            handles.append(m.register_forward_pre_hook(enter(name)))
            handles.append(m.register_forward_hook(leave, always_call=True))
    probe = _GemmProbe(specs, stack)
    try:
        with probe:
            model(*example_inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    status = module_status(model)
    flops: dict[str, list[int]] = {}
    for c in probe.calls:
        acc = flops.setdefault(c.module, [0, 0])
        acc[0] += c.flops
        acc[1] += c.flops if c.is_mx else 0
    modules = dict(model.named_modules())
    names = [n for n in modules if n in status or n in flops]
    rows = []
    for n in names:
        st, detail = status.get(n, ("-", "runs GEMMs outside any MX module or attention scope"))
        f, mx = flops.get(n, (0, 0))
        notes = sorted({c.note for c in probe.calls if c.module == n and c.note})
        if notes:
            detail = f"{detail}; {', '.join(notes)}"
        rows.append(ModuleCoverage(n, type(modules[n]).__name__, st, detail, f, mx))
    return CoverageReport(None if recipe is None else recipe.name, tuple(rows), tuple(probe.calls))

"""Quantized modules, made by swapping the class of an existing module in place.

A swap keeps the module's own Parameter objects (so an optimizer built before the swap still updates
them), its state_dict keys and its hooks; :func:`microscale.nn.dequantize_model` swaps the class back.

- :class:`MXLinear`, :class:`MXConv1d`, :class:`MXConv2d`: every GEMM operand quantized by the recipe.
  Convolutions run as im2col (a strided copy, the order of ``F.unfold``) + one batched quantized GEMM
  over the groups (:func:`~microscale.nn.functional.mx_grouped_gemm`), so the reduction blocked is
  C_in/groups · kernel (channel-major, the order of ``weight.reshape(out, -1)``): for a depthwise conv,
  each block is one channel's kh·kw window. The result equals one :func:`mx_linear` per group exactly.
  Grouped convolutions (groups > 1) run their forward fused where a kernel covers them
  (:func:`~microscale.nn.functional.mx_grouped_conv2d`: the same quantized windows without the im2col
  columns, outputs and gradients equal up to fp32 summation order; :data:`fused_grouped_conv`).
- Subclasses of those types whose forward is the parent's (e.g. nn.MultiheadAttention's ``out_proj``,
  a ``NonDynamicallyQuantizableLinear``) are swapped too (:func:`swap_for`); subclasses that override
  ``forward`` are left alone and reported (:mod:`microscale.nn.coverage`).
- Attention scopes: a module whose forward does activation x activation matmuls (nn.MultiheadAttention,
  nn.TransformerEncoderLayer/DecoderLayer, or a hand-written attention module) gets a subclass whose
  forward runs inside :class:`MXMatmulMode`, a TorchFunctionMode that replaces torch.matmul / bmm /
  baddbmm / addmm / F.scaled_dot_product_attention and F.linear with their quantized versions
  (``torch.addmm(b, x, W)`` with a Parameter W stored [in, out], as in transformers' ``Conv1D``, is
  ``mx_linear(x, Wᵀ, b)``). The mode exists
  only for the duration of that forward; nothing global is patched. Being inside a TorchFunctionMode
  also turns off nn.MultiheadAttention's and nn.TransformerEncoderLayer's fused inference fast paths
  (they check ``has_torch_function``), so their internal F.linear calls (in_proj, and out_proj, a
  NonDynamicallyQuantizableLinear that is used through F.linear, never called) are quantized too.

Inference mode (``inference=True``): ``weight`` becomes a frozen :class:`~microscale.nn.packed.PackedWeight`
Parameter (codes + scales of the [out, K] GEMM view blocked along K) that still answers ``.shape``,
``.dtype`` and ``.device``; GEMMs on it run as the ``microscale::packed_linear`` custom op. Its
state_dict entries are the MXTensor's components under ``weight_codes``, ``weight_scales`` (and
``weight_micro`` / ``weight_tensor_scale`` for formats that have them).

- :func:`mx_hf_conv1d_class`: transformers' ``Conv1D`` (GPT-2; ``addmm(b, x, W)`` with W stored
  [in, out]) as an MX GEMM whose reduction is axis 0 of its weight, registered in :data:`SWAPS` by
  :func:`register_optional_swaps` when transformers is imported.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..tensor import MXTensor
from .functional import (QuantState, WeightCache, _round_elementwise, _run_fused_conv, fused_conv_covers, im2col,
                         mx_addmm, mx_baddbmm, mx_bmm, mx_grouped_conv2d, mx_grouped_gemm, mx_linear, mx_matmul,
                         mx_scaled_dot_product_attention, packed_mx_linear, quantize_operand)
from .packed import PackedWeight, is_packed, pack_parameter, unpack_parameters

__all__ = ["MXLinear", "MXConv1d", "MXConv2d", "MXMatmulMode", "QuantizedModule", "swap_for", "mx_hf_conv1d_class",
           "register_optional_swaps"]


class QuantizedModule:
    """Mixin of the swapped GEMM modules: shared state, packing and repr."""

    _mx_state: QuantState
    _mx_packed: bool = False
    #: True when ``weight`` is stored [K, out] (transformers' Conv1D): it is then packed as the
    #: transposed view of its [out, K] GEMM weight.
    _mx_weight_transposed: bool = False

    def _mx_init(self, state: QuantState, base: type) -> None:
        self._mx_state = state
        self._mx_base = base
        self._mx_cache = WeightCache()
        self._mx_packed = False

    @property
    def recipe(self):
        return self._mx_state.recipe

    # The GEMM view of the weight: [out, K] with K the reduction.
    def _gemm_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def packed_weight(self) -> MXTensor:
        """The packed weight (inference mode only) as an MXTensor of shape [out, K], blocked along K."""
        if not self._mx_packed:
            raise RuntimeError("this module keeps an FP32 master weight; quantize with inference=True to pack")
        return self.weight.mx

    def _pack(self) -> None:
        """Replace ``weight`` by a :class:`~microscale.nn.packed.PackedWeight` of the recipe's fwd_weight
        format, blocked along the reduction (a weight already packed through a tie is kept)."""
        spec = self.recipe.fwd_weight
        if spec.is_none:
            raise ValueError(f"inference=True packs weights in the recipe's fwd_weight format, but recipe "
                             f"{self.recipe.name!r} leaves weights unquantized ('none')")
        if spec.rounding == "stochastic":
            raise ValueError("inference=True needs deterministic weight rounding, got 'stochastic'")
        if not is_packed(self.weight):
            w = self.weight
            pw = PackedWeight.from_dense(self._gemm_weight().detach(), spec.format, spec.rounding, spec.scale_mode,
                                         shape=tuple(w.shape), transposed=self._mx_weight_transposed, dtype=w.dtype)
            pack_parameter(self, "weight", pw)
        self._mx_packed = True

    def _unpack(self, memo: dict | None = None) -> None:
        unpack_parameters(self, {} if memo is None else memo)
        self._mx_packed = False

    def _current_weight_2d(self, dtype) -> torch.Tensor:
        # Packed: the [out, K] view of the PackedWeight; its GEMMs run as microscale::packed_linear in
        # the activation's dtype.
        return self._gemm_weight()

    def _gemm(self, x: torch.Tensor, w2: torch.Tensor, b: torch.Tensor | None, cache) -> torch.Tensor:
        if self._mx_packed:
            # The weight is already quantized (fwd_weight); only the input is left to quantize.
            return packed_mx_linear(x, w2, b, self._mx_state)
        return mx_linear(x, w2, b, self._mx_state, cache)

    def _mx_repr(self) -> str:
        s = f"mx=[{self.recipe.name}: {self.recipe.describe()}]"
        if self._mx_packed:
            s += f", packed={self.recipe.fwd_weight.format}"
        return s


class MXLinear(QuantizedModule, nn.Linear):
    """nn.Linear whose forward and backward GEMMs are MX-quantized (made by :func:`quantize_model`)."""

    def _gemm_weight(self):
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mx_state.recipe.is_identity and not self._mx_packed:
            return nn.Linear.forward(self, x)
        return self._gemm(x, self._current_weight_2d(x.dtype), self.bias, self._mx_cache)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._mx_repr()}")


#: Grouped convolutions (groups > 1) take the fused forward of :func:`mx_grouped_conv2d` where a kernel
#: covers them (outputs and gradients equal to the im2col path's up to fp32 summation order). False: im2col
#: (tests compare the two; benchmarks time them).
fused_grouped_conv = True


class _MXConvNd(QuantizedModule):
    """Shared im2col forward of MXConv1d / MXConv2d."""

    def _gemm_weight(self):
        return self.weight.reshape(self.weight.shape[0], -1)

    def _conv(self, x: torch.Tensor, spatial: int) -> torch.Tensor:
        unbatched = x.dim() == spatial + 1
        if unbatched:
            x = x.unsqueeze(0)
        if spatial == 1:  # run 1-D as 2-D with a height of 1
            x = x.unsqueeze(2)
            k, s, d = (1, *self.kernel_size), (1, *self.stride), (1, *self.dilation)
        else:
            k, s, d = self.kernel_size, self.stride, self.dilation
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        pad = list(self._reversed_padding_repeated_twice)
        if spatial == 1:
            pad = pad + [0, 0]
        y = self._fused_conv(x, k, s, d, pad, mode) if self.groups > 1 and fused_grouped_conv else None
        if y is None:
            if any(pad):
                x = F.pad(x, pad, mode=mode)
            cols, ho, wo = im2col(x, k, s, d)                         # [C*kh*kw, N*L]
            n, g = x.shape[0], self.groups
            w2 = self._current_weight_2d(x.dtype)                    # [O, C/G*kh*kw]
            y = self._grouped_gemm(cols.view(g, -1, cols.shape[-1]), w2.view(g, -1, w2.shape[1]))  # [G, O/G, N*L]
            y = y.reshape(-1, n, ho, wo).transpose(0, 1).contiguous()
        if spatial == 1:
            y = y.squeeze(2)
        return y.squeeze(0) if unbatched else y

    def _fused_conv(self, x: torch.Tensor, k, s, d, pad: list[int], mode: str) -> torch.Tensor | None:
        """The grouped convolution without im2col (:func:`mx_grouped_conv2d`; packed: the fused kernel on
        the decoded weight), or None when no fused kernel covers it. ``pad``: F.pad's [left, right, top,
        bottom]; symmetric zero padding goes to the kernel, any other is applied here first."""
        if pad[0] == pad[1] and pad[2] == pad[3] and mode == "constant":
            padding = (pad[2], pad[0])
        else:
            x, padding = F.pad(x, pad, mode=mode), (0, 0)
        shape4 = (self.out_channels, self.in_channels // self.groups, *k)   # 1-D: [O, C/G, 1, k]
        if not self._mx_packed:
            return mx_grouped_conv2d(x, self.weight.view(shape4), self.bias, s, padding, d, self.groups,
                                     self._mx_state, self._mx_cache)
        r = self.recipe
        if not fused_conv_covers(x, r.fwd_input, shape4, self.groups):
            return None
        wq = self.weight.dequantize(x.dtype).view(shape4)
        return _round_elementwise(_run_fused_conv(x, wq, self.bias, (s, padding, d, self.groups), r.fwd_input), r)

    def _grouped_gemm(self, cols: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        """All groups in one batched GEMM: [G, K, N*L] columns, [G, O/G, K] weights -> [G, O/G, N*L]."""
        if self._mx_packed:
            r = self.recipe
            xq = quantize_operand(cols, r.fwd_input, 1, self._mx_state.seed(r.fwd_input))
            y = torch.ops.aten.matmul.default(w3, xq)
            return _round_elementwise(y if self.bias is None else y + self.bias.view(*w3.shape[:2], 1), r)
        return mx_grouped_gemm(w3, cols, self.bias, self._mx_state, self._mx_cache)

    def extra_repr(self) -> str:
        return f"{self._mx_base.extra_repr(self)}, {self._mx_repr()}"


class MXConv1d(_MXConvNd, nn.Conv1d):
    """nn.Conv1d as im2col + MX-quantized GEMM (reduction C_in/groups · kernel)."""

    def forward(self, x):
        if self._mx_state.recipe.is_identity and not self._mx_packed:
            return nn.Conv1d.forward(self, x)
        return self._conv(x, 1)


class MXConv2d(_MXConvNd, nn.Conv2d):
    """nn.Conv2d as im2col + MX-quantized GEMM (reduction C_in/groups · kh · kw)."""

    def forward(self, x):
        if self._mx_state.recipe.is_identity and not self._mx_packed:
            return nn.Conv2d.forward(self, x)
        return self._conv(x, 2)


#: Exact module types that are swapped, and their quantized classes.
SWAPS: dict[type, type] = {nn.Linear: MXLinear, nn.Conv1d: MXConv1d, nn.Conv2d: MXConv2d}


#: Methods a subclass must inherit unchanged from its SWAPS base to be swapped (its forward is the base's).
_FORWARD_METHODS = ("forward", "_conv_forward")
_SUBCLASS_SWAPS: dict[type, type] = {}


def overridden_forward(cls: type, base: type) -> str | None:
    """The first of ``forward`` / ``_conv_forward`` that ``cls`` defines differently from ``base``, or None."""
    for meth in _FORWARD_METHODS:
        if getattr(cls, meth, None) is not getattr(base, meth, None):
            return meth
    return None


def swap_for(cls: type) -> tuple[type, type] | None:
    """``(quantized class, original class)`` for a module type, or None when it is not swapped.

    Exact :data:`SWAPS` types map to their MX class. A subclass of one of them (e.g.
    ``nn.MultiheadAttention.out_proj``, a ``NonDynamicallyQuantizableLinear``) whose forward is the
    base's gets a class deriving from both the MX class and itself (made once per class), so
    ``isinstance`` checks against the original class still hold. Subclasses that override ``forward``
    (or ``_conv_forward``) are left alone: their forward may compute something else.
    """
    swap = SWAPS.get(cls)
    if swap is not None:
        return swap, cls
    if (getattr(cls, "_mx_scope", False) or issubclass(cls, QuantizedModule)
            or issubclass(cls, nn.modules.lazy.LazyModuleMixin)):  # lazy: no weight shape to quantize yet
        return None
    for base, swap in SWAPS.items():
        if issubclass(cls, base) and overridden_forward(cls, base) is None:
            sub = _SUBCLASS_SWAPS.get(cls)
            if sub is None:
                sub = type(f"MX{cls.__name__}", (swap, cls), {"__module__": __name__})
                _SUBCLASS_SWAPS[cls] = sub
            return sub, cls
    return None


# ---- transformers' Conv1D (GPT-2, GPT, ...): y = addmm(b, x, W), W stored [in, out] -------------------
class _MXHFConv1DMixin(QuantizedModule):
    """transformers' ``Conv1D`` with MX GEMMs: the reduction is axis 0 of its [in, out] weight, so the
    GEMM weight is ``weight.t()`` ([out, K]) and packing stores that view (``weight`` stays [in, out])."""

    _mx_weight_transposed = True

    def _gemm_weight(self):
        return self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mx_state.recipe.is_identity and not self._mx_packed:
            return self._mx_base.forward(self, x)
        return self._gemm(x, self._gemm_weight(), self.bias, self._mx_cache)

    def __repr__(self) -> str:
        return f"MXHFConv1D(nf={self.nf}, nx={self.nx}, {self._mx_repr()})"


_HF_CONV1D: dict[type, type] = {}


def mx_hf_conv1d_class(base: type) -> type:
    """The MX subclass of transformers' ``Conv1D`` class ``base`` (made once; named ``MXHFConv1D``)."""
    sub = _HF_CONV1D.get(base)
    if sub is None:
        sub = type("MXHFConv1D", (_MXHFConv1DMixin, base), {"__module__": __name__})
        _HF_CONV1D[base] = sub
        globals()["MXHFConv1D"] = sub  # picklable by name
    return sub


def register_optional_swaps() -> None:
    """Add swaps for classes of optional packages that are already imported (transformers' Conv1D);
    nothing is imported here."""
    import sys
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and hasattr(hf, "Conv1D") and hf.Conv1D not in SWAPS:
        SWAPS[hf.Conv1D] = mx_hf_conv1d_class(hf.Conv1D)


# ---- attention scopes -------------------------------------------------------------------------------
class MXMatmulMode(TorchFunctionMode):
    """Quantizes the GEMMs torch functions run while it is active (entered only by attention scopes).

    Handles torch.matmul / Tensor.matmul / @, torch.mm and torch.bmm / baddbmm on rank >= 2 activations,
    F.scaled_dot_product_attention (as :func:`mx_scaled_dot_product_attention`) and F.linear (as
    :func:`mx_linear`, for weights used without a module, e.g. nn.MultiheadAttention's projections).
    Anything else, and calls with ``out=``, run unchanged.
    """

    def __init__(self, state: QuantState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            # That Python function hands itself to the active mode (has_torch_function is true) before
            # doing anything, and this handler runs with the mode popped, so its inner F.linear / bmm /
            # SDPA calls would escape quantization. Run its body with the mode pushed again instead.
            with MXMatmulMode(self.state):
                return _MHA_FORWARD_BODY(*args, **kwargs)
        handler = _HANDLERS.get(func)
        if handler is not None and "out" not in kwargs:
            out = handler(self.state, *args, **kwargs)
            if out is not NotImplemented:
                return out
        if func is torch.Tensor.unflatten and "names" not in kwargs:
            # The same op without Tensor.unflatten's Python wrapper (its super() call breaks the
            # torch.compile graph; nn.MultiheadAttention's packed in-projection uses it).
            return torch.unflatten(*args, **kwargs)
        return func(*args, **kwargs)


def _without_torch_function_check(f: types.FunctionType) -> types.FunctionType:
    """A copy of ``f`` whose ``has_torch_function`` is off, so it runs its own body under the mode (the
    original function and torch's globals are untouched)."""
    glb = dict(f.__globals__)
    glb["has_torch_function"] = lambda *_: False
    return types.FunctionType(f.__code__, glb, f.__name__, f.__defaults__, f.__closure__)


# Built once at import, not on first use: torch.compile then sees a plain function object and traces
# into it, instead of tracing the copy of F's globals (a graph break on ``dict.items``).
_MHA_FORWARD_BODY = _without_torch_function_check(F.multi_head_attention_forward)


def _h_matmul(state, a, b):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
        return NotImplemented
    return mx_matmul(a, b, state)


def _h_rmatmul(state, b, a):
    return _h_matmul(state, a, b)


def _h_bmm(state, a, b):
    return mx_bmm(a, b, state)


def _h_baddbmm(state, input, batch1, batch2, *, beta=1, alpha=1):
    return mx_baddbmm(input, batch1, batch2, beta=beta, alpha=alpha, recipe=state)


def _h_addmm(state, input, mat1, mat2, *, beta=1, alpha=1):
    if not (isinstance(mat1, torch.Tensor) and isinstance(mat2, torch.Tensor)) or mat1.dim() != 2 or mat2.dim() != 2:
        return NotImplemented
    return mx_addmm(input, mat1, mat2, beta=beta, alpha=alpha, recipe=state)


def _h_sdpa(state, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
    return mx_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                           enable_gqa, recipe=state)


def _h_linear(state, input, weight, bias=None):
    return mx_linear(input, weight, bias, state)


_HANDLERS = {
    torch.matmul: _h_matmul, torch.Tensor.matmul: _h_matmul, torch.Tensor.__matmul__: _h_matmul,
    torch.Tensor.__rmatmul__: _h_rmatmul,
    torch.bmm: _h_bmm, torch.Tensor.bmm: _h_bmm, torch.mm: _h_matmul, torch.Tensor.mm: _h_matmul,
    torch.baddbmm: _h_baddbmm, torch.Tensor.baddbmm: _h_baddbmm,
    torch.addmm: _h_addmm, torch.Tensor.addmm: _h_addmm,
    F.scaled_dot_product_attention: _h_sdpa,
    F.linear: _h_linear,
}


_SCOPED_CLASSES: dict[type, type] = {}


def _scoped_forward(self, *args, **kwargs):
    state = self._mx_state
    if state.recipe.is_identity:
        return self._mx_base.forward(self, *args, **kwargs)
    # Nested scopes (nn.MultiheadAttention inside nn.TransformerEncoderLayer) stack two modes; the inner
    # one quantizes each GEMM and the GEMMs themselves run with torch functions disabled, so nothing is
    # quantized twice.
    with MXMatmulMode(state):
        return self._mx_base.forward(self, *args, **kwargs)


def _scoped_extra_repr(self) -> str:
    base = self._mx_base.extra_repr(self)
    s = f"mx_matmuls=[{self._mx_state.recipe.name}: {self._mx_state.recipe.describe()}]"
    return f"{base}, {s}" if base else s


def scoped_class(cls: type) -> type:
    """The subclass of ``cls`` whose forward runs inside :class:`MXMatmulMode` (made once per class)."""
    sub = _SCOPED_CLASSES.get(cls)
    if sub is None:
        name = f"MXScoped{cls.__name__}"
        sub = type(name, (cls,), {"forward": _scoped_forward, "extra_repr": _scoped_extra_repr,
                                  "_mx_base": cls, "__module__": __name__, "_mx_scope": True})
        _SCOPED_CLASSES[cls] = sub
    return sub

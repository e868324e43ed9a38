"""Packed weights that stay ``.weight``: a tensor subclass backed by an :class:`~microscale.MXTensor`.

:class:`PackedWeight` is a wrapper tensor subclass (the torchao way: ``torch.Tensor._make_wrapper_subclass``
plus ``__torch_dispatch__``). It answers ``.shape``, ``.dtype`` (the compute dtype, e.g. float32) and
``.device`` like the dense weight it replaces, while it stores only the MX codes and scales (and, for
two-level / tensor-scaled formats, the microexponents and tensor scale) of the GEMM view ``[out, K]``
blocked along the reduction K. Its value is exactly ``dequantize()`` of that MXTensor, seen as

- the weight's own shape (``[out, K]`` for nn.Linear, ``[out, C/groups, kh, kw]`` for convolutions), or
- its transpose ``[K, out]`` (transformers' ``Conv1D``, which computes ``torch.addmm(b, x, W)``; also
  what ``weight.t()`` of a Linear weight gives).

How ops run on it (aten level, so ``F.linear``, ``torch.addmm`` / ``mm`` / ``matmul`` and the
decompositions of ``nn.Linear`` all arrive here):

- GEMMs whose reduction is the blocked axis (``linear``, ``addmm(b, x, Wᵀ)``, ``mm(x, Wᵀ)``) run as the
  custom op ``microscale::packed_linear`` (:func:`microscale.packed_linear` on the components), which
  ``torch.compile`` treats as one opaque call with a fake (meta) implementation.
- Views that keep the packed storage exact: ``t`` / ``transpose`` / ``permute`` of the 2-D view,
  ``view`` / ``reshape`` between the weight's shape and ``[out, K]``, row slices and splits along
  ``out`` (nn.MultiheadAttention's q/k/v chunks, grouped convolutions), ``detach``, ``to(dtype)`` (the
  compute dtype changes, the codes do not), ``to(device)``, ``clone``.
- ``embedding`` gathers the packed rows it reads and decodes only those.
- Ops that read the weight's values (``convolution``, the fused inference kernels of
  nn.MultiheadAttention / nn.TransformerEncoderLayer, GEMMs along another axis such as the input
  gradient ``dY · W``) run on the dequantized weight (``microscale::dequantize_packed``), explicitly.
- Any other op runs on the dequantized weight with a one-time warning naming the op; in-place ops other
  than ``copy_`` raise (packed weights are read-only). ``copy_`` from another PackedWeight of the same
  format copies the codes; ``copy_`` from a dense tensor quantizes it (so a dense checkpoint loads into a
  packed model by quantizing on load).

``state_dict`` stores a packed parameter ``name`` as its components under ``name_codes``,
``name_scales`` (+ ``name_micro``, ``name_tensor_scale``), the plain tensors of the MXTensor; loading
accepts those parts, a :class:`~microscale.MXTensor` (blocked along the reduction, in either GEMM
orientation), or a dense tensor (quantized on load).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import return_and_correct_aliasing

from .. import backends, kernels
from ..formats import BlockFormat, format_key, get_format
from ..quantize import packed_linear, quantize
from ..tensor import COMPONENTS, MXTensor

__all__ = ["PackedWeight", "pack_parameter", "unpack_parameters", "is_packed", "packed_parameters",
           "PART_NAMES"]

#: The component names of a packed parameter in a state_dict (``<name>_<part>``): MXTensor's components.
PART_NAMES = COMPONENTS

aten = torch.ops.aten


# ---- custom ops: the packed GEMM and the explicit dequantize -----------------------------------------
# ``fmt`` is a format key (microscale.formats.format_key): the registered name, or the interned key of an
# unregistered BlockFormat, so torch.compile sees only static strings whatever the format.
def _mx(codes, scales, micro, tensor_scale, fmt: str, out_features: int, in_features: int) -> MXTensor:
    return MXTensor(codes, scales, (out_features, in_features), 1, fmt, micro, tensor_scale)


@torch.library.custom_op("microscale::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, micro: Optional[torch.Tensor],
                     tensor_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str,
                     out_features: int, in_features: int) -> torch.Tensor:
    """``x · Wᵀ + bias`` for the packed weight W = MXTensor([out, K], axis 1) given by its components:
    :func:`microscale.packed_linear` (fused kernel when one covers it, else dequantize + F.linear)."""
    q = _mx(codes, scales, micro, tensor_scale, fmt, out_features, in_features)
    return packed_linear(x, q, bias)


@packed_linear_op.register_fake
def _(x, codes, scales, micro, tensor_scale, bias, fmt, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("microscale::dequantize_packed", mutates_args=())
def dequantize_op(codes: torch.Tensor, scales: torch.Tensor, micro: Optional[torch.Tensor],
                  tensor_scale: Optional[torch.Tensor], fmt: str, out_features: int, in_features: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, K]`` weight of ``dtype`` decoded from its packed components."""
    return _mx(codes, scales, micro, tensor_scale, fmt, out_features, in_features).dequantize(dtype)


@dequantize_op.register_fake
def _(codes, scales, micro, tensor_scale, fmt, out_features, in_features, dtype):
    return codes.new_empty((out_features, in_features), dtype=dtype)


def _packed_linear_setup(ctx, inputs, output):
    x, codes, scales, micro, tensor_scale, bias, fmt, out_features, in_features = inputs
    ctx.save_for_backward(codes, scales, micro, tensor_scale)
    ctx.facts = (fmt, out_features, in_features)
    ctx.has_bias = bias is not None


def _packed_linear_backward(ctx, gy):
    # Only the activation and the bias can need gradients: packed weights are frozen.
    codes, scales, micro, tensor_scale = ctx.saved_tensors
    fmt, out_features, in_features = ctx.facts
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize_op(codes, scales, micro, tensor_scale, fmt, out_features, in_features, gy.dtype)
        gx = gy.matmul(w)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        gb = gy.reshape(-1, out_features).sum(0)
    return gx, None, None, None, None, gb, None, None, None


packed_linear_op.register_autograd(_packed_linear_backward, setup_context=_packed_linear_setup)


# ---- the subclass ---------------------------------------------------------------------------------------
_NO_PLAN_YET = object()   # PackedWeight._plan_cell[0] before the first packed GEMM (None: not covered)

def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def _wrapper(cls, gemm_shape, shape, transposed: bool, dtype: torch.dtype, device):
    """The bare wrapper tensor of a packed weight of GEMM shape [out, K] seen as ``shape`` (or as [K, out]
    when ``transposed``), after checking that view and the compute dtype."""
    out_features, k = gemm_shape
    if transposed:
        shape, strides = (k, out_features), (1, k)
    else:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != out_features or math.prod(shape[1:]) != k:
            raise ValueError(f"a packed weight of GEMM shape [{out_features}, {k}] cannot be viewed as "
                             f"{list(shape)} (needs shape[0] == {out_features} and prod(shape[1:]) == {k})")
        strides = _contiguous_strides(shape)
    if not dtype.is_floating_point:
        raise TypeError(f"a packed weight's compute dtype must be floating point, got {dtype}")
    return torch.Tensor._make_wrapper_subclass(cls, shape, strides=strides, dtype=dtype, device=device,
                                               requires_grad=False)


class PackedWeight(torch.Tensor):
    """A frozen weight stored as MX codes + scales of its GEMM view ``[out, K]`` blocked along K.

    Build with :func:`PackedWeight.from_dense` or from an MXTensor; see the module docstring for which
    ops take the packed path. ``mx`` is the MXTensor, ``dequantize()`` the dense value.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, q: MXTensor, dtype: torch.dtype = torch.float32, shape=None, transposed: bool = False,
                rounding: str = "even", scale_mode: str | None = None):
        out_features, k = cls._check_q(q)
        return _wrapper(cls, (out_features, k), shape or q.shape, transposed, dtype, q.codes.device)

    def __init__(self, q: MXTensor, dtype: torch.dtype = torch.float32, shape=None, transposed: bool = False,
                 rounding: str = "even", scale_mode: str | None = None):
        self.codes, self.scales, self.micro, self.tensor_scale = q.codes, q.scales, q.micro, q.tensor_scale
        self.format_name = format_key(q.format)   # static string for the custom ops (any format)
        self.gemm_shape = (int(q.shape[0]), int(q.shape[1]))
        self.transposed = bool(transposed)
        # plain strings: static facts of __tensor_flatten__ (enum members are accepted and stored as values)
        self.rounding = str(rounding)
        self.scale_mode = None if scale_mode is None else str(scale_mode)
        self._plan_cell = [_NO_PLAN_YET]   # one list shared by every view over these components

    def _rewrap(self, dtype: torch.dtype, shape, transposed: bool) -> "PackedWeight":
        """A new wrapper over the same (already validated) components with other view facts: no MXTensor is
        rebuilt and the kernel plan is shared, so views such as ``W.t()`` inside ``F.linear`` stay cheap."""
        w = _wrapper(PackedWeight, self.gemm_shape, shape, transposed, dtype, self.codes.device)
        for name in ("codes", "scales", "micro", "tensor_scale", "format_name", "gemm_shape", "rounding",
                     "scale_mode", "_plan_cell"):
            setattr(w, name, getattr(self, name))
        w.transposed = bool(transposed)
        return w

    def _linear_plan(self):
        """The fused kernels' checked plan of this weight (made on first use, shared by its views), or None
        when they do not cover it; remade when a component was replaced or resized in place."""
        cell = self._plan_cell
        plan = cell[0]
        if plan is _NO_PLAN_YET or (plan is not None and not plan.fits(self.codes, self.scales)):
            plan = None
            if self.micro is None and self.tensor_scale is None and self.codes.device.type == "cpu":
                plan = kernels.linear_plan(self.mx)
            cell[0] = plan
        return plan

    @staticmethod
    def _check_q(q) -> tuple[int, int]:
        if not isinstance(q, MXTensor):
            raise TypeError(f"a PackedWeight wraps an MXTensor, got {type(q).__name__}")
        if q.ndim != 2 or q.axis != 1:
            raise ValueError(f"a PackedWeight wraps the GEMM view [out, K] blocked along axis 1, got shape "
                             f"{q.shape} along axis {q.axis}")
        return int(q.shape[0]), int(q.shape[1])

    @classmethod
    def from_dense(cls, w2: torch.Tensor, fmt, rounding: str = "even", scale_mode: str | None = None,
                   shape=None, transposed: bool = False, dtype: torch.dtype | None = None) -> "PackedWeight":
        """Quantize the GEMM view ``w2`` ([out, K], K the reduction) along K and wrap it; ``shape`` /
        ``transposed`` say how the weight itself is laid out (see the module docstring)."""
        if rounding == "stochastic":
            raise ValueError("packed weights need deterministic rounding, got 'stochastic'")
        q = quantize(w2.detach(), fmt, axis=1, rounding=rounding, scale_mode=scale_mode)
        return cls(q, dtype or w2.dtype, shape, transposed, rounding, scale_mode)

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def mx(self) -> MXTensor:
        """The packed GEMM view as an MXTensor of shape [out, K] blocked along axis 1."""
        return _mx(self.codes, self.scales, self.micro, self.tensor_scale, self.format_name, *self.gemm_shape)

    def components(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (``codes``, ``scales`` and, where the format has them, ``micro`` /
        ``tensor_scale``)."""
        return {n: getattr(self, n) for n in PART_NAMES if getattr(self, n) is not None}

    @property
    def packed_nbytes(self) -> int:
        """Bytes actually stored (the MXTensor's nbytes); ``nbytes`` keeps torch's numel * itemsize."""
        return sum(t.numel() * t.element_size() for t in self.components().values())

    def _facts(self):
        return (self.format_name, self.gemm_shape, self.transposed, tuple(self.shape), self.dtype,
                self.rounding, self.scale_mode)

    def _like(self, q: MXTensor | None = None, **changes) -> "PackedWeight":
        """A new PackedWeight over ``q`` (default: the same components) with some view facts changed."""
        facts = dict(dtype=self.dtype, shape=tuple(self.shape), transposed=self.transposed,
                     rounding=self.rounding, scale_mode=self.scale_mode)
        facts.update(changes)
        if q is None:
            return self._rewrap(facts["dtype"], facts["shape"], facts["transposed"])
        if facts["transposed"]:
            facts["shape"] = None
        return PackedWeight(q, **facts)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense value, in this weight's layout and ``dtype`` (default: the compute dtype)."""
        w2 = dequantize_op(self.codes, self.scales, self.micro, self.tensor_scale, self.format_name,
                           *self.gemm_shape, dtype or self.dtype)
        return w2.t() if self.transposed else w2.reshape(self.shape)

    # ---- torch.compile: flatten to the plain component tensors + static facts -------------------------
    def __tensor_flatten__(self):
        return [n for n in PART_NAMES if getattr(self, n) is not None], self._facts()

    @staticmethod
    def __tensor_unflatten__(inner, facts, outer_size, outer_stride):
        fmt, gemm_shape, transposed, shape, dtype, rounding, scale_mode = facts
        q = _mx(inner["codes"], inner["scales"], inner.get("micro"), inner.get("tensor_scale"), fmt, *gemm_shape)
        return PackedWeight(q, dtype, None if transposed else shape, transposed, rounding, scale_mode)

    def __repr__(self, *, tensor_contents=None) -> str:
        view = "transposed [K, out]" if self.transposed else "weight"
        return (f"PackedWeight(format={self.format_name}, shape={tuple(self.shape)} ({view}), gemm "
                f"[out, K]={list(self.gemm_shape)}, dtype={self.dtype}, device={self.device}, "
                f"packed_nbytes={self.packed_nbytes})")

    def __reduce_ex__(self, proto):
        # the format object itself, not its key: an interned key means nothing in another process
        return (_rebuild, (self.components(), (get_format(self.format_name), *self._facts()[1:])))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            if func.is_view and torch.is_inference_mode_enabled():
                # A view of a normal tensor must be a normal tensor, also under torch.inference_mode (torch
                # sets its version counter); a wrapper made inside inference mode would be an inference one.
                with torch.inference_mode(False):
                    out = rule(func, *args, **kwargs)
            else:
                out = rule(func, *args, **kwargs)
            if out is not NotImplemented:
                if func in _GEMM_OPS:
                    return out   # a fresh result that aliases nothing: nothing to correct (saves µs per call)
                # View ops (t, view, detach, slices...) return new wrappers: give them the aliasing and
                # version-counter facts torch expects of a view (also under torch.inference_mode).
                return return_and_correct_aliasing(func, args, kwargs, out)
        return _on_dense(func, args, kwargs)


def _rebuild(components, facts):
    if isinstance(facts[0], BlockFormat):
        facts = (format_key(facts[0]), *facts[1:])
    return PackedWeight.__tensor_unflatten__(components, facts, None, None)


def is_packed(t) -> bool:
    """True for a :class:`PackedWeight` (also one registered as an nn.Parameter)."""
    return isinstance(t, PackedWeight)


# ---- dispatch rules -------------------------------------------------------------------------------------
_RULES: dict = {}
#: Ops that read the weight's values: they run on the dequantized weight without a warning.
_DENSE_OK = {aten.embedding.default, aten.convolution.default, aten._native_multi_head_attention.default,
             aten._transformer_encoder_layer_fwd.default, aten.mm.default, aten.addmm.default,
             aten.bmm.default, aten.equal.default, aten.allclose.default, aten.isclose.default,
             aten.sub.Tensor, aten.abs.default, aten.max.default, aten.select.int, aten.index.Tensor,
             aten._to_copy.default, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
             aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
             aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.linear.default,
             aten.eq.Tensor, aten.ne.Tensor, aten.is_nonzero.default}
_WARNED: set = set()
_GEMM_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default, aten.matmul.default}


def _rule(*ops):
    def deco(fn):
        for op in ops:
            _RULES[op] = fn
        return fn
    return deco


def _dense(t):
    return t.dequantize() if isinstance(t, PackedWeight) else t


def _on_dense(func, args, kwargs):
    """Run ``func`` on the dequantized values of every PackedWeight argument (explicitly)."""
    schema = func._schema
    flat = pytree.arg_tree_leaves(*args, **kwargs)
    if schema.is_mutable and any(isinstance(a, PackedWeight) for a in flat):
        mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        raise TypeError(f"{func} would modify a packed (read-only) weight in place (arguments {mutated}); "
                        f"call microscale.nn.dequantize_model(model) first to get trainable FP32 weights")
    if func not in _DENSE_OK and func not in _WARNED:
        _WARNED.add(func)
        warnings.warn(f"microscale PackedWeight: {func} has no packed rule; it runs on the dequantized weight",
                      stacklevel=3)
    dense = _dense
    if func in _GEMM_OPS:
        # As in the packed GEMM, the weight takes the activation's dtype (a bfloat16 dY in the backward
        # of a weight-only layer meets a float32-valued weight).
        dtypes = [a.dtype for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, PackedWeight)
                  and a.is_floating_point()]
        if dtypes:
            def dense(t, dtype=dtypes[0]):
                return t.dequantize(dtype)
    args, kwargs = pytree.tree_map_only(PackedWeight, dense, (args, kwargs))
    return func(*args, **kwargs)


@_rule(aten.detach.default, aten.alias.default)
def _detach(func, w):
    return w._like()


@_rule(aten.clone.default)
def _clone(func, w, memory_format=None):
    return w._like(_mx(*(None if t is None else t.clone() for t in (w.codes, w.scales, w.micro, w.tensor_scale)),
                       w.format_name, *w.gemm_shape))


@_rule(aten.t.default)
def _t(func, w):
    if w.dim() != 2:
        return NotImplemented
    return w._like(transposed=not w.transposed, shape=w.gemm_shape)


@_rule(aten.transpose.int)
def _transpose(func, w, d0, d1):
    if w.dim() != 2:
        return NotImplemented
    if d0 % 2 == d1 % 2:
        return w._like()
    return _t(func, w)


@_rule(aten.permute.default)
def _permute(func, w, dims):
    if w.dim() != 2:
        return NotImplemented
    return w._like() if [d % 2 for d in dims] == [0, 1] else _t(func, w)


@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func, w, size):
    size = list(size)
    if -1 in size:
        i = size.index(-1)
        rest = math.prod(s for j, s in enumerate(size) if j != i)
        size[i] = w.numel() // max(rest, 1)
    out_features, k = w.gemm_shape
    if w.transposed:
        return w._like() if tuple(size) == tuple(w.shape) else NotImplemented
    if size and size[0] == out_features and math.prod(size[1:]) == k:
        return w._like(shape=tuple(size))
    return NotImplemented


@_rule(aten._to_copy.default)
def _to_copy(func, w, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    if layout not in (None, torch.strided) or memory_format not in (None, torch.preserve_format,
                                                                    torch.contiguous_format):
        return NotImplemented
    if dtype is not None and not dtype.is_floating_point:
        return NotImplemented  # e.g. .int(): the dequantized values, converted
    q = w.mx
    if device is not None and torch.device(device) != w.device:
        q = _mx(*(None if t is None else t.to(device, non_blocking=non_blocking)
                  for t in (w.codes, w.scales, w.micro, w.tensor_scale)), w.format_name, *w.gemm_shape)
    return w._like(q, dtype=dtype or w.dtype)


def _rows(w: PackedWeight) -> dict[str, torch.Tensor] | None:
    """The components of a non-transposed packed weight viewed as one row per output feature: the
    blocked storage is row-major ([out, K] blocked along K), so row r is a contiguous byte range of the
    codes (and microexponents) when each row fills whole bytes. None when it does not."""
    out_features, k = w.gemm_shape
    q = w.mx
    fmt, lay = q.format, q.layout
    bpr = lay.blocks_per_vector
    code_bits = bpr * lay.block_size * fmt.element.bits
    if code_bits % 8:
        return None
    rows = {"codes": w.codes.view(out_features, code_bits // 8),
            "scales": w.scales.view(out_features, bpr) if w.scales.numel() else None}
    if w.micro is not None:
        micro_bits = bpr * (lay.block_size // fmt.subblock_size) * fmt.micro_bits
        if micro_bits % 8:
            return None
        rows["micro"] = w.micro.view(out_features, micro_bits // 8)
    if w.tensor_scale is not None:
        rows["tensor_scale"] = w.tensor_scale.view(out_features, 1) if w.tensor_scale.dim() else None
    return rows


def _take_rows(w: PackedWeight, pick) -> MXTensor | None:
    """An MXTensor of the rows ``pick(rows)`` selects (a slice or an index gather), in new storage."""
    rows = _rows(w)
    if rows is None:
        return None
    parts = {}
    for name in PART_NAMES:
        whole = getattr(w, name)
        if whole is None:
            continue
        r = rows.get(name)
        # Components that are not per row (no block scales, one tensor scale) are kept whole.
        parts[name] = whole.clone() if r is None else pick(r).reshape(-1).clone()
    n = parts["codes"].numel() // rows["codes"].shape[1]
    if w.tensor_scale is not None and w.tensor_scale.dim():
        parts["tensor_scale"] = parts["tensor_scale"].reshape(n)
    return _mx(parts["codes"], parts["scales"], parts.get("micro"), parts.get("tensor_scale"), w.format_name,
               n, w.gemm_shape[1])


def _row_slice(w: PackedWeight, start: int, stop: int) -> PackedWeight | None:
    """Rows [start, stop) of a non-transposed weight as a PackedWeight (exact: the same codes)."""
    q = _take_rows(w, lambda r: r[start:stop])
    return None if q is None else w._like(q, shape=(stop - start, *w.shape[1:]))


@_rule(aten.embedding.default)
def _embedding(func, w, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    # A lookup decodes only the rows it reads: gather their codes and scales, then dequantize.
    if not isinstance(w, PackedWeight) or w.transposed or w.dim() != 2:
        return NotImplemented
    flat = indices.reshape(-1)
    q = _take_rows(w, lambda r: r.index_select(0, flat))
    if q is None:
        return NotImplemented
    out = dequantize_op(q.codes, q.scales, q.micro, q.tensor_scale, w.format_name, flat.numel(), w.gemm_shape[1],
                        w.dtype)
    return out.reshape(*indices.shape, w.gemm_shape[1])


@_rule(aten.slice.Tensor)
def _slice(func, w, dim=0, start=None, end=None, step=1):
    n = w.shape[0]
    if w.transposed or dim % w.dim() != 0 or step != 1:
        return NotImplemented
    start = 0 if start is None else start + (n if start < 0 else 0)
    end = n if end is None else end + (n if end < 0 else 0)
    start = max(0, min(n, start))
    end = max(start, min(n, end))
    if start == 0 and end == n:
        return w._like()
    part = _row_slice(w, start, end)
    return NotImplemented if part is None else part


@_rule(aten.split_with_sizes.default, aten.split.Tensor)
def _split(func, w, sizes, dim=0):
    if w.transposed or dim % w.dim() != 0:
        return NotImplemented
    n = w.shape[0]
    if isinstance(sizes, int):
        sizes = [min(sizes, n - i) for i in range(0, n, sizes)]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    parts = [_row_slice(w, a, b) for a, b in zip(bounds, bounds[1:])]
    return NotImplemented if any(p is None for p in parts) else parts


def _eager_fused(x, w: PackedWeight, bias):
    """The fused kernel run directly from the weight's checked plan, or None when this call must take the
    custom op (torch.compile / tracing modes / fake or functional tensors, autograd through x or the bias,
    a backend other than ``c`` selected, a weight or x the kernels do not cover). Same result as the
    custom op, without rebuilding and re-checking the weight on every call."""
    if (type(x) is not torch.Tensor and type(x) is not nn.Parameter) or \
            (bias is not None and type(bias) is not torch.Tensor and type(bias) is not nn.Parameter):
        return None
    if torch._C._len_torch_dispatch_stack() or not backends.c_selected():
        return None
    if x.device.type != "cpu" or (bias is not None and bias.device.type != "cpu"):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    plan = w._linear_plan()
    return None if plan is None else plan(x, bias)


def eager_linear(x, w: PackedWeight, bias):
    """``F.linear(x, w, bias)`` for a packed [out, K] weight (not a transposed view) straight through
    :func:`_eager_fused`, or None where that does not apply. Calling F.linear on the wrapper costs two
    ``__torch_dispatch__`` round trips (aten.t, then aten.addmm / mm) before reaching the same kernel: about
    20-30 µs per call at batch 1, which a decode loop pays for every Linear. Never used while torch.compile
    traces (the custom op path keeps the graph whole)."""
    if torch.compiler.is_compiling() or type(w) is not PackedWeight or w.transposed:
        return None
    return _eager_fused(x, w, bias)


def _mx_gemm(x, w: PackedWeight, bias):
    y = _eager_fused(x, w, bias)
    if y is not None:
        return y
    return packed_linear_op(x, w.codes, w.scales, w.micro, w.tensor_scale, bias, w.format_name, *w.gemm_shape)


@_rule(aten.mm.default)
def _mm(func, a, b):
    # x · Wᵀ with Wᵀ the transposed view: the reduction runs along the blocked K.
    if isinstance(b, PackedWeight) and b.transposed and not isinstance(a, PackedWeight):
        return _mx_gemm(a, b, None)
    return NotImplemented


@_rule(aten.addmm.default)
def _addmm(func, bias, a, b, beta=1, alpha=1):
    if (isinstance(b, PackedWeight) and b.transposed and not isinstance(a, PackedWeight)
            and not isinstance(bias, PackedWeight) and beta == 1 and alpha == 1
            and bias.dim() == 1 and bias.shape[0] == b.shape[1]):
        return _mx_gemm(a, b, bias)
    return NotImplemented


@_rule(aten.linear.default)
def _linear(func, x, w, bias=None):
    if isinstance(w, PackedWeight) and not w.transposed and w.dim() == 2 and not isinstance(x, PackedWeight):
        return _mx_gemm(x, w, bias)
    return NotImplemented


@_rule(aten.copy_.default)
def _copy_(func, dst, src, non_blocking=False):
    if not isinstance(dst, PackedWeight):
        return NotImplemented  # copying a packed weight into a dense tensor: its dequantized value
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"cannot copy a tensor of shape {tuple(src.shape)} into a packed weight of shape "
                         f"{tuple(dst.shape)}")
    if isinstance(src, PackedWeight):
        if src.format_name != dst.format_name or src.gemm_shape != dst.gemm_shape:
            raise ValueError(f"cannot copy a packed {src.format_name} weight of GEMM shape {list(src.gemm_shape)} "
                             f"into a packed {dst.format_name} weight of GEMM shape {list(dst.gemm_shape)}")
        if src.transposed != dst.transposed:
            raise ValueError("cannot copy a transposed packed view into an untransposed one (or back)")
        new = src.components()
    else:
        w2 = src.t() if dst.transposed else src.reshape(dst.gemm_shape)
        new = PackedWeight.from_dense(w2, dst.format_name, dst.rounding, dst.scale_mode).components()
    for name, t in dst.components().items():
        t.copy_(new[name])
    return dst


# ---- parameters on modules -----------------------------------------------------------------------------
def packed_parameters(module: nn.Module) -> dict[str, PackedWeight]:
    """The module's own parameters that are packed, by name."""
    return {n: p for n, p in module._parameters.items() if isinstance(p, PackedWeight)}


def pack_parameter(module: nn.Module, name: str, weight: PackedWeight) -> nn.Parameter:
    """Replace ``module.<name>`` by ``weight`` (as a frozen nn.Parameter, so ``named_parameters``,
    ``.dtype`` and tying by assignment keep working) and install the state_dict hooks that store it as
    its parts. Returns the Parameter."""
    p = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    module._parameters[name] = p
    if "_mx_packed_hooks" not in module.__dict__:
        module._mx_packed_hooks = (module.register_state_dict_post_hook(_state_dict_hook),
                                   module.register_load_state_dict_pre_hook(_load_state_dict_hook))
    return p


def unpack_parameters(module: nn.Module, memo: dict[int, nn.Parameter]) -> None:
    """Replace each packed parameter of ``module`` by a trainable FP32-valued dense Parameter (in the
    packed weight's compute dtype); ``memo`` maps id(packed) -> dense so tied parameters stay one."""
    for name, p in packed_parameters(module).items():
        dense = memo.get(id(p))
        if dense is None:
            dense = memo[id(p)] = nn.Parameter(p.dequantize().contiguous())
        module._parameters[name] = dense
    hooks = module.__dict__.pop("_mx_packed_hooks", None)
    if hooks is not None:
        for h in hooks:
            h.remove()


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    for name, p in packed_parameters(module).items():
        if state_dict.pop(prefix + name, None) is None:
            continue
        for part, t in p.components().items():
            state_dict[f"{prefix}{name}_{part}"] = t


def as_packed_like(value, like: PackedWeight, key: str) -> PackedWeight:
    """``value`` (an MXTensor blocked along the reduction, in the weight's layout or the GEMM view) as a
    PackedWeight with the view facts of ``like``; ValueError naming ``key`` when it does not fit."""
    out_features, k = like.gemm_shape
    if value.format != get_format(like.format_name):
        raise ValueError(f"{key}: the file holds {value.format.name}, the model expects "
                         f"{get_format(like.format_name).name} "
                         f"(quantize the model with the recipe the file was written with)")
    if value.shape == (out_features, k) and value.axis == 1:
        q = value
    elif value.shape == (k, out_features) and value.axis == 0:
        # [K, out] blocked along axis 0 (e.g. a Conv1D weight quantized in its own layout) has exactly
        # the blocked storage of [out, K] blocked along axis 1 (layout.py moves the block axis last).
        q = _mx(*(value.components().get(n) for n in PART_NAMES), format_key(value.format), out_features, k)
    elif (len(value.shape) == len(like.shape) and value.shape == tuple(like.shape) and value.axis == 1
          and len(value.shape) == 2):
        q = value
    else:
        raise ValueError(f"{key}: the file holds {value.format.name} of shape {list(value.shape)} blocked along "
                         f"axis {value.axis}; the model expects the GEMM view [{out_features}, {k}] blocked "
                         f"along axis 1 (or [{k}, {out_features}] along axis 0)")
    return like._like(q)


def _load_state_dict_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    for name, p in packed_parameters(module).items():
        key = prefix + name
        parts = {part: f"{key}_{part}" for part in p.components()}
        present = {part: k for part, k in parts.items() if k in state_dict}
        try:
            if present:
                if len(present) != len(parts) or key in state_dict:
                    missing = sorted(set(parts.values()) - set(present.values()))
                    raise ValueError(f"{key}: packed parts incomplete (missing {missing})" if missing else
                                     f"{key}: both the dense key and its packed parts are present")
                comp = {part: state_dict.pop(k) for part, k in present.items()}
                state_dict[key] = p._like(_mx(comp["codes"], comp["scales"], comp.get("micro"),
                                              comp.get("tensor_scale"), p.format_name, *p.gemm_shape))
            elif isinstance(state_dict.get(key), MXTensor):
                state_dict[key] = as_packed_like(state_dict[key], p, key)
        except (ValueError, TypeError) as e:
            state_dict.pop(key, None)
            error_msgs.append(str(e))

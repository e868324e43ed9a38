"""One verb changes a model: :func:`quantize_model`; :func:`dequantize_model` undoes it.

Only the model given is changed (its modules' classes are swapped in place); nothing global is patched.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..tensor import MXTensor
from .functional import QuantState
from .modules import SWAPS, QuantizedModule, scoped_class, swap_for
from .recipe import OPERANDS, Recipe, get_recipe

__all__ = ["quantize_model", "dequantize_model", "restore", "resident_bytes", "save_quantized",
           "load_quantized", "DEFAULT_ATTENTION_TYPES"]

#: Module types whose forward runs in an attention scope by default (activation x activation matmuls).
DEFAULT_ATTENTION_TYPES: tuple[type, ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                                             nn.TransformerDecoderLayer)

AttentionSpec = str | Iterable[type] | Callable[[str, nn.Module], bool] | None


def _is_attention(attention: AttentionSpec, name: str, module: nn.Module) -> bool:
    if attention is None or attention is False:
        return False
    if attention == "auto":
        # The torch transformer modules, plus hand-written attention modules by the common naming
        # convention (CausalSelfAttention, SelfAttention, MultiHeadAttention, ...).
        return (isinstance(module, DEFAULT_ATTENTION_TYPES)
                or type(module).__name__.lower().endswith("attention"))
    if callable(attention) and not isinstance(attention, type):
        return bool(attention(name, module))
    return isinstance(module, tuple(attention))


def _probe(recipe: Recipe) -> None:
    """Fail early, naming the operand, when a recipe's format cannot quantize a GEMM operand."""
    from .functional import quantize_operand
    seen = set()
    for op in OPERANDS:
        spec = getattr(recipe, op)
        if spec.is_none or spec in seen:
            continue
        seen.add(spec)
        fmt = spec.block_format
        k = fmt.block_size or 32
        try:
            quantize_operand(torch.ones(2, k), spec, -1, 0 if spec.is_stochastic else None)
        except Exception as e:  # noqa: BLE001 — re-raised with the operand's name
            raise ValueError(f"recipe {recipe.name!r}: format {spec.format!r} cannot quantize the GEMM operand "
                             f"{op!r}: {e}") from e


def quantize_model(model: nn.Module, recipe: str | Recipe = "mxfp8", inference: bool = False,
                   attention: AttentionSpec = "auto", generator: torch.Generator | None = None) -> nn.Module:
    """Swap the supported modules of ``model`` for MX-quantized ones, in place; returns ``model``.

    - ``recipe``: a :class:`Recipe` or a name (:func:`~microscale.nn.recipe.list_recipes`, or any format
      name for "that format for every operand").
    - Swapped: nn.Linear, nn.Conv1d, nn.Conv2d and their subclasses that keep the parent's forward
      (e.g. nn.MultiheadAttention.out_proj); subclasses with their own forward are left alone.
      Attention: modules picked by ``attention`` ("auto": nn.MultiheadAttention,
      nn.TransformerEncoderLayer/DecoderLayer and classes named ``*Attention``; or a tuple of types, or a
      predicate ``(name, module) -> bool``, or None) run their forward with matmul / bmm / baddbmm /
      addmm / scaled_dot_product_attention / F.linear quantized (see :mod:`microscale.nn.modules`).
    - Warns (one UserWarning naming them) when matmul-bearing modules stay in full precision: types
      with no MX swap (e.g. a raw 2-D Parameter used in a matmul), Linear/Conv subclasses with their own
      forward, an unscoped nn.MultiheadAttention. :func:`microscale.nn.coverage` measures the share of
      GEMM FLOPs that actually run MX on an example input.
    - ``inference=True``: GEMM weights are packed into MX codes + scales (fwd_weight format) and the FP32
      Parameters are dropped; use for evaluation only (no weight gradients).
    - ``generator``: seed stream for stochastic rounding (default: seeded by ``recipe.seed``).
    A model that is already quantized is first restored, then quantized with the new recipe.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}")
    recipe = get_recipe(recipe)
    _probe(recipe)
    if any(isinstance(m, QuantizedModule) or getattr(type(m), "_mx_scope", False) for m in model.modules()):
        dequantize_model(model)
    state = QuantState(recipe, generator)
    read_by_parent = _weights_read_by_parent(model) if inference else set()
    for name, m in model.named_modules():
        found = swap_for(type(m))
        if found is not None and id(m) not in read_by_parent:
            swap, base = found
            _check_module(name, m)
            m.__class__ = swap
            m._mx_init(state, base)
            if inference:
                m._pack()
        elif _is_attention(attention, name, m):
            m.__class__ = scoped_class(type(m))
            m._mx_state = state
    _warn_full_precision(model)
    return model


def _weights_read_by_parent(model: nn.Module) -> set[int]:
    """ids of modules whose weight their parent reads directly instead of calling them
    (nn.MultiheadAttention.out_proj): packing would take that ``.weight`` away, so inference=True leaves
    them as they are (the parent's attention scope still quantizes their F.linear)."""
    return {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.children()}


def _warn_full_precision(model: nn.Module) -> None:
    from .coverage import full_precision_modules
    left = full_precision_modules(model)
    if left:
        names = "; ".join(f"{name or '<model>'} ({reason})" for name, reason in left)
        warnings.warn(f"quantize_model left {len(left)} matmul-bearing module(s) in full precision: {names}. "
                      f"ms.nn.coverage(model, *example_inputs) measures the share of GEMM FLOPs that run MX.",
                      UserWarning, stacklevel=3)


def _check_module(name: str, m: nn.Module) -> None:
    w = m.weight
    if w.shape[0] == 0 or w[0].numel() == 0:
        raise ValueError(f"module {name or type(m).__name__!r} has a weight of shape {tuple(w.shape)}: a GEMM "
                         f"block axis (out_features or the reduction) has length 0")


def dequantize_model(model: nn.Module) -> nn.Module:
    """Give back plain torch modules, in place, keeping the current weights (packed weights are
    dequantized into FP32 Parameters). Returns ``model``."""
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            if m._mx_packed:
                m._unpack()
            base = m._mx_base
            for attr in ("_mx_state", "_mx_base", "_mx_cache", "_mx_packed", "_mx_weight_shape",
                         "_mx_weight_2d"):
                m.__dict__.pop(attr, None)
            m.__class__ = base
        elif getattr(type(m), "_mx_scope", False):
            m.__class__ = type(m)._mx_base
            m.__dict__.pop("_mx_state", None)
    return model


restore = dequantize_model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as stored: parameters + buffers (packed weights are uint8 buffers)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- files -------------------------------------------------------------------------------------------
def _io():
    import microscale as ms
    if not hasattr(ms, "save_file"):
        raise RuntimeError("microscale.io (ms.save_file / ms.load_file) is not available in this build")
    return ms


def quantized_state(model: nn.Module) -> dict[str, MXTensor | torch.Tensor]:
    """The model's state as a flat dict: each packed weight as one MXTensor under ``<module>.weight``,
    everything else as in ``state_dict()``."""
    out: dict[str, MXTensor | torch.Tensor] = {}
    packed = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedModule) and m._mx_packed}
    skip = set()
    for name, m in packed.items():
        pre = f"{name}." if name else ""
        out[pre + "weight"] = m.packed_weight()
        skip.update(pre + "weight_" + part for part in m._mx_parts)
    for k, v in model.state_dict().items():
        if k not in skip:
            out[k] = v
    return out


def save_quantized(model: nn.Module, path) -> None:
    """Write a packed (``inference=True``) model to a safetensors file with :func:`microscale.save_file`."""
    ms = _io()
    ms.save_file(quantized_state(model), str(path))


def load_quantized(model: nn.Module, path, recipe: str | Recipe | None = None) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` (in place; returned).

    ``model`` is either already quantized with ``inference=True`` or a plain model of the same
    architecture, in which case ``recipe`` says how to quantize it first.
    """
    ms = _io()
    if not any(isinstance(m, QuantizedModule) and m._mx_packed for m in model.modules()):
        if recipe is None:
            raise ValueError("model is not packed: quantize it with inference=True first, or pass recipe=")
        quantize_model(model, recipe, inference=True)
    data = ms.load_file(str(path))
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedModule) and m._mx_packed:
            pre = f"{name}." if name else ""
            q = data.pop(pre + "weight", None)
            if not isinstance(q, MXTensor):
                raise ValueError(f"{path}: expected a packed MXTensor for {pre}weight")
            want = m.packed_weight()
            if q.format.name != want.format.name or q.shape != want.shape or q.axis != want.axis:
                raise ValueError(f"{pre}weight in {path} is {q.format.name} {q.shape} axis {q.axis}; the model "
                                 f"expects {want.format.name} {want.shape} axis {want.axis}")
            for part, t in q.components().items():
                state[pre + "weight_" + part] = t
    for k, v in data.items():
        state[k] = v.dequantize() if isinstance(v, MXTensor) else v
    model.load_state_dict(state, strict=True)
    return model

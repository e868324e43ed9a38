"""One verb changes a model: :func:`quantize_model`; :func:`dequantize_model` undoes it.

Only the model given is changed (its modules' classes are swapped in place); nothing global is patched.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .. import io
from ..tensor import MXTensor
from .functional import QuantState
from .modules import QuantizedModule, register_optional_swaps, scoped_class, swap_for
from .packed import PART_NAMES, PackedWeight, as_packed_like, is_packed, pack_parameter, unpack_parameters
from .recipe import OPERANDS, Recipe, get_recipe

__all__ = ["quantize_model", "dequantize_model", "restore", "resident_bytes", "save_quantized",
           "load_quantized", "from_pretrained", "quantized_state", "packing_plan", "checkpoint_key_mapper",
           "DEFAULT_ATTENTION_TYPES"]

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
                   attention: AttentionSpec = "auto", generator: torch.Generator | None = None,
                   embeddings: bool = False) -> nn.Module:
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
    - Also swapped: transformers' ``Conv1D`` (GPT-2; its reduction is axis 0 of the [in, out] weight),
      when transformers is imported.
    - ``inference=True``: GEMM weights are packed into MX codes + scales (fwd_weight format, blocked
      along each GEMM's reduction) as frozen :class:`~microscale.nn.packed.PackedWeight` Parameters that
      stay ``module.weight`` (``.shape`` / ``.dtype`` / ``.device`` as before); so is
      nn.MultiheadAttention's ``in_proj_weight`` (or q/k/v_proj_weight). A parameter tied to a packed
      one (GPT-2's ``wte`` / ``lm_head``) is the same packed Parameter: stored once. Evaluation only.
    - ``embeddings=True`` (with ``inference=True``): also pack every nn.Embedding weight along its
      embedding dim (weight-only; lookups dequantize the rows they read).
    - ``generator``: seed stream for stochastic rounding (default: seeded by ``recipe.seed``).
    A model that is already quantized is first restored, then quantized with the new recipe.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}")
    recipe = get_recipe(recipe)
    _probe(recipe)
    if any(isinstance(m, QuantizedModule) or getattr(type(m), "_mx_scope", False) for m in model.modules()) \
            or any(is_packed(p) for p in model.parameters()):
        dequantize_model(model)
    if embeddings and not inference:
        raise ValueError("embeddings=True packs nn.Embedding weights, which needs inference=True")
    register_optional_swaps()
    state = QuantState(recipe, generator)
    ties = _parameter_users(model) if inference else {}
    for name, m in model.named_modules():
        found = swap_for(type(m))
        if found is not None:
            swap, base = found
            _check_module(name, m)
            old = m.weight
            m.__class__ = swap
            m._mx_init(state, base)
            if inference:
                m._pack()
                _share(ties, old, m.weight)
        elif _is_attention(attention, name, m):
            m.__class__ = scoped_class(type(m))
            m._mx_state = state
        if inference and isinstance(m, nn.MultiheadAttention):
            for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                _pack_plain(m, pname, recipe, ties)
    if embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                _pack_plain(m, "weight", recipe, ties)
    _warn_full_precision(model, recipe)
    return model


def _parameter_users(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, name) that holds it (tied parameters have several)."""
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for n, p in m._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((m, n))
    return users


def _share(ties, old: torch.Tensor, packed: nn.Parameter) -> None:
    """Make every other holder of the dense parameter ``old`` hold the packed Parameter too (one storage)."""
    for mod, n in ties.get(id(old), ()):
        if mod._parameters.get(n) is old:
            pack_parameter(mod, n, packed)


def _pack_plain(m: nn.Module, pname: str, recipe: Recipe, ties) -> None:
    """Pack a 2-D [out, K] weight of a module that is not swapped (MHA projections, embeddings)."""
    p = m._parameters.get(pname)
    if p is None or is_packed(p):
        return
    spec = recipe.fwd_weight
    if spec.is_none:
        raise ValueError(f"inference=True packs weights in the recipe's fwd_weight format, but recipe "
                         f"{recipe.name!r} leaves weights unquantized ('none')")
    pw = PackedWeight.from_dense(p.detach(), spec.format, spec.rounding, spec.scale_mode)
    _share(ties, p, pack_parameter(m, pname, pw))


#: How a packed parameter's GEMM view [out, K] is laid out in the weight (see :func:`packing_plan`).
PLAN_KINDS = ("linear", "transposed", "conv")


def packing_plan(model: nn.Module, embeddings: bool = False) -> dict[str, str]:
    """Which parameters ``quantize_model(model, ..., inference=True, embeddings=embeddings)`` packs, and
    how each is blocked along its reduction, without quantizing anything (works on the meta device):
    name -> "linear" ([out, K], blocked along axis 1), "transposed" (transformers' Conv1D: [K, out],
    blocked along axis 0) or "conv" ([out, C/groups, *kernel] as [out, K] blocked along K). Tied
    parameters appear under each of their names."""
    register_optional_swaps()
    by_id: dict[int, str] = {}
    for m in model.modules():
        found = swap_for(type(m))
        if found is not None:
            swap, w = found[0], m.weight
            by_id.setdefault(id(w), "transposed" if swap._mx_weight_transposed else
                             "linear" if w.dim() == 2 else "conv")
        if isinstance(m, nn.MultiheadAttention):
            for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if m._parameters.get(pname) is not None:
                    by_id.setdefault(id(m._parameters[pname]), "linear")
    if embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                by_id.setdefault(id(m.weight), "linear")
    plan = {}
    for name, m in model.named_modules(remove_duplicate=False):
        pre = f"{name}." if name else ""
        for n, p in m._parameters.items():
            if p is not None and id(p) in by_id:
                plan[pre + n] = by_id[id(p)]
    return plan



def _warn_full_precision(model: nn.Module, recipe: Recipe) -> None:
    from .coverage import full_precision_modules
    left = full_precision_modules(model)
    if recipe.fwd_input.is_none:
        # Weight-only recipe: activation x activation matmuls stay in the input dtype by design, so an
        # unscoped nn.MultiheadAttention whose projection weights are all packed is fully covered.
        mods = dict(model.named_modules())
        left = [(n, r) for n, r in left
                if not (isinstance(mods[n], nn.MultiheadAttention)
                        and all(is_packed(p) for p in mods[n].parameters(recurse=True) if p.dim() == 2))]
    if left:
        names = "; ".join(f"{name or '<model>'} ({reason})" for name, reason in left)
        warnings.warn(f"quantize_model left {len(left)} matmul-bearing module(s) in full precision: {names}. "
                      f"ms.nn.coverage(model, *example_inputs) measures the share of GEMM FLOPs that run MX.",
                      UserWarning, stacklevel=3)


def _check_module(name: str, m: nn.Module) -> None:
    w = m.weight
    if w.shape[0] == 0 or math.prod(w.shape[1:]) == 0:
        raise ValueError(f"module {name or type(m).__name__!r} has a weight of shape {tuple(w.shape)}: a GEMM "
                         f"block axis (out_features or the reduction) has length 0")


def dequantize_model(model: nn.Module) -> nn.Module:
    """Give back plain torch modules, in place, keeping the current weights (packed weights are
    dequantized into FP32 Parameters; tied parameters stay one Parameter). Returns ``model``."""
    memo: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            m._unpack(memo)
            base = m._mx_base
            for attr in ("_mx_state", "_mx_base", "_mx_cache", "_mx_packed"):
                m.__dict__.pop(attr, None)
            m.__class__ = base
        else:
            unpack_parameters(m, memo)
            if getattr(type(m), "_mx_scope", False):
                m.__class__ = type(m)._mx_base
                m.__dict__.pop("_mx_state", None)
    return model


restore = dequantize_model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as stored: parameters + buffers, packed weights as their codes and
    scales, each storage counted once (tied parameters)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        for part in (t.components().values() if is_packed(t) else (t,)):
            key = (part.untyped_storage().data_ptr(), part.data_ptr(), part.numel())
            if key in seen:
                continue
            seen.add(key)
            total += part.numel() * part.element_size()
    return total


# ---- files -------------------------------------------------------------------------------------------
def _packed_params(model: nn.Module) -> dict[str, PackedWeight]:
    """Every packed parameter by its full name, tied ones under each of their names."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        pre = f"{name}." if name else ""
        for n, p in m._parameters.items():
            if is_packed(p):
                out[pre + n] = p
    return out


def _file_mx(p: PackedWeight) -> MXTensor:
    """A packed parameter as the MXTensor written to files: in the weight's own layout when that is
    2-D ([out, K] along axis 1, or transformers' Conv1D [K, out] along axis 0, the same bytes), else the
    GEMM view [out, K] (convolutions: K = C/groups * kh * kw, channel-major)."""
    q = p.mx
    if p.transposed:
        return MXTensor(q.codes, q.scales, (q.shape[1], q.shape[0]), 0, q.format, q.micro, q.tensor_scale)
    return q


def quantized_state(model: nn.Module) -> dict[str, MXTensor | torch.Tensor]:
    """The model's state as a flat dict: each packed parameter as one MXTensor under its name (a tied
    parameter once, under its first name, as transformers' save_pretrained does), everything else as in
    ``state_dict()``."""
    packed = _packed_params(model)
    out: dict[str, MXTensor | torch.Tensor] = {}
    seen: set[int] = set()
    for key, p in packed.items():
        if id(p) not in seen:
            seen.add(id(p))
            out[key] = _file_mx(p)
    parts = {f"{key}_{part}" for key in packed for part in PART_NAMES}
    for k, v in model.state_dict().items():
        if k not in parts:
            out[k] = v
    return out


def save_quantized(model: nn.Module, path, recipe: str | Recipe | None = None) -> None:
    """Write a packed (``inference=True``) model to a safetensors file with :func:`microscale.save_file`.

    Packed weights are MXTensors (format, shape and blocking axis in the file's metadata), a tied
    weight is written once, the rest as plain tensors. The recipe's name goes into the metadata
    (``recipe``), so :func:`load_quantized` / :func:`from_pretrained` can pack a fresh model the same way.
    """
    packed = _packed_params(model)
    if not packed:
        raise ValueError("model has no packed weights: quantize it with inference=True before save_quantized")
    if recipe is None:
        states = {m._mx_state.recipe.name for m in model.modules() if "_mx_state" in m.__dict__}
        recipe = states.pop() if len(states) == 1 else None
    meta = {"format": "microscale-packed"}
    if recipe is not None:
        meta["recipe"] = recipe if isinstance(recipe, str) else recipe.name
    io.save_file(quantized_state(model), str(path), meta)


def _expected_keys(model: nn.Module) -> tuple[set[str], list[list[str]]]:
    """The keys a full checkpoint of ``model`` holds (packed parameters under their own names), and the
    groups of names of tied parameters."""
    packed = _packed_params(model)
    parts = {f"{key}_{part}" for key in packed for part in PART_NAMES}
    expected = (set(model.state_dict()) - parts) | set(packed)
    groups: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        pre = f"{name}." if name else ""
        for n, p in m._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append(pre + n)
    return expected, [g for g in groups.values() if len(g) > 1]


def checkpoint_key_mapper(model: nn.Module) -> Callable[[str], str]:
    """A function from a checkpoint's tensor name to ``model``'s parameter name.

    transformers 5 renames some modules in memory but saves the original checkpoint names (e.g. ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj`` in memory); this
    applies the model's own renamings (transformers' conversion mapping) the way ``from_pretrained``
    does. Identity for other models. A name that transformers would convert by changing the tensor
    (fusing, splitting) raises ValueError: a packed tensor cannot be converted without dequantizing.
    """
    if not hasattr(model, "config") or "transformers" not in type(model).__module__:
        return lambda key: key
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        conversions = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):
        return lambda key: key
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    names = dict.fromkeys(n for n, _ in model.named_parameters(remove_duplicate=False))
    names.update(dict.fromkeys(model.state_dict()))
    prefix = getattr(model, "base_model_prefix", None) or None

    def mapped(key: str) -> str:
        new, converted = rename_source_key(key, renamings, converters, prefix, names)
        if converted is not None:
            raise ValueError(f"checkpoint tensor {key!r} is converted by transformers ({converted!r} -> {new!r}) "
                             f"by changing its values; a packed tensor cannot be converted")
        return new

    return mapped


def _name_list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_quantized(model: nn.Module, path, recipe: str | Recipe | None = None, embeddings: bool | None = None,
                   strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_quantized` (or by ``microscale quantize``) into ``model``, in
    place; returns it.

    ``model`` is either already packed (``quantize_model(..., inference=True)``) or a plain model of the
    same architecture, which is then packed first with ``recipe`` (default: the recipe recorded in the
    file, else weight-only in the one format the file holds, e.g. a ``microscale quantize`` output).
    Embeddings are packed when the file holds them packed (``embeddings=None``). Tied parameters
    (GPT-2's ``lm_head`` / ``wte``) are read from whichever of their names the file holds. Raises
    ValueError naming the keys when the file lacks some of the model's tensors or holds others
    (``strict=False``: only packed-weight mismatches raise), or when a packed tensor's format, shape or
    blocking does not match.
    """
    from ..io import read_header
    data = io.load_file(str(path))
    if not _packed_params(model):
        if recipe is None:
            recipe = read_header(str(path)).user_metadata.get("recipe")
        if recipe is None:
            # e.g. a file from `microscale quantize`: weight-only in the one format it holds
            formats = {v.format.name for v in data.values() if isinstance(v, MXTensor)}
            if len(formats) != 1:
                raise ValueError(f"model is not packed and {path} records no recipe (packed formats: "
                                 f"{sorted(formats)}): quantize it with inference=True first, or pass recipe=")
            recipe = Recipe.weight_only(formats.pop())
        quantize_model(model, recipe, inference=True, embeddings=bool(embeddings))
    if embeddings is None:
        # Embeddings the file holds packed (quantize_model(..., embeddings=True)) are packed here too,
        # in the file's format; tied ones already are.
        ties = _parameter_users(model)
        for k, v in data.items():
            owner, pname = _owner(model, k), k.rpartition(".")[2]
            if isinstance(v, MXTensor) and isinstance(owner, nn.Embedding) and pname == "weight" \
                    and not is_packed(owner.weight):
                pw = PackedWeight.from_dense(owner.weight.detach(), v.format)
                _share(ties, owner.weight, pack_parameter(owner, "weight", pw))
    _fold_parts(model, data)
    expected, tied = _expected_keys(model)
    if set(data) - expected:
        to_model = checkpoint_key_mapper(model)
        data = {to_model(k): v for k, v in data.items()}
    for group in tied:  # a tied parameter is stored once: its other names read the same tensor
        held = [k for k in group if k in data]
        for k in group:
            if held and k not in data:
                data[k] = data[held[0]]
    missing, unexpected = expected - set(data), set(data) - expected
    if strict and (missing or unexpected):
        raise ValueError(f"{path} does not match the model: missing keys [{_name_list(missing)}]; unexpected "
                         f"keys [{_name_list(unexpected)}]")
    packed = _packed_params(model)
    state = {}
    for k, v in data.items():
        if k in packed:
            p = packed[k]
            if isinstance(v, MXTensor):
                v = as_packed_like(v, p, f"{k} in {path}")
            elif tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{k} in {path} has shape {list(v.shape)}; the model expects {list(p.shape)}")
        elif isinstance(v, MXTensor):
            if k in expected:
                raise ValueError(f"{k} in {path} is packed ({v.format.name}) but the model's {k} is not; pack "
                                 f"the model the way the file was written (recipe, embeddings=)")
            continue
        state[k] = v
    model.load_state_dict(state, strict=strict)
    return model


def _fold_parts(model: nn.Module, data: dict) -> None:
    """In place: packed weights stored as their state_dict parts (``<name>_codes``, ``<name>_scales``, ...;
    e.g. transformers' save_pretrained of a packed model) become one MXTensor under ``<name>``, in the
    format the model packed that weight with."""
    for key, p in _packed_params(model).items():
        names = {part: f"{key}_{part}" for part in p.components()}
        if key in data or not any(n in data for n in names.values()):
            continue
        missing = [n for n in names.values() if n not in data]
        if missing:
            raise ValueError(f"{key}: packed parts incomplete (missing {missing})")
        comp = {part: data.pop(n) for part, n in names.items()}
        data[key] = MXTensor(comp["codes"], comp["scales"], p.gemm_shape, 1, p.format_name, comp.get("micro"),
                             comp.get("tensor_scale"))


def _owner(model: nn.Module, key: str) -> nn.Module | None:
    name = key.rpartition(".")[0]
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def from_pretrained(model_class, path, config=None, recipe: str | Recipe | None = None,
                    embeddings: bool | None = None, **config_kwargs) -> nn.Module:
    """Build a transformers model of ``model_class`` from its config, pack it and load a packed
    checkpoint into it, raising on any missing or unexpected key (never random weights).

    ``path``: a file written by :func:`save_quantized` / ``microscale quantize``, or a directory holding
    ``model.safetensors`` (and ``config.json`` unless ``config`` is given). ``config``: a transformers
    config (default: ``model_class.config_class.from_pretrained(directory)``, local files only).
    ``recipe``: default the one recorded in the file. Returns the model in ``eval()`` mode.
    """
    path = os.fspath(path)
    directory, file = (path, os.path.join(path, "model.safetensors")) if os.path.isdir(path) else \
        (os.path.dirname(path) or ".", path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no packed checkpoint at {file}")
    if config is None:
        config_class = getattr(model_class, "config_class", None)
        if config_class is None:
            raise TypeError(f"{getattr(model_class, '__name__', model_class)} has no config_class; pass config=")
        config = config_class.from_pretrained(directory, local_files_only=True, **config_kwargs)
    model = model_class(config)
    load_quantized(model, file, recipe=recipe, embeddings=embeddings, strict=True)
    if hasattr(model, "tie_weights"):
        # transformers' tie_weights assigns the source Parameter to the target: the packed one stays shared.
        model.tie_weights()
    return model.eval()

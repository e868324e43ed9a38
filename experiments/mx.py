"""The experiments' one door to microscale.nn: recipes by name and quantized copies of models.

Everything goes through the library's integration layer (``microscale.nn.quantize_model``); this module
only names the recipes the experiments use, so the scripts read like the paper's tables.
"""

from __future__ import annotations

import copy

import torch.nn as nn

#: Training recipes (MX paper §6.3, GPT training): "mxfp8" (E4M3 weights and activations, E5M2
#: gradients), "mxfp6" (E3M2 everywhere), "mxfp4-w+mxfp6" (E2M1 weights, E3M2 activations and gradients),
#: and the BDR paper's MX9 / MX6 (one format for every operand).
TRAIN_RECIPES = ("fp32", "mxfp8", "mxfp6", "mxfp4-w+mxfp6", "mx9", "mx6")
#: The BDR recipes (two-level formats, the slowest to emulate): scheduled last.
BDR_TRAIN_RECIPES = ("mx9", "mx6")


def training_recipe(label: str):
    """The microscale.nn recipe for a training label (None for FP32)."""
    if label == "fp32":
        return None
    import microscale.nn as msnn
    return msnn.get_recipe(label)  # registered names; a bare format name means that format everywhere


def recipe_formats(label: str) -> tuple[str, str]:
    """(weight format, activation format) of a training recipe, for the bits columns."""
    if label == "fp32":
        return "none", "none"
    r = training_recipe(label)
    return r.fwd_weight.format, r.fwd_input.format


def inference_recipe(fmt: str):
    """Direct cast for inference: weights and activations (Linear inputs, attention operands) in ``fmt``."""
    import microscale.nn as msnn
    return msnn.Recipe.from_formats(fmt, fmt, "none", name=f"{fmt}-inference")


def qat_recipe(fmt: str):
    """Quantization-aware finetuning: weights and activations in ``fmt`` in every pass (as in inference),
    output gradients unquantized; rounding is straight-through."""
    return inference_recipe(fmt)


def quantized(model: nn.Module, recipe, inference: bool = False, copy_model: bool = True,
              attention="auto") -> nn.Module:
    """``microscale.nn.quantize_model`` on (a deep copy of) ``model``; ``recipe=None`` is FP32;
    ``attention=None`` leaves the activation x activation matmuls (QKᵀ, AV) unquantized."""
    if copy_model:
        model = copy.deepcopy(model)
    if recipe is None:
        return model
    import microscale.nn as msnn
    return msnn.quantize_model(model, recipe, inference=inference, attention=attention)


def inference_model(model: nn.Module, fmt: str | None) -> tuple[nn.Module, bool]:
    """A copy of ``model`` for direct-cast evaluation in ``fmt`` (None: FP32) and whether its weights are
    packed: every block format is packed by ``quantize_model(..., inference=True)``."""
    if fmt is None:
        return copy.deepcopy(model), False
    return quantized(model, inference_recipe(fmt), inference=True), True


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model as stored (packed weights after inference quantization, FP32 otherwise)."""
    import microscale.nn as msnn
    return int(msnn.resident_bytes(model))


def dequantized(model: nn.Module) -> nn.Module:
    """Plain modules again (in place), keeping current weights."""
    import microscale.nn as msnn
    return msnn.dequantize_model(model)

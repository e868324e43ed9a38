"""Byte-level GPT helpers shared by the LM scripts: building, evaluating, checkpoints.

The model is the library's :class:`microscale.nn.models.TinyGPT` with the ``"gpt2-two-pass"``
initialisation and, in checkpoint files, the parameter names these runs were first saved with
(:data:`CHECKPOINT_NAMES`): the direct-cast and PTQ caches are keyed by the checkpoints' SHA-256, so a
retrained checkpoint must be the same bytes as before.
"""

from __future__ import annotations

import math
import pathlib
import re

import torch

from microscale.nn.models import GPTConfig, TinyGPT

from .data import ByteCorpus, batch_windows, val_starts

#: Preset size keys (``common.Preset.gpt_sizes``): width, layers, heads, context; ``vocab`` optional (256).
SIZE_KEYS = ("d_model", "n_layers", "n_heads", "ctx", "vocab")
#: (TinyGPT's parameter-name piece, the name the checkpoint files use), applied to whole dotted components.
CHECKPOINT_NAMES = (("wte", "tok"), ("wpe", "pos"), ("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.c_attn", "attn.qkv"),
                    ("attn.c_proj", "attn.proj"), ("mlp.0", "fc1"), ("mlp.2", "fc2"), ("lm_head", "head"))


def gpt_config(size_kwargs: dict) -> GPTConfig:
    """The TinyGPT config of a preset size: biases on, GPT-2 initialisation drawn in two passes."""
    unknown = sorted(set(size_kwargs) - set(SIZE_KEYS))
    if unknown:
        raise ValueError(f"GPT size keys must be among {SIZE_KEYS}, got unknown {unknown}")
    return GPTConfig(vocab_size=size_kwargs.get("vocab", 256), block_size=size_kwargs["ctx"],
                     n_layer=size_kwargs["n_layers"], n_head=size_kwargs["n_heads"], n_embd=size_kwargs["d_model"],
                     bias=True, init="gpt2-two-pass")


def build_gpt(size_kwargs: dict, seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(gpt_config(size_kwargs))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = re.sub(rf"(^|\.){re.escape(old)}(\.|$)", rf"\g<1>{new}\g<2>", key)
    return key


def checkpoint_names(state: dict) -> dict:
    """``state`` (a TinyGPT state_dict) under the checkpoint files' parameter names."""
    return {_rename(k, CHECKPOINT_NAMES): v for k, v in state.items()}


def model_names(state: dict) -> dict:
    """A checkpoint file's tensors under TinyGPT's parameter names (inverse of :func:`checkpoint_names`)."""
    return {_rename(k, [(new, old) for old, new in CHECKPOINT_NAMES]): v for k, v in state.items()}


@torch.no_grad()
def val_loss(model: torch.nn.Module, corpus: ByteCorpus, ctx: int, n_windows: int, chunk: int = 16) -> float:
    """Mean next-byte cross entropy (nats) over fixed, evenly spaced validation windows."""
    was_training = model.training
    model.eval()
    starts = val_starts(corpus.val, ctx, n_windows)
    total = 0.0
    for i in range(0, len(starts), chunk):
        x, y = batch_windows(corpus.val, starts[i:i + chunk], ctx)
        total += float(model(x, y)[1]) * len(x)
    model.train(was_training)
    return total / len(starts)


def lr_at(step: int, steps: int, lr: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def checkpoint_path(out: pathlib.Path, model_name: str, seed: int) -> pathlib.Path:
    return out / "checkpoints" / f"{model_name}_seed{seed}_fp32.safetensors"


def save_checkpoint(model: torch.nn.Module, path: pathlib.Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def save_gpt(model: TinyGPT, path: pathlib.Path) -> None:
    """A GPT's checkpoint, under the checkpoint files' parameter names (:data:`CHECKPOINT_NAMES`)."""
    from safetensors.torch import save_file
    save_file(checkpoint_names({k: v.detach().contiguous() for k, v in model.state_dict().items()}), str(path))


def load_gpt(size_kwargs: dict, path: pathlib.Path) -> TinyGPT:
    from safetensors.torch import load_file
    model = TinyGPT(gpt_config(size_kwargs))
    model.load_state_dict(model_names(load_file(str(path))))
    return model.eval()

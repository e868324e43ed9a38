"""Byte-level GPT helpers shared by the LM scripts: building, evaluating, checkpoints."""

from __future__ import annotations

import math
import pathlib

import torch

from .data import ByteCorpus, batch_windows, val_starts
from .models import GPT, GPTConfig


def build_gpt(size_kwargs: dict, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**size_kwargs))


@torch.no_grad()
def val_loss(model: torch.nn.Module, corpus: ByteCorpus, ctx: int, n_windows: int, chunk: int = 16) -> float:
    """Mean next-byte cross entropy (nats) over fixed, evenly spaced validation windows."""
    was_training = model.training
    model.eval()
    starts = val_starts(corpus.val, ctx, n_windows)
    total = 0.0
    for i in range(0, len(starts), chunk):
        x, y = batch_windows(corpus.val, starts[i:i + chunk], ctx)
        total += float(model.loss(x, y)) * len(x)
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


def load_gpt(size_kwargs: dict, path: pathlib.Path) -> GPT:
    from safetensors.torch import load_file
    model = GPT(GPTConfig(**size_kwargs))
    model.load_state_dict(load_file(str(path)))
    return model.eval()

"""The FP32 models trained by train_lm.py / train_digits.py, with how to load and score each one.

Every model has one primary metric (validation loss for the GPTs, test accuracy for the digits MLP)
and a loss; ``higher_is_better`` says which way the primary metric points.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import lm, train_digits
from .data import batch_windows, load_corpus, load_digits_split, train_starts


@dataclass
class TrainedModel:
    name: str            # e.g. "gpt-0.2M"
    kind: str            # "lm" or "digits"
    seed: int
    load: Callable[[], torch.nn.Module]
    evaluate: Callable[[torch.nn.Module], dict]   # -> {"loss": ..., and "accuracy" for digits}
    calibration: Callable[[int], list]            # n batches -> list of model inputs
    finetune_batches: Callable[[int, int], list]  # (steps, seed) -> list of (inputs, targets)
    loss_fn: Callable                              # (model, inputs, targets) -> scalar loss
    checkpoint: pathlib.Path | None = None

    def cache_key(self, **settings) -> dict:
        """What a result computed from this model depends on: its checkpoint's bytes and the settings."""
        from .common import file_sha256
        return {"model": self.name, "seed": self.seed, "checkpoint_sha256": file_sha256(self.checkpoint),
                **settings}

    @property
    def metric(self) -> str:
        return "val_loss" if self.kind == "lm" else "accuracy"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "digits"


def trained_models(preset, out: pathlib.Path) -> list[TrainedModel]:
    """Every FP32 checkpoint the preset trains, in table order (GPTs by size, then digits)."""
    corpus = load_corpus()
    digits = load_digits_split()
    models = []
    for name, kw in preset.gpt_sizes.items():
        ctx = kw["ctx"]
        for seed in preset.seeds:
            path = lm.checkpoint_path(out, name, seed)

            def evaluate(m, ctx=ctx):
                return {"val_loss": lm.val_loss(m, corpus, ctx, preset.val_windows)}

            def calibration(n, ctx=ctx):
                starts = train_starts(corpus.train, ctx, preset.batch, n, seed=10_000)
                return [batch_windows(corpus.train, s, ctx)[0] for s in starts]

            def finetune(steps, s, ctx=ctx):
                starts = train_starts(corpus.train, ctx, preset.batch, steps, seed=20_000 + s)
                return [batch_windows(corpus.train, st, ctx) for st in starts]

            models.append(TrainedModel(name, "lm", seed, lambda p=path, kw=kw: lm.load_gpt(kw, p), evaluate,
                                       calibration, finetune, lambda m, x, y: m(x, y)[1], path))
    for seed in preset.digits_seeds:
        path = train_digits.checkpoint_path(out, seed)

        def calibration(n):
            return [digits.x_train[i::n] for i in range(n)]

        def finetune(steps, s):
            g = torch.Generator().manual_seed(20_000 + s)
            idx = torch.randint(0, digits.y_train.numel(), (steps, 64), generator=g)
            return [(digits.x_train[i], digits.y_train[i]) for i in idx]

        models.append(TrainedModel(train_digits.MODEL_NAME, "digits", seed,
                                   lambda p=path: train_digits.load_mlp(p),
                                   lambda m: train_digits.evaluate(m, digits), calibration, finetune,
                                   lambda m, x, y: F.cross_entropy(m(x), y), path))
    return models

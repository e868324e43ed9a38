"""Train the FP32 MLP on scikit-learn's 8x8 digits (the small non-LM model of the inference study).

Writes results/train_digits.json and FP32 checkpoints (results/checkpoints/digits-mlp_seed*_fp32.*).

    python -m experiments.train_digits [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .common import Timer, add_common_args, environment, setup, write_json
from .data import Digits, load_digits_split
from .models import DigitsMLP, n_params

MODEL_NAME = "digits-mlp"
HIDDEN = 128


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Digits) -> dict:
    """Test accuracy (fraction) and mean cross-entropy loss (nats)."""
    model.eval()
    logits = model(data.x_test)
    return {"accuracy": float((logits.argmax(1) == data.y_test).float().mean()),
            "loss": float(F.cross_entropy(logits, data.y_test))}


def train_mlp(data: Digits, seed: int, epochs: int, batch: int = 64, lr: float = 1e-3,
              model: torch.nn.Module | None = None, desc: str = "") -> torch.nn.Module:
    """Minibatch AdamW on the training split (``model`` to continue training, e.g. for QAT)."""
    torch.manual_seed(seed)
    if model is None:
        model = DigitsMLP(HIDDEN)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = data.y_train.numel()
    for _ in tqdm(range(epochs), desc=desc, leave=False, mininterval=2.0):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def checkpoint_path(out, seed: int):
    return out / "checkpoints" / f"{MODEL_NAME}_seed{seed}_fp32.safetensors"


def load_mlp(path) -> DigitsMLP:
    from safetensors.torch import load_file
    model = DigitsMLP(HIDDEN)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    preset, out = setup(args)
    from .lm import save_checkpoint
    data = load_digits_split()
    runs = []
    for seed in preset.digits_seeds:
        with Timer() as t:
            model = train_mlp(data, seed, preset.digits_epochs, desc=f"digits s{seed}")
        save_checkpoint(model, checkpoint_path(out, seed))
        runs.append({"seed": seed, **evaluate(model, data), "wall_s": t.seconds})
        tqdm.write(f"digits-mlp seed {seed}: acc {runs[-1]['accuracy']:.4f} loss {runs[-1]['loss']:.4f}")
    write_json(out / "train_digits.json", {
        "preset": preset.name, "environment": environment(), "data": data.summary(),
        "model": {"name": MODEL_NAME, "hidden": HIDDEN, "params": n_params(DigitsMLP(HIDDEN)),
                  "epochs": preset.digits_epochs, "optimizer": "AdamW lr 1e-3 wd 1e-4, batch 64"},
        "runs": runs})
    return runs


if __name__ == "__main__":
    main()

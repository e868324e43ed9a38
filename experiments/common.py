"""Shared plumbing for the experiments: run presets, results I/O, markdown tables, model size facts.

Two presets: ``full`` (the published results, results/) and ``quick`` (a smoke run of the same
pipeline in a few minutes, results/quick/, gitignored). Every script takes ``--quick`` and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
QUICK_RESULTS = RESULTS / "quick"

#: Formats of the direct-cast sweep, in table order: the MX formats, then the BDR paper's.
DIRECT_CAST_FORMATS = ("mxint8", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1")
BDR_FORMATS = ("mx9", "mx6", "mx4")


@dataclass(frozen=True)
class Preset:
    """Sizes of one run of the whole pipeline (``full`` publishes; ``quick`` only smoke-tests)."""

    name: str
    gpt_sizes: dict = field(default_factory=dict)   # name -> GPTConfig kwargs
    train_steps: dict = field(default_factory=dict)  # gpt size name -> steps
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 20
    seeds: tuple = (0, 1)
    #: the digits MLP is cheap and its metric noisy (450 test images): more seeds
    digits_seeds: tuple = (0, 1, 2, 3, 4)
    eval_every: int = 25
    val_windows: int = 64
    digits_epochs: int = 60
    calib_batches: int = 8
    qat_steps: int = 40
    qat_lr: float = 3e-4
    #: training recipes per GPT size (None: all); the larger model runs a subset to fit the CPU budget
    gpt_recipes: dict = field(default_factory=dict)

    def recipes_for(self, model_name: str) -> tuple:
        from .mx import TRAIN_RECIPES
        return tuple(self.gpt_recipes.get(model_name) or TRAIN_RECIPES)


PRESETS = {
    "full": Preset(
        name="full",
        gpt_sizes={"gpt-0.2M": dict(d_model=64, n_layers=3, n_heads=4, ctx=64),
                   "gpt-0.9M": dict(d_model=128, n_layers=4, n_heads=4, ctx=64)},
        train_steps={"gpt-0.2M": 300, "gpt-0.9M": 250},
        gpt_recipes={"gpt-0.9M": ("fp32", "mxfp6", "mxfp4-w+mxfp6")},
        eval_every=50, val_windows=128,
    ),
    "quick": Preset(
        name="quick",
        gpt_sizes={"gpt-tiny": dict(d_model=32, n_layers=1, n_heads=2, ctx=32)},
        train_steps={"gpt-tiny": 12}, gpt_recipes={"gpt-tiny": ("fp32", "mxfp6", "mxfp4-w+mxfp6")}, batch=4,
        warmup=2, seeds=(0, 1), digits_seeds=(0, 1), eval_every=6, val_windows=8,
        digits_epochs=3, calib_batches=2, qat_steps=3,
    ),
}


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true", help="smoke-test sizes, writes to results/quick/")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default results/ or "
                   "results/quick/)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for independent runs (1 thread each)")
    p.add_argument("--fresh", action="store_true", help="ignore cached per-run results in <out>/runs/")
    return p


def setup(args) -> tuple[Preset, pathlib.Path]:
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS["quick" if args.quick else "full"]
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    return preset, out


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}


def write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: pathlib.Path):
    return json.loads(path.read_text())


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


# ---- markdown ----------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are expected pre-formatted by the caller."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_markdown_table(text: str) -> list[dict]:
    """Rows of the first markdown table in ``text`` as dicts keyed by header (used by the tests)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def pm(mean: float, spread: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


# ---- formats and sizes -------------------------------------------------------------------------
def bits_per_element(fmt: str) -> float:
    import microscale as ms
    return float(ms.get_format(fmt).bits_per_element)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def model_bytes(model: nn.Module, fmt: str | None) -> int:
    """Storage bytes: every Linear weight packed in ``fmt`` (exact MXTensor.nbytes, blocks along
    in_features), every other parameter (embeddings, norms, biases) FP32. ``fmt=None``: all FP32."""
    import microscale as ms
    total = 0
    quantized = {id(w) for w in linear_weights(model).values()} if fmt else set()
    for p in model.parameters():
        if id(p) in quantized:
            total += ms.quantize(p.detach(), fmt, axis=-1).nbytes
        else:
            total += 4 * p.numel()
    return int(total)


# ---- per-unit result cache -----------------------------------------------------------------------
def file_sha256(path: pathlib.Path) -> str:
    import hashlib
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def cached(out: pathlib.Path, name: str, key: dict, compute, fresh: bool = False):
    """``compute()`` (JSON-able), reused from ``<out>/runs/<name>.json`` when stored with the same ``key``.

    Keys hold everything a result depends on (settings, checkpoint hashes), so a stale entry is never used.
    """
    path = out / "runs" / f"{name}.json"
    if not fresh and path.exists():
        stored = read_json(path)
        if stored.get("key") == key:
            return stored["value"]
    value = compute()
    path.parent.mkdir(exist_ok=True)
    write_json(path, {"key": key, "value": value})
    return value

"""Does the MX training gap shrink with model size? Byte-level GPTs at several sizes, each trained to a fixed
number of tokens per parameter under FP32 and MX training recipes (MX paper §6.3, GPT training, and its
finding that the gap to FP32 falls from 20M to 1.5B parameters).

Plan (every knob is a CLI option; the defaults are the published run):

- Sizes ``DxL``: the library's GPT (:class:`microscale.nn.models.TinyGPT`, ``init="gpt2"``: GPT-2's initialisation),
  d_model D, L layers, head dimension 32 (one MX block), context 64 bytes, vocabulary 256 (bytes). "params"
  are non-embedding parameters (Kaplan et al. 2020): every parameter except the token and position
  embeddings (the untied LM head is a GEMM and counts); the total is recorded too.
- Token budget: ``--tokens-per-param`` x params, rounded up to whole batches of 16 x 64 bytes and to a
  multiple of the evaluation count; the run refuses a size that would repeat the training split more than
  ``--max-epochs`` times (enlarge the corpus first).
- One hyperparameter recipe per size, tuned once on FP32: a learning-rate sweep over ``--lr-grid`` at
  ``--sweep-fraction`` of the budget (seed 0; the grid is extended by a factor 2 while the best rate is at
  its edge, at most twice), the best rate then used for every recipe at that size. Linear warmup over 5% of
  the steps, cosine to 0.1 x peak at the end of the budget, AdamW(0.9, 0.95), weight decay 0.1, clip 1.0.
- Recipes: FP32, MXFP6 (E3M2), MXFP4-W + MXFP6 at every size; MXFP8, MX9, MX6 also at the
  ``--full-recipe-sizes`` smallest. ``--seeds`` seeds per size, ``--seeds-smallest`` at the smallest. A seed
  fixes the initial weights and the batches, shared by every recipe (paired runs).

Each unit (size x recipe x seed, and each sweep point) is cached in ``<out>/runs/scale_*.json`` with the key
it depends on, and checkpointed every ``--checkpoint-s`` seconds inside the unit (``<out>/checkpoints/``,
not committed), so a killed run resumes where it stopped: run the same command again. Adding sizes later
(``--sizes ... 128x4``) reuses every cached unit.

    python -m experiments.train_scale [--quick] [--sizes 32x1 64x1 64x2 96x2] [--workers 1] [--report-only]

Writes <out>/train_scale.json, train_scale.md (the results section), train_scale_gap.png,
train_scale_curves.png; `python -m experiments.report` (run by experiments.all) puts it into docs/results.md when the other stages'
results are present.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import pathlib
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .common import QUICK_RESULTS, RESULTS, environment, markdown_table, read_json, write_json

#: MX paper (Rouhani et al. 2023, GPT training): gap of final LM loss to FP32 at three sizes.
PAPER_GAPS = {"mxfp6": {20e6: 0.03, 150e6: 0.02, 1.5e9: 0.01},
              "mxfp4-w+mxfp6": {20e6: 0.06, 150e6: 0.03, 1.5e9: 0.02}}
CORE_RECIPES = ("fp32", "mxfp6", "mxfp4-w+mxfp6")
EXTRA_RECIPES = ("mxfp8", "mx9", "mx6")
FIT_RECIPES = ("mxfp6", "mxfp4-w+mxfp6")
HEAD_DIM = 32
#: relative cost of one training step per recipe (FP32 = 1), from a short single-thread measurement; only
#: used for the time-left estimate before the first unit of this invocation has finished
COST_FACTOR = {"fp32": 1.0, "mxfp6": 1.9, "mxfp4-w+mxfp6": 1.9, "mxfp8": 1.9, "mx9": 2.3, "mx6": 2.3}


@dataclass(frozen=True)
class Plan:
    """Everything the run's units depend on (the cache keys are built from it)."""

    sizes: tuple = ("32x1", "64x1", "64x2", "96x2")
    tokens_per_param: float = 20.0
    batch: int = 16
    ctx: int = 64
    seeds: int = 2
    seeds_smallest: int = 3
    full_recipe_sizes: int = 2
    lr_grid: tuple = (1e-3, 2e-3, 4e-3, 8e-3)
    sweep_fraction: float = 0.125
    max_grid_extensions: int = 2
    warmup_fraction: float = 0.05
    lr_floor: float = 0.1
    weight_decay: float = 0.1
    n_evals: int = 20
    val_windows: int = 256
    final_val_windows: int | None = None  # None: every non-overlapping window of the validation stream
    max_epochs: float = 5.0
    extra_recipes: tuple = EXTRA_RECIPES
    name: str = "full"

    def __post_init__(self):
        if self.n_evals % 10:
            raise ValueError(f"n_evals must be a multiple of 10 (an evaluation at 90% of training), got {self.n_evals}")

    def to_json(self) -> dict:
        return asdict(self)


QUICK_PLAN = Plan(sizes=("32x1", "64x1"), tokens_per_param=0.25, seeds=2, seeds_smallest=2, full_recipe_sizes=1,
                  lr_grid=(2e-3, 4e-3), sweep_fraction=0.5, max_grid_extensions=0, n_evals=10, val_windows=8,
                  final_val_windows=16, extra_recipes=("mxfp8",), name="quick")


# ---- sizes, models, budgets ----------------------------------------------------------------------
def parse_size(size: str) -> tuple[int, int]:
    """``"DxL"`` -> (d_model, n_layers); d_model a positive multiple of the head dimension 32."""
    m = re.fullmatch(r"(\d+)x(\d+)", str(size))
    if not m:
        raise ValueError(f"size must look like '64x2' (d_model x layers), got {size!r}")
    d, n = int(m.group(1)), int(m.group(2))
    if d <= 0 or d % HEAD_DIM or n <= 0:
        raise ValueError(f"size {size!r}: d_model must be a positive multiple of {HEAD_DIM} and layers >= 1")
    return d, n


def gpt_config(size: str, ctx: int):
    """The TinyGPT config of a size: bytes, biases, GPT-2 initialisation (one draw per matrix)."""
    from microscale.nn.models import GPTConfig
    d, n = parse_size(size)
    return GPTConfig(vocab_size=256, block_size=ctx, n_layer=n, n_head=d // HEAD_DIM, n_embd=d, bias=True,
                     init="gpt2")


def build_model(size: str, seed: int, ctx: int):
    from microscale.nn.models import TinyGPT
    torch.manual_seed(seed)
    return TinyGPT(gpt_config(size, ctx))


def param_counts(size: str, ctx: int) -> dict:
    model = build_model(size, 0, ctx)
    total = sum(p.numel() for p in model.parameters())
    emb = model.wte.weight.numel() + model.wpe.weight.numel()
    return {"params": total - emb, "params_total": total}


def size_label(params: int) -> str:
    return f"gpt-{params / 1e3:.0f}k" if params < 1e6 else f"gpt-{params / 1e6:.1f}M"


def budget(plan: Plan, params: int, fraction: float = 1.0) -> dict:
    """Token budget and steps: steps a multiple of ``n_evals`` so the evaluations fall on exact fractions."""
    tokens = plan.tokens_per_param * params * fraction
    per_step = plan.batch * plan.ctx
    steps = math.ceil(tokens / per_step / plan.n_evals) * plan.n_evals
    return {"token_budget": int(math.ceil(tokens)), "steps": steps, "tokens": steps * per_step}


def recipes_for(plan: Plan, size: str) -> list[str]:
    from .mx import TRAIN_RECIPES
    small = sorted(plan.sizes, key=lambda s: param_counts(s, plan.ctx)["params"])[:plan.full_recipe_sizes]
    wanted = list(CORE_RECIPES) + (list(plan.extra_recipes) if size in small else [])
    unknown = [r for r in wanted if r not in TRAIN_RECIPES]
    if unknown:
        raise ValueError(f"unknown training recipes {unknown}; known: {', '.join(TRAIN_RECIPES)}")
    return wanted


def seeds_for(plan: Plan, size: str) -> list[int]:
    smallest = min(plan.sizes, key=lambda s: param_counts(s, plan.ctx)["params"])
    return list(range(plan.seeds_smallest if size == smallest else plan.seeds))


def lr_at(step: int, steps: int, lr: float, warmup: int, floor: float) -> float:
    from .lm import lr_at as _lr_at
    return _lr_at(step, steps, lr, warmup, floor)


# ---- one unit ------------------------------------------------------------------------------------
#: suffix of a diagnostic recipe that leaves the attention matmuls (QKᵀ, AV) in FP32, Linear layers quantized
LINEAR_ONLY = "-linear-only"
#: suffix of a diagnostic recipe trained at half the size's tuned peak learning rate
HALF_LR = "-halflr"
#: diagnostic units (size, recipe, seed), size None meaning the largest, run with --diagnostics (in this
#: order, after the planned units) and reported apart from the fit. 64x2 at half its tuned rate trains at
#: 64x1's rate (2e-3): depth 1 -> 2 at equal width and learning rate; 64x2 -> 96x2 (both 4e-3, 2 layers) is
#: width at equal depth and rate in the planned units.
DIAGNOSTICS = (("64x2", "fp32" + HALF_LR, 0), ("64x2", "mxfp6" + HALF_LR, 0), ("64x2", "mxfp4-w+mxfp6" + HALF_LR, 0),
               (None, "mxfp6" + LINEAR_ONLY, 0), (None, "fp32" + HALF_LR, 0), (None, "mxfp6" + HALF_LR, 0))


def split_recipe(label: str) -> tuple[str, str | None]:
    """(training recipe, attention spec for quantize_model): ``"<recipe>-linear-only"`` quantizes the
    Linear layers only (attention matmuls FP32); every other label quantizes both."""
    if label.endswith(LINEAR_ONLY):
        return label[:-len(LINEAR_ONLY)], None
    if label.endswith(HALF_LR):
        return label[:-len(HALF_LR)], "auto"
    return label, "auto"


def unit_key(plan: Plan, size: str, recipe: str, seed: int, lr: float, steps: int, kind: str = "main") -> dict:
    """Everything one unit's result depends on; a cached unit is reused only when its key matches. Main
    units also evaluate the final windows at 90% of training (the flattening check); sweep units do not."""
    key = {"size": size, "recipe": recipe, "seed": seed, "lr": lr, "steps": steps, "batch": plan.batch,
           "ctx": plan.ctx, "warmup_fraction": plan.warmup_fraction, "lr_floor": plan.lr_floor,
           "weight_decay": plan.weight_decay, "n_evals": plan.n_evals, "val_windows": plan.val_windows,
           "final_val_windows": plan.final_val_windows,
           # the label the cached units were keyed with; TinyGPT(init="gpt2") draws what TinyGPT + gpt2_init drew
           "model": "microscale.nn.models.TinyGPT+gpt2_init"}
    if kind != "sweep":
        key["final_windows_at_90pct"] = True
    return key


def unit_name(kind: str, size: str, recipe: str, seed: int, lr: float, steps: int) -> str:
    """Cache file stem; a main unit's name carries its step count, so runs at other budgets keep their files."""
    return (f"scale-sweep_{size}_lr{lr:g}" if kind == "sweep" else f"scale_{size}_{recipe}_s{seed}_{steps}steps")


@torch.no_grad()
def _val_loss(model, stream: torch.Tensor, starts: torch.Tensor, ctx: int, chunk: int = 64) -> float:
    from .data import batch_windows
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(starts), chunk):
        x, y = batch_windows(stream, starts[i:i + chunk], ctx)
        total += float(model(x, y)[1]) * len(x)
    model.train(was)
    return total / len(starts)


@torch.no_grad()
def _val_losses_per_window(model, stream: torch.Tensor, starts: torch.Tensor, ctx: int, chunk: int = 64) -> torch.Tensor:
    """Mean next-byte cross-entropy of each window (float64, [len(starts)]); their mean is the loss over
    the windows (every window has ``ctx`` targets)."""
    from .data import batch_windows
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(starts), chunk):
        x, y = batch_windows(stream, starts[i:i + chunk], ctx)
        logits = model(x, y)[0]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        out.append(ce.view(len(x), ctx).mean(1).double())
    model.train(was)
    return torch.cat(out)


#: contiguous blocks of validation windows for the batch-means standard error of the flattening (adjacent
#: windows come from the same file and are correlated; block means are close to independent)
SE_BLOCKS = 32


def paired_improvement(before: torch.Tensor, after: torch.Tensor, blocks: int = SE_BLOCKS) -> dict:
    """Relative improvement (L_before − L_after) / L_before of two per-window loss vectors on the same
    windows, and its standard error by batch means: the windows cut into ``blocks`` contiguous blocks, the
    SE of the mean per-window difference = sd(block means) / sqrt(blocks), divided by L_before (fewer
    blocks, at least two windows each, when there are fewer than 2 x ``blocks`` windows)."""
    if before.dim() != 1 or before.shape != after.shape or before.numel() < 4:
        raise ValueError(f"need two equal 1-d per-window loss vectors of >= 4 windows, got "
                         f"{tuple(before.shape)} and {tuple(after.shape)}")
    blocks = min(blocks, before.numel() // 2)
    d = (before - after).double()
    means = torch.stack([c.mean() for c in torch.tensor_split(d, blocks)])
    l0 = float(before.double().mean())
    return {"before": l0, "after": float(after.double().mean()), "rel": float(d.mean()) / l0,
            "se_rel": float(means.std(unbiased=True)) / math.sqrt(blocks) / l0, "windows": d.numel(), "blocks": blocks}


def final_val_starts(stream: torch.Tensor, ctx: int, n: int | None) -> torch.Tensor:
    """Every non-overlapping window of the validation stream (``n`` None), else ``n`` evenly spaced ones."""
    from .data import val_starts
    if n is None:
        return torch.arange(0, stream.numel() - ctx - 1, ctx)
    return val_starts(stream, ctx, n)


_CORPUS = None


def _corpus():
    global _CORPUS
    if _CORPUS is None:
        from .data import load_corpus
        _CORPUS = load_corpus()
    return _CORPUS


def train_unit(job: dict) -> dict:
    """Train one unit or reuse its cached record. Checkpoints every ``checkpoint_s`` seconds and resumes
    from the checkpoint; ``stop_after`` (tests) stops after that many steps, leaving only the checkpoint."""
    from . import mx
    from .data import batch_windows, train_starts, val_starts
    torch.set_num_threads(job.get("threads") or 1)
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["plan"].items()})
    out = pathlib.Path(job["out"])
    size, recipe, seed, lr, steps = job["size"], job["recipe"], job["seed"], job["lr"], job["steps"]
    key = unit_key(plan, size, recipe, seed, lr, steps, job["kind"])
    name = unit_name(job["kind"], size, recipe, seed, lr, steps)
    cache = out / "runs" / f"{name}.json"
    if cache.exists():
        rec = read_json(cache)
        if rec.get("key") == key:
            rec["cached"] = True
            return rec
    ckpt = out / "checkpoints" / f"{name}.pt"
    corpus = _corpus()
    model = build_model(size, seed, plan.ctx)
    base_recipe, attention = split_recipe(recipe)
    model = mx.quantized(model, mx.training_recipe(base_recipe), inference=False, copy_model=False, attention=attention)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=plan.weight_decay)
    warmup = max(1, round(plan.warmup_fraction * steps))
    starts = train_starts(corpus.train, plan.ctx, plan.batch, steps, seed)
    vstarts = val_starts(corpus.val, plan.ctx, plan.val_windows)
    eval_every = steps // plan.n_evals
    rec = {"kind": job["kind"], "size": size, "recipe": recipe, "seed": seed, "lr": lr, "steps": steps,
           "warmup_steps": warmup, "train_loss": [], "val_steps": [], "val_tokens": [], "val_loss": [],
           "wall_s": 0.0, "cpu_s": 0.0, "resumed_from_step": None}
    fstarts = final_val_starts(corpus.val, plan.ctx, plan.final_val_windows)
    step90 = int(round(0.9 * steps))  # a multiple of steps // n_evals (n_evals is a multiple of 10)
    step0, chunk_losses, windows90 = 0, [], None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["key"] == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            rec, step0, chunk_losses = state["rec"], state["step"], state["chunk_losses"]
            windows90 = state.get("windows90")
            rec["resumed_from_step"] = step0
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    wall0, cpu0 = rec["wall_s"], rec["cpu_s"]
    last_ckpt = last_print = time.perf_counter()
    tag = job.get("tag", name)

    def save(step):
        rec["wall_s"] = wall0 + time.perf_counter() - t_wall
        rec["cpu_s"] = cpu0 + time.process_time() - t_cpu
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"key": key, "model": model.state_dict(), "opt": opt.state_dict(), "rec": rec, "step": step,
                    "chunk_losses": chunk_losses, "windows90": windows90}, tmp)
        os.replace(tmp, ckpt)

    loss_every = max(1, steps // 100)
    for step in range(step0, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, plan.lr_floor)
        x, y = batch_windows(corpus.train, starts[step], plan.ctx)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        chunk_losses.append(loss.item())
        if (step + 1) % loss_every == 0 or step + 1 == steps:  # train loss: mean over chunks of steps
            rec["train_loss"].append([step + 1, statistics.fmean(chunk_losses)])
            chunk_losses = []
        if (step + 1) % eval_every == 0:
            rec["val_steps"].append(step + 1)
            rec["val_tokens"].append((step + 1) * plan.batch * plan.ctx)
            rec["val_loss"].append(_val_loss(model, corpus.val, vstarts, plan.ctx))
        if step + 1 == step90 and job["kind"] != "sweep":  # the flattening check's 90% point, final windows
            windows90 = _val_losses_per_window(model, corpus.val, fstarts, plan.ctx)
        now = time.perf_counter()
        if job.get("stop_after") is not None and step + 1 == job["stop_after"]:
            save(step + 1)
            return {"stopped_at": step + 1}
        if now - last_ckpt > job.get("checkpoint_s", 120):
            save(step + 1)
            last_ckpt = now
        if job.get("verbose") and now - last_print > 60:
            done = step + 1 - step0
            left = (steps - step - 1) * (now - t_wall) / done
            print(f"    {tag}: step {step + 1}/{steps} ({100 * (step + 1) / steps:.0f}%), "
                  f"val {rec['val_loss'][-1] if rec['val_loss'] else float('nan'):.4f}, unit time left "
                  f"{left / 60:.1f} min", flush=True)
            last_print = now
    windows_end = _val_losses_per_window(model, corpus.val, fstarts, plan.ctx)
    rec["final_val_loss"] = float(windows_end.mean())
    if windows90 is not None:
        rec["last10pct"] = paired_improvement(windows90, windows_end)
    rec["wall_s"] = wall0 + time.perf_counter() - t_wall
    rec["cpu_s"] = cpu0 + time.process_time() - t_cpu
    rec["tokens_seen"] = steps * plan.batch * plan.ctx
    rec["diverged"] = not all(math.isfinite(v) for _, v in rec["train_loss"])
    rec.update(param_counts(size, plan.ctx), key=key, environment=environment())
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, rec)
    ckpt.unlink(missing_ok=True)
    return rec


# ---- running many units --------------------------------------------------------------------------
def _work(job: dict) -> float:
    """Cost model of a unit for the time-left estimate: training tokens plus evaluation tokens (a forward
    pass ~1/3 of a training step; about 150k validation bytes at the end), x params x recipe factor."""
    plan = job["plan"]
    evals = plan["n_evals"] * plan["val_windows"] * plan["ctx"] + 150_000
    return (job["steps"] * plan["batch"] * plan["ctx"] + evals / 3) * job["params"] * COST_FACTOR.get(job["recipe"], 2.0)


def _job_name(job: dict) -> str:
    return unit_name(job["kind"], job["size"], job["recipe"], job["seed"], job["lr"], job["steps"])


class Progress:
    """Prints one line per finished unit with the time left, from this invocation's measured rate
    (work = steps x params x recipe cost factor, per wall second); units are known by name."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.left: dict[str, float] = {}
        self.done, self.work_done = 0, 0.0

    def add(self, job: dict) -> None:
        self.left[_job_name(job)] = _work(job)

    def update(self, job: dict, rec: dict) -> None:
        self.done += 1
        w = self.left.pop(_job_name(job), 0.0)
        if not rec.get("cached"):
            self.work_done += w
        el = time.perf_counter() - self.t0
        rest = sum(self.left.values())
        eta = "n/a" if not self.work_done else f"{rest * el / self.work_done / 60:.1f} min (~" + (
            dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=rest * el / self.work_done)).strftime(
            "%H:%M UTC") + ")"
        print(f"[{self.done}/{self.done + len(self.left)}] {_job_name(job)}: val {rec['final_val_loss']:.4f} "
              f"({rec['wall_s']:.0f} s{', cached' if rec.get('cached') else ''}); elapsed {el / 60:.1f} min, "
              f"time left {eta}", flush=True)


def run_units(jobs: list[dict], workers: int, progress: Progress) -> list[dict]:
    """Run jobs inline (``workers`` 1) or in spawned single-thread worker processes; keeps job order."""
    done = {}
    if workers <= 1:
        for i, job in enumerate(jobs):
            done[i] = train_unit({**job, "verbose": True})
            progress.update(job, done[i])
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(train_unit, {**job, "threads": 1, "verbose": True}): i for i, job in enumerate(jobs)}
            for f in cf.as_completed(futures):
                i = futures[f]
                done[i] = f.result()
                progress.update(jobs[i], done[i])
    return [done[i] for i in range(len(jobs))]


def _cached_only(job: dict) -> dict | None:
    """The cached record of a job, or None (``--report-only``)."""
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["plan"].items()})
    path = pathlib.Path(job["out"]) / "runs" / f"{unit_name(job['kind'], job['size'], job['recipe'], job['seed'], job['lr'], job['steps'])}.json"
    if not path.exists():
        return None
    rec = read_json(path)
    if rec.get("key") != unit_key(plan, job["size"], job["recipe"], job["seed"], job["lr"], job["steps"], job["kind"]):
        return None
    rec["cached"] = True
    return rec


# ---- statistics ----------------------------------------------------------------------------------
def fit_slope(x_params, gaps) -> dict:
    """Least-squares line gap = a + b·log10(params) through every (params, gap) point; ``b`` is the change
    of the gap per decade of parameters. 95% interval from Student's t with n − 2 degrees of freedom
    (residuals include the spread over seeds); None when n < 3 or the x values are all equal."""
    from scipy import stats
    x = [math.log10(p) for p in x_params]
    n = len(x)
    if n < 2 or len(set(x)) < 2:
        return {"slope": None, "intercept": None, "n": n, "ci95": None, "se": None}
    mx_, my = statistics.fmean(x), statistics.fmean(gaps)
    sxx = sum((a - mx_) ** 2 for a in x)
    b = sum((a - mx_) * (g - my) for a, g in zip(x, gaps)) / sxx
    a = my - b * mx_
    if n < 3:
        return {"slope": b, "intercept": a, "n": n, "ci95": None, "se": None}
    rss = sum((g - a - b * xi) ** 2 for xi, g in zip(x, gaps))
    se = math.sqrt(rss / (n - 2) / sxx)
    t = float(stats.t.ppf(0.975, n - 2))
    return {"slope": b, "intercept": a, "n": n, "se": se, "ci95": [b - t * se, b + t * se]}


def bootstrap_slope(per_size: dict, n_boot: int = 4000, seed: int = 0) -> dict:
    """Percentile 95% interval of the slope of mean gap vs log10(params): seeds resampled with replacement
    within each size (``per_size``: params -> list of per-seed gaps), the line fitted to the size means."""
    g = torch.Generator().manual_seed(seed)
    sizes = sorted(per_size)
    if len(sizes) < 2:
        return {"ci95": None, "n_boot": 0}
    slopes = []
    for _ in range(n_boot):
        means = []
        for p in sizes:
            v = per_size[p]
            idx = torch.randint(0, len(v), (len(v),), generator=g).tolist()
            means.append(statistics.fmean(v[i] for i in idx))
        slopes.append(fit_slope(sizes, means)["slope"])
    slopes.sort()
    return {"ci95": [slopes[int(0.025 * n_boot)], slopes[int(0.975 * n_boot) - 1]], "n_boot": n_boot}


def flattening(rec: dict) -> float:
    """Relative improvement of validation loss over the last 10% of training: (L(90%) − L(end)) / L(90%),
    on the final evaluation's windows when the unit recorded them (``last10pct``), else on the curve's."""
    if "last10pct" in rec:
        return rec["last10pct"]["rel"]
    steps = rec["val_steps"]
    i90 = steps.index(int(round(0.9 * rec["steps"])))
    return (rec["val_loss"][i90] - rec["val_loss"][-1]) / rec["val_loss"][i90]


#: a unit whose validation loss rises more than this (nats) above its running minimum is listed as unstable
RISE_LIMIT = 0.02


def val_rise(rec: dict) -> float:
    """Largest rise of the validation-loss curve above its running minimum (0 for a curve that only falls):
    a loss spike or instability shows here even when training does not produce NaNs."""
    best, rise = math.inf, 0.0
    for v in rec["val_loss"]:
        rise = max(rise, v - best)
        best = min(best, v)
    return rise


def spike(rec: dict) -> dict:
    """Where the largest rise of the validation curve above its running minimum happened (fraction of
    training), the minimum before it, the peak, the curve's last value, and whether the curve later fell
    below the pre-spike minimum again (recovered)."""
    best, rise, at, lo, peak = math.inf, 0.0, None, None, None
    for i, v in enumerate(rec["val_loss"]):
        if v - best > rise:
            rise, at, lo, peak = v - best, i, best, v
        best = min(best, v)
    if at is None:
        return {"rise": 0.0, "at_fraction": None, "before_min": None, "peak": None,
                "last": rec["val_loss"][-1] if rec["val_loss"] else None, "recovered": True}
    return {"rise": rise, "at_fraction": rec["val_steps"][at] / rec["steps"], "before_min": lo, "peak": peak,
            "last": rec["val_loss"][-1], "recovered": min(rec["val_loss"][at:]) < lo}


def summarize(units: list[dict], sizes: dict) -> list[dict]:
    """Per size x recipe: losses per seed, paired gaps to the same seed's FP32 unit, mean and half-range."""
    rows = []
    for size in sizes:
        mine = [u for u in units if u["size"] == size]
        base = {u["seed"]: u["final_val_loss"] for u in mine if u["recipe"] == "fp32"}
        for recipe in dict.fromkeys(u["recipe"] for u in mine):
            rs = sorted((u for u in mine if u["recipe"] == recipe), key=lambda u: u["seed"])
            vals = [u["final_val_loss"] for u in rs]
            gaps = [u["final_val_loss"] - base[u["seed"]] for u in rs if u["seed"] in base]
            rows.append({"size": size, "label": sizes[size]["label"], "params": sizes[size]["params"],
                         "recipe": recipe, "seeds": [u["seed"] for u in rs], "final_val_loss": vals,
                         "mean": statistics.fmean(vals), "half_range": (max(vals) - min(vals)) / 2,
                         "gap": gaps, "gap_mean": statistics.fmean(gaps) if gaps else None,
                         "gap_half_range": (max(gaps) - min(gaps)) / 2 if gaps else None,
                         "val_rise_max": max(val_rise(u) for u in rs),
                         "wall_s_mean": statistics.fmean(u["wall_s"] for u in rs)})
    return rows


def fits(rows: list[dict]) -> dict:
    """Per fitted recipe: the slope through every size (``ols``, ``bootstrap``) and, per depth with two or
    more sizes (``by_layers``), the slope through the sizes of that depth only (width alone changes)."""
    out = {}
    for recipe in FIT_RECIPES:
        mine = [r for r in rows if r["recipe"] == recipe and r["gap"]]
        xs = [r["params"] for r in mine for _ in r["gap"]]
        gs = [g for r in mine for g in r["gap"]]
        paper = PAPER_GAPS[recipe]
        by_layers = {}
        for n in sorted({parse_size(r["size"])[1] for r in mine}):
            same = [r for r in mine if parse_size(r["size"])[1] == n]
            if len(same) >= 2:
                by_layers[str(n)] = {"sizes": [r["size"] for r in same],
                                     **fit_slope([r["params"] for r in same for _ in r["gap"]],
                                                 [g for r in same for g in r["gap"]])}
        out[recipe] = {"ols": fit_slope(xs, gs), "bootstrap": bootstrap_slope({r["params"]: r["gap"] for r in mine}),
                       "sizes": len(mine), "paper_slope": fit_slope(list(paper), list(paper.values()))["slope"],
                       "mean_gap_first": mine[0]["gap_mean"] if mine else None,
                       "mean_gap_last": mine[-1]["gap_mean"] if mine else None, "by_layers": by_layers}
    return out


def factor_comparisons(units: list[dict], diagnostics: list[dict]) -> dict:
    """Separates depth, width and learning rate: every (size, peak lr) group with paired gaps of a fitted
    recipe (planned units, and ``-halflr`` diagnostics paired with FP32 at the same rate), and every pair of
    groups that differ in exactly one of layers, width, lr, with the change of the gap on their common seeds
    (b − a, mean over those seeds)."""
    groups: dict = {}
    for u in units:
        if u["recipe"] in FIT_RECIPES and u.get("gap_to_fp32") is not None:
            groups.setdefault((u["size"], u["lr"]), {}).setdefault(u["recipe"], {})[u["seed"]] = u["gap_to_fp32"]
    for d in diagnostics:
        base = split_recipe(d["recipe"])[0]
        if d["recipe"].endswith(HALF_LR) and base in FIT_RECIPES and d.get("gap_to_fp32") is not None:
            groups.setdefault((d["size"], d["lr"]), {}).setdefault(base, {})[d["seed"]] = d["gap_to_fp32"]
    table = [{"size": s, "layers": parse_size(s)[1], "width": parse_size(s)[0], "lr": lr,
              "gaps": {r: {str(k): v for k, v in sorted(g.items())} for r, g in rg.items()}}
             for (s, lr), rg in sorted(groups.items(), key=lambda kv: (parse_size(kv[0][0])[::-1], kv[0][1]))]
    pairs = []
    for i, a in enumerate(table):
        for b in table[i + 1:]:
            differ = [f for f in ("layers", "width", "lr") if a[f] != b[f]]
            if len(differ) != 1:
                continue
            for recipe in FIT_RECIPES:
                ga, gb = a["gaps"].get(recipe, {}), b["gaps"].get(recipe, {})
                common = sorted(set(ga) & set(gb))
                if common:
                    pairs.append({"factor": differ[0], "recipe": recipe, "a": {k: a[k] for k in ("size", "lr")},
                                  "b": {k: b[k] for k in ("size", "lr")}, "seeds": [int(c) for c in common],
                                  "gap_a": statistics.fmean(ga[c] for c in common),
                                  "gap_b": statistics.fmean(gb[c] for c in common),
                                  "change": statistics.fmean(gb[c] - ga[c] for c in common)})
    return {"groups": table, "pairs": pairs}


# ---- plots ---------------------------------------------------------------------------------------
def plot_gap(rows: list[dict], path) -> None:
    """Paired gap to FP32 vs parameters (log x): ours (per seed, and mean ± half-range) beside the paper's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, recipe in zip(axes, FIT_RECIPES):
        mine = [r for r in rows if r["recipe"] == recipe and r["gap"]]
        for r in mine:
            ax.plot([r["params"]] * len(r["gap"]), r["gap"], "o", color="C0", ms=3, alpha=0.5)
        if mine:
            ax.errorbar([r["params"] for r in mine], [r["gap_mean"] for r in mine],
                        yerr=[r["gap_half_range"] for r in mine], fmt="s-", color="C0", capsize=3,
                        label="ours (mean ± half-range over seeds; dots: seeds)")
            f = fit_slope([r["params"] for r in mine for _ in r["gap"]], [g for r in mine for g in r["gap"]])
            if f["slope"] is not None:
                xs = [min(r["params"] for r in mine), max(r["params"] for r in mine)]
                ax.plot(xs, [f["intercept"] + f["slope"] * math.log10(x) for x in xs], "--", color="C0", lw=1,
                        label=f"least-squares fit, {f['slope']:+.4f} per decade")
        paper = PAPER_GAPS[recipe]
        ax.plot(list(paper), list(paper.values()), "D-", color="C3", label="MX paper")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=f"{recipe}: final validation loss − FP32 (paired)",
               xlabel="parameters (ours: non-embedding; paper: as reported)",
               ylabel="gap (nats; ours per byte, paper per token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(units: list[dict], sizes: dict, path) -> None:
    """Per size: validation loss vs tokens (seed mean) per recipe (top), and the paired gap to FP32 (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [s for s in sizes if any(u["size"] == s for u in units)]
    if not names:
        return
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for j, size in enumerate(names):
        mine = [u for u in units if u["size"] == size]
        base = {u["seed"]: u for u in mine if u["recipe"] == "fp32"}
        for i, recipe in enumerate(dict.fromkeys(u["recipe"] for u in mine)):
            rs = [u for u in mine if u["recipe"] == recipe]
            t = rs[0]["val_tokens"]
            axes[0, j].plot(t, torch.tensor([u["val_loss"] for u in rs]).mean(0), color=f"C{i}", lw=1.2, label=recipe)
            gaps = [[v - b for v, b in zip(u["val_loss"], base[u["seed"]]["val_loss"])] for u in rs if u["seed"] in base]
            if gaps and recipe != "fp32":
                axes[1, j].plot(t, torch.tensor(gaps).mean(0), "o-", ms=2, color=f"C{i}", lw=1.2, label=recipe)
        axes[0, j].set(title=f"{sizes[size]['label']} ({size}): validation loss", xlabel="tokens", ylabel="nats / byte")
        lo = min(min(u["val_loss"]) for u in mine)
        axes[0, j].set_ylim(lo - 0.05, lo + 1.0)
        axes[1, j].axhline(0, color="k", lw=0.8)
        axes[1, j].set(title="validation loss − FP32 (paired, seed mean)", xlabel="tokens", ylabel="Δ nats / byte")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: why the budget is 20 tokens per parameter (the first run's numbers: results/train_scale.json at commit
#: ad75a4d); shown on the page of the full plan
BUDGET_NOTE = ("**Why 20 tokens per parameter.** A first run at 10 tokens per parameter (same sizes, rates and "
               "seeds; results/train_scale.json at commit ad75a4d) failed the flattening check at gpt-248k seed 1: its FP32 "
               "curve fell 1.3705 → 1.3617 → 1.3444 → 1.3294 over the last 20% (256-window curve), monotonically "
               "and without a spike, while seed 0 had reached 1.3376 at 90% and ended at 1.3278. Both final losses "
               "agreed within 0.004, so the 2.37% was a real late improvement of an under-trained model, not window "
               "noise or a recovery from an instability. One rule for every size replaced it: twice the token budget, "
               "and the 90% and 100% points measured on every validation window with a stated standard error. The "
               "learning rates are the first run's sweep, reused (the sweep units are cached): tuned at 2.5 tokens "
               "per parameter, 1/8 of the budget now.")


# ---- the page section ----------------------------------------------------------------------------
def _hms(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 5400 else (f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s")


def by_depth(rows: list[dict], sizes: dict) -> str:
    """Mean gaps of the fitted recipes, grouped by depth (sizes with the same number of layers)."""
    parts = []
    for n in sorted({parse_size(s)[1] for s in sizes}):
        mine = [s for s in sizes if parse_size(s)[1] == n]
        for recipe in FIT_RECIPES:
            g = [(sizes[s]["label"], r["gap_mean"]) for s in mine for r in rows
                 if r["size"] == s and r["recipe"] == recipe and r["gap_mean"] is not None]
            if g:
                parts.append(f"{recipe} at {n} layer{'s' if n > 1 else ''}: "
                             + ", ".join(f"{lab} {v:+.4f}" for lab, v in g))
    return ("Mean gaps by depth: " + "; ".join(parts) + ". ") if parts else ""


def _ci(v) -> str:
    return "n/a" if v is None else f"[{v[0]:+.4f}, {v[1]:+.4f}]"


def _sign(v: float, tol: float) -> str:
    return "grows" if v > tol else ("shrinks" if v < -tol else "hardly changes")


def scope_paragraph(js: dict) -> str:
    """What the fitted trend does and does not show, from the slopes and the one-factor comparisons."""
    ft, sizes = js["fits"], js["sizes"]
    pairs = js.get("factors", {}).get("pairs", [])
    shown = []
    for recipe, f in ft.items():
        o = f["ols"]
        if o["slope"] is not None:
            shown.append(f"{recipe} {o['slope']:+.4f} per decade (95% CI {_ci(o['ci95'])})")
    if not shown:
        return ""
    labels = list(dict.fromkeys(r["label"] for r in js["summary"] if r["recipe"] in ft and r["gap"]))
    text = ("**What the trend shows, and what it does not.** It shows how the paired gap moves across these "
            f"{len(labels)} models ({labels[0]} to {labels[-1]}) as they were built and tuned here: "
            + "; ".join(shown) + ". It does not show that parameter count causes it, because width, depth and the "
            "tuned learning rate change together along the x axis.")
    parts = []
    for recipe, f in ft.items():
        for n, b in f.get("by_layers", {}).items():
            if b["slope"] is not None:
                parts.append(f"at {n} layer{'s' if n != '1' else ''} ({', '.join(sizes[x]['label'] for x in b['sizes'])}) "
                             f"the {recipe} gap {_sign(b['slope'], 0.01)} with width ({b['slope']:+.4f} per decade"
                             + (f", 95% CI {_ci(b['ci95'])}" if b["ci95"] else ", two points: no interval") + ")")
    for factor, what in (("layers", "changing the depth at the same width and rate"),
                         ("lr", "changing the peak rate at a fixed size")):
        for q in (q for q in pairs if q["factor"] == factor):
            parts.append(f"{what} ({q['a']['size']} at {q['a']['lr']:g} → {q['b']['size']} at {q['b']['lr']:g}, "
                         f"seed{'s' if len(q['seeds']) > 1 else ''} {', '.join(map(str, q['seeds']))}) changes the "
                         f"{q['recipe']} gap by {q['change']:+.4f}")
    if parts:
        text += " Separately: " + "; ".join(parts) + "."
    text += (" These one-factor comparisons rest on one or two seeds each and on rates tuned for FP32, so they "
             "say which factor moves the gap at these sizes, not how it scales; nothing here extrapolates to the "
             "paper's 20M–1.5B models, whose recipes were trained at rates and token budgets tuned at that scale.\n")
    return text


def section(js: dict, img) -> str:
    """The results-page section (markdown) for train_scale.json; ``img(name)`` gives an image's link."""
    plan, sizes, rows, ft = js["plan"], js["sizes"], js["summary"], js["fits"]
    out = ["## 4. Does the training gap shrink with model size?\n"]
    if js["missing_units"]:
        out.append(f"**Partial results: {len(js['missing_units'])} of {js['n_units_planned']} units are missing** "
                   f"({', '.join(js['missing_units'])}); the run resumes with `{js['command']}`.\n")
    out.append(
        f"Byte-level GPTs (the library's `microscale.nn.models.TinyGPT`, GPT-2 initialisation, head dimension "
        f"{HEAD_DIM}, context {plan['ctx']}) on the corpus of section 1, each trained to "
        f"{plan['tokens_per_param']:g} tokens (bytes) per parameter, parameters counted without the token and "
        f"position embeddings (Kaplan et al. 2020; the untied LM head is a GEMM and counts). Batch {plan['batch']} x {plan['ctx']} bytes; one learning rate per size, the best of an FP32 "
        f"sweep at {100 * plan['sweep_fraction']:g}% of the budget ({plan['sweep_fraction'] * plan['tokens_per_param']:g} "
        f"tokens per parameter, seed 0), used for every recipe; linear warmup over "
        f"{100 * plan['warmup_fraction']:.0f}% of the steps, cosine to {plan['lr_floor']:g} x peak at the end of the "
        f"budget; AdamW(0.9, 0.95), weight decay {plan['weight_decay']:g}, clip 1.0. Final validation loss on "
        + ("every non-overlapping window of the validation stream" if plan["final_val_windows"] is None else
           f"{plan['final_val_windows']} windows") + f"; curves on {plan['val_windows']} fixed windows. "
        f"Gap = paired difference to the FP32 unit of the same seed (same initial weights and batches).\n")
    body = []
    for s, v in sizes.items():
        sweep = ", ".join(f"{p['lr']:g}: {p['val']:.4f}" for p in v["sweep"]) or "not run"
        body.append([v["label"], s, f"{v['params']:,}", f"{v['params_total']:,}", f"{v['token_budget']:,}",
                     v["steps"], f"{v['tokens']:,}", f"{v['epochs']:.2f}", "—" if v["lr"] is None else f"{v['lr']:g}",
                     sweep + (" (best at grid edge)" if v.get("lr_at_edge") else ""), len(v["seeds"])])
    out.append(markdown_table(["model", "DxL", "params (non-embedding)", "total params", "token budget", "steps", "tokens seen",
                               "epochs of train split", "peak lr", "sweep (lr: val loss)", "seeds"], body))
    body = []
    for r in rows:
        body.append([r["label"], r["recipe"], len(r["seeds"]), f"{r['mean']:.4f} ± {r['half_range']:.4f}",
                     "—" if r["recipe"] == "fp32" else f"{r['gap_mean']:+.4f} ± {r['gap_half_range']:.4f}",
                     "—" if r["recipe"] == "fp32" else " / ".join(f"{g:+.4f}" for g in r["gap"]),
                     f"{r['val_rise_max']:.3f}", _hms(r["wall_s_mean"])])
    out.append("\n" + markdown_table(["model", "recipe", "seeds", "final val loss (mean ± half-range)",
                                      "gap to FP32 (mean ± half-range)", "gap per seed",
                                      "largest rise of val loss (max over seeds)", "wall per unit"], body))
    out.append(f"\n![gap vs parameters]({img('train_scale_gap.png')})\n\n"
               f"![loss curves]({img('train_scale_curves.png')})\n")
    # slope
    fb = []
    for recipe, f in ft.items():
        o = f["ols"]
        fb.append([recipe, f["sizes"], o["n"], "n/a" if o["slope"] is None else f"{o['slope']:+.4f}", _ci(o["ci95"]),
                   _ci(f["bootstrap"]["ci95"]), "n/a" if f["paper_slope"] is None else f"{f['paper_slope']:+.4f}"])
    out.append("Fitted slope of the gap against log10(parameters) (change of the gap per 10x parameters): least "
               "squares through every per-seed gap, 95% interval from Student's t (n − 2 df); and a 95% bootstrap "
               "interval resampling seeds within each size and fitting the size means. The paper's slope is the "
               "same fit through its three points (20M, 150M, 1.5B).\n\n"
               + markdown_table(["recipe", "sizes", "points", "slope per decade", "95% CI (t)", "95% CI (bootstrap)",
                                 "paper slope"], fb))
    # checks
    ck = js["checks"]
    ses = ck.get("fp32_last10pct_se", {})
    flat = "; ".join(f"{sizes[s]['label']}: " + ", ".join(
        f"{100 * v:.2f}%" + (f" ± {100 * ses[s][i]:.2f}%" if len(ses.get(s, [])) == len(vals) else "")
        for i, v in enumerate(vals)) for s, vals in ck["fp32_last10pct_improvement"].items())
    se_all = [v for vals in ses.values() for v in vals]
    out.append("\n**Checks.** Every unit reached its size's token budget (no early stop): "
               f"{'yes' if ck['all_reached_budget'] else 'no'}; diverged units (NaN loss): {', '.join(ck['diverged']) or 'none'}. "
               f"FP32 curves flatten (validation loss improves by < 2% over the last 10% of training): "
               f"{'yes' if ck['fp32_flat'] else 'no'} ({flat})"
               + ("" if ck["fp32_flat"] else "; a size with a value of 2% or more was still improving at the end of its "
                  "budget, so its gaps are measured before the FP32 curve flattened") + "."
               + (f" The improvement is (L(90%) − L(100%)) / L(90%) with both losses on the final evaluation's windows "
                  f"(every non-overlapping window of the validation stream), paired window by window; ± is its standard "
                  f"error by batch means over {SE_BLOCKS} contiguous blocks of windows (largest {100 * max(se_all):.2f}%, "
                  f"against the 2% threshold)." if se_all else "") + "\n")
    if js.get("budget_note"):
        out.append(js["budget_note"] + "\n")
    sp = ck.get("spikes", {})
    if sp:
        body = [[k, f"{v['rise']:+.3f}", f"{100 * v['at_fraction']:.0f}%", f"{v['before_min']:.3f}", f"{v['peak']:.3f}",
                 f"{v['last']:.3f}", "yes" if v["recovered"] else "no"] for k, v in sp.items()]
        big = list(sizes)[-1]
        at_big = {}
        for k in sp:
            for u in js["units"]:
                if k == unit_name("main", u["size"], u["recipe"], u["seed"], u["lr"], u["steps"]) and u["size"] == big:
                    at_big.setdefault(u["recipe"], []).append(u["seed"])
        n_seeds = len(sizes[big]["seeds"])
        out.append(f"**Instabilities.** \"Rise\" is the largest rise of a unit's validation curve ({plan['val_windows']} "
                   f"fixed windows, {plan['n_evals']} evaluations) above its own running minimum; units above {RISE_LIMIT} "
                   "nats are listed (none of them produced a NaN: see diverged above). \"Recovered\": the curve later fell "
                   "below its minimum before the spike.\n\n" + markdown_table(
                       ["unit", "rise (nats)", "at", "min before", "peak", "last curve value", "recovered"], body)
                   + "".join(f"\n**At the largest size ({sizes[big]['label']}), {r} is unstable at the FP32-tuned "
                             f"learning rate: {len(seeds)} of {n_seeds} seeds spiked** (seeds "
                             f"{', '.join(map(str, seeds))}); its gap there includes the cost of the spike(s).\n"
                             for r, seeds in at_big.items()))
    if js.get("diagnostics"):
        db = [[sizes[d["size"]]["label"], d["recipe"], d["seed"], f"{d['final_val_loss']:.4f}",
               "n/a" if d["gap_to_fp32"] is None else f"{d['gap_to_fp32']:+.4f}", d["full_recipe"],
               "n/a" if d["full_recipe_gap"] is None else f"{d['full_recipe_gap']:+.4f}"] for d in js["diagnostics"]]
        out.append("**Diagnostics (not in the fit).** `-linear-only`: the recipe with the attention "
                   "matmuls (QKᵀ and AV) left in FP32 and every Linear layer quantized as before, paired with the same "
                   "seed's FP32 unit. `-halflr`: the recipe at half the size's tuned peak learning rate, paired with an "
                   "FP32 unit also at half the rate (same seed). \"full recipe\": the planned unit of that recipe (tuned "
                   "rate, attention quantized) and its gap:\n\n" + markdown_table(["model", "recipe", "seed", "final val loss",
                                                                  "gap to FP32", "full recipe", "full recipe's gap"], db)
                   + "".join(f"\nIn {sizes[d['size']]['label']} seed {d['seed']}, quantizing the attention matmuls adds "
                             f"{d['full_recipe_gap'] - d['gap_to_fp32']:+.4f} of the full recipe's {d['full_recipe_gap']:+.4f}; "
                             f"the Linear layers alone give {d['gap_to_fp32']:+.4f}.\n" for d in js["diagnostics"]
                             if d["recipe"].endswith(LINEAR_ONLY) and d["gap_to_fp32"] is not None
                             and d["full_recipe_gap"] is not None))
    fc = js.get("factors", {})
    if fc.get("pairs"):
        names = {"layers": "depth (layers)", "width": "width (d_model)", "lr": "peak learning rate"}
        body = [[names[q["factor"]], q["recipe"], f"{sizes[q['a']['size']]['label']} ({q['a']['size']}) at {q['a']['lr']:g}",
                 f"{sizes[q['b']['size']]['label']} ({q['b']['size']}) at {q['b']['lr']:g}", ", ".join(map(str, q["seeds"])),
                 f"{q['gap_a']:+.4f}", f"{q['gap_b']:+.4f}", f"{q['change']:+.4f}"]
                for q in sorted(fc["pairs"], key=lambda q: (q["factor"], q["recipe"]))]
        fb = [[recipe, n, ", ".join(sizes[x]["label"] for x in f["by_layers"][n]["sizes"]),
               "n/a" if f["by_layers"][n]["slope"] is None else f"{f['by_layers'][n]['slope']:+.4f}",
               _ci(f["by_layers"][n]["ci95"])] for recipe, f in ft.items() for n in f.get("by_layers", {})]
        out.append("**Depth, width and learning rate, one at a time.** The sizes change width, depth (1 → 2 layers) "
                   "and the tuned learning rate together. Every pair of (size, peak rate) groups that differs in exactly "
                   "one of them, with the paired gap to FP32 averaged over the seeds both have (the `-halflr` "
                   "diagnostics supply the other rates):\n\n" + markdown_table(
                       ["factor changed", "recipe", "a", "b", "seeds", "gap a", "gap b", "change b − a"], body)
                   + ("\n\nSlope of the gap within one depth (only width changes; least squares through the per-seed "
                      "gaps, 95% t interval, none with fewer than three points):\n\n" + markdown_table(
                          ["recipe", "layers", "sizes", "slope per decade", "95% CI (t)"], fb) if fb else "") + "\n")
    # trend, in words no stronger than the table
    lines = []
    for recipe, f in ft.items():
        o, b = f["ols"], f["bootstrap"]["ci95"]
        if o["slope"] is None:
            lines.append(f"- **{recipe}**: fewer than two sizes; no slope.")
            continue
        mine = [r for r in rows if r["recipe"] == recipe and r["gap"]]
        spread = max(r["gap_half_range"] for r in mine)
        change = mine[-1]["gap_mean"] - mine[0]["gap_mean"]
        cis = [c for c in (o["ci95"], b) if c]
        if cis and all(c[1] < 0 for c in cis):
            verdict = "the gap shrinks across these sizes: both intervals of the slope lie below zero"
        elif cis and all(c[0] > 0 for c in cis):
            verdict = "the gap grows across these sizes: both intervals of the slope lie above zero"
        else:
            verdict = ("the slope is not distinguishable from zero at this precision (an interval includes zero); "
                       "the data neither show the paper's shrinking gap nor rule it out")
        spikes = [k for k in js["checks"].get("unstable", {}) if f"_{recipe}_s" in k]
        lines.append(f"- **{recipe}**: mean gap {mine[0]['gap_mean']:+.4f} at {mine[0]['label']} → "
                     f"{mine[-1]['gap_mean']:+.4f} at {mine[-1]['label']} (change {change:+.4f}; largest half-range "
                     f"over seeds at one size {spread:.4f}); slope {o['slope']:+.4f} per decade vs the paper's "
                     f"{f['paper_slope']:+.4f}: {verdict}"
                     + (f"; units with loss spikes (see Instabilities): {', '.join(spikes)}" if spikes else "") + ".")
    out.append("**Trend.**\n\n" + "\n".join(lines) + "\n")
    out.append(scope_paragraph(js))
    run = js["run"]
    n_diag = len(js.get("diagnostics", []))
    out.append(f"**Cost.** {js['n_units_done']} units (incl. {js['n_sweep_units']} sweep units"
               + (f" and {n_diag} diagnostic" if n_diag else "") + "): "
               f"{_hms(run['unit_wall_s'])} wall and {_hms(run['unit_cpu_s'])} CPU summed over units, one thread each, "
               f"{run['workers_used']} worker(s), niceness "
               f"{'/'.join(sorted({str(i.get('nice', 'not recorded')) for i in run['invocations']})) or 'not recorded'} on "
               f"{js['environment']['cpu_count']} CPU cores shared with other jobs; wall time of the invocations that trained units: "
               + (_hms(run['invocations_wall_s']) if run["invocations"] else "not recorded (an invocation records "
                  "itself when it ends; the one that trained these units was stopped before it ended)") + ".\n")
    big = js["gpu_scale"]
    layers = {v["label"]: parse_size(s)[1] for s, v in sizes.items()}
    depth = "" if len(set(layers.values())) < 2 else (
        "The sizes differ in depth as well as width (layers: " + ", ".join(f"{k} {n}" for k, n in layers.items())
        + "); a one-layer transformer cannot form the two-layer induction circuits of Olsson et al. (2022), so a "
        "step between one and two layers mixes model size with depth. " + by_depth(rows, sizes))
    out.append(
        "**Caveats and what a full-size run needs.** " + depth + "Losses are nats per byte on a 1.4 MB code corpus, not the "
        "paper's nats per token on web text, so only the sign and size of the *trend* are comparable, not the "
        f"gaps themselves; the paper's sizes are its own (total) parameter counts. Our largest model has "
        f"{big['ours_largest']:,} non-embedding parameters, about {big['ratio_to_paper_20M']:.0f}x "
        "smaller than the paper's smallest (20M). The issue's largest example size (1M parameters), at this run's "
        f"{plan['tokens_per_param']:g} tokens per parameter, would add a 1M model: {big['tokens_1M']:,} tokens, {big['epochs_1M']:.1f} epochs of this "
        "training split" + (f" (more than {plan['max_epochs']:g}: the corpus must first grow, e.g. by more "
                            "standard-library packages, which the run checks)" if big["epochs_1M"] > plan["max_epochs"]
                            else "") + (
            f", about {_hms(big['cpu_s_1M_core'])} of one core for its FP32, MXFP6 and MXFP4-W units at 2 seeds "
            "(our largest size's CPU time per token, scaled linearly in parameters)" if big["cpu_s_1M_core"] else "")
        + "; add it with `--sizes` (cached units are reused). A run at the paper's sizes needs a tokenised web-text corpus of "
        f"billions of tokens and MX emulation on GPUs: at {big['gpu_tokens_per_param']} tokens per parameter, "
        + ", ".join(f"{e['params'] / 1e6:g}M parameters ≈ {e['flops']:.1e} FLOPs (6·N·D) ≈ {24 * e['gpu_days']:.2g} GPU-hours"
                    for e in big["gpu_runs"])
        + f" per recipe and seed on one GPU sustaining {big['gpu_sustained_flops'] / 1e12:g} TFLOP/s (an assumption: "
        "about 40% of an H100-class BF16 peak), before the quantize/dequantize overhead of emulation"
        + (f", which multiplies our CPU step time by {big['mx_cpu_ratio']:.1f} (median MX / FP32 unit CPU time)"
           if big["mx_cpu_ratio"] else "") + ".\n")
    return "\n".join(out)


def gpu_estimate(tokens_per_param: int = 20, sustained_flops: float = 4e14) -> dict:
    """Compute of one FP32 training run at the MX paper's sizes: 6·N·D FLOPs (Kaplan et al. 2020) and days on
    one GPU sustaining ``sustained_flops`` (an assumption, stated on the page)."""
    runs = [{"params": n, "flops": 6 * n * tokens_per_param * n,
             "gpu_days": 6 * n * tokens_per_param * n / sustained_flops / 86400} for n in (20e6, 150e6, 1.5e9)]
    return {"gpu_tokens_per_param": tokens_per_param, "gpu_sustained_flops": sustained_flops, "gpu_runs": runs}


# ---- main ----------------------------------------------------------------------------------------
def _command(args_argv: list[str]) -> str:
    return "nohup nice -n 19 python -m experiments.train_scale " + " ".join(args_argv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Plan()
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (seconds), writes to results/quick/")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default results/ or results/quick/)")
    p.add_argument("--sizes", nargs="+", default=None, help=f"model sizes DxL (d_model x layers), default {' '.join(d.sizes)}")
    p.add_argument("--tokens-per-param", type=float, default=None, help=f"token budget per parameter ({d.tokens_per_param:g})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per size ({d.seeds})")
    p.add_argument("--seeds-smallest", type=int, default=None, help=f"seeds at the smallest size ({d.seeds_smallest})")
    p.add_argument("--workers", type=int, default=1, help="worker processes (1 torch thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads when --workers is 1 (default 1)")
    p.add_argument("--checkpoint-s", type=float, default=120.0, help="seconds between checkpoints inside a unit")
    p.add_argument("--report-only", action="store_true", help="train nothing: assemble JSON, plots and page from "
                   "the cached units (missing ones are listed)")
    p.add_argument("--diagnostics", action="store_true", help="also train the diagnostic units at the largest "
                   "size (" + ", ".join(f"{s or 'largest'} {r} seed {n}" for s, r, n in DIAGNOSTICS) + "), after the planned ones")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK_PLAN if args.quick else Plan()
    over = {k: v for k, v in {"sizes": tuple(args.sizes) if args.sizes else None,
                               "tokens_per_param": args.tokens_per_param, "seeds": args.seeds,
                               "seeds_smallest": args.seeds_smallest}.items() if v is not None}
    plan = replace(plan, **over)
    for s in plan.sizes:
        parse_size(s)
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    corpus = _corpus()
    sizes = {}
    for s in sorted(plan.sizes, key=lambda s: param_counts(s, plan.ctx)["params"]):
        pc = param_counts(s, plan.ctx)
        b = budget(plan, pc["params"])
        epochs = b["tokens"] / corpus.train.numel()
        if epochs > plan.max_epochs:
            raise ValueError(f"size {s} ({pc['params']:,} params) would see {b['tokens']:,} tokens = {epochs:.1f} "
                             f"epochs of the {corpus.train.numel():,}-byte training split (> {plan.max_epochs:g}); "
                             f"enlarge the corpus (experiments/data.py) or lower --tokens-per-param")
        sizes[s] = {**pc, **b, "label": size_label(pc["params"]), "epochs": epochs, "recipes": recipes_for(plan, s),
                    "seeds": seeds_for(plan, s), "lr": None, "sweep": [], "lr_at_edge": False}
    base = {"plan": plan.to_json(), "out": str(out), "checkpoint_s": args.checkpoint_s, "threads": args.threads}

    def job(kind, s, recipe, seed, lr, steps):
        return {**base, "kind": kind, "size": s, "recipe": recipe, "seed": seed, "lr": lr, "steps": steps,
                "params": sizes[s]["params"]}

    planned_main = sum(len(v["recipes"]) * len(v["seeds"]) for v in sizes.values())
    sweep_steps = {s: budget(plan, v["params"], plan.sweep_fraction)["steps"] for s, v in sizes.items()}
    grid = {s: sorted(plan.lr_grid) for s in sizes}
    progress = Progress()
    for s, v in sizes.items():  # every planned unit, for the time-left estimate (main units by name)
        for lr in grid[s]:
            progress.add(job("sweep", s, "fp32", 0, lr, sweep_steps[s]))
        for seed in v["seeds"]:
            for r in v["recipes"]:
                progress.add(job("main", s, r, seed, 0.0, v["steps"]))
    sweep_recs, computed = [], 0
    # 1. learning-rate sweep per size (FP32, seed 0, reduced budget), extended while the best is at an edge
    for ext in range(plan.max_grid_extensions + 1):
        jobs = [job("sweep", s, "fp32", 0, lr, sweep_steps[s]) for s in sizes for lr in grid[s]
                if not any(r["size"] == s and r["lr"] == lr for r in sweep_recs)]
        for j in jobs:
            progress.add(j)
        recs = [_cached_only(j) for j in jobs] if args.report_only else run_units(jobs, args.workers, progress)
        sweep_recs += [r for r in recs if r]
        computed += sum(1 for r in recs if r and not r.get("cached"))
        grown = False
        for s in sizes:
            pts = sorted((r for r in sweep_recs if r["size"] == s), key=lambda r: r["lr"])
            if len(pts) < len(grid[s]):
                continue
            best = min(pts, key=lambda r: r["final_val_loss"])
            at_edge = best["lr"] in (pts[0]["lr"], pts[-1]["lr"])
            if at_edge and ext < plan.max_grid_extensions:
                grid[s].append(best["lr"] * 2 if best["lr"] == pts[-1]["lr"] else best["lr"] / 2)
                grid[s].sort()
                grown = True
        if not grown:
            break
    for s, v in sizes.items():
        pts = sorted((r for r in sweep_recs if r["size"] == s), key=lambda r: r["lr"])
        v["sweep"] = [{"lr": r["lr"], "val": r["final_val_loss"], "steps": r["steps"]} for r in pts]
        if len(pts) == len(grid[s]) and pts:
            best = min(pts, key=lambda r: r["final_val_loss"])
            v["lr"], v["lr_at_edge"] = best["lr"], best["lr"] in (pts[0]["lr"], pts[-1]["lr"])
    # 2. main units: the core recipes at seeds 0-1 of every size first (smallest first), then the rest
    main_jobs = [job("main", s, r, seed, v["lr"], v["steps"]) for s, v in sizes.items() if v["lr"] is not None
                 for seed in v["seeds"] for r in v["recipes"]]
    main_jobs.sort(key=lambda j: (not (j["recipe"] in CORE_RECIPES and j["seed"] < 2), j["recipe"] in ("mx9", "mx6")))
    recs = [_cached_only(j) for j in main_jobs] if args.report_only else run_units(main_jobs, args.workers, progress)
    units = [r for r in recs if r]
    computed += sum(1 for r in recs if r and not r.get("cached"))
    names = {unit_name("main", j["size"], j["recipe"], j["seed"], j["lr"], j["steps"]) for j in main_jobs}
    have = {unit_name("main", u["size"], u["recipe"], u["seed"], u["lr"], u["steps"]) for u in units}
    missing = sorted(names - have) + [f"{s} (all: no learning rate yet)" for s, v in sizes.items() if v["lr"] is None]
    # 3. diagnostics at the largest size: trained with --diagnostics, reported whenever cached
    big_s = list(sizes)[-1]
    diag_jobs = [job("main", s, r, seed, sizes[s]["lr"] * (0.5 if r.endswith(HALF_LR) else 1.0), sizes[s]["steps"])
                 for s, r, seed in ((s or big_s, r, seed) for s, r, seed in DIAGNOSTICS)
                 if s in sizes and sizes[s]["lr"] is not None]
    if args.diagnostics and not args.report_only:
        for j in diag_jobs:
            progress.add(j)
        drecs = run_units(diag_jobs, args.workers, progress)
        computed += sum(1 for r in drecs if not r.get("cached"))
    else:
        drecs = [r for r in (_cached_only(j) for j in diag_jobs) if r]
    diagnostics = []
    for d in drecs:
        planned = {u["recipe"]: u["final_val_loss"] for u in units if u["size"] == d["size"] and u["seed"] == d["seed"]}
        paired = {u["recipe"]: u["final_val_loss"] for u in units + drecs
                  if u["size"] == d["size"] and u["seed"] == d["seed"]}
        base = split_recipe(d["recipe"])[0]
        if d["recipe"].endswith(HALF_LR):  # paired with the FP32 unit at the same (halved) learning rate
            paired["fp32"] = paired.get("fp32" + HALF_LR)
            if base == "fp32":
                paired["fp32"] = None
            paired = {k: v for k, v in paired.items() if v is not None}
        diagnostics.append({**{k: d[k] for k in ("size", "recipe", "seed", "lr", "steps", "final_val_loss", "val_tokens",
                                                 "val_loss", "wall_s", "cpu_s", "params", "tokens_seen")},
                            "gap_to_fp32": d["final_val_loss"] - paired["fp32"] if "fp32" in paired else None,
                            "full_recipe": base,
                            "full_recipe_gap": (planned[base] - planned["fp32"]) if base in planned and "fp32" in planned
                            and base != "fp32" else None})
    order = list(sizes)
    units.sort(key=lambda u: (order.index(u["size"]), u["seed"], list(CORE_RECIPES + EXTRA_RECIPES).index(u["recipe"])))
    rows = summarize(units, sizes)
    fp32 = [u for u in units if u["recipe"] == "fp32"]
    flat = {s: [flattening(u) for u in fp32 if u["size"] == s] for s in sizes}
    checks = {"all_reached_budget": all(u["tokens_seen"] >= sizes[u["size"]]["token_budget"] for u in units),
              "diverged": [unit_name("main", u["size"], u["recipe"], u["seed"], u["lr"], u["steps"]) for u in units if u["diverged"]],
              "unstable": {unit_name("main", u["size"], u["recipe"], u["seed"], u["lr"], u["steps"]): val_rise(u) for u in units
                           if val_rise(u) > RISE_LIMIT},
              "spikes": {unit_name("main", u["size"], u["recipe"], u["seed"], u["lr"], u["steps"]): spike(u)
                         for u in units + drecs if val_rise(u) > RISE_LIMIT},
              "fp32_last10pct_improvement": {s: v for s, v in flat.items() if v},
              "fp32_last10pct_se": {s: [u["last10pct"]["se_rel"] for u in fp32 if u["size"] == s and "last10pct" in u]
                                    for s in sizes if any(u["size"] == s for u in fp32)},
              "fp32_flat": bool(fp32) and all(v < 0.02 for vals in flat.values() for v in vals)}
    for u in units:
        u["gap_to_fp32"] = next((u["final_val_loss"] - b["final_val_loss"] for b in fp32
                                 if b["size"] == u["size"] and b["seed"] == u["seed"]), None)
    # previous invocations of the same plan (a resumed run adds up; a run at another plan does not)
    prev = read_json(out / "train_scale.json") if (out / "train_scale.json").exists() else {}
    plan_js = json.loads(json.dumps(plan.to_json()))
    invocations = [i for i in prev.get("run", {}).get("invocations", []) if i.get("plan") == plan_js]
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    this = {"finished_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu + ru.ru_utime + ru.ru_stime,
            "units_computed": computed, "workers": args.workers, "nice": os.nice(0), "plan": plan_js}
    if computed:
        invocations.append(this)
    all_units = units + sweep_recs + drecs
    largest = max(v["params"] for v in sizes.values())
    ratios = [u["cpu_s"] / b["cpu_s"] for u in units for b in fp32 if u["recipe"] in ("mxfp6", "mxfp4-w+mxfp6")
              and b["size"] == u["size"] and b["seed"] == u["seed"]]
    mx_ratio = statistics.median(ratios) if ratios else None
    big_fp32 = [u["cpu_s"] / u["tokens_seen"] / u["params"] for u in fp32 if u["params"] == largest]
    n1m = 1_000_000
    tok1m = budget(plan, n1m)["tokens"]
    js = {"plan": plan.to_json(), "environment": environment(), "corpus": corpus.summary(),
          "command": _command(_argv_for_resume(argv)), "sizes": sizes,
          "n_units_planned": planned_main, "n_units_done": len(all_units), "n_sweep_units": len(sweep_recs),
          "missing_units": missing, "units": units, "sweep_units": sweep_recs, "diagnostics": diagnostics, "summary": rows, "fits": fits(rows),
          "factors": factor_comparisons(units, diagnostics),
          "budget_note": BUDGET_NOTE if plan.name == "full" and plan.tokens_per_param == 20 else None,
          "checks": checks,
          "run": {"unit_wall_s": sum(u["wall_s"] for u in all_units), "unit_cpu_s": sum(u["cpu_s"] for u in all_units),
                  "invocations": invocations, "invocations_wall_s": sum(i["wall_s"] for i in invocations),
                  "invocations_cpu_s": sum(i["cpu_s"] for i in invocations),
                  "workers_used": max([i["workers"] for i in invocations] or [args.workers]), "this_invocation": this},
          "gpu_scale": {"ours_largest": largest, "ratio_to_paper_20M": 20e6 / largest, "tokens_1M": tok1m,
                        "epochs_1M": tok1m / corpus.train.numel(),
                        "mx_cpu_ratio": mx_ratio,
                        "cpu_s_1M_core": (2 * tok1m * n1m * statistics.fmean(big_fp32) * (1 + 2 * mx_ratio)
                                          if big_fp32 and mx_ratio else None),
                        **gpu_estimate()}}
    write_json(out / "train_scale.json", js)
    def img(name):
        return name
    (out / "train_scale.md").write_text(section(js, img))
    plot_gap(rows, out / "train_scale_gap.png")
    plot_curves(units, sizes, out / "train_scale_curves.png")
    print(markdown_table(["model", "recipe", "seeds", "final val loss", "gap to FP32"],
                         [[r["label"], r["recipe"], len(r["seeds"]), f"{r['mean']:.4f}",
                           "—" if r["gap_mean"] is None or r["recipe"] == "fp32" else f"{r['gap_mean']:+.4f}"]
                          for r in rows]))
    if missing:
        print(f"missing units ({len(missing)}): {', '.join(missing)}")
    if out == RESULTS:
        # report imports this module (section 4), so the page is refreshed by its own command, not from here
        print("docs/results.md: refresh with `python -m experiments.report` (python -m experiments.all does it)")
    return js


def _argv_for_resume(argv) -> list[str]:
    a = list(sys.argv[1:] if argv is None else argv)
    return [x for x in a if x != "--report-only"]


if __name__ == "__main__":
    main()

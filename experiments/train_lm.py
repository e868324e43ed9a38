"""Train the byte-level GPTs under FP32 and MX training recipes (MX paper, GPT training experiment).

Every recipe starts from the same initial weights and sees the same batches for a given seed (paired
runs), so the gap to FP32 measures the recipe, not the draw. Writes results/train_lm.{json,md} and
results/train_lm_<model>.png, and the FP32 checkpoints used by direct_cast.py and ptq.py.

    python -m experiments.train_lm [--quick] [--recipes fp32 mxfp6 ...] [--models gpt-0.2M ...]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import torch
from tqdm import tqdm

from . import mx
from .common import (Timer, add_common_args, environment, markdown_table, model_bytes, pm, read_json, setup,
                     write_json)
from .data import batch_windows, load_corpus, train_starts
from .lm import build_gpt, checkpoint_path, lr_at, save_gpt, val_loss
from .models import n_params


def train_one(preset, size_kwargs, steps, recipe_label, seed, corpus, desc=""):
    """Train one GPT; returns its record (curves, final val loss, wall time) and the model."""
    model = build_gpt(size_kwargs, seed)
    model = mx.quantized(model, mx.training_recipe(recipe_label), inference=False, copy_model=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ctx = size_kwargs["ctx"]
    starts = train_starts(corpus.train, ctx, preset.batch, steps, seed)
    rec = {"recipe": recipe_label, "seed": seed, "steps": steps, "train_loss": [], "val_steps": [],
           "val_loss": []}
    with Timer() as t:
        bar = tqdm(range(steps), desc=desc, leave=False, mininterval=2.0, disable=not desc)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, preset.lr, preset.warmup)
            x, y = batch_windows(corpus.train, starts[step], ctx)
            loss = model(x, y)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            rec["train_loss"].append(loss.item())
            if (step + 1) % preset.eval_every == 0 or step + 1 == steps:
                rec["val_steps"].append(step + 1)
                rec["val_loss"].append(val_loss(model, corpus, ctx, preset.val_windows))
                bar.set_postfix(val=f"{rec['val_loss'][-1]:.3f}")
    rec["final_val_loss"] = rec["val_loss"][-1]
    rec["wall_s"] = t.seconds
    if any(v != v for v in rec["train_loss"]):
        rec["diverged"] = True
    return rec, model


def summarize(runs: list[dict]) -> list[dict]:
    """Per (model, recipe): final val loss mean and half-range over seeds, paired gap to FP32."""
    rows = []
    for model_name in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model_name]
        base = {r["seed"]: r["final_val_loss"] for r in mine if r["recipe"] == "fp32"}
        for recipe in dict.fromkeys(r["recipe"] for r in mine):
            rs = [r for r in mine if r["recipe"] == recipe]
            vals = [r["final_val_loss"] for r in rs]
            gaps = [r["final_val_loss"] - base[r["seed"]] for r in rs if r["seed"] in base]
            rows.append({"model": model_name, "recipe": recipe, "n_seeds": len(rs),
                         "bits_w": rs[0]["bits"]["weight"], "bits_a": rs[0]["bits"]["activation"],
                         "final_val_loss": vals, "mean": statistics.fmean(vals),
                         "half_range": (max(vals) - min(vals)) / 2,
                         "gap": gaps, "gap_mean": statistics.fmean(gaps) if gaps else None,
                         "gap_half_range": (max(gaps) - min(gaps)) / 2 if gaps else None,
                         "wall_s_mean": statistics.fmean(r["wall_s"] for r in rs)})
    return rows


def table(rows: list[dict]) -> str:
    body = [[r["model"], r["recipe"], f"{r['bits_w']:g} / {r['bits_a']:g}", r["n_seeds"],
             pm(r["mean"], r["half_range"]),
             ("—" if r["recipe"] == "fp32" else f"{r['gap_mean']:+.3f} ± {r['gap_half_range']:.3f}"),
             " / ".join(f"{v:.3f}" for v in r["final_val_loss"]), f"{r['wall_s_mean']:.0f}"]
            for r in rows]
    return markdown_table(["model", "recipe", "bits W / A", "seeds", "final val loss (mean ± half-range)",
                           "gap to FP32 (paired)", "per seed", "wall s/run"], body)


def recipe_bits(label: str) -> dict:
    from .common import bits_per_element
    w, a = mx.recipe_formats(label)
    return {"weight": bits_per_element(w), "activation": bits_per_element(a)}


def plot(runs: list[dict], model_name: str, path) -> None:
    """Left: training loss (running mean), first seed. Right: validation loss minus the same seed's FP32
    run at each evaluation (the paired gap), per seed (thin) and averaged (thick)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mine = [r for r in runs if r["model"] == model_name]
    seeds = sorted({r["seed"] for r in mine})
    base = {r["seed"]: r for r in mine if r["recipe"] == "fp32"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, recipe in enumerate(dict.fromkeys(r["recipe"] for r in mine)):
        c = f"C{i}"
        rs = [r for r in mine if r["recipe"] == recipe]
        first = next(r for r in rs if r["seed"] == seeds[0])
        tl = torch.tensor(first["train_loss"])
        k = max(1, len(tl) // 30)
        smooth = torch.nn.functional.avg_pool1d(tl[None, None], k, stride=1)[0, 0]
        ax1.plot(range(k, len(tl) + 1), smooth, color=c, lw=1, label=recipe)
        gaps = [[v - b for v, b in zip(r["val_loss"], base[r["seed"]]["val_loss"])] for r in rs if r["seed"] in base]
        for g in gaps:
            ax2.plot(rs[0]["val_steps"], g, color=c, lw=0.6, alpha=0.5)
        ax2.plot(rs[0]["val_steps"], torch.tensor(gaps).mean(0), "o-", color=c, ms=3, lw=1.8, label=recipe)
    ax1.set(title=f"{model_name}: training loss (running mean, seed {seeds[0]})", xlabel="step",
            ylabel="nats / byte")
    ax1.set_ylim(top=float(torch.tensor(mine[0]["train_loss"][len(mine[0]["train_loss"]) // 10:]).max()))
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(title=f"{model_name}: validation loss − FP32 (paired; thin: each seed)", xlabel="step",
            ylabel="Δ nats / byte")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_key(preset, model_name: str, recipe: str, seed: int) -> dict:
    """Everything that determines a training run; a cached run is reused only when this matches."""
    return {"model": model_name, "config": preset.gpt_sizes[model_name], "steps": preset.train_steps[model_name],
            "recipe": recipe, "seed": seed, "batch": preset.batch, "lr": preset.lr, "warmup": preset.warmup,
            "eval_every": preset.eval_every, "val_windows": preset.val_windows}


def run_job(job: dict) -> dict:
    """Train one (model, recipe, seed), or reuse its cached record; in a worker process or inline."""
    from .common import PRESETS
    preset, out = PRESETS[job["preset"]], pathlib.Path(job["out"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    name, recipe, seed = job["model"], job["recipe"], job["seed"]
    key = run_key(preset, name, recipe, seed)
    cache = out / "runs" / f"{name}_{recipe}_s{seed}.json"
    ckpt = checkpoint_path(out, name, seed)
    if not job.get("fresh") and cache.exists() and (recipe != "fp32" or ckpt.exists()):
        rec = read_json(cache)
        if rec.get("key") == key:
            rec["cached"] = True
            return rec
    kw = preset.gpt_sizes[name]
    rec, model = train_one(preset, kw, preset.train_steps[name], recipe, seed, load_corpus(),
                           desc="" if job.get("threads") else f"{name} {recipe} s{seed}")
    rec.update(model=name, params=n_params(build_gpt(kw, seed)), bits=recipe_bits(recipe), key=key,
               environment=environment())
    if recipe == "fp32":
        save_gpt(model, ckpt)
    cache.parent.mkdir(exist_ok=True)
    write_json(cache, rec)
    return rec


def run_jobs(jobs: list[dict], n_workers: int) -> list[dict]:
    """Run training jobs inline (1 worker) or in spawned single-thread worker processes; keeps job order."""
    done = {}
    if n_workers <= 1:
        for i, job in enumerate(jobs):
            done[i] = run_job(job)
            _report(done[i])
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, {**job, "threads": 1}): i for i, job in enumerate(jobs)}
            for f in tqdm(cf.as_completed(futures), total=len(futures), desc="training runs"):
                done[futures[f]] = f.result()
                _report(done[futures[f]])
    return [done[i] for i in range(len(jobs))]


def _report(rec: dict) -> None:
    tqdm.write(f"{rec['model']:9s} {rec['recipe']:14s} seed {rec['seed']}: val {rec['final_val_loss']:.4f} "
               f"({rec['wall_s']:.0f} s{', cached' if rec.get('cached') else ''})")


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--recipes", nargs="*", default=None, help="subset of " + ", ".join(mx.TRAIN_RECIPES))
    p.add_argument("--models", nargs="*", default=None, help="subset of the preset's GPT sizes")
    args = p.parse_args(argv)
    preset, out = setup(args)
    corpus = load_corpus()
    models = args.models or list(preset.gpt_sizes)
    recipes_of = {m: [r for r in (args.recipes or mx.TRAIN_RECIPES) if r in preset.recipes_for(m)]
                  for m in models}
    skipped = {m: [r for r in mx.TRAIN_RECIPES if r not in recipes_of[m]] for m in models}
    # FP32 first (the baselines and checkpoints), then the MX recipes, the slow BDR recipes last.
    jobs = [{"preset": preset.name, "out": str(out), "model": m, "recipe": r, "seed": s, "fresh": args.fresh}
            for m in models for r in recipes_of[m] for s in preset.seeds]
    jobs.sort(key=lambda j: (j["recipe"] != "fp32", j["recipe"] in mx.BDR_TRAIN_RECIPES))
    with Timer() as total:
        runs = run_jobs(jobs, args.jobs)
    runs.sort(key=lambda r: (models.index(r["model"]), r["seed"], mx.TRAIN_RECIPES.index(r["recipe"])))
    rows = summarize(runs)
    for r in rows:  # storage of the trained model: Linear weights in the recipe's weight format
        w_fmt = mx.recipe_formats(r["recipe"])[0]
        r["model_bytes"] = model_bytes(build_gpt(preset.gpt_sizes[r["model"]], 0), None if w_fmt == "none" else w_fmt)
    result = {"preset": preset.name, "environment": environment(), "corpus": corpus.summary(),
              "models": {m: {"config": preset.gpt_sizes[m], "params": next(r["params"] for r in runs
                                                                            if r["model"] == m),
                             "steps": preset.train_steps[m]} for m in models},
              "hyperparameters": {"batch": preset.batch, "lr": preset.lr, "warmup": preset.warmup,
                                  "schedule": "linear warmup, cosine to 0.1 lr", "optimizer":
                                  "AdamW(0.9, 0.95), wd 0.1, clip 1.0", "val_windows": preset.val_windows},
              "recipes": recipes_of, "skipped_recipes": skipped, "runs": runs, "summary": rows,
              "wall_s": total.seconds, "compute_s": sum(r["wall_s"] for r in runs)}
    write_json(out / "train_lm.json", result)
    (out / "train_lm.md").write_text(table(rows))
    for m in models:
        plot(runs, m, out / f"train_lm_{m}.png")
    print(table(rows))
    return result


if __name__ == "__main__":
    main()

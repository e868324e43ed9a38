"""Recovering direct-cast losses: error-diffusion PTQ and short quantization-aware finetuning (MX paper
§6.2; the paper finds MXFP6 E2M3 ≈ FP32 after finetuning and E2M3 better than E3M2 for inference).

For each FP32 model and each of MXFP6 E2M3, MXFP6 E3M2 and MXFP4 (weights and activations in the format):
- direct cast (no data),
- error diffusion (``microscale.ptq``, GPTQ-style, Hessians from a small calibration set,
  layers in order, each seeing the already-quantized earlier layers),
- QAT: ``qat_steps`` AdamW steps from the FP32 weights with the model quantized by
  ``microscale.nn.quantize_model`` (weights and activations in the format in every pass, output gradients
  unquantized, straight-through rounding), then evaluated as a direct cast of the finetuned weights,
- a control: the same finetuning in FP32, since extra steps alone may lower the loss of a small model.
share = (direct − method) / (direct − FP32) on the loss (validation loss for the GPTs, test loss for digits).

Writes results/ptq.{json,md} and results/ptq.png.

    python -m experiments.ptq [--quick] [--formats mxfp6_e2m3 ...]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn as nn
from tqdm import tqdm

import microscale as ms

from . import mx
from .common import Timer, add_common_args, cached, environment, markdown_table, setup, write_json
from microscale.ptq import error_diffusion_model
from .lm import lr_at

PTQ_FORMATS = ("mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1")
METHODS = ("direct", "error_diffusion", "qat")


def finetune(model: nn.Module, tm, fmt: str | None, steps: int, lr: float, seed: int) -> nn.Module:
    """``steps`` AdamW steps on a copy of ``model``: quantization-aware in ``fmt`` (None: FP32 control).
    Returns plain FP32 modules holding the finetuned master weights."""
    q = mx.quantized(model, None if fmt is None else mx.qat_recipe(fmt), inference=False)
    q.train()
    opt = torch.optim.AdamW(q.parameters(), lr=lr, weight_decay=0.0)
    for step, (x, y) in enumerate(tm.finetune_batches(steps, seed)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10), floor=0.0)
        loss = tm.loss_fn(q, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(q.parameters(), 1.0)
        opt.step()
    return (mx.dequantized(q) if fmt is not None else q).eval()


def evaluate_in(tm, model: nn.Module, fmt: str | None) -> dict:
    q, _ = mx.inference_model(model, fmt)
    return tm.evaluate(q)


def run_model(tm, preset, formats) -> list[dict]:
    """All methods for one trained model; one record per format (plus the FP32 references)."""
    model = tm.load()
    calib = tm.calibration(preset.calib_batches)
    with Timer() as t:
        fp32 = tm.evaluate(model)
    with Timer() as tc:
        control = evaluate_in(tm, finetune(model, tm, None, preset.qat_steps, preset.qat_lr, tm.seed), None)
    recs = []
    for fmt in formats:
        rec = {"model": tm.name, "seed": tm.seed, "format": fmt,
               "bits_per_element": ms.get_format(fmt).bits_per_element,
               "fp32": fp32, "fp32_finetuned_control": control, "wall_s": {"fp32_finetune": tc.seconds}}
        with Timer() as t:
            rec["direct"] = evaluate_in(tm, model, fmt)
        rec["wall_s"]["direct"] = t.seconds
        with Timer() as t:
            ed_model, rec["layers"] = error_diffusion_model(model, calib, fmt)
            rec["error_diffusion"] = evaluate_in(tm, ed_model, fmt)
        rec["wall_s"]["error_diffusion"] = t.seconds
        with Timer() as t:
            rec["qat"] = evaluate_in(tm, finetune(model, tm, fmt, preset.qat_steps, preset.qat_lr, tm.seed), fmt)
        rec["wall_s"]["qat"] = t.seconds
        for m in ("error_diffusion", "qat"):
            rec[f"share_{m}"] = recovered_share(fp32[_loss_key(tm)], rec["direct"][_loss_key(tm)],
                                                rec[m][_loss_key(tm)])
        recs.append(rec)
    return recs


#: A share is computed only where direct cast is worse than FP32 by at least this fraction of the FP32
#: loss; below it direct cast already matches FP32 and a ratio of two tiny differences is noise.
MIN_GAP_REL = 1e-3


def recovered_share(fp32: float, direct: float, method: float) -> float | None:
    """(direct − method) / (direct − FP32): the share of the direct-cast loss gap a method recovers;
    None when direct cast is within MIN_GAP_REL of FP32 (no gap to recover)."""
    gap = direct - fp32
    return (direct - method) / gap if gap >= MIN_GAP_REL * abs(fp32) else None


def _loss_key(tm_or_name) -> str:
    kind = getattr(tm_or_name, "kind", None)
    name = tm_or_name if isinstance(tm_or_name, str) else tm_or_name.name
    return "loss" if kind == "digits" or name.startswith("digits") else "val_loss"


def summarize(recs: list[dict]) -> list[dict]:
    """Mean over seeds per (model, format): losses of each method, shares of the gap recovered."""
    rows = []
    for (name, fmt) in dict.fromkeys((r["model"], r["format"]) for r in recs):
        rs = [r for r in recs if r["model"] == name and r["format"] == fmt]
        k = _loss_key(name)
        row = {"model": name, "format": fmt, "n_seeds": len(rs), "bits_per_element": rs[0]["bits_per_element"],
               "loss_key": k}
        for m in ("fp32", "fp32_finetuned_control") + METHODS:
            row[m] = statistics.fmean(r[m][k] for r in rs)
            if "accuracy" in rs[0][m]:
                row[m + "_accuracy"] = statistics.fmean(r[m]["accuracy"] for r in rs)
        for m in ("error_diffusion", "qat"):  # share of the seed-mean gap; per seed where a seed has a gap
            row[f"share_{m}"] = recovered_share(row["fp32"], row["direct"], row[m])
            row[f"share_{m}_per_seed"] = [recovered_share(r["fp32"][k], r["direct"][k], r[m][k]) for r in rs]
        row["wall_s"] = {m: statistics.fmean(r["wall_s"][m] for r in rs) for m in rs[0]["wall_s"]}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def share(r, m):
        v = r[f"share_{m}"]
        per = ", ".join("n/a" if s is None else f"{s:.2f}" for s in r[f"share_{m}_per_seed"])
        return "— (no gap)" if v is None else f"{100 * v:.0f}% ({per})"

    body = []
    for r in rows:
        acc = "accuracy" if "direct_accuracy" in r else None
        cell = (lambda m: f"{r[m]:.4f}" + (f" / {100 * r[m + '_accuracy']:.1f}%" if acc else ""))
        body.append([r["model"], r["format"], f"{r['bits_per_element']:.2f}", cell("fp32"), cell("direct"),
                     cell("error_diffusion"), cell("qat"), share(r, "error_diffusion"), share(r, "qat"),
                     cell("fp32_finetuned_control"),
                     f"{r['wall_s']['error_diffusion']:.0f} / {r['wall_s']['qat']:.0f}"])
    return markdown_table(["model", "format", "bits/elem", "FP32", "direct cast", "error diffusion", "QAT",
                           "ED share", "QAT share (per seed)", "FP32 + same finetune (control)",
                           "wall s ED / QAT"], body)


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["model"] == name]
        xs = range(len(mine))
        bars = METHODS + ("fp32_finetuned_control",)
        for i, m in enumerate(bars):
            ax.bar([x + (i - 1.5) * 0.2 for x in xs], [r[m] - r["fp32"] for r in mine], width=0.2,
                   label=m.replace("fp32_finetuned_control", "FP32 + same finetune"),
                   color="0.6" if m.startswith("fp32") else None)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [r["format"].replace("mxfp", "fp") for r in mine], fontsize=8)
        ax.set(title=f"{name}", ylabel=f"{mine[0]['loss_key']} − FP32")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--formats", nargs="*", default=list(PTQ_FORMATS), help="MX formats to recover")
    args = p.parse_args(argv)
    preset, out = setup(args)
    from .zoo import trained_models
    recs = []
    with Timer() as total:
        for tm in tqdm(trained_models(preset, out), desc="ptq: models"):
            key = tm.cache_key(formats=args.formats, calib_batches=preset.calib_batches, qat_steps=preset.qat_steps,
                               qat_lr=preset.qat_lr, val_windows=preset.val_windows, batch=preset.batch)
            recs += cached(out, f"ptq_{tm.name}_s{tm.seed}", key, lambda tm=tm: run_model(tm, preset, args.formats),
                           args.fresh)
            for r in recs[-len(args.formats):]:
                k = _loss_key(tm)
                tqdm.write(f"{tm.name} s{tm.seed} {r['format']}: fp32 {r['fp32'][k]:.4f} direct {r['direct'][k]:.4f}"
                           f" ED {r['error_diffusion'][k]:.4f} QAT {r['qat'][k]:.4f}")
    rows = summarize(recs)
    write_json(out / "ptq.json", {"preset": preset.name, "environment": environment(), "formats": args.formats,
                                  "calibration_batches": preset.calib_batches, "qat_steps": preset.qat_steps,
                                  "qat_lr": preset.qat_lr, "damp": 0.01, "min_gap_rel": MIN_GAP_REL,
                                  "records": recs, "summary": rows,
                                  "wall_s": total.seconds})
    (out / "ptq.md").write_text(table(rows))
    plot(rows, out / "ptq.png")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()

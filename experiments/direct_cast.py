"""Direct-cast inference: every FP32 model evaluated with its Linear weights and activations (and
attention operands) cast to each format, no calibration, no training (MX paper §6.1).

Writes results/direct_cast.{json,md} and results/direct_cast.png.

    python -m experiments.direct_cast [--quick] [--formats mxint8 mxfp4_e2m1 ...]
"""

from __future__ import annotations

import argparse
import statistics

from tqdm import tqdm

from . import mx
from .common import (BDR_FORMATS, DIRECT_CAST_FORMATS, Timer, add_common_args, bits_per_element, cached,
                     environment, markdown_table, model_bytes, setup, write_json)
from .zoo import trained_models


def cast_and_evaluate(tm, model, fmt: str) -> dict:
    """One (model, format) point: metrics of the direct-cast model, its stored bytes, wall time."""
    with Timer() as t:
        q, packed = mx.inference_model(model, None if fmt == "fp32" else fmt)
        metrics = tm.evaluate(q)
    return {"model": tm.name, "seed": tm.seed, "format": fmt,
            "bits_per_element": 32.0 if fmt == "fp32" else bits_per_element(fmt),
            "model_bytes": model_bytes(model, None if fmt == "fp32" else fmt), "packed": packed,
            **metrics, "wall_s": t.seconds}


def summarize(points: list[dict], models) -> list[dict]:
    """Mean over seeds per (model, format), and the relative change of each metric vs FP32."""
    rows = []
    kinds = {tm.name: tm for tm in models}
    for name in dict.fromkeys(p["model"] for p in points):
        mine = [p for p in points if p["model"] == name]
        metric_keys = [k for k in ("val_loss", "accuracy", "loss") if k in mine[0]]
        base = {k: statistics.fmean(p[k] for p in mine if p["format"] == "fp32") for k in metric_keys}
        for fmt in dict.fromkeys(p["format"] for p in mine):
            ps = [p for p in mine if p["format"] == fmt]
            row = {"model": name, "format": fmt, "n_seeds": len(ps),
                   "bits_per_element": ps[0]["bits_per_element"], "model_bytes": ps[0]["model_bytes"],
                   "primary": kinds[name].metric, "higher_is_better": kinds[name].higher_is_better,
                   "packed": ps[0]["packed"], "wall_s": statistics.fmean(p["wall_s"] for p in ps)}
            for k in metric_keys:
                vals = [p[k] for p in ps]
                row[k] = statistics.fmean(vals)
                row[k + "_half_range"] = (max(vals) - min(vals)) / 2
                row[k + "_rel"] = (row[k] - base[k]) / base[k]
            rows.append(row)
    return rows


def tables(rows: list[dict]) -> str:
    """One markdown table per model: format, bits, bytes, metric(s) with relative change."""
    parts = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        keys = [k for k in ("val_loss", "accuracy", "loss") if k in mine[0]]
        header = ["format", "bits/elem", "model bytes"] + [f"{k} (Δ rel)" for k in keys]
        body = [[r["format"], f"{r['bits_per_element']:.2f}", f"{r['model_bytes']:,}"]
                + [f"{r[k]:.4f} ± {r[k + '_half_range']:.4f} ({100 * r[k + '_rel']:+.2f}%)" for k in keys]
                for r in mine]
        parts.append(f"**{name}** (mean ± half-range over {mine[0]['n_seeds']} seeds)\n\n"
                     + markdown_table(header, body))
    return "\n".join(parts)


def plot(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["model"] == name and r["format"] != "fp32"]
        key = "val_loss" if "val_loss" in mine[0] else "loss"  # losses: accuracy moves in coarse steps
        ax.axhline(0, color="k", lw=0.8)
        for r in mine:
            ax.scatter(r["bits_per_element"], 100 * r[key + "_rel"], s=18)
            ax.annotate(r["format"], (r["bits_per_element"], 100 * r[key + "_rel"]), fontsize=7,
                        xytext=(3, 2), textcoords="offset points")
        ax.set(title=f"{name}: direct cast", xlabel="bits / element", ylabel=f"{key}: % change vs FP32")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--formats", nargs="*", default=None, help="formats to cast to (default: every MX format, "
                   "then mx9/mx6/mx4)")
    args = p.parse_args(argv)
    preset, out = setup(args)
    formats = ["fp32"] + list(args.formats or DIRECT_CAST_FORMATS + BDR_FORMATS)
    models = trained_models(preset, out)
    points = []
    with Timer() as total:
        for tm in tqdm(models, desc="direct cast: models", leave=False):
            def compute(tm=tm):
                model = tm.load()
                return [cast_and_evaluate(tm, model, fmt) for fmt in formats]
            key = tm.cache_key(formats=formats, val_windows=preset.val_windows)
            points += cached(out, f"direct_cast_{tm.name}_s{tm.seed}", key, compute, args.fresh)
    rows = summarize(points, models)
    write_json(out / "direct_cast.json", {"preset": preset.name, "environment": environment(),
                                          "formats": formats,
                                          "points": points, "summary": rows, "wall_s": total.seconds})
    (out / "direct_cast.md").write_text(tables(rows))
    plot(rows, out / "direct_cast.png")
    print(tables(rows))
    return rows


if __name__ == "__main__":
    main()

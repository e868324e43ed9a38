"""Time one training step (forward + backward + AdamW) of a small GPT: FP32 vs MX recipes.

Each row is the median (and the minimum, less sensitive to other load on a shared machine) wall time
of ``--steps`` steps after ``--warmup`` steps, on the same model, data and thread count; "x FP32"
divides by the FP32 row of the same run. Rows:

- ``fp32``: the plain model.
- one row per ``--recipes`` entry: ``microscale.nn.quantize_model(model, recipe)`` (Linear layers and the
  attention matmuls quantized), and with ``--linear-only`` also the same recipe with attention left in
  FP32 (``attention=None``), the like-for-like comparison with microxcaling's mx.Linear.
- with ``--microxcaling PATH`` (a local checkout of microsoft/microxcaling): every nn.Linear replaced by
  its ``mx.Linear`` with fp6_e3m2 (its MXFP6 default in the papers) everywhere, round "nearest",
  ``quantize_backprop`` on, CPU path. Nothing of that project is copied here.

Writes ``<out>.json`` and ``<out>.md`` (the markdown table) and prints the table.

    python benchmarks/training_step.py
    python benchmarks/training_step.py --microxcaling /tmp/microxcaling --linear-only
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

from microscale import nn as mnn
from microscale.nn.models import GPTConfig, TinyGPT

DEFAULT_RECIPES = ("mxfp8", "mxfp6", "mxfp4-w+mxfp6")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="recipe names (default: %(default)s)")
    p.add_argument("--linear-only", action="store_true", help="also time each recipe with attention in FP32")
    p.add_argument("--microxcaling", metavar="PATH", help="local checkout of microsoft/microxcaling to compare")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/training_step", help="output path stem")
    return p.parse_args(argv)


def microxcaling_model(model: nn.Module, path: str) -> nn.Module:
    """A copy of ``model`` with every nn.Linear replaced by microxcaling's mx.Linear (fp6_e3m2)."""
    sys.path.insert(0, str(pathlib.Path(path).resolve()))
    import mx  # noqa: PLC0415 — the user's local checkout

    specs = mx.finalize_mx_specs({"w_elem_format": "fp6_e3m2", "a_elem_format": "fp6_e3m2", "block_size": 32,
                                  "scale_bits": 8, "bfloat": 0, "round": "nearest", "custom_cuda": False,
                                  "quantize_backprop": True})
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = mx.Linear(child.in_features, child.out_features, bias=child.bias is not None, mx_specs=specs)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    return model


def time_steps(model: nn.Module, batches, warmup: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i, (x, y) in enumerate(batches[: warmup + steps]):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd)
    torch.manual_seed(0)
    base = TinyGPT(cfg)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, args.vocab, (args.batch, args.seq), generator=g),
                torch.randint(0, args.vocab, (args.batch, args.seq), generator=g))
               for _ in range(args.warmup + args.steps)]

    rows = [("fp32", "plain PyTorch", lambda: copy.deepcopy(base))]
    for r in args.recipes:
        rows.append((r, "microscale, Linear + attention", lambda r=r: mnn.quantize_model(copy.deepcopy(base), r)))
        if args.linear_only:
            rows.append((r, "microscale, Linear only",
                         lambda r=r: mnn.quantize_model(copy.deepcopy(base), r, attention=None)))
    if args.microxcaling:
        rows.append(("fp6_e3m2", "microxcaling mx.Linear", lambda: microxcaling_model(base, args.microxcaling)))

    try:
        from tqdm import tqdm
        it = tqdm(rows, desc="rows", file=sys.stderr)
    except ImportError:  # pragma: no cover
        it = rows
    results = []
    for recipe, impl, make in it:
        med, best = time_steps(make(), batches, args.warmup, args.steps)
        results.append({"recipe": recipe, "impl": impl, "step_s": med, "min_step_s": best})
    fp32, fp32_min = results[0]["step_s"], results[0]["min_step_s"]
    for r in results:
        r["x_fp32"] = r["step_s"] / fp32
        r["min_x_fp32"] = r["min_step_s"] / fp32_min

    n_params = sum(p.numel() for p in base.parameters())
    head = (f"TinyGPT n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} seq={args.seq} "
            f"batch={args.batch} vocab={args.vocab} ({n_params / 1e6:.2f}M params), {args.threads} thread(s), "
            f"median of {args.steps} steps, torch {torch.__version__}, {platform.machine()}")
    lines = [head, "", "| recipe | implementation | median step (ms) | x FP32 | min step (ms) | x FP32 (min) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['impl']} | {1e3 * r['step_s']:.1f} | {r['x_fp32']:.2f} | "
              f"{1e3 * r['min_step_s']:.1f} | {r['min_x_fp32']:.2f} |" for r in results]
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": vars(args), "header": head, "rows": results}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()

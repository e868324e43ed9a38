"""Regenerate every result of the MX reproduction with one command.

    python -m experiments.all            # full run: results/*.json|md|png and docs/results.md
    python -m experiments.all --quick    # smoke run of the same pipeline into results/quick/ (minutes)

Stages: train_digits, train_lm (FP32 and MX training recipes; cached per run in <out>/runs/ and reused
when the settings match, unless --fresh), direct_cast, ptq (error diffusion and QAT), train_scale (the
training gap vs model size; cached per unit, always resumed, hours on 2 cores when nothing is cached),
report.
"""

from __future__ import annotations

import argparse

from . import direct_cast, ptq, report, train_digits, train_lm, train_scale
from .common import Timer, add_common_args, environment, read_json, setup, write_json

STAGES = {"train_digits": train_digits.main, "train_lm": train_lm.main, "direct_cast": direct_cast.main,
          "ptq": ptq.main, "train_scale": train_scale.main, "report": report.main}


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    preset, out = setup(args)
    common = (["--quick"] if args.quick else []) + (["--out", str(args.out)] if args.out else []) \
        + (["--threads", str(args.threads)] if args.threads else [])
    extra = {"train_lm": ["--jobs", str(args.jobs)] + (["--fresh"] if args.fresh else []),
             "train_scale": ["--workers", str(args.jobs)]}
    walls, results = {}, {}
    previous = read_json(out / "all.json") if (out / "all.json").exists() else {}
    with Timer() as total:
        for name, fn in STAGES.items():
            if name == "report":  # the report reads all.json for the wall times: write it first
                write_json(out / "all.json", _record(preset, walls, sum(walls.values()), results, previous))
            print(f"== {name}", flush=True)
            with Timer() as t:
                results[name] = fn(common + extra.get(name, []))
            walls[name] = t.seconds
    write_json(out / "all.json", _record(preset, walls, total.seconds, results, previous))
    print(f"done in {total.seconds / 60:.1f} min; stage wall times: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))


def _record(preset, walls: dict, wall_s: float, results: dict, previous: dict) -> dict:
    """all.json: this invocation's wall times, and those of the last invocation that reused no cached
    training run (kept from ``previous`` when this one did reuse some)."""
    tr = results.get("train_lm") or {}
    cached_runs = sum(bool(r.get("cached")) for r in tr.get("runs", []))
    this = {"wall_s": wall_s, "stage_wall_s": dict(walls), "cached_training_runs": cached_runs}
    uncached = this if tr and not cached_runs else previous.get("last_uncached_run")
    return {"preset": preset.name, "environment": environment(), **this, "last_uncached_run": uncached}


if __name__ == "__main__":
    main()

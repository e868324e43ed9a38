"""Tests of experiments/train_scale.py (MX training gap vs model size): the --quick pipeline end to end
(JSON schema, paired-gap arithmetic, resume from cached units), the slope fit against a hand-computed
example, exact resume from a mid-unit checkpoint, and input checks. The published numbers are not tested.
"""

import json
import math
import pathlib
import statistics
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import train_scale as ts  # noqa: E402


def test_fit_slope_matches_hand_computation():
    # x = log10(params) = 3, 4, 5; y = 0.10, 0.08, 0.03: mean x 4, mean y 0.07, Sxy = -0.07, Sxx = 2
    f = ts.fit_slope([1e3, 1e4, 1e5], [0.10, 0.08, 0.03])
    assert f["slope"] == pytest.approx(-0.035) and f["intercept"] == pytest.approx(0.21)
    # residuals -0.005, +0.010, -0.005: RSS 1.5e-4, se = sqrt(1.5e-4 / 1 / 2); t(0.975, 1 df) = 12.7062
    se = math.sqrt(1.5e-4 / 2)
    assert f["se"] == pytest.approx(se)
    assert f["ci95"] == pytest.approx([-0.035 - 12.7062047 * se, -0.035 + 12.7062047 * se])


def test_fit_slope_degenerate_inputs():
    assert ts.fit_slope([1e3, 1e3], [0.1, 0.2])["slope"] is None
    two = ts.fit_slope([1e3, 1e5], [0.1, 0.0])
    assert two["slope"] == pytest.approx(-0.05) and two["ci95"] is None


def test_bootstrap_slope_without_seed_spread_is_the_slope():
    b = ts.bootstrap_slope({1e3: [0.1, 0.1], 1e5: [0.0, 0.0]}, n_boot=50)
    assert b["ci95"] == pytest.approx([-0.05, -0.05])
    wide = ts.bootstrap_slope({1e3: [0.0, 0.2], 1e5: [0.0, 0.0]}, n_boot=400)
    assert wide["ci95"][0] == pytest.approx(-0.1) and wide["ci95"][1] == pytest.approx(0.0)


def test_flattening_is_relative_improvement_over_last_tenth():
    rec = {"steps": 100, "val_steps": list(range(10, 101, 10)), "val_loss": [5, 4, 3, 2.8, 2.6, 2.5, 2.4, 2.3, 2.0, 1.96]}
    assert ts.flattening(rec) == pytest.approx(0.02)


def test_val_rise_is_largest_rise_above_running_minimum():
    assert ts.val_rise({"val_loss": [3.0, 2.5, 2.0, 1.9]}) == 0.0
    assert ts.val_rise({"val_loss": [3.0, 2.0, 2.3, 1.8, 2.4, 1.7]}) == pytest.approx(0.6)  # 2.4 - 1.8


def test_budget_rounds_up_to_whole_evaluation_intervals():
    plan = ts.Plan()
    b = ts.budget(plan, 20_960)  # 20 x 20,960 = 419,200 tokens / 1024 per step = 409.4 steps -> 420 (a multiple of 20)
    assert (b["token_budget"], b["steps"], b["tokens"]) == (419_200, 420, 420 * 1024)
    assert b["tokens"] >= b["token_budget"]


def test_param_counts_exclude_embeddings():
    c = ts.param_counts("32x1", 64)
    assert c["params_total"] - c["params"] == (256 + 64) * 32
    # one block: LN 2·2d, QKV d·3d + 3d, proj d² + d, MLP d·4d + 4d + 4d·d + d; final LN 2d; head 256·d
    d = 32
    assert c["params"] == 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d) + 2 * d + 256 * d


@pytest.mark.parametrize("bad", ["64", "64x", "48x2", "0x1", "64x0", "x2"])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError, match="size"):
        ts.parse_size(bad)


def test_plan_needs_an_evaluation_at_90_percent():
    with pytest.raises(ValueError, match="multiple of 10"):
        ts.Plan(n_evals=4)


def test_unit_resumes_exactly_from_a_mid_unit_checkpoint(tmp_path):
    plan = ts.QUICK_PLAN
    base = {"plan": plan.to_json(), "kind": "main", "size": "32x1", "recipe": "mxfp6", "seed": 0, "lr": 4e-3,
            "steps": 20}
    whole = ts.train_unit({**base, "out": str(tmp_path / "a")})
    assert ts.train_unit({**base, "out": str(tmp_path / "b"), "stop_after": 7}) == {"stopped_at": 7}
    assert list((tmp_path / "b" / "checkpoints").glob("*.pt"))
    resumed = ts.train_unit({**base, "out": str(tmp_path / "b")})
    assert resumed["resumed_from_step"] == 7
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["val_loss"] == whole["val_loss"] and resumed["train_loss"] == whole["train_loss"]
    assert not list((tmp_path / "b" / "checkpoints").glob("*.pt"))  # removed once the unit is done
    assert ts.train_unit({**base, "out": str(tmp_path / "b")})["cached"] is True


def test_corpus_guard_refuses_too_many_epochs(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        ts.main(["--quick", "--out", str(tmp_path), "--tokens-per-param", "1000"])


@pytest.mark.slow
def test_quick_pipeline_schema_gaps_and_resume(tmp_path):
    js = ts.main(["--quick", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "train_scale.json").read_text())
    assert on_disk["summary"] == js["summary"]
    for name in ("train_scale.md", "train_scale_gap.png", "train_scale_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    plan = ts.QUICK_PLAN
    assert not js["missing_units"]
    assert len(js["units"]) == js["n_units_planned"] == sum(len(v["recipes"]) * len(v["seeds"])
                                                            for v in js["sizes"].values())
    for u in js["units"]:
        for k in ("params", "params_total", "tokens_seen", "final_val_loss", "gap_to_fp32", "wall_s", "cpu_s", "lr"):
            assert k in u, k
        size = js["sizes"][u["size"]]
        assert u["tokens_seen"] == u["steps"] * plan.batch * plan.ctx >= size["token_budget"]
        assert u["lr"] == size["lr"] and u["steps"] == size["steps"]
        fp32 = next(b for b in js["units"] if b["size"] == u["size"] and b["seed"] == u["seed"] and b["recipe"] == "fp32")
        assert u["gap_to_fp32"] == u["final_val_loss"] - fp32["final_val_loss"]  # paired: same size and seed
    for r in js["summary"]:
        gaps = [u["gap_to_fp32"] for u in js["units"] if u["size"] == r["size"] and u["recipe"] == r["recipe"]]
        assert r["gap"] == gaps and r["gap_mean"] == pytest.approx(statistics.fmean(gaps))
    for recipe, f in js["fits"].items():  # the slope on the page is the fit through the per-seed gaps
        rows = [r for r in js["summary"] if r["recipe"] == recipe]
        want = ts.fit_slope([r["params"] for r in rows for _ in r["gap"]], [g for r in rows for g in r["gap"]])
        assert f["ols"]["slope"] == pytest.approx(want["slope"])
    assert js["run"]["this_invocation"]["units_computed"] == len(js["units"]) + js["n_sweep_units"]
    assert js["run"]["unit_cpu_s"] > 0 and js["checks"]["all_reached_budget"]
    # the learning rate is the sweep's best, per size
    for v in js["sizes"].values():
        assert v["lr"] == min(v["sweep"], key=lambda p: p["val"])["lr"]
    # a second run reuses every cached unit and gives the same table
    again = ts.main(["--quick", "--out", str(tmp_path)])
    assert again["run"]["this_invocation"]["units_computed"] == 0
    assert all(u.get("cached") for u in again["units"])
    assert again["summary"] == js["summary"]
    assert len(again["run"]["invocations"]) == 1  # an invocation that trained nothing is not counted
    # the page section lists what is missing when units are
    partial = ts.main(["--quick", "--out", str(tmp_path), "--report-only", "--seeds", "3"])
    assert len(partial["missing_units"]) == 3 and "Partial results" in (tmp_path / "train_scale.md").read_text()


def test_linear_only_diagnostic_leaves_attention_unquantized():
    from experiments import mx
    assert ts.split_recipe("mxfp6-linear-only") == ("mxfp6", None)
    assert ts.split_recipe("mxfp4-w+mxfp6") == ("mxfp4-w+mxfp6", "auto")
    kinds = {}
    for label in ("mxfp6", "mxfp6-linear-only"):
        recipe, attention = ts.split_recipe(label)
        m = mx.quantized(ts.build_model("32x1", 0, 64), mx.training_recipe(recipe), attention=attention)
        kinds[label] = (type(m.blocks[0].attn) is not ts.build_model("32x1", 0, 64).blocks[0].attn.__class__,
                        type(m.blocks[0].mlp[0]).__name__)
    assert kinds["mxfp6"][0] and not kinds["mxfp6-linear-only"][0]  # attention scope only in the full recipe
    assert kinds["mxfp6"][1] == kinds["mxfp6-linear-only"][1] != "Linear"  # Linear layers quantized in both


def test_recipes_for_each_size_and_unknown_recipe_refused():
    """Core recipes at every size, the extra ones at the two smallest; every name one the experiments can
    train (a removed helper once made this fail only in the slow pipeline test)."""
    from dataclasses import replace
    plan = ts.Plan()
    assert ts.recipes_for(plan, "32x1") == list(ts.CORE_RECIPES) + list(ts.EXTRA_RECIPES)
    assert ts.recipes_for(plan, "64x1") == list(ts.CORE_RECIPES) + list(ts.EXTRA_RECIPES)
    assert ts.recipes_for(plan, "96x2") == list(ts.CORE_RECIPES)
    with pytest.raises(ValueError, match="unknown training recipes"):
        ts.recipes_for(replace(plan, extra_recipes=("mxfp3",)), "32x1")


def test_paired_improvement_and_batch_means_se_by_hand():
    import torch
    # 8 windows, 4 blocks of 2: differences 0.1, 0.3 | 0.2, 0.2 | 0.0, 0.4 | 0.1, 0.1 -> block means .2 .2 .2 .1
    before = torch.full((8,), 2.0, dtype=torch.float64)
    d = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.0, 0.4, 0.1, 0.1], dtype=torch.float64)
    r = ts.paired_improvement(before, before - d, blocks=4)
    assert r["rel"] == pytest.approx(0.175 / 2.0) and r["before"] == 2.0 and r["after"] == pytest.approx(1.825)
    means = [0.2, 0.2, 0.2, 0.1]
    assert r["se_rel"] == pytest.approx(statistics.stdev(means) / 2 / 2.0)
    assert ts.paired_improvement(before, before - d, blocks=32)["blocks"] == 4  # at least two windows a block
    with pytest.raises(ValueError, match="per-window"):
        ts.paired_improvement(before, before[:6])


def test_flattening_prefers_the_final_window_measurement():
    rec = {"steps": 100, "val_steps": list(range(10, 101, 10)), "val_loss": [5, 4, 3, 2.8, 2.6, 2.5, 2.4, 2.3, 2.0, 1.96],
           "last10pct": {"rel": 0.005, "se_rel": 0.001}}
    assert ts.flattening(rec) == 0.005


def test_spike_location_and_recovery():
    rec = {"steps": 100, "val_steps": [20, 40, 60, 80, 100], "val_loss": [3.0, 2.0, 2.9, 1.9, 1.8]}
    sp = ts.spike(rec)
    assert sp["rise"] == pytest.approx(0.9) and sp["at_fraction"] == 0.6 and sp["before_min"] == 2.0
    assert sp["peak"] == 2.9 and sp["last"] == 1.8 and sp["recovered"]
    assert not ts.spike({**rec, "val_loss": [3.0, 2.0, 2.9, 2.5, 2.1]})["recovered"]
    assert ts.spike({**rec, "val_loss": [3.0, 2.0, 1.9, 1.8, 1.7]})["rise"] == 0.0


def test_factor_comparisons_pair_groups_differing_in_one_factor():
    def u(size, recipe, seed, lr, gap):
        return {"size": size, "recipe": recipe, "seed": seed, "lr": lr, "gap_to_fp32": gap}
    units = [u("64x1", "mxfp6", 0, 2e-3, 0.05), u("64x1", "mxfp6", 1, 2e-3, 0.07),
             u("64x2", "mxfp6", 0, 4e-3, 0.15), u("64x2", "mxfp6", 1, 4e-3, 0.17),
             u("96x2", "mxfp6", 0, 4e-3, 0.20), u("96x2", "mxfp6", 1, 4e-3, 0.24), u("96x2", "fp32", 0, 4e-3, 0.0)]
    diags = [{"size": "64x2", "recipe": "mxfp6-halflr", "seed": 0, "lr": 2e-3, "gap_to_fp32": 0.08},
             {"size": "64x2", "recipe": "mxfp6-linear-only", "seed": 0, "lr": 4e-3, "gap_to_fp32": 0.1}]
    fc = ts.factor_comparisons(units, diags)
    got = {(q["factor"], q["a"]["size"], q["a"]["lr"], q["b"]["size"], q["b"]["lr"]): (q["seeds"], q["change"])
           for q in fc["pairs"]}
    assert got[("layers", "64x1", 2e-3, "64x2", 2e-3)] == ([0], pytest.approx(0.03))  # seed 0 only: 0.08 - 0.05
    assert got[("width", "64x2", 4e-3, "96x2", 4e-3)] == ([0, 1], pytest.approx(0.06))
    assert got[("lr", "64x2", 2e-3, "64x2", 4e-3)] == ([0], pytest.approx(0.07))
    assert len(got) == 3  # 64x1@2e-3 vs 96x2@4e-3 differs in three factors; linear-only is not a rate change


def test_fits_by_layers_only_within_one_depth():
    rows = [{"size": s, "recipe": "mxfp6", "params": p, "gap": g, "gap_mean": statistics.fmean(g)}
            for s, p, g in (("32x1", 1e4, [0.0, 0.02]), ("64x1", 1e5, [0.1, 0.12]), ("64x2", 1e6, [0.5, 0.5]))]
    f = ts.fits(rows)["mxfp6"]
    assert list(f["by_layers"]) == ["1"] and f["by_layers"]["1"]["sizes"] == ["32x1", "64x1"]
    assert f["by_layers"]["1"]["slope"] == pytest.approx(0.1)

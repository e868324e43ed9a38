"""QSNR (paper's Gaussian setting), the worst-case bound, the cost model and the explorer."""

import math

import pytest
import torch

import microscale as ms
from microscale import bdr
from microscale.formats import bdr_format


@pytest.fixture(scope="module")
def gauss():
    return bdr.gaussian_vectors(48, 1024, seed=0)


def test_qsnr_definition():
    x = torch.tensor([3.0, 4.0])
    assert bdr.qsnr_of(x, torch.tensor([3.0, 3.5])) == pytest.approx(-10 * math.log10(0.25 / 25))
    assert bdr.qsnr_of(x, x) == math.inf
    y = ms.fake_quantize(x[None], "mx6")
    assert bdr.qsnr(x[None], "mx6") == bdr.qsnr_of(x[None], y)


def test_vectors_are_quantized_independently(gauss):
    x = gauss[:4]
    y = bdr.fake_quantize_vectors(x, "int8_tensor")
    for v in range(4):
        assert torch.equal(y[v].float(), ms.fake_quantize(x[v:v + 1], "int8_tensor")[0])


def test_paper_gaps(gauss):
    q = {n: bdr.vectors_qsnr(gauss, n) for n in ("mx9", "msfp16", "fp8_e4m3", "fp8_e4m3_tensor")}
    assert 14.5 <= q["mx9"] - q["fp8_e4m3_tensor"] <= 16.5       # paper: ~15-16 dB
    assert 14.5 <= q["mx9"] - q["fp8_e4m3"] <= 16.5
    assert 3.2 <= q["mx9"] - q["msfp16"] <= 4.0                  # paper: ~3.6 dB


@pytest.mark.parametrize("name", ["mx9", "mx6", "mx4", "msfp12", "msfp16"])
def test_worst_case_block_attains_the_bound(name):
    b = torch.tensor([bdr.worst_case_block(name)])
    assert bdr.qsnr(b, name) == pytest.approx(bdr.qsnr_lower_bound(name), abs=1e-9)


@pytest.mark.parametrize("name", ["mx6", "mx4", "mx9", "msfp12"])
@pytest.mark.parametrize("rounding", ["even", "zero", "stochastic"])
@pytest.mark.parametrize("dist", ["gaussian", "laplace", "student_t"])
def test_measured_qsnr_above_bound(name, rounding, dist):
    x = bdr.sample_vectors(dist, n=16, length=256, seed=3)
    per = bdr.vectors_qsnr(x, name, reduce="none", rounding=rounding, seed=5)
    assert per.min() >= bdr.qsnr_lower_bound(name, rounding)
    # a random 16-block never does worse than the bound either
    blocks = x.reshape(-1, 16)
    y = bdr.fake_quantize_vectors(blocks, name, rounding=rounding, seed=5)
    noise = (blocks.double() - y).square().sum(1)
    worst = float((-10 * torch.log10(noise / blocks.double().square().sum(1))).min())
    assert worst >= bdr.qsnr_lower_bound(name, rounding) - 1e-9


def test_bound_values():
    # 6.02 m - 10 log10(k2 + (k1 - k2) 4^-beta) + small terms; MX6: m=4, k1=16, k2=2, beta=1
    assert bdr.qsnr_lower_bound("mx6") == pytest.approx(17.2725, abs=1e-3)
    assert bdr.qsnr_lower_bound(bdr_format(4, 16, 8, 2, 2)) > bdr.qsnr_lower_bound("mx6")
    with pytest.raises(ValueError, match="sign \\+ m magnitude"):
        bdr.qsnr_lower_bound("nvfp4")


def test_cost_components():
    # hand counts in full adders (NanGate45 X1 areas: AND 0.25, HA 0.625, XOR 0.375, MUX 0.4375, DFF 1.0625)
    assert bdr.multiplier_area(4) == 16 * 0.25 + 4 * 2 * 1 + 4 * 0.625          # 4x4 array: 14.5
    assert bdr.multiplier_area(2) == 4 * 0.25 + 2 * 0.625                        # 2x2: no FA
    assert bdr.tree_area(4, 8) == 2 * 8 + 1 * 9                                  # 2 adders of 8, 1 of 9
    parts = bdr.area_breakdown("mx6")                                            # sign + 4, k1 16, k2 2, d2 1
    assert parts["multiplier"] == 14.5 + 9 * 0.375                               # + sign/negate XORs
    assert parts["registers"] == 2 * 5 * 1.0625
    # sub-block sum of 2 products (10 bits) shifted by sA + sB in 0..2: 2 mux stages over 12 bits,
    # 2 register bits, a 1-bit adder, per 2 lanes
    assert parts["microexponent"] == pytest.approx((2 * 1.0625 + 1 + 0.4375 * 12 * 2) / 2)
    assert parts["adder_tree"] == pytest.approx((32 * 9 + bdr.tree_area(32, 12)) / 64)
    assert "block_align" in parts and "block_align" not in bdr.area_breakdown(bdr_format(4, 64, 8, 2, 1))
    assert bdr.cost("fp8_e4m3") == pytest.approx(bdr.area("fp8_e4m3") / bdr.baseline_area())
    assert bdr.cost("mx6") == pytest.approx(bdr.area("mx6") / bdr.baseline_area() * 6 / 8)


def test_structural_model_is_the_count_without_overhead():
    assert "lane_overhead" not in bdr.area_breakdown("mx6", bdr.STRUCTURAL_MODEL)
    parts = bdr.area_breakdown("mx6")
    assert parts["lane_overhead"] == bdr.DEFAULT_MODEL.lane_overhead
    assert bdr.area("mx6") == pytest.approx(bdr.area("mx6", bdr.STRUCTURAL_MODEL) + parts["lane_overhead"])
    assert bdr.baseline_area() == pytest.approx(bdr.baseline_area(bdr.STRUCTURAL_MODEL)
                                                + bdr.DEFAULT_MODEL.lane_overhead)


def test_default_model_is_the_calibration():
    fitted = bdr.calibrate()
    assert fitted.lane_overhead == pytest.approx(bdr.DEFAULT_MODEL.lane_overhead, abs=0.05)
    # the fit is a minimum of the misfit: moving the overhead either way fits the relations worse
    from dataclasses import replace
    from microscale.bdr.cost import _misfit as misfit
    for step in (-3.0, 3.0):
        assert misfit(replace(fitted, lane_overhead=fitted.lane_overhead + step)) > misfit(fitted)
    assert misfit(fitted) < misfit(bdr.STRUCTURAL_MODEL)


def test_cost_model_rejects_bad_constants():
    with pytest.raises(ValueError, match="lanes must be a power of two"):
        bdr.CostModel(lanes=48)
    with pytest.raises(ValueError, match="lane_overhead must be >= 0"):
        bdr.CostModel(lane_overhead=-1.0)
    with pytest.raises(ValueError, match="mux must be > 0"):
        bdr.CostModel(mux=0.0)


_ROWS = {(r["relation"], r["format"]): r for r in bdr.relations()}


@pytest.mark.parametrize("key", list(_ROWS), ids=[f"{a}|{b}" for a, b in _ROWS])
def test_relation_ratio_within_25_percent(key):
    # cost ratio within +-25 % of the paper's (BDR, Rouhani et al. ISCA 2023, as the issue states them)
    r = _ROWS[key]
    lo, hi = r["paper"]
    assert 0.75 * lo <= r["model"] <= 1.25 * hi


# The stricter reading: the relative *increase* of a step within +-25 % of the paper's increase. The
# calibrated model meets it for the MX6/MX4 headline ratios and for MX4's d2 and k2 2->1 steps; the other
# seven cases miss it (k2 8->2 provably: test_cost_k2_8_to_2_memory_alone_exceeds_paper) and are listed,
# with the model's figures, in docs/bdr.md's table, which the test below holds to bdr.relations().
_MET_STRICTLY = {("MX6 ~2x cheaper than FP8", "mx6"), ("MX4 ~4x cheaper than FP8", "mx4"),
                 ("d2 1 -> 2 costs 30-50 % more", "MX4"), ("k2 2 -> 1 costs 30-40 % more", "MX4")}


@pytest.mark.parametrize("key", sorted(_MET_STRICTLY), ids=[f"{a}|{b}" for a, b in sorted(_MET_STRICTLY)])
def test_relation_increase_met(key):
    assert _ROWS[key]["increment_ok"]


def _docs_miss_table() -> dict[tuple[str, str], float]:
    """(relation step, format) -> model increase in % from docs/bdr.md's table of increase-reading misses."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "bdr.md").read_text()
    head = "| relation | format | paper increase | allowed (±25 %) | model increase |"
    lines = text[text.index(head):].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0].split(" (")[0], cells[1])] = float(cells[4].strip("+ %"))
    return rows


def test_increase_reading_misses_match_docs():
    step = {"k2 8 -> 2 costs ~3 % more": "k2 8→2", "d2 1 -> 2 costs 30-50 % more": "d2 1→2",
            "k2 2 -> 1 costs 30-40 % more": "k2 2→1"}
    misses = {(step[r["relation"]], r["format"]): 100 * (r["model"] - 1) for r in bdr.relations()
              if not r["increment_ok"]}
    documented = _docs_miss_table()
    assert set(misses) == set(documented)
    assert len(misses) + len(_MET_STRICTLY) == len(_ROWS)   # every row either met or documented
    for key, value in misses.items():
        assert documented[key] == pytest.approx(value, abs=0.05), key


def test_relations_report_both_readings_consistently():
    for r in bdr.relations(bdr.STRUCTURAL_MODEL) + bdr.relations():
        lo, hi = r["paper"]
        if r["increment_ok"] and lo > 1:
            assert r["ratio_ok"]                      # the increment reading is the stricter one
    # the structural count alone (no overhead) misses MX4's ~4x: 5.6x
    structural = {(r["relation"], r["format"]): r for r in bdr.relations(bdr.STRUCTURAL_MODEL)}
    assert structural[("MX4 ~4x cheaper than FP8", "mx4")]["model"] > 5.0


def test_cost_k2_8_to_2_memory_alone_exceeds_paper():
    # why the +3 % cannot hold for the area-memory product: bits/element alone rise by 0.375 / (bits at k2=8),
    # above the +3.75 % the increment reading allows, and no model's area falls when sub-blocks shrink
    for m, want in ((7, 0.375 / 8.625), (4, 0.375 / 5.625), (2, 0.375 / 3.625)):
        f8, f2 = bdr_format(m, 16, 8, 8, 1), bdr_format(m, 16, 8, 2, 1)
        assert f2.bits_per_element / f8.bits_per_element - 1 == pytest.approx(want)
        assert want > 0.03 * 1.25
        for model in (bdr.DEFAULT_MODEL, bdr.STRUCTURAL_MODEL):
            assert bdr.area(f2, model) > bdr.area(f8, model)


def test_cost_extra_mantissa_bit_grows_multiplier_quadratically():
    small, big = bdr.area_breakdown(bdr_format(4, 64, 8, 8, 1)), bdr.area_breakdown(bdr_format(5, 64, 8, 8, 1))
    assert big["multiplier"] - small["multiplier"] == pytest.approx(bdr.multiplier_area(5) - bdr.multiplier_area(4)
                                                                   + 2 * 0.375)


def test_pareto_front():
    P = bdr.Point
    pts = [P(n, "e", 16, 8, None, 0, "s", 4, 1, c, q) for n, c, q in
           [("a", 1, 10), ("b", 2, 9), ("c", 2, 12), ("d", 3, 12), ("e", 4, 20), ("f", 1, 10)]]
    front = bdr.pareto_front(pts)
    assert [p.name for p in front] == ["a", "f", "c", "e"]
    assert {p.name: p.gap_db for p in pts}["b"] == 3 and {p.name: p.gap_db for p in pts}["d"] == 0


def test_explore_small_and_report(tmp_path):
    fmts = [bdr_format(m, 16, 8, 2, 1) for m in (2, 4)] + [bdr_format(4, 16)]
    res = bdr.explore(formats=fmts, n_vectors=2, length=256, progress=False)
    assert len(res["points"]) == 3 + len(bdr.explore.__globals__["NAMED_FORMATS"])
    paths = bdr.write_report(res, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert "| mx6 * |" in paths["md"].read_text()


def test_cli_explore_registered():
    from microscale.cli import COMMANDS
    assert "explore" in COMMANDS


def test_design_space_ranges():
    fmts = bdr.design_space(m=[4], k1=[16], d1=[8], k2=[2, 32], d2=[1], fp=[])
    assert [f.name for f in fmts] == [bdr_format(4, 16).name, bdr_format(4, 16, 8, 2, 1).name]  # k2 < k1 only
    with pytest.raises(ValueError, match="unknown design-space range 'k3'"):
        bdr.design_space(k3=[2])
    with pytest.raises(ValueError, match="range 'k1' must be positive ints"):
        bdr.design_space(k1=[0])
    with pytest.raises(ValueError, match="fp elements must be among"):
        bdr.design_space(fp=["e9m9"])


def test_explore_other_data_and_cli(tmp_path, capsys):
    res = bdr.explore(quick=True, n_vectors=2, length=256, data="laplace", progress=False,
                      ranges={"m": [2, 4], "k1": [16], "k2": [2]})
    assert res["settings"]["data"] == "laplace" and res["settings"]["ranges"]["m"] == [2, 4]
    assert len(res["points"]) == 2 * 2 + 2 + len(bdr.explore.__globals__["NAMED_FORMATS"])
    with pytest.raises(ValueError, match="distribution must be one of"):
        bdr.explore(quick=True, n_vectors=2, data="uniform", progress=False)
    from microscale.cli import main
    assert main(["explore", "--quick", "--vectors", "2", "--k1", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(line.split(":")[0] in ("mx9", "mx6", "mx4") for line in out.splitlines()[:3])
    assert (tmp_path / "explore.png").stat().st_size > 10_000

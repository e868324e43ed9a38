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


def test_cost_relations():
    assert bdr.cost("fp8_e4m3") == pytest.approx(1.0, rel=0.05)
    assert 1.5 <= 1 / bdr.cost("mx6") <= 2.5                     # paper: MX6 ~2x cheaper than FP8
    assert 3.0 <= 1 / bdr.cost("mx4") <= 5.0                     # paper: MX4 ~4x cheaper
    for m in (7, 4, 2):
        c = lambda k2, d2: bdr.cost(bdr_format(m, 16, 8, k2, d2))  # noqa: E731
        assert 1.3 * 0.75 <= c(2, 2) / c(2, 1) <= 1.5 * 1.25     # d2 1 -> 2: paper +30-50%
        assert 1.3 * 0.75 <= c(1, 1) / c(2, 1) <= 1.4 * 1.25     # k2 2 -> 1: paper +30-40%
        assert 1.0 < c(2, 1) / c(8, 1) <= 1.03 * 1.25            # k2 8 -> 2: paper +3% (model: more)
    parts = bdr.area_breakdown("mx6")
    assert parts["multiplier"] == 16 and "microexponent" in parts


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

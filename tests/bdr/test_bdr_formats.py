"""BDR formats: MX9/MX6/MX4 hand-worked blocks, specials, idempotence; every new format's packed storage."""

import math

import pytest
import torch

import microscale as ms
from microscale.reference import quantize_blocks

NEW_FORMATS = ["mx9", "mx6", "mx4", "msfp12", "msfp16", "int8_tensor", "int8_channel", "fp8_e4m3",
               "fp8_e5m2", "fp8_e4m3_tensor", "fp8_e5m2_tensor", "nvfp4", "vsq_int4"]


def _mx6_block():
    # pairs: (1.5, 0.40625) shift 0 | (0.3, 0.1) E=-2 -> shift min(2, 1) = 1 | (0, 0) zero pair -> shift 1
    #        (0.9, 0.03125) E=-1 -> shift 1 | (1.9, -1.97) shift 0, -1.97 rounds to 16/8 -> clamped to 15/8
    return torch.tensor([1.5, 0.40625, 0.3, 0.1, 0, 0, 0.9, 0.03125, 1.9, -1.97, 0, 0, 0, 0, 0, 0],
                        dtype=torch.float64)


def test_mx6_hand_worked_block():
    x = _mx6_block()[None]
    q = quantize_blocks(x, ms.get_format("mx6"))
    assert q.scales.tolist() == [127]                       # E = floor(log2 1.97) = 0
    assert q.micro.tolist() == [[0, 1, 1, 1, 0, 1, 1, 1]]
    # quantum 2^(E - s + 1 - m) = 1/8 (s = 0) or 1/16 (s = 1); 0.03125 = 0.5/16 is a tie -> even (0)
    want = [1.5, 0.375, 0.3125, 0.125, 0, 0, 0.875, 0, 1.875, -1.875, 0, 0, 0, 0, 0, 0]
    assert ms.fake_quantize(x, "mx6")[0].tolist() == want


@pytest.mark.parametrize("rounding,want", [("even", 0.0), ("away", 2.0**-7), ("zero", 0.0)])
def test_mx9_microexponent_shift_and_rounding(rounding, want):
    # pair 0 = (1, 2^-8): shift 0, quantum 2^-6, 2^-8 -> 0; pair 1 = (2^-8, 0): shift 1, quantum 2^-7: a tie
    x = torch.tensor([[1.0, 2.0**-8, 2.0**-8] + [0.0] * 13], dtype=torch.float64)
    y = ms.fake_quantize(x, "mx9", rounding=rounding)[0]
    assert y[0] == 1.0 and y[1] == 0.0 and y[2] == want


def test_mx4_values_and_clamp():
    # m = 2: magnitudes {0, 1, 2, 3} x 2^(E - s - 1); E = 2 (amax 7.9): pair 0 quantum 2, pair 1 (E=0) quantum 1
    x = torch.tensor([[7.9, 3.0, 1.2, 0.4] + [0.0] * 12], dtype=torch.float64)
    q = quantize_blocks(x, ms.get_format("mx4"))
    assert q.scales.tolist() == [129] and q.micro[0, :2].tolist() == [0, 1]
    assert ms.fake_quantize(x, "mx4")[0, :4].tolist() == [6.0, 4.0, 1.0, 0.0]  # 7.9 saturates to 3 x 2


@pytest.mark.parametrize("name", ["mx9", "mx6", "mx4"])
def test_zero_and_special_blocks(name):
    fmt = ms.get_format(name)
    x = torch.zeros(4, 16, dtype=torch.float64)
    x[1, 3], x[2, 0], x[3, 5] = math.nan, math.inf, -math.inf
    x[1:, 7] = 1.0
    q = quantize_blocks(x, fmt)
    assert q.scales.tolist() == [0, 255, 255, 255]          # zero block: smallest scale; NaN/Inf: NaN scale
    assert q.micro[0].tolist() == [1] * 8 and q.micro[1:].eq(0).all() and q.codes.eq(0).all()
    y = ms.fake_quantize(x.float(), name)
    assert y[0].eq(0).all() and y[1:].isnan().all()


@pytest.mark.parametrize("name", ["mx9", "mx6", "mx4", "msfp12", "msfp16"])  # power-of-two scales only
@pytest.mark.parametrize("rounding", ["even", "away", "zero"])
def test_idempotent(name, rounding):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 8)[:, None]
    y = ms.fake_quantize(x, name, rounding=rounding)
    assert torch.equal(ms.fake_quantize(y, name, rounding=rounding), y)


# exact packed bytes of a [3, 40] tensor along the last axis: 3 vectors x 3 blocks of 16 (padded to 48)
@pytest.mark.parametrize("name,nbytes", [
    ("mx9", 144 + 9 + 9), ("mx6", 144 * 5 // 8 + 9 + 9), ("mx4", 144 * 3 // 8 + 9 + 9),
    ("msfp12", 72 + 9), ("msfp16", 144 + 9), ("nvfp4", 72 + 9 + 4), ("vsq_int4", 72 + 9 + 3 * 4),
    ("int8_tensor", 120 + 4), ("int8_channel", 120 + 3 * 4), ("fp8_e4m3", 120), ("fp8_e4m3_tensor", 124),
])
def test_packed_nbytes(name, nbytes):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    assert ms.quantize(x, name).nbytes == nbytes


@pytest.mark.parametrize("name", NEW_FORMATS)
def test_round_trip_and_fake_quantize_agree(name):
    x = torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(2))
    q = ms.quantize(x, name, axis=1)
    y = q.dequantize()
    assert y.shape == x.shape and torch.equal(ms.fake_quantize(x, name, axis=1), y)
    q2 = ms.MXTensor.from_blocks(q.to_blocks(), q.layout, q.format)  # unpack + repack: same bytes
    assert torch.equal(q2.codes, q.codes) and torch.equal(q2.dequantize(), y)
    assert ms.fake_quantize(x, name, axis=1).sub(x).abs().max() <= x.abs().max() / 2


def test_nvfp4_two_level_scales():
    x = torch.tensor([[6.0 * 448] + [0.0] * 15, [1.0, 0.5] + [0.0] * 14])
    q = quantize_blocks(x.double(), ms.get_format("nvfp4"))
    t = float(q.tensor_scale)
    assert t == pytest.approx(1.0)                              # amax / (6 * 448)
    # block 1: E4M3(1 / 6 / t) = E4M3(0.1667) = 0.171875 (code 0x23: 2^-3 * 1.375); 1.0 / 0.171875 = 5.8 -> 6
    assert q.scales.tolist() == [0x7E, 0x23]                  # 448 = 0x7E
    y = ms.fake_quantize(x, "nvfp4")
    assert y[0, 0] == 6 * 448 and y[1, 0] == pytest.approx(6 * 0.171875) and y[1, 1] == pytest.approx(3 * 0.171875)


def test_per_tensor_specials_and_unscaled_fp8():
    x = torch.tensor([[1.0, math.inf, -math.inf, math.nan, 1e6]])
    assert ms.fake_quantize(x, "fp8_e5m2")[0, :3].tolist() == [1.0, math.inf, -math.inf]
    y = ms.fake_quantize(x, "fp8_e4m3")
    assert y[0, 0] == 1.0 and y[0, 1:4].isnan().all() and y[0, 4] == 448.0   # saturating cast
    assert ms.fake_quantize(x, "int8_tensor").isnan().all()                   # INT8 has no NaN: NaN scale


def test_new_names_registered():
    for n in NEW_FORMATS:
        assert ms.get_format(n).name == n
    assert ms.get_format("mx6").bits_per_element == 6.0 and ms.get_format("msfp12").bits_per_element == 4.5
    assert ms.formats.bfp_format(5, 8).bits_per_element == 7.0

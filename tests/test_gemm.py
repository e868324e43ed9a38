"""Fused packed-weight linear (microscale.kernels.gemm, _mxgemm.c) against F.linear on the dequantized weight.

The fused kernels decode every weight exactly (w = v(code) * 2^X, the value dequantize() gives), so they
differ from ``F.linear(x, dequantize(W), b)`` only by fp32 summation order: the tolerance is relative to
``|x| @ |W|ᵀ + |b|`` (the scale of the rounding error of any summation order).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import microscale as ms
from microscale import kernels
from microscale.kernels import gemm

COVERED = ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8"]
BATCHES = [1, 2, 7, 8, 9, 64, 300]

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built")


def reference(x, q, bias):
    """F.linear in fp32 on the dequantized weight, and the magnitude scale of its rounding error."""
    w = q.dequantize(torch.float32)
    xf = x.float()
    ref = F.linear(xf, w, None if bias is None else bias.float())
    mag = F.linear(xf.abs(), w.abs(), None if bias is None else bias.float().abs())
    return ref, mag


def assert_close_to_reference(y, x, q, bias, rel):
    ref, mag = reference(x, q, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert bool((err <= rel * mag + 1e-30).all()), float((err / (mag + 1e-30)).max())


def weight(fmt, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a spread of block magnitudes, so blocks get different scales
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 6, (n, 1), generator=g).float())
    return ms.quantize(w, fmt, axis=1)


@pytest.mark.parametrize("fmt", COVERED)
@pytest.mark.parametrize("batch", BATCHES)
def test_fused_equals_linear_on_dequantized_weight(fmt, batch):
    g = torch.Generator().manual_seed(batch)
    for k, with_bias in ((100, True), (288, False), (544, True)):   # 100 and 544: ragged; 544: 4 chunks + 1 block
        q = weight(fmt, 37, k, seed=k)
        x = torch.randn(batch, k, generator=g)
        b = torch.randn(37, generator=g) if with_bias else None
        y = kernels.packed_linear(x, q, b)
        assert y is not None, "the fused kernel must cover this format"
        assert_close_to_reference(y, x, q, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_tiles_cover_every_row(monkeypatch, dtype):
    """The GEMM path decodes the weight a tile of rows at a time: several tiles and a ragged last one."""
    monkeypatch.setattr(gemm, "TILE_BYTES", 16 * 4 * 128)   # 16 rows of K = 128 per tile
    monkeypatch.setattr(gemm, "TILE_BYTES_BF16", 16 * 2 * 128)
    monkeypatch.setattr(gemm, "TILE_BYTES_THREADED", 16 * 4 * 128)
    q = weight("mxfp6_e3m2", 37, 128)
    x = torch.randn(20, 128).to(dtype)
    b = torch.randn(37)
    y = kernels.packed_linear(x, q, b)
    ref, mag = reference(x, q, b)
    rel = 1e-5 if dtype == torch.float32 else 2.0 ** -7
    assert y.dtype == dtype and bool(((y.float() - ref).abs() <= rel * mag).all())


@pytest.mark.parametrize("fmt", COVERED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 9])
def test_half_precision_inputs(fmt, dtype, batch):
    """bf16 / fp16 x: computed in fp32, returned in x's dtype (one rounding of the fp32 result)."""
    q = weight(fmt, 19, 96)
    x = torch.randn(batch, 96).to(dtype)
    b = torch.randn(19).to(dtype)
    y = kernels.packed_linear(x, q, b)
    assert y.dtype == dtype
    ref, mag = reference(x, q, b)
    assert bool(((y.float() - ref).abs() <= 2.0 ** -7 * mag).all())
    # and within bf16 / fp16 tolerance of F.linear run in x's own dtype
    y16 = F.linear(x, q.dequantize(dtype), b)
    assert bool(((y.float() - y16.float()).abs() <= 2.0 ** -6 * mag + 1e-3).all())


def test_public_verb_uses_the_fused_kernel(monkeypatch):
    q = weight("mxfp4", 33, 64)
    x = torch.randn(2, 3, 64)
    b = torch.randn(33)
    called = []
    real = gemm.packed_linear
    monkeypatch.setattr(gemm, "packed_linear", lambda *a: called.append(1) or real(*a))
    y = ms.packed_linear(x, q, b)
    assert called and y.shape == (2, 3, 33)
    assert_close_to_reference(y, x, q, b, 1e-5)


def test_gemv_threads_do_not_change_the_bits():
    """Each output row is summed by one thread in a fixed order: 1 thread and all threads agree bit for bit."""
    q = weight("mxfp6_e2m3", 4096, 256)
    x = torch.randn(3, 256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernels.packed_linear(x, q, None)
        torch.set_num_threads(max(2, old))
        y2 = kernels.packed_linear(x, q, None)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1.view(torch.int32), y2.view(torch.int32))


def test_non_contiguous_and_empty_inputs():
    q = weight("mxfp8_e4m3", 10, 64)
    x = torch.randn(64, 5).t()            # non-contiguous view
    assert_close_to_reference(kernels.packed_linear(x, q, None), x, q, None, 1e-5)
    y = kernels.packed_linear(torch.empty(0, 64), q, None)
    assert y.shape == (0, 10)


@pytest.mark.parametrize("fmt", COVERED)
def test_nan_scale_blocks_and_saturated_codes_behave_as_dequantize(fmt):
    q = weight(fmt, 12, 100)
    scales = q.scales.clone()
    scales[3 * 4 + 1] = 255            # row 3, second block: NaN scale
    scales[5 * 4] = 254                # row 5, first block: the largest scale, 2^127
    scales[7 * 4 + 2] = 0              # row 7: the smallest scale, 2^-127 (subnormal weights)
    codes = q.codes.clone()
    row_bytes = q.codes.numel() // 12
    codes[6 * row_bytes: 7 * row_bytes] = 0xFF   # row 6: every code all ones (the most negative / NaN code)
    codes[5 * row_bytes: 5 * row_bytes + 4] = 0x77  # row 5: large codes under the largest scale
    q2 = ms.MXTensor(codes, scales, q.shape, q.axis, q.format)
    g = torch.Generator().manual_seed(5)
    for batch in (1, 5, 20):
        x = torch.randn(batch, 100, generator=g)
        y = kernels.packed_linear(x, q2, None)
        ref = F.linear(x, q2.dequantize(), None)
        # row 5 holds huge finite weights whose products overflow: which of inf / NaN comes out depends on
        # the summation order (FMA or not), so only its finite answers and its inf weights are compared
        other = torch.ones(12, dtype=torch.bool)
        other[5] = False
        assert torch.equal(torch.isnan(y[:, other]), torch.isnan(ref[:, other])), (batch, y[:, 3], ref[:, 3])
        assert torch.equal(torch.isinf(y[:, other]), torch.isinf(ref[:, other]))
        if bool(torch.isinf(q2.dequantize()[5]).any()):
            assert not bool(torch.isfinite(y[:, 5]).any())
        finite = torch.isfinite(ref) & other    # row 5's finite sums may overflow in another order
        _, mag = reference(x, q2, None)
        assert bool(((y - ref).abs()[finite] <= 1e-5 * mag[finite] + 1e-30).all())
        assert bool(torch.isnan(y[:, 3]).all())


def test_formats_not_covered_return_none():
    x = torch.randn(2, 64)
    for fmt in ("mx6", "mx9", "nvfp4"):
        q = ms.quantize(torch.randn(8, 64), fmt, axis=1)
        assert kernels.packed_linear(x, q, None) is None
        # the public verb still answers, through dequantize + F.linear
        assert torch.allclose(ms.packed_linear(x, q), F.linear(x, q.dequantize()))


def test_inputs_that_need_gradients_fall_back_to_a_differentiable_linear():
    q = weight("mxfp4", 8, 64)
    x = torch.randn(3, 64, requires_grad=True)
    assert kernels.packed_linear(x, q, None) is None
    y = ms.packed_linear(x, q)
    y.sum().backward()
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(3, 64))
    with torch.no_grad():
        assert kernels.packed_linear(x, q, None) is not None


def test_non_cpu_tensors_are_not_covered():
    q = weight("mxfp4", 8, 64)
    assert kernels.packed_linear(torch.randn(2, 64, device="meta"), q, None) is None


def test_bad_calls_raise_before_any_c_runs():
    q = weight("mxfp4", 8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        kernels.packed_linear(torch.randn(2, 63), q, None)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16.*int64"):
        kernels.packed_linear(torch.ones(2, 64, dtype=torch.int64), q, None)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16.*float64"):
        kernels.packed_linear(x.double(), q, None)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        kernels.packed_linear(x, q, torch.randn(9))
    with pytest.raises(TypeError, match="bias must be a floating-point"):
        kernels.packed_linear(x, q, torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight must be an MXTensor"):
        kernels.packed_linear(x, torch.randn(8, 64), None)
    qa = ms.quantize(torch.randn(64, 8), "mxfp4", axis=0)
    with pytest.raises(ValueError, match="blocked along axis 1"):
        kernels.packed_linear(x, qa, None)
    # storage that no longer matches the shape and format (forced past MXTensor's own checks, which a
    # caller of the kernels may not have run)
    bad = weight("mxfp4", 8, 64)
    object.__setattr__(bad, "codes", bad.codes[:-1])
    with pytest.raises(ValueError, match="codes .* must hold 256 bytes, got 255"):
        kernels.packed_linear(x, bad, None)
    bad = weight("mxfp4", 8, 64)
    object.__setattr__(bad, "scales", bad.scales[:-2])
    with pytest.raises(ValueError, match="scales .* must hold 16 bytes, got 14"):
        kernels.packed_linear(x, bad, None)
    bad = weight("mxfp4", 8, 64)
    object.__setattr__(bad, "codes", torch.zeros(512, dtype=torch.uint8)[::2])
    with pytest.raises(ValueError, match="codes must be contiguous"):
        kernels.packed_linear(x, bad, None)
    bad = weight("mxfp4", 8, 64)
    object.__setattr__(bad, "codes", bad.codes.to(torch.int16))
    with pytest.raises(TypeError, match="1-D uint8"):
        kernels.packed_linear(x, bad, None)


def test_plan_of_an_mxtensor_is_reused_and_rechecked_when_its_storage_changes():
    q = weight("mxfp4", 8, 64)
    x = torch.randn(2, 64)
    plan = gemm.plan_for(q, kernels._load())
    assert plan is not None and gemm.plan_for(q, kernels._load()) is plan
    assert torch.equal(kernels.packed_linear(x, q, None), plan(x, None))
    object.__setattr__(q, "codes", q.codes[:-1])   # forced past MXTensor's checks after the plan was made
    with pytest.raises(ValueError, match="codes .* must hold 256 bytes, got 255"):
        kernels.packed_linear(x, q, None)
    q = weight("mxfp4", 8, 64)
    plan = gemm.plan_for(q, kernels._load())
    q.scales.resize_(15)   # resized in place: the same tensor object, fewer bytes
    with pytest.raises(ValueError, match="scales .* must hold 16 bytes, got 15"):
        kernels.packed_linear(x, q, None)


@pytest.mark.parametrize("fmt", COVERED)
def test_tile_decode_is_dequantize_bit_for_bit_in_fp32_and_bf16(fmt):
    """The GEMM path's tiles (fp32, and bf16 for bf16 x) are dequantize(W) of the rows, bit for bit: every
    code, the extreme and NaN scale codes (the smallest scales put values in bf16's subnormal range,
    where the bf16 tile rounds to nearest even as torch's conversion does)."""
    f = ms.get_format(fmt)
    g = torch.Generator().manual_seed(3)
    n, k = 24, 96
    codes = torch.randint(0, 256, (n * k * f.element.bits // 8,), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (n * k // 32,), dtype=torch.uint8, generator=g)
    scales[:6] = torch.tensor([0, 1, 2, 127, 254, 255], dtype=torch.uint8)
    q = ms.MXTensor(codes, scales, (n, k), 1, f)
    plan = gemm.plan_for(q, kernels._load())
    ref32 = q.dequantize(torch.float32)
    for dtype, ref in ((torch.float32, ref32), (torch.bfloat16, ref32.bfloat16())):
        got = plan.decode_rows(0, torch.empty(n, k, dtype=dtype))
        part = plan.decode_rows(5, torch.empty(7, k, dtype=dtype))
        for g_, r_ in ((got, ref), (part, ref[5:12])):
            nan = torch.isnan(r_)
            assert torch.equal(torch.isnan(g_), nan)
            assert torch.equal(g_[~nan], r_[~nan])
            assert torch.equal(torch.signbit(g_[~nan]), torch.signbit(r_[~nan]))   # -0 kept
    with pytest.raises(ValueError, match=r"out must be \[rows, 96\]"):
        plan.decode_rows(20, torch.empty(7, k))
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.float16"):
        plan.decode_rows(0, torch.empty(7, k, dtype=torch.float16))


def test_tile_rows_fit_the_cache_and_the_weight():
    assert gemm.tile_rows(16384, 4096, 1) * 4096 * 4 <= gemm.TILE_BYTES
    assert gemm.tile_rows(16384, 4096, 2) * 4096 * 4 <= gemm.TILE_BYTES_THREADED
    assert gemm.tile_rows(37, 128, 1) == 37 and gemm.tile_rows(10**6, 10**6, 1) == 16
    assert gemm.tile_rows(16384, 4096, 1) % 16 == 0
    assert gemm.tile_rows(16384, 4096, 1, 2) * 4096 * 2 <= gemm.TILE_BYTES_BF16


_VARIANT_CHECK = r"""
import torch, torch.nn.functional as F
import microscale as ms
from microscale import kernels
torch.manual_seed(0)
for fmt in %r:
    for batch in (1, 2, 5, 8, 9, 40):
        for k in (100, 544):
            w = torch.randn(21, k) * torch.exp2(torch.randint(-6, 6, (21, 1)).float())
            q = ms.quantize(w, fmt, axis=1)
            x, b = torch.randn(batch, k), torch.randn(21)
            y = kernels.packed_linear(x, q, b)
            wd = q.dequantize()
            ref, mag = F.linear(x, wd, b), F.linear(x.abs(), wd.abs(), b.abs())
            assert bool(((y - ref).abs() <= 1e-5 * mag).all()), (fmt, batch, k)
from microscale.layout import from_blocks
from microscale.reference import cast_values, dequantize_blocks
for fmt in ("mxfp4_e2m1", "mxfp6_e3m2"):
    f = ms.get_format(fmt)
    q = ms.MXTensor(torch.randint(0, 256, (6 * 64 * f.element.bits // 8,), dtype=torch.uint8),
                    torch.randint(0, 256, (12,), dtype=torch.uint8), (6, 64), 1, f)
    ref = cast_values(from_blocks(dequantize_blocks(q.to_blocks(), f), q.layout), torch.float32)
    assert torch.equal(q.dequantize().view(torch.int32), ref.view(torch.int32)), fmt
from microscale.kernels import gemm
for fmt in %r:
    f = ms.get_format(fmt)
    q = ms.MXTensor(torch.randint(0, 256, (6 * 64 * f.element.bits // 8,), dtype=torch.uint8),
                    torch.randint(0, 256, (12,), dtype=torch.uint8), (6, 64), 1, f)
    ref = q.dequantize().bfloat16()
    got = gemm.plan_for(q, kernels._load()).decode_rows(0, torch.empty(6, 64, dtype=torch.bfloat16))
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16)), fmt
    x = torch.randn(40, 64).bfloat16()
    y = kernels.packed_linear(x, ms.quantize(torch.randn(6, 64), fmt, axis=1), None)
    assert y.dtype == torch.bfloat16 and y.shape == (40, 6)
print(kernels._load().gemm_info()["isa"])
""" % (COVERED, COVERED)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_compiled_isa_variant(isa):
    """The default run above uses the best variant of this CPU; the others only when capped."""
    env = dict(os.environ, MICROSCALE_KERNELS_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _VARIANT_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = out.stdout.strip().splitlines()[-1]
    assert got == isa or (isa == "avx2" and got == "baseline")   # a CPU without AVX2 falls back


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp6_e2m3"])
@pytest.mark.parametrize("shape", [(7, 64), (3, 2, 96), (1, 32)])
def test_fp32_dequantize_through_the_register_decode_is_bit_exact(fmt, shape):
    """4- / 6-bit dequantize along the last axis (whole blocks) takes the GEMV's decode: bit for bit the
    reference, for every code and the extreme and NaN scale codes, allocating and with out=."""
    from microscale.layout import from_blocks
    from microscale.reference import cast_values, dequantize_blocks
    f = ms.get_format(fmt)
    g = torch.Generator().manual_seed(len(shape))
    n_el = 1
    for s in shape:
        n_el *= s
    codes = torch.randint(0, 256, (n_el * f.element.bits // 8,), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (n_el // 32,), dtype=torch.uint8, generator=g)
    scales[: min(4, scales.numel())] = torch.tensor([0, 254, 255, 127], dtype=torch.uint8)[: min(4, scales.numel())]
    q = ms.MXTensor(codes, scales, shape, len(shape) - 1, f)
    assert gemm.dequantize_rows(q, None, kernels._load(), 1) is not None   # this path is the one under test
    ref = cast_values(from_blocks(dequantize_blocks(q.to_blocks(), f), q.layout), torch.float32)
    got = q.dequantize()
    out = torch.empty(shape)
    q.dequantize(out=out)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def test_register_decode_dequantize_checks_buffer_sizes_before_c():
    q = ms.quantize(torch.randn(4, 64), "mxfp4", axis=-1)
    object.__setattr__(q, "codes", torch.zeros(4, dtype=torch.uint8))   # forced past MXTensor's checks
    with pytest.raises(ValueError, match="expected exactly 128 bytes.*replaced or resized"):
        kernels.dequantize(q, torch.float32)


# ---- the AVX-512 GEMV lane paths (4-bit and 6-bit lanes over x reordered per call, 8-bit codes read as
# fp16 bits, block scales applied once per block) and their fall-backs ---------------------------------

@pytest.mark.parametrize("fmt", COVERED)
def test_gemv_every_row_count_and_k_chunking(fmt):
    """Every x row count of the GEMV (1..8: each its own compiled loop, two weight rows at a time up to 4),
    K spanning several of the GEMV's K chunks plus lane-chunk and block tails (K = 4096 + 96 + 5: 4-bit
    lanes cover 128 elements, 6-bit 64), an odd number of weight rows, with and without bias."""
    q = weight(fmt, 21, 4197, seed=11)
    g = torch.Generator().manual_seed(3)
    for batch in range(1, 9):
        x = torch.randn(batch, 4197, generator=g)
        b = torch.randn(21, generator=g) if batch % 2 else None
        assert_close_to_reference(kernels.packed_linear(x, q, b), x, q, b, 1e-5)


def _with_codes_and_scales(q, codes, scales):
    return ms.MXTensor(codes, scales, q.shape, q.axis, q.format)


@pytest.mark.parametrize("fmt", COVERED)
def test_gemv_extreme_and_subnormal_range_scales(fmt):
    """Scale codes 0..3 (weights in fp32's subnormal range), large codes 247..251 (where the E4M3 path's
    2^(X + 8) is no fp32 value: those rows fall back) and 255 (NaN) in single blocks of otherwise ordinary
    rows; the huge-scale blocks hold one small code, so the sums stay finite. Every output equals F.linear on the dequantized weight
    (NaN exactly where it has NaN)."""
    n, k = 10, 320
    q = weight(fmt, n, k, seed=4)
    f = q.format
    g = torch.Generator().manual_seed(9)
    scales = q.scales.clone().view(n, -1)
    scales[0, 1], scales[1, 0], scales[2, 9], scales[3, 4] = 0, 1, 3, 2      # subnormal range
    scales[4, 2], scales[5, 7], scales[6, 0] = 247, 249, 251                   # huge
    scales[7, 3] = 255                                                          # NaN
    codes = q.codes.clone().view(n, -1)
    bpb = 32 * f.element.bits // 8                                              # bytes per block
    for r, blk in ((4, 2), (5, 7), (6, 0)):   # one small code (the first) in the huge-scale blocks
        codes[r, blk * bpb:(blk + 1) * bpb] = 0
        codes[r, blk * bpb] = 1
    q2 = _with_codes_and_scales(q, codes.reshape(-1), scales.reshape(-1))
    w = q2.dequantize()
    for batch in (1, 2, 3, 8):
        x = torch.randn(batch, k, generator=g)
        y = kernels.packed_linear(x, q2, None)
        ref = F.linear(x, w)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert bool(torch.isnan(y[:, 7]).all()) and bool(torch.isfinite(y[:, :7]).all())
        ok = ~torch.isnan(ref)
        _, mag = reference(x, q2, None)
        assert bool(((y - ref).abs()[ok] <= 1e-5 * mag[ok] + 1e-37).all())


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp8_e5m2"])
def test_fp8_special_codes_in_single_blocks(fmt):
    """8-bit codes read as fp16 bits: NaN codes (E4M3 magnitude 0x7F, which that reading does not map to
    NaN: the rows are recomputed from the table), E5M2 infinities and NaNs (exact in the fp16 reading),
    subnormal codes, negative zero; one block of one row each, rows paired by the kernel."""
    n, k = 9, 256
    q = weight(fmt, n, k, seed=2)
    codes = q.codes.clone().view(n, k)
    codes[1, 37] = 0x7F
    codes[2, 200] = 0xFF
    codes[3, 0:8] = torch.tensor([0x01, 0x81, 0x02, 0x07, 0x80, 0x00, 0x83, 0x05], dtype=torch.uint8)
    codes[4, 64] = 0x7C     # E5M2 +inf (E4M3: a finite value)
    codes[5, 65] = 0xFC     # E5M2 -inf
    codes[6, 255] = 0x7E    # E5M2 NaN (E4M3: the largest finite value)
    q2 = _with_codes_and_scales(q, codes.reshape(-1), q.scales)
    w = q2.dequantize()
    g = torch.Generator().manual_seed(1)
    for batch in (1, 2, 5, 8):
        x = torch.randn(batch, k, generator=g)
        y = kernels.packed_linear(x, q2, None)
        ref = F.linear(x, w)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
        fin = torch.isfinite(ref)
        _, mag = reference(x, q2, None)
        assert bool(((y - ref).abs()[fin] <= 1e-5 * mag[fin] + 1e-30).all())


def test_avx512_lane_paths_agree_with_the_baseline_variant():
    """The AVX-512 lane paths against the portable (baseline) variant run in a subprocess: both within
    fp32 summation-order error of each other on every format, batch 1 and 8 (the paths differ only in
    summation order and where the block scale is applied)."""
    script = """
import torch, microscale as ms
from microscale import kernels
torch.manual_seed(0)
out = {}
for fmt in %r:
    q = ms.quantize(torch.randn(33, 1000) * 3, fmt, axis=1)
    for m in (1, 8):
        x = torch.randn(m, 1000)
        out[(fmt, m)] = kernels.packed_linear(x, q, None)
torch.save(out, %r)
"""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        res = {}
        for isa in ("avx512", "baseline"):
            path = os.path.join(d, isa + ".pt")
            env = dict(os.environ, MICROSCALE_KERNELS_ISA=isa)
            run = subprocess.run([sys.executable, "-c", script % (COVERED, path)], env=env, capture_output=True,
                                 text=True)
            assert run.returncode == 0, run.stderr[-2000:]
            res[isa] = torch.load(path)
        for key, y in res["avx512"].items():
            z = res["baseline"][key]
            assert bool(((y - z).abs() <= 2e-5 * z.abs().max()).all()), key


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp6_e2m3"])
def test_lane_paths_decode_every_code_at_every_position(fmt):
    """The 4-bit and 6-bit lane paths pick each code out of a lane by position (nibble shifts; 6-bit
    bit-field selects of a qword with wrap-around for the sign bit): every code value, at every position
    of a lane chunk (128 codes for 4 bits, 64 for 6), with its sign, must decode to the value dequantize()
    gives. Row r holds code (p * 5 + r) mod 2^bits at position p, so over 2^bits rows every (code,
    position) pair occurs; one-hot x rows read single weights out exactly."""
    from microscale.packing import pack_codes
    f = ms.get_format(fmt)
    bits = f.element.bits
    n, k = 1 << bits, 256
    p = torch.arange(k)
    codes = torch.stack([(p * 5 + r) % n for r in range(n)]).to(torch.uint8)
    scales = torch.full((n * k // 32,), 127, dtype=torch.uint8)
    scales[::3] = 125
    q = ms.MXTensor(pack_codes(codes.reshape(-1), bits), scales, (n, k), 1, f)
    w = q.dequantize()
    # every position, 8 x rows per call (the GEMV's widest loop) and single rows (batch 1 has its own loop)
    for cols in [torch.arange(c, c + 8) for c in range(0, k, 8)] + [torch.tensor([c]) for c in range(0, 136, 9)]:
        x = torch.zeros(len(cols), k)
        x[torch.arange(len(cols)), cols] = 1.0
        y = kernels.packed_linear(x, q, None)
        assert torch.equal(y, w[:, cols].T), (fmt, cols)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(0))
    assert_close_to_reference(kernels.packed_linear(x, q, None), x, q, None, 1e-5)

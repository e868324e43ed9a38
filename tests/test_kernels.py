"""The C kernels (microscale.kernels) against the reference quantizer, bit for bit.

Every comparison is on bit patterns, NaNs included (both paths write each dtype's canonical quiet NaN;
see reference.cast_values).
"""

import itertools
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microscale as ms
from microscale import kernels
from microscale.formats import E2M1, bdr_format, bfp_format
from microscale.layout import from_blocks
from microscale.packing import pack_codes, unpack_codes
from microscale.reference import cast_values, dequantize_blocks, fake_quantize_reference, quantize_reference
from microscale.tensor import MXTensor

FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"]
ROUNDINGS = ["even", "away", "zero", "stochastic"]
SCALE_MODES = ["floor", "ceil", "even", "rceil"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Two-level (BDR microexponent) formats (docs/bdr.md "Two-level rules"; reference._quantize_two_level): the
# kernels cover any sign + m (or small fp) element with k1 <= 256, a d1-bit power-of-two scale and k2-element
# sub-blocks with d2-bit microexponents. Single-level BFP/MSFP: sign-magnitude elements, d1-bit scales.
TWO_LEVEL = ["mx9", "mx6", "mx4",
             bdr_format(3, 8, 6, 1, 1), bdr_format(5, 32, 8, 4, 2), bdr_format(2, 16, 6, 8, 2),
             bdr_format(7, 32, 6, 2, 1), bdr_format(4, 8, 8, 8, 1), bdr_format(6, 16, 8, 1, 2),
             bdr_format(1, 16, 8, 2, 3), bdr_format(E2M1, 16, 8, 2, 1)]
BFP = ["msfp12", "msfp16", bfp_format(3, 16, 6), bfp_format(2, 8, 4), bfp_format(6, 32, 5)]
# every covered kind of format goes through the same parametrised tests: single-level and two-level loops
# are one family in C (_mxloops.c), specialized at compile time
ALL = FORMATS + BFP + TWO_LEVEL


def fmt_id(f):
    return f if isinstance(f, str) else f.name


# (shape, axis): last axis with a ragged length, first axis, a middle axis, a 1-D vector; rows of whole
# blocks (chunks that run across rows), long rows (several chunks, a ragged block), tiles wider than TILE
GEOMETRIES = [((5, 70), -1), ((70, 5), 0), ((3, 40, 7), 1), ((33,), 0),
              ((8, 64), -1), ((3, 1040), -1), ((2, 5, 96), 2), ((37, 130), 0)]



def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 8: torch.int64, 2: torch.int16}[t.element_size()])


def assert_same(ref: torch.Tensor, got: torch.Tensor, what=""):
    assert got is not None, f"kernel did not cover {what}"
    assert ref.dtype == got.dtype and ref.shape == got.shape, what
    bad = (bits(ref) != bits(got)).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}: " \
                             f"ref {ref[tuple(bad[0])].item()!r} kernel {got[tuple(bad[0])].item()!r}"


def sample(shape, dtype, seed=0, specials=True):
    """Values over a wide exponent range with zeros, -0.0, fp32 subnormals and (optionally) NaN/Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())
    flat = x.view(-1)
    n = flat.numel()
    flat[0] = 0.0
    if n > 5:
        flat[5] = -0.0
    if n > 7:
        flat[7] = 1e-40  # fp32 subnormal
    if specials and n > 60:
        flat[41] = float("nan")
        flat[59] = float("-inf")
    return x.to(dtype)


def check_all(x, fmt, axis, rounding, scale_mode, seed=None, out_dtypes=(torch.float32,)):
    """fake_quantize, quantize (codes, scales, and microexponents of two-level formats) and dequantize
    against the reference, bit for bit."""
    f = ms.get_format(fmt)
    seed = 1234 if rounding == "stochastic" and seed is None else seed
    what = f"{f.name} {rounding} {scale_mode} {x.dtype} {tuple(x.shape)} axis={axis}"
    ref = fake_quantize_reference(x, f, axis, rounding, scale_mode, seed=seed)
    assert_same(ref, kernels.fake_quantize(x, f, axis, rounding, scale_mode, seed, None), "fake " + what)
    q, layout = quantize_reference(x, f, axis, rounding, scale_mode, seed=seed)
    mref = MXTensor.from_blocks(q, layout, f)
    fast = kernels.quantize(x, f, axis, rounding, scale_mode, seed, None)
    assert fast is not None, what
    codes, scales, klayout, *micro = fast
    assert torch.equal(mref.codes, codes), "codes " + what
    assert torch.equal(mref.scales, scales), "scales " + what
    assert klayout == layout
    assert len(micro) == f.is_two_level
    if micro:
        assert torch.equal(mref.micro, micro[0]), "microexponents " + what
    for odt in out_dtypes:
        dref = cast_values(from_blocks(dequantize_blocks(mref.to_blocks(), f), mref.layout), odt)
        assert_same(dref, kernels.dequantize(mref, odt), f"dequantize->{odt} " + what)


@pytest.mark.parametrize("fmt", ALL, ids=fmt_id)
def test_every_rounding_and_scale_mode(fmt):
    x = sample((6, 96), torch.float32, seed=1)
    for rounding, scale_mode in itertools.product(ROUNDINGS, SCALE_MODES):
        check_all(x, fmt, -1, rounding, scale_mode)


@pytest.mark.parametrize("fmt", ALL, ids=fmt_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_axes_and_ragged_lengths(fmt, dtype):
    # each geometry with one rounding and scale mode, rotated by geometry and dtype so that every geometry
    # meets deterministic and stochastic rounding over the three dtypes
    d = DTYPES.index(dtype)
    for i, (shape, axis) in enumerate(GEOMETRIES):
        check_all(sample(shape, dtype, seed=12 + i), fmt, axis, ROUNDINGS[(i + d) % 4], SCALE_MODES[(i + 2 * d) % 4],
                  out_dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64))


@pytest.mark.parametrize("fmt", ALL, ids=fmt_id)
def test_wide_tiles_and_odd_inner(fmt):
    # inner > TILE (64) with a ragged tile, and a ragged block axis
    check_all(sample((37, 130), torch.float32, seed=3), fmt, 0, "away", "even")
    check_all(sample((2, 45, 67), torch.bfloat16, seed=4), fmt, 1, "zero", "rceil")


def _special_rows(k1):
    x = torch.randn(9, 2 * k1)
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    x[2, k1 + 5] = float("-inf")                     # second block of the row only
    x[3] = 0.0
    x[4] = -0.0
    x[5] = torch.randn(2 * k1) * 1e-41               # fp32 subnormals: smallest scale
    x[6] = torch.randn(2 * k1) * 2.0**126             # near the top of fp32
    x[7, 0] = torch.finfo(torch.float32).max         # ceil/even/rceil scales can round this up to 2^128
    x[8, ::2] = 0.0                                  # zero sub-blocks next to non-zero ones (k2 = 1, 2)
    x[8, :k1 // 2] = 0.0
    return x


@pytest.mark.parametrize("fmt", ALL, ids=fmt_id)
def test_special_blocks(fmt):
    x = _special_rows(ms.get_format(fmt).block_size)
    for rounding, scale_mode in itertools.product(ROUNDINGS, SCALE_MODES):
        check_all(x, fmt, -1, rounding, scale_mode, out_dtypes=DTYPES + [torch.float64])
        check_all(x.t().contiguous(), fmt, 0, rounding, scale_mode)


def test_nan_block_scale_code_and_values():
    x = torch.randn(2, 32)
    x[0, 7] = float("nan")
    q = ms.quantize(x, "mxfp4")
    assert q.scales.tolist()[0] == 0xFF
    assert (q.to_blocks().codes[0] == 0).all()
    assert q.dequantize()[0].isnan().all() and not q.dequantize()[1].isnan().any()
    zero = ms.quantize(torch.zeros(1, 32), "mxfp8")
    assert zero.scales.tolist() == [0] and (zero.codes == 0).all()


def test_negative_zero_keeps_sign_for_fp_elements():
    x = torch.full((1, 32), -0.0)
    x[0, 0] = 1.0
    x[0, 1] = -1e-30  # rounds to -0
    q = ms.quantize(x, "mxfp8_e4m3")
    codes = q.to_blocks().codes[0]
    assert codes[1].item() == 0x80 and codes[2].item() == 0x80
    y = ms.fake_quantize(x, "mxfp8_e4m3")
    assert torch.signbit(y[0, 1:]).all()
    assert not torch.signbit(ms.fake_quantize(x, "mxint8")[0, 1:]).any()  # int codes decode to +0


def test_exhaustive_fp32_exponents():
    """One element of every fp32 exponent (and a few mantissas) next to every block amax exponent."""
    e = torch.arange(-149, 128, dtype=torch.float64)
    vals = (torch.exp2(e) * torch.tensor([1.0, 1.5, 1.9999999]).reshape(3, 1)).reshape(-1).to(torch.float32)
    vals = vals[torch.isfinite(vals)]
    vals = torch.cat([vals, -vals])
    n = vals.numel() - vals.numel() % 32
    x = vals[:n].reshape(-1, 32)
    x = torch.cat([x, x[torch.randperm(x.shape[0])].flip(1)], 0)
    for fmt in FORMATS:
        for rounding, scale_mode in itertools.product(ROUNDINGS, SCALE_MODES):
            check_all(x, fmt, -1, rounding, scale_mode)


def test_element_ties_and_every_code():
    """Every element code, the midpoints between neighbours, and their neighbours, at a fixed scale."""
    for fmt in FORMATS:
        elem = ms.get_format(fmt).element
        v = np.unique(np.abs(elem.code_values[np.isfinite(elem.code_values)]))
        mids = (v[1:] + v[:-1]) / 2
        allv = np.concatenate([v, mids, np.nextafter(mids.astype(np.float32), 0), np.nextafter(mids.astype(np.float32), 9)])
        allv = np.concatenate([allv, -allv, [elem.max_normal * 1.01, elem.max_normal * 1.5]])
        x = torch.tensor(allv, dtype=torch.float32)
        x = torch.cat([x, x.new_zeros((-x.numel()) % 31)]).reshape(-1, 31)
        x = torch.cat([x, torch.full((x.shape[0], 1), elem.max_normal)], 1)  # pin the scale to 2^0
        for rounding in ROUNDINGS:
            check_all(x, fmt, -1, rounding, "floor")


def random_bits(shape, dtype, data_seed):
    """A tensor of random bit patterns of ``dtype``, mostly finite: the top exponent bit of most words is
    cleared so few blocks are NaN/Inf."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(data_seed)
    if dtype == torch.float32:
        raw = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
        raw &= np.where(rng.random(n) < 0.995, np.uint32(0xBFFFFFFF), np.uint32(0xFFFFFFFF))
        return torch.from_numpy(raw.view(np.float32).copy()).reshape(shape)
    raw = rng.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16)
    raw &= np.where(rng.random(n) < 0.995, np.uint16(0xBFFF), np.uint16(0xFFFF))
    return torch.from_numpy(raw.view(np.int16).copy()).view(dtype).reshape(shape)


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3).flatmap(lambda nd: st.tuples(st.lists(st.integers(1, 70), min_size=nd, max_size=nd),
                                                     st.integers(0, nd - 1))),
       st.sampled_from(ALL), st.sampled_from(ROUNDINGS), st.sampled_from(SCALE_MODES),
       st.sampled_from(DTYPES), st.integers(0, 2**32 - 1), st.integers(0, 2**31))
def test_random_bit_patterns(geom, fmt, rounding, scale_mode, dtype, seed, data_seed):
    shape, axis = geom
    x = random_bits(shape, dtype, data_seed)
    check_all(x, fmt, axis, rounding, scale_mode, seed=seed, out_dtypes=(torch.float32, torch.bfloat16))


def test_public_verbs_use_kernels_and_match_reference(monkeypatch):
    x = sample((4, 64), torch.float32, specials=False)
    calls = []
    real = kernels.fake_quantize

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(kernels, "fake_quantize", spy)
    y = ms.fake_quantize(x, "mxfp6_e2m3", axis=0)
    assert calls
    assert_same(fake_quantize_reference(x, "mxfp6_e2m3", 0), y)
    q = ms.quantize(x, "mxfp4", rounding="stochastic", seed=7)
    assert_same(ms.fake_quantize(x, "mxfp4", rounding="stochastic", seed=7), q.dequantize())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ms.fake_quantize(x, "mxfp4", rounding="stochastic", generator=g1),
                       ms.fake_quantize(x, "mxfp4", rounding="stochastic", generator=g2))


def test_non_contiguous_input_and_autograd():
    x = sample((64, 48), torch.float32, specials=False).t()  # non-contiguous view
    assert_same(fake_quantize_reference(x, "mxfp8", -1), ms.fake_quantize(x, "mxfp8", -1))
    w = x.clone().requires_grad_(True)
    y = ms.fake_quantize(w, "mxfp4", axis=0)
    assert y.requires_grad
    (y * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    assert_same(fake_quantize_reference(w.detach(), "mxfp4", 0), y.detach())


def test_large_tensor_multithreaded_matches_single_thread():
    x = sample((256, 1024), torch.bfloat16, specials=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = ms.fake_quantize(x, "mxfp6", axis=0, rounding="stochastic", seed=5)
        qa = ms.quantize(x, "mxfp4")
        torch.set_num_threads(1)
        b = ms.fake_quantize(x, "mxfp6", axis=0, rounding="stochastic", seed=5)
        qb = ms.quantize(x, "mxfp4")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(bits(a), bits(b))
    assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales)
    assert_same(fake_quantize_reference(x[:, :64], "mxfp6", 0, "stochastic", seed=5),
                kernels.fake_quantize(x[:, :64].contiguous(), ms.get_format("mxfp6"), 0, "stochastic", "floor",
                                      5, None))


def test_not_covered_requests_return_none():
    x = torch.randn(4, 32)
    f = ms.get_format("mxfp4")
    assert kernels.fake_quantize(x.double(), f, -1, "even", "floor", None, None) is None
    assert kernels.fake_quantize(x, f, -1, "even", "floor", None, "microxcaling") is None
    assert kernels.quantize(x, f, -1, "even", "floor", None, "microxcaling") is None
    # the public verb still works through the reference
    assert ms.fake_quantize(x, f, compat="microxcaling").shape == x.shape


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_load_failed", False)
    import builtins
    real_import = builtins.__import__

    def broken(name, *a, **k):
        if "_mxkernels" in name or (a and a[2] and "_mxkernels" in a[2]):
            raise ImportError("simulated missing extension")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", broken)
    x = torch.randn(3, 32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y1 = ms.fake_quantize(x, "mxfp4")
        y2 = ms.fake_quantize(x, "mxfp4")
    assert sum("C kernels unavailable" in str(m.message) for m in w) == 1
    assert torch.equal(y1, y2)
    assert torch.equal(y1, fake_quantize_reference(x, "mxfp4"))


def test_extension_is_built():
    # CI builds the extension (make test on a fresh clone); a silent fallback there would hide a build bug
    if os.environ.get("MICROSCALE_KERNELS") == "0":
        pytest.skip("kernels disabled")
    info = kernels.info()
    assert info is not None and info["openmp"] in (0, 1) and info["isa"] in ("avx512", "avx2", "baseline")


_VARIANT_CHECK = r"""
import itertools, torch, microscale as ms
from microscale import kernels
from microscale.reference import fake_quantize_reference, quantize_reference
from microscale.tensor import MXTensor
from microscale.formats import bdr_format
assert kernels.available()
g = torch.Generator().manual_seed(6)
x = torch.randn(24, 160, generator=g) * torch.exp2(torch.randint(-30, 30, (24, 1), generator=g).float())
x[0, 3], x[1, 5], x[2] = float("nan"), float("inf"), 0.0
x[3, :4] = torch.tensor([1e-40, -3e-39, 2.0 ** -149, -0.0])
x[4, ::2] = 0.0
fmts = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "msfp12",
        "mx9", "mx6", "mx4", bdr_format(3, 8, 6, 1, 2), bdr_format(5, 32, 8, 4, 1)]
for fmt, rnd, sm, ax, dt in itertools.product(fmts, ["even", "stochastic"], ["floor", "rceil"], [-1, 0],
                                              [torch.float32, torch.bfloat16]):
    xi = x.to(dt)
    ref = fake_quantize_reference(xi, fmt, ax, rnd, sm, seed=9)
    got = kernels.fake_quantize(xi, ms.get_format(fmt), ax, rnd, sm, 9, None)
    ints = torch.int32 if dt == torch.float32 else torch.int16
    assert torch.equal(ref.view(ints), got.view(ints)), (fmt, rnd, sm, ax, dt)
    q = ms.quantize(xi, fmt, axis=ax, rounding=rnd, scale_mode=sm, seed=9)
    qr, lay = quantize_reference(xi, fmt, ax, rnd, sm, seed=9)
    for name, t in MXTensor.from_blocks(qr, lay, fmt).components().items():
        assert torch.equal(q.components()[name], t), (name, fmt, rnd, sm, ax, dt)
    assert torch.equal(q.dequantize(dt).view(ints), ref.view(ints)), ("packed", fmt, rnd, sm, ax, dt)
print(kernels.info()["isa"])
"""


def run_variant_check(script: str, isa: str) -> None:
    """Run ``script`` in a subprocess with the kernels capped at ``isa``; it prints the ISA it ran last."""
    # the default run uses the best variant this CPU has; the others are only reachable by capping it
    import subprocess
    import sys
    env = dict(os.environ, MICROSCALE_KERNELS_ISA=isa)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got_isa = out.stdout.strip().splitlines()[-1]
    assert got_isa == isa or (isa == "avx2" and got_isa == "baseline")  # a CPU without AVX2 falls back


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_compiled_isa_variant_matches_the_reference(isa):
    run_variant_check(_VARIANT_CHECK, isa)


# ---- two-level (BDR microexponent) specifics -------------------------------------------------------------
def test_two_level_every_microexponent_and_exponent():
    """Sub-block maxima 0..5 binades below the block maximum (every microexponent and its clamp), next to
    block maxima of every fp32 exponent, subnormals included, for d2 = 1, 2, 3."""
    g = torch.Generator().manual_seed(13)
    e = torch.arange(-149, 128)
    rows = []
    for top in e.tolist():
        drops = torch.randint(0, 7, (8,), generator=g)
        mags = torch.exp2((top - drops).clamp(min=-149).double()) * (1 + torch.rand(8, generator=g, dtype=torch.float64))
        rows.append(torch.stack([mags, mags * torch.rand(8, generator=g, dtype=torch.float64)], 1).reshape(16))
    x = torch.stack(rows).float()
    x = torch.where(torch.isfinite(x), x, torch.finfo(torch.float32).max)
    x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    x[::7, 4:6] = 0.0
    for fmt in ["mx9", "mx4", bdr_format(3, 16, 8, 2, 2), bdr_format(5, 16, 8, 4, 3)]:
        for rounding, scale_mode in itertools.product(ROUNDINGS, ["floor", "even"]):
            check_all(x, fmt, -1, rounding, scale_mode)


def test_two_level_subnormal_and_zero_sub_blocks_in_ordinary_blocks():
    """Sub-blocks whose maximum is an fp32 subnormal, zero or -0.0 inside blocks of ordinary exponents, every
    block of the tensor ordinary (so that the kernels' fast path, with its shortcut microexponent, takes
    every chunk): their microexponent clamps to the largest one, as in the reference; fp32 and bf16 inputs
    (bf16 subnormals too)."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(64, 48, generator=g) * torch.exp2(torch.randint(-20, 20, (64, 1), generator=g).float())
    x[:, 2:4] = torch.randn(64, 2, generator=g) * 1e-39       # fp32 subnormal sub-block
    x[:, 6:8] = 0.0
    x[::2, 8:10] = -0.0
    x[1::3, 10] = 1e-45                                       # smallest subnormal beside a zero
    x[1::3, 11] = 0.0
    for fmt in ["mx9", "mx6", "mx4", bdr_format(3, 16, 8, 2, 2), bdr_format(5, 16, 8, 4, 3)]:
        for dtype in (torch.float32, torch.bfloat16):
            check_all(x.to(dtype), fmt, -1, "even", "floor")
            check_all(x.to(dtype), fmt, -1, "zero", "even")


def test_two_level_element_ties():
    """Every magnitude code at every microexponent, the midpoints between neighbours and their fp32
    neighbours, with the block scale pinned to 2^0 by a maximal element in sub-block 0."""
    for fmt in ["mx9", "mx6", "mx4"]:
        f = ms.get_format(fmt)
        m = f.element.int_bits - 1
        mag = np.arange(1 << m) * 2.0 ** (1 - m)
        mids = (mag[1:] + mag[:-1]) / 2
        v = np.concatenate([mag, mids, np.nextafter(mids.astype(np.float32), 0), np.nextafter(mids.astype(np.float32), 9)])
        cols = []
        for s in range(2):                       # microexponent 0 or 1: values scaled down by 2^-s
            w = np.concatenate([v, -v]) * 2.0**-s
            w = np.concatenate([w, np.zeros((-w.size) % 14)]).reshape(-1, 14)
            lead = np.full((w.shape[0], 2), f.element.max_normal)   # sub-block 0: pins X = 0
            cols.append(np.concatenate([lead, w], 1))
        x = torch.tensor(np.concatenate(cols), dtype=torch.float32)
        for rounding in ROUNDINGS:
            check_all(x, fmt, -1, rounding, "floor")


def test_two_level_public_verbs_out_and_idempotence(monkeypatch):
    x = sample((12, 80), torch.float32, seed=14, specials=False)
    calls = []
    real = kernels.quantize

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(kernels, "quantize", spy)
    for fmt in ["mx9", "mx6", "mx4"]:
        q = ms.quantize(x, fmt, rounding="stochastic", seed=3)
        q_ref, layout = quantize_reference(x, fmt, -1, "stochastic", seed=3)
        ref = MXTensor.from_blocks(q_ref, layout, fmt)
        for name, t in ref.components().items():
            assert torch.equal(q.components()[name], t), (fmt, name)
        y = ms.fake_quantize(x, fmt, rounding="stochastic", seed=3)
        assert_same(q.dequantize(), y, fmt)
        out = torch.empty_like(x)
        assert ms.fake_quantize(x, fmt, rounding="stochastic", seed=3, out=out) is out
        assert_same(y, out, fmt + " out=")
        deq_out = torch.empty(x.shape, dtype=torch.bfloat16)
        assert q.dequantize(torch.bfloat16, out=deq_out) is deq_out
        assert_same(cast_values(y.double(), torch.bfloat16), deq_out, fmt + " dequantize out=")
        z = ms.fake_quantize(x, fmt)                 # floor scales: quantized values are fixed points
        assert_same(z, ms.fake_quantize(z, fmt), fmt + " idempotence")
        assert_same(z, ms.fake_quantize(z.t(), fmt, axis=0).t(), fmt + " axis")
    assert len(calls) == 3


def test_two_level_multithreaded_matches_single_thread():
    x = sample((128, 1000), torch.bfloat16, seed=15)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = [ms.fake_quantize(x, "mx6", axis=ax, rounding=r, seed=5) for ax in (0, 1) for r in ("even", "stochastic")]
        qa = ms.quantize(x, "mx4", axis=0)
        torch.set_num_threads(1)
        b = [ms.fake_quantize(x, "mx6", axis=ax, rounding=r, seed=5) for ax in (0, 1) for r in ("even", "stochastic")]
        qb = ms.quantize(x, "mx4", axis=0)
    finally:
        torch.set_num_threads(old)
    for u, v in zip(a, b):
        assert torch.equal(bits(u), bits(v))
    for name, t in qa.components().items():
        assert torch.equal(t, qb.components()[name]), name
    assert_same(fake_quantize_reference(x[:, :48], "mx6", 1, "stochastic", seed=5),
                kernels.fake_quantize(x[:, :48].contiguous(), ms.get_format("mx6"), 1, "stochastic", "floor", 5, None))


def test_two_level_not_covered_falls_back_to_the_reference():
    x = torch.randn(4, 64)
    wide = bdr_format(7, 16, 8, 2, 5)            # 2^(1-7) * 2^(-127-31): values below fp32's range
    big = bdr_format(4, 512, 8, 2, 1)            # k1 above the kernels' two-level limit
    for f in (wide, big):
        assert kernels._params(f) is None
        assert kernels.fake_quantize(x, f, -1, "even", "floor", None, None) is None
        assert kernels.quantize(x, f, -1, "even", "floor", None, None) is None
    assert_same(fake_quantize_reference(x, wide), ms.fake_quantize(x, wide))
    q = ms.quantize(x, wide)
    assert q.micro is not None and kernels.dequantize(q, torch.float32) is None
    assert_same(fake_quantize_reference(x, wide), q.dequantize())
    for fmt in ALL:
        assert kernels._params(ms.get_format(fmt)) is not None, fmt


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp8_e5m2", "mxint8", "msfp12", "mx9", "mx4",
                                 bdr_format(3, 8, 6, 4, 2), bdr_format(E2M1, 16, 8, 1, 3)], ids=fmt_id)
def test_dequantize_any_stored_codes(fmt):
    """Arbitrary packed codes, scale codes (NaN and both ends of the range included) and microexponents, as a
    file or another producer could hold them: the kernels decode them exactly like the reference."""
    f = ms.get_format(fmt)
    g = torch.Generator().manual_seed(18)
    for shape, axis in [((7, 3 * f.block_size + 5), -1), ((2 * f.block_size + 3, 70), 0)]:
        q0 = ms.quantize(torch.randn(shape, generator=g), f, axis=axis)
        comps = {name: torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8)
                 for name, t in q0.components().items()}
        nan_code, top = f.scale.nan_code, f.scale.nan_code - 1
        comps["scales"] = torch.randint(0, nan_code + 1, comps["scales"].shape, generator=g, dtype=torch.uint8)
        comps["scales"][:3] = torch.tensor([nan_code, 0, top], dtype=torch.uint8)
        # stored values beyond the last code / sub-block are padding: keep them zero as the packers write them
        lay = q0.layout
        codes = unpack_codes(comps["codes"], f.element.bits, lay.n_elements_padded)
        micro = None
        if f.is_two_level:
            micro = unpack_codes(comps["micro"], f.micro_bits, lay.n_blocks * (lay.block_size // f.subblock_size))
            micro = pack_codes(micro, f.micro_bits)
        q = MXTensor(pack_codes(codes, f.element.bits), comps["scales"], q0.shape, q0.axis, f, micro)
        for odt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            dref = cast_values(from_blocks(dequantize_blocks(q.to_blocks(), f), q.layout), odt)
            assert_same(dref, kernels.dequantize(q, odt), f"{f.name} {shape} {odt}")


def test_mx6_hand_worked_block():
    """One MX6 block worked by hand from docs/bdr.md "Two-level rules" (sign + 4 magnitude bits, k1 = 16,
    k2 = 2, d2 = 1): amax 3.0 gives E = 1 (scale code 128); a sub-block whose max is below 2^E, or all zero,
    gets s = 1; elements are mag * 2^(E - s + 1 - 4), rounded half to even and saturated at mag 15."""
    x = torch.tensor([[3.0, 0.3, 0.7, -0.55, 0.0, 0.0, 1.0, 1.9375,
                       -2.125, 0.0625, 0.3, 0.2, 0.125, -0.0625, 2.5, 2.6]])
    expected = [3.0, 0.25, 0.75, -0.5, 0.0, 0.0, 1.0, 1.875, -2.0, 0.0, 0.25, 0.25, 0.125, 0.0, 2.5, 2.5]
    q = ms.quantize(x, "mx6")
    assert q.scales.tolist() == [128]
    assert q.micro.tolist() == [0b01101110]                       # s = 0,1,1,1,0,1,1,0, first in the low bit
    assert q.to_blocks().codes[0].tolist() == [12, 1, 6, 16 | 4, 0, 0, 8, 15, 16 | 8, 0, 2, 2, 1, 16 | 0, 10, 10]
    y = ms.fake_quantize(x, "mx6")
    assert y[0].tolist() == expected and not torch.signbit(y[0, 13])   # sign-magnitude -0 decodes to +0
    assert_same(y, q.dequantize())
    assert_same(fake_quantize_reference(x, "mx6"), y)


# ---- dequantize fast paths: word-table decode (AVX-512), exact bf16 stores, axis-0 tiles ---------------------
def _stored(f, shape, axis, g, extreme_every=0):
    """An MXTensor of ``shape`` blocked along ``axis`` with random codes and microexponents and mid-range
    scale codes (the fast paths), except that every ``extreme_every``-th block (0: none) gets one of the
    scale codes at both ends of the range, or the NaN code."""
    q0 = ms.quantize(torch.randn(shape, generator=g), f, axis=axis)
    lay = q0.layout
    codes = torch.randint(0, 1 << f.element.bits, (lay.n_elements_padded,), generator=g, dtype=torch.uint8)
    nan_code = f.scale.nan_code
    scales = torch.randint(nan_code // 2 - 20, nan_code // 2 + 20, (lay.n_blocks,), generator=g, dtype=torch.uint8)
    if extreme_every:
        ends = torch.tensor([0, 1, 2, 3, nan_code - 8, nan_code - 7, nan_code - 4, nan_code - 2, nan_code - 1, nan_code])
        idx = torch.arange(0, lay.n_blocks, extreme_every)
        scales[idx] = ends[torch.arange(idx.numel()) % ends.numel()].to(torch.uint8)
    micro = None
    if f.is_two_level:
        n_sub = lay.n_blocks * (lay.block_size // f.subblock_size)
        micro = pack_codes(torch.randint(0, 1 << f.micro_bits, (n_sub,), generator=g, dtype=torch.uint8), f.micro_bits)
    return MXTensor(pack_codes(codes, f.element.bits), scales, q0.shape, q0.axis, f, micro)


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8", "mx6", "mx4", "mx9"])
def test_dequantize_fast_paths_every_scale_code(fmt):
    """Rows of whole 512-element chunks (the word-table decode of 4/6-bit and MX6/MX4 blocks, the exact bf16
    stores), ragged rows (an odd number of MX6 blocks in the last chunk) and axis-0 tiles wider than TILE with
    a row count that is not a multiple of the block: mid-range scales, and chunks holding the scale codes 0..3,
    the top ones and NaN (values that leave fp32's normal range or bf16's). Every output dtype, bit for bit."""
    f = ms.get_format(fmt)
    g = torch.Generator().manual_seed(31)
    for shape, axis, every in [((6, 1024), -1, 0), ((6, 1024), -1, 37), ((5, 16 * 3 + 9), -1, 5),
                               ((3 * f.block_size + 7, 136), 0, 0), ((3 * f.block_size + 7, 136), 0, 11)]:
        q = _stored(f, shape, axis, g, every)
        for odt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            dref = cast_values(from_blocks(dequantize_blocks(q.to_blocks(), f), q.layout), odt)
            assert_same(dref, kernels.dequantize(q, odt), f"{f.name} {shape} axis={axis} every={every} {odt}")
            out = torch.empty(shape, dtype=odt)
            assert kernels.dequantize(q, odt, out=out) is out
            assert_same(dref, out, f"{f.name} {shape} axis={axis} every={every} {odt} out=")


def test_dequantize_axis0_large_output_streamed():
    """An axis-0 fp32 dequantize whose output is beyond the caches (> 16 MiB: written with streaming stores
    on AVX-512), with a ragged last block row and NaN / extreme scales, equals the reference."""
    f = ms.get_format("mxfp4_e2m1")
    g = torch.Generator().manual_seed(32)
    q = _stored(f, (4097, 1024), 0, g, 997)
    dref = cast_values(from_blocks(dequantize_blocks(q.to_blocks(), f), q.layout), torch.float32)
    assert_same(dref, q.dequantize())

"""Backends (microscale.backends): the torch backend bit for bit against the C kernels and the reference,
meta tensors, torch.compile, the Triton kernels under TRITON_INTERPRET=1, and backend selection.

Every comparison is on bit patterns (bitcheck.same_bits): codes, scales, microexponents and values,
NaN payloads and signed zeros included.
"""

import importlib.util
import itertools
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microscale as ms
from bitcheck import same_bits
from microscale import backends
from microscale.backends import QuantSpec, get_backend
from microscale.backends.bitfacts import bit_facts
from microscale.formats import E4M3, bdr_format, bfp_format
from microscale.tensor import component_specs

C, TORCH, REF = get_backend("c"), get_backend("torch"), get_backend("reference")
OCP = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"]
# beyond OCP: two-level MX9/MX6/MX4, MSFP, BFP with a 6-bit exponent, a d2 = 2 two-level format, FP elements
# with microexponents, an odd element width and an 8-element block
BDR = ["mx9", "mx6", "mx4", "msfp12", "msfp16", bfp_format(4, 32, 6), bdr_format(3, 16, 8, 4, 2),
       bdr_format(E4M3, 32, 8, 8, 1), bdr_format(4, 8)]
FORMATS = OCP + BDR
ROUNDINGS = ["even", "away", "zero", "stochastic"]
SCALE_MODES = ["floor", "ceil", "even", "rceil"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED = 0x5EED1234


def _name(fmt):
    return fmt if isinstance(fmt, str) else fmt.name


def sample(shape, dtype, seed=0):
    """Wide-range values with zeros, -0.0, fp32 subnormals, NaN, ±Inf and saturating magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-40, 40, shape, generator=g).float())
    flat = x.view(-1)
    flat[0], flat[5], flat[7], flat[9] = 0.0, -0.0, 1e-40, -3e-39
    flat[41], flat[59], flat[77] = float("nan"), float("-inf"), 3.4e38
    m = min(flat.numel(), 140) - 100
    flat[100:140] = torch.randn(m, generator=g) * 1e-41            # a block of fp32 subnormals
    return x.to(dtype)


DEQUANT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def assert_backends_agree(x, spec, axis, seed=SEED, with_reference=True, dequant=None):
    """torch == c (== reference) on fake-quantize values and on packed codes / scales / microexponents,
    and the torch decode of the packed result == the c decode, for output ``dequant`` (None: every dtype)."""
    ft, fc = TORCH.fake_quantize(x, spec, axis, seed), C.fake_quantize(x, spec, axis, seed)
    assert same_bits(ft, fc), f"fake_quantize torch != c: {spec.describe()} axis {axis} {x.dtype}"
    pt, pc = TORCH.quantize(x, spec, axis, seed), C.quantize(x, spec, axis, seed)
    for part in ("codes", "scales", "micro"):
        a, b = getattr(pt, part), getattr(pc, part)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{part}: {spec.describe()}"
    if with_reference:
        assert same_bits(ft, REF.fake_quantize(x, spec, axis, seed)), f"torch != reference: {spec.describe()}"
    q = ms.MXTensor(pt.codes, pt.scales, pt.layout.shape, pt.layout.axis, spec.format, pt.micro)
    for dtype in DEQUANT_DTYPES if dequant is None else (dequant,):
        assert same_bits(TORCH.dequantize(q, dtype), C.dequantize(q, dtype)), f"dequantize {dtype}"


# ---- every format x rounding x scale mode x axis x dtype on one tensor with every kind of value -------
def _every_combination(fmt, axes, dequant_every):
    x3 = {dt: sample((3, 64, 5), dt, seed=1) for dt in DTYPES}
    combos = itertools.product(ROUNDINGS, SCALE_MODES, DTYPES)
    for i, (rounding, scale_mode, dtype) in enumerate(combos):
        spec = QuantSpec.resolve(fmt, rounding, scale_mode)
        for axis in axes(i):
            assert_backends_agree(x3[dtype], spec, axis, with_reference=False,
                                  dequant=None if dequant_every else DEQUANT_DTYPES[i % 4])


@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_torch_backend_equals_c_every_mode(fmt):
    # every rounding x scale mode x input dtype; the axis and the output dtype cycle (full product: slow test)
    _every_combination(fmt, lambda i: ((1, 2, 0)[i % 3],), dequant_every=False)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS, ids=_name)
def test_torch_backend_equals_c_every_combination(fmt):
    _every_combination(fmt, lambda i: (1, 2, 0), dequant_every=True)


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxint8", "mx6", bdr_format(3, 16, 8, 4, 2)], ids=_name)
def test_torch_backend_equals_reference(fmt):
    x = sample((3, 64, 5), torch.float32, seed=2)
    for i, (rounding, scale_mode) in enumerate(itertools.product(ROUNDINGS, SCALE_MODES)):
        assert_backends_agree(x, QuantSpec.resolve(fmt, rounding, scale_mode), 1, dequant=DEQUANT_DTYPES[i % 4])


# ---- hypothesis: random bit patterns, narrow-range blocks, ragged lengths, specials at drawn places --------
_SPECIAL_BITS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x00000001, 0x807FFFFF,
                 0x7F7FFFFF, 0x00800000, 0x3F800000, 0x3FFFFFFF]


@st.composite
def tensors(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, (70, 24, 9)[ndim - 1]), min_size=ndim, max_size=ndim)))
    n = 1
    for s in shape:
        n *= s
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):   # any fp32 bit pattern
        raw = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
    else:                     # one binade range per tensor, as real data
        base, width = draw(st.integers(1, 254)), draw(st.integers(0, 30))
        exp = (base - torch.randint(0, width + 1, (n,), generator=g)).clamp(0, 254)
        raw = (torch.randint(0, 2, (n,), generator=g) << 31) | (exp << 23) | torch.randint(0, 2**23, (n,), generator=g)
    for pos, special in draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(_SPECIAL_BITS)), max_size=6)):
        raw[pos] = special
    bits = torch.where(raw >= 2**31, raw - 2**32, raw).to(torch.int32)
    dtype = draw(st.sampled_from(DTYPES))
    axis = draw(st.integers(-ndim, ndim - 1))
    return bits.view(torch.float32).reshape(shape).to(dtype), axis


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tensors(), fmt=st.sampled_from(FORMATS), rounding=st.sampled_from(ROUNDINGS),
       scale_mode=st.sampled_from(SCALE_MODES), seed=st.integers(0, 2**32 - 1),
       dequant=st.sampled_from(DEQUANT_DTYPES))
def test_torch_backend_bit_exact_hypothesis(data, fmt, rounding, scale_mode, seed, dequant):
    x, axis = data
    assert_backends_agree(x, QuantSpec.resolve(fmt, rounding, scale_mode), axis, seed, dequant=dequant)


def test_torch_backend_coverage_reasons():
    for fmt in FORMATS:
        assert TORCH.covers(QuantSpec.resolve(fmt), torch.ones(4))
    for fmt, why in [("nvfp4", "power-of-two"), ("int8_channel", "power-of-two"), ("fp8_e4m3", "no block scale"),
                     (bdr_format(15, 16), "16-bit elements")]:
        cov = TORCH.covers(QuantSpec.resolve(fmt), torch.ones(4))
        assert not cov and why in cov.reason, cov.reason
    assert "float64" in TORCH.covers(QuantSpec.resolve("mxfp4"), torch.ones(4, dtype=torch.float64)).reason
    assert "compat" in TORCH.covers(QuantSpec.resolve("mxfp4", compat="microxcaling"), torch.ones(4)).reason
    # d1 = 8 with 7 magnitude bits and d2 = 8: the smallest quantum 2^-387 is not an fp32 value
    assert "below fp32" in bit_facts(bdr_format(7, 16, 8, 2, 8))


# ---- meta tensors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_meta_tensors_keep_shape_and_dtype(dtype):
    x = torch.empty(3, 70, 5, device="meta", dtype=dtype)
    for fmt in ("mxfp4", "mxint8", "mx6"):
        y = ms.fake_quantize(x, fmt, axis=1)
        assert y.device.type == "meta" and y.shape == x.shape and y.dtype == dtype
        q = ms.quantize(x, fmt, axis=1, rounding="stochastic", seed=3)
        assert q.codes.device.type == "meta"
        for name, (cdtype, cshape) in component_specs(x.shape, 1, fmt).items():
            part = q.components()[name]
            assert part.dtype == cdtype and tuple(part.shape) == cshape, name
        d = q.dequantize(torch.bfloat16)
        assert d.device.type == "meta" and d.shape == x.shape and d.dtype == torch.bfloat16


def test_meta_tensor_gives_shapes_in_formats_no_backend_computes_on_meta():
    """nvfp4 (amax-scaled: neither c nor torch covers it, the reference cannot run on meta) still plans on
    meta: the verbs answer shapes without running any backend."""
    x = torch.empty(2, 32, device="meta")
    y = ms.fake_quantize(x, "nvfp4")
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    q = ms.quantize(x, "nvfp4")
    for name, (cdtype, cshape) in component_specs(x.shape, 1, "nvfp4").items():
        part = q.components()[name]
        assert part.device.type == "meta" and part.dtype == cdtype and tuple(part.shape) == cshape, name


# ---- torch.compile -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_fake_quantize_verb_is_bit_exact(compiler):
    # aot_eager: the verb traces as one graph (fullgraph) and the traced graph is bit-exact, in ~2 s;
    # inductor (slow): the generated code itself (C++ here, Triton on a GPU) is bit-exact too
    # (bf16 with NaNs: inductor once rewrote the canonical NaN that a float masked_fill wrote; regression)
    torch._dynamo.reset()
    x = sample((4, 64), torch.bfloat16, seed=3)
    compiled = torch.compile(lambda t: ms.fake_quantize(t, "mxfp4_e2m1", axis=0), fullgraph=True, backend=compiler)
    assert same_bits(compiled(x), C.fake_quantize(x, QuantSpec.resolve("mxfp4"), 0, None))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mx6", "mxint8", "mxfp8_e5m2"])
def test_compiled_torch_backend_quantize_dequantize_stochastic(fmt):
    from microscale.backends.torch_native import dequantize_parts, fake_quantize_bits, quantize_bits
    torch._dynamo.reset()
    spec = QuantSpec.resolve(fmt, "stochastic", "rceil")
    x = sample((6, 64), torch.bfloat16, seed=4)
    fq = torch.compile(lambda t, s: fake_quantize_bits(t, spec, 1, s), fullgraph=True)
    qz = torch.compile(lambda t, s: quantize_bits(t, spec, 1, s), fullgraph=True)
    dq = torch.compile(lambda c, sc, m: dequantize_parts(c, sc, m, x.shape, 1, spec.format, torch.float32),
                       fullgraph=True)
    for seed in (1, 2**32 - 1):   # a tensor seed: one compilation serves every seed
        s = torch.tensor(seed, dtype=torch.int64)
        assert same_bits(fq(x, s), C.fake_quantize(x, spec, 1, seed))
        p, pc = qz(x, s), C.quantize(x, spec, 1, seed)
        assert torch.equal(p.codes, pc.codes) and torch.equal(p.scales, pc.scales)
        assert (p.micro is None) == (pc.micro is None) and (p.micro is None or torch.equal(p.micro, pc.micro))
        q = ms.MXTensor(pc.codes, pc.scales, x.shape, 1, spec.format, pc.micro)
        assert same_bits(dq(pc.codes, pc.scales, pc.micro), C.dequantize(q, torch.float32))


# ---- selection --------------------------------------------------------------------------------------------------
def _chosen(x, fmt="mxfp4"):
    return backends.select(QuantSpec.resolve(fmt), x).name


def test_automatic_selection(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert _chosen(torch.ones(4)) == "c"
    assert _chosen(torch.ones(4, device="meta")) == "torch"
    assert _chosen(torch.ones(4, dtype=torch.float64)) == "reference"
    assert _chosen(torch.ones(4), "nvfp4") == "reference"
    assert backends.select(QuantSpec.resolve("mxfp4", compat="microxcaling"), torch.ones(4)).name == "reference"


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "torch")
    assert _chosen(torch.ones(4)) == "torch"
    x = sample((2, 64), torch.float32)
    assert same_bits(ms.fake_quantize(x, "mx4"), C.fake_quantize(x, QuantSpec.resolve("mx4"), -1, None))
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    assert _chosen(torch.ones(4)) == "reference"
    monkeypatch.setenv(backends.BACKEND_ENV, "auto")
    assert _chosen(torch.ones(4)) == "c"
    monkeypatch.setenv(backends.BACKEND_ENV, "c")
    with pytest.raises(ValueError, match=r"backend 'c' \(selected by MICROSCALE_BACKEND\) does not cover "
                                         r"nvfp4.*power-of-two block scales"):
        ms.quantize(torch.ones(32), "nvfp4")
    monkeypatch.setenv(backends.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="MICROSCALE_BACKEND: unknown backend 'cuda'; known backends: c, torch"):
        ms.quantize(torch.ones(32), "mxfp4")


def test_use_backend_context_nests_and_restores(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    with ms.use_backend("torch") as b:
        assert b is TORCH and _chosen(torch.ones(4)) == "torch"
        with ms.use_backend("auto"):
            assert _chosen(torch.ones(4)) == "c"        # the context beats the environment
        with ms.use_backend("c"):
            with pytest.raises(ValueError, match=r"backend 'c' \(selected by use_backend\) does not cover "
                                                 r"mxfp4_e2m1.*float64"):
                ms.fake_quantize(torch.ones(4, dtype=torch.float64), "mxfp4")
        assert _chosen(torch.ones(4)) == "torch"
    assert _chosen(torch.ones(4)) == "reference"
    with pytest.raises(ValueError, match="use_backend: unknown backend 'gpu'"):
        with ms.use_backend("gpu"):
            pass


def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    seen = {}
    with ms.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("thread", _chosen(torch.ones(4))))
        t.start()
        t.join()
        seen["main"] = _chosen(torch.ones(4))
    assert seen == {"thread": "c", "main": "reference"}


def test_mxtensor_dequantize_follows_selection(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    q = ms.quantize(sample((3, 64), torch.float32), "mx6")
    with ms.use_backend("torch"):
        assert backends.select_dequantize(q, torch.float32).name == "torch"
        y = q.dequantize(torch.float16)
    assert same_bits(y, C.dequantize(q, torch.float16))
    with ms.use_backend("reference"):
        assert same_bits(q.dequantize(), C.dequantize(q, torch.float32))


def test_backends_listing():
    rows = ms.backends()
    assert [r["name"] for r in rows] == ["c", "torch", "triton", "reference"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["torch"]["available"] and by_name["reference"]["available"]
    assert by_name["c"]["available"] == ms.kernels.available()
    for r in rows:
        assert r["available"] == (r["reason"] == "") and r["description"]
    if importlib.util.find_spec("triton") is None:
        assert not by_name["triton"]["available"] and "triton is not installed" in by_name["triton"]["reason"]


# ---- Triton kernels under the interpreter ----------------------------------------------------------------------
# Triton decides at decoration time whether its functions (its own library's included) are interpreted, so
# TRITON_INTERPRET=1 must be set before triton is first imported; torch.compile imports it. The checks
# therefore run in a fresh interpreter (on CPU; on a GPU machine they run the real kernels in-process too).
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed (optional extra)")


def triton_cases(cases):
    """Run ``_triton_agrees`` for each (format name, rounding, scale mode, dtype name, axis) case."""
    tb = get_backend("triton")
    reason = tb.unavailable_reason()
    assert reason is None, reason
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for fmt, rounding, scale_mode, dtype, axis in cases:
        _triton_agrees(tb, dev, fmt, rounding, scale_mode, getattr(torch, dtype), axis)


def _run_triton_cases(cases):
    import os
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(Path(ms.__file__).parents[1]), str(here)]))
    code = f"import test_backends as t; t.triton_cases({cases!r}); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=here)
    assert res.returncode == 0 and res.stdout.split()[-1:] == ["ok"], res.stderr[-3000:]


def _triton_agrees(tb, dev, fmt, rounding, scale_mode, dtype, axis):
    x = sample((3, 64, 5), dtype, seed=5)
    spec = QuantSpec.resolve(fmt, rounding, scale_mode)
    xd = x.to(dev)
    assert same_bits(tb.fake_quantize(xd, spec, axis, SEED).cpu(), C.fake_quantize(x, spec, axis, SEED))
    p, pc = tb.quantize(xd, spec, axis, SEED), C.quantize(x, spec, axis, SEED)
    assert torch.equal(p.codes.cpu(), pc.codes) and torch.equal(p.scales.cpu(), pc.scales)
    assert (p.micro is None) == (pc.micro is None) and (p.micro is None or torch.equal(p.micro.cpu(), pc.micro))
    q = ms.MXTensor(pc.codes, pc.scales, x.shape, axis, spec.format, pc.micro)
    qd = ms.MXTensor(p.codes, p.scales, x.shape, axis, spec.format, p.micro)
    for out in (torch.float32, torch.float64):
        assert same_bits(tb.dequantize(qd, out).cpu(), C.dequantize(q, out))


@_needs_triton
def test_triton_kernels_bit_exact():
    _run_triton_cases([("mx6", "stochastic", "ceil", "bfloat16", 2)])


_TRITON_FORMATS = [f for f in FORMATS if isinstance(f, str)]


@pytest.mark.slow
@_needs_triton
def test_triton_kernels_bit_exact_every_mode():
    cases = [(fmt, r, sm, ("float32", "bfloat16", "float16")[i % 3], i % 3)
             for fmt in _TRITON_FORMATS for i, (r, sm) in enumerate(itertools.product(ROUNDINGS, SCALE_MODES))]
    _run_triton_cases(cases)


def test_triton_coverage_without_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tb = get_backend("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert tb.unavailable_reason()
    with ms.use_backend("triton"), pytest.raises(ValueError, match="backend 'triton'.*is not available"):
        ms.fake_quantize(torch.ones(32), "mxfp4")


def test_importing_microscale_imports_neither_dynamo_nor_triton():
    # regression: marking bit_facts constant through torch.compiler imported torch._dynamo, which imports
    # triton when installed (before TRITON_INTERPRET could be set) and slows every import
    import subprocess
    import sys
    code = "import sys, microscale; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_pack_codes_on_meta_and_pack_bits_match():
    # packing is device-generic: the range check needs data, so meta codes skip it; pack_bits == pack_codes
    from microscale.packing import pack_bits, pack_codes, unpack_codes
    assert pack_codes(torch.empty(10, dtype=torch.uint8, device="meta"), 6).shape == (8,)
    codes = torch.randint(0, 32, (37,), generator=torch.Generator().manual_seed(0))
    for bits in (5, 6, 7):
        assert torch.equal(pack_bits(codes, bits), pack_codes(codes, bits))
        assert torch.equal(unpack_codes(pack_bits(codes, bits), bits, 37), codes.to(torch.uint8))
    with pytest.raises(ValueError, match=rf"codes out of range for 4-bit packing: \[0, {int(codes.max())}\]"):
        pack_codes(codes, 4)

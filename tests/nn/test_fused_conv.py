"""The fused MX grouped / depthwise convolution (kernels/_mxconv.c, kernels/conv.py, nn.mx_grouped_conv2d):
its quantized windows (forward) and columns (wgrad, blocked along the tokens) are bit for bit
fake_quantize(im2col(x)), its outputs and gradients equal the im2col + batched-GEMM path's up to fp32
summation order, every ISA variant agrees, and bad calls raise before C runs."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import microscale as ms
from microscale import kernels
from microscale import nn as mnn
from microscale.kernels import conv as kconv
from microscale.nn import modules as mmod
from microscale.nn.functional import im2col

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built")

FORMATS = ["mxfp8", "mxfp6", "mxfp4", "mxint8", "mxfp8_e5m2", "mxfp6_e3m2"]

# (N, C, H, W, O, groups, kernel, stride, padding, dilation)
GEOMETRIES = [
    (2, 16, 9, 9, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)),      # depthwise 3x3, padding 1
    (3, 8, 11, 10, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1)),       # stride 2, odd sizes
    (2, 8, 7, 7, 16, 8, (3, 3), (1, 1), (1, 1), (1, 1)),        # channel multiplier 2
    (3, 12, 11, 10, 8, 4, (3, 3), (2, 2), (2, 2), (2, 2)),      # grouped (K = 27), dilation 2
    (1, 5, 6, 7, 5, 5, (3, 2), (2, 1), (1, 0), (1, 1)),         # rectangular kernel, uneven stride/padding
    (2, 32, 5, 5, 32, 4, (3, 3), (1, 1), (0, 0), (1, 1)),       # K = 72: three blocks, the last ragged
    (2, 6, 4, 9, 6, 6, (5, 5), (1, 3), (2, 2), (1, 1)),         # window wider than the row segment
]


def reference(x, wq, bias, k, s, p, d, groups, fmt):
    """Today's path: zero padding, im2col, fake_quantize along K, batched GEMM, + bias."""
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    cols, ho, wo = im2col(xp, k, s, d)
    cq = ms.fake_quantize(cols.view(groups, -1, cols.shape[-1]), fmt, axis=1)
    o = wq.shape[0]
    y = torch.matmul(wq.reshape(groups, o // groups, -1), cq)
    if bias is not None:
        y = y + bias.view(groups, o // groups, 1)
    bound = torch.matmul(wq.reshape(groups, o // groups, -1).abs(), cq.abs())   # sum |w| |x|: the error scale
    to_nchw = lambda t: t.reshape(o, x.shape[0], ho, wo).transpose(0, 1)  # noqa: E731
    return to_nchw(y), cq, to_nchw(bound)


def awkward_input(shape, seed):
    """Normal values plus the blocks that take the other code paths: zeros, fp32 subnormals (the slow
    rounding path), huge values (saturation), one Inf and one NaN window."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 7, shape, generator=g).float())
    x[0, 0, :2, :3] = 0.0
    x[-1, -1, 1, :] = 3e-39
    x[0, -1, -1, -1] = 2.5e38
    x[-1, 0, 0, 0] = float("inf")
    x[0, 0, -1, 0] = float("nan")
    return x


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:6])) + f"-s{g[7][0]}{g[7][1]}")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_windows_bit_identical_and_outputs_match_im2col(geom, fmt, bias):
    n, c, h, w, o, groups, k, s, p, d = geom
    torch.manual_seed(1)
    x = awkward_input((n, c, h, w), 2)
    wq = ms.fake_quantize(torch.randn(o, c // groups * k[0] * k[1]), fmt, axis=1).view(o, c // groups, *k)
    b = torch.randn(o) if bias else None
    y, windows = kconv.conv_forward(x, wq, b, s, p, d, groups, fmt, return_windows=True)
    ref, cq, bound = reference(x, wq, b, k, s, p, d, groups, fmt)
    assert torch.equal(windows.view(torch.int32), cq.view(torch.int32))     # NaN windows included, bit for bit
    assert y.shape == ref.shape
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(y)) and torch.equal(torch.isnan(ref), torch.isnan(y))
    assert torch.equal(y[torch.isinf(ref)], ref[torch.isinf(ref)])
    err = (y - ref)[finite].abs()
    scale = bound[finite] + (0 if b is None else b.abs().view(1, -1, 1, 1).expand_as(ref)[finite])
    assert (err <= 1e-5 * scale + 1e-30).all(), (err / scale.clamp_min(1e-30)).max()


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:6])) + f"-s{g[7][0]}{g[7][1]}")
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp6", "mxfp4", "mxint8"])
def test_wgrad_columns_bit_identical_and_gradient_matches(geom, fmt):
    """wgrad: the columns quantized along the tokens (blocks of 32 from token 0, crossing rows and images)
    bit for bit; the weight gradient within fp32 summation error of a float64 product of those operands."""
    n, c, h, w, o, groups, k, s, p, d = geom
    x = awkward_input((n, c, h, w), 7)
    x[~torch.isfinite(x) | (x.abs() > 1e30)] = 1.0   # (sums of huge values overflow fp32 on either path)
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    cols, ho, wo = im2col(xp, k, s, d)
    tokens = cols.shape[-1]
    gyq = ms.fake_quantize(torch.randn(groups, o // groups, tokens), fmt, axis=2)
    gw, colsq = kconv.conv_wgrad(x, gyq, (o, c // groups, *k), s, p, d, groups, fmt, return_columns=True)
    ref_cols = ms.fake_quantize(cols.view(groups, -1, tokens), fmt, axis=2)
    assert torch.equal(colsq.view(torch.int32), ref_cols.view(torch.int32))
    exact = torch.matmul(gyq.double(), ref_cols.double().transpose(1, 2)).reshape(gw.shape)
    bound = torch.matmul(gyq.double().abs(), ref_cols.double().abs().transpose(1, 2)).reshape(gw.shape)
    assert ((gw.double() - exact).abs() <= 1e-5 * bound + 1e-30).all()


def test_wgrad_bad_calls_raise_before_c():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"gyq must be \[G, O/G, N·Ho·Wo\]"):
        kconv.conv_wgrad(x, torch.randn(4, 1, 49), (4, 1, 3, 3), 1, 1, 1, 4, "mxfp6")
    with pytest.raises(TypeError, match="float32"):
        kconv.conv_wgrad(x, torch.randn(4, 1, 50).half(), (4, 1, 3, 3), 1, 1, 1, 4, "mxfp6")
    with pytest.raises(ValueError, match="multiples of groups"):
        kconv.conv_wgrad(x, torch.randn(4, 1, 50), (4, 1, 3, 3), 1, 1, 1, 3, "mxfp6")


@pytest.mark.parametrize("rounding,scale_mode", [("away", "floor"), ("zero", "ceil"), ("even", "even"),
                                                 ("even", "rceil")])
def test_every_deterministic_option_is_bit_identical(rounding, scale_mode):
    x = awkward_input((2, 8, 9, 9), 3)
    wq = torch.randn(8, 1, 3, 3)
    _, windows = kconv.conv_forward(x, wq, None, 1, 1, 1, 8, "mxfp6", rounding, scale_mode, return_windows=True)
    cols, _, _ = im2col(F.pad(x, (1, 1, 1, 1)), (3, 3), (1, 1), (1, 1))
    ref = ms.fake_quantize(cols.view(8, 9, -1), "mxfp6", axis=1, rounding=rounding, scale_mode=scale_mode)
    assert torch.equal(windows.view(torch.int32), ref.view(torch.int32))


def test_not_covered_requests_return_none():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    assert kconv.conv_forward(x, w, None, 1, 1, 1, 4, "mxfp6", "stochastic") is None   # noise by column index
    assert kconv.conv_forward(x.double(), w.double(), None, 1, 1, 1, 4, "mxfp6") is None
    assert kconv.conv_forward(x, w, None, 1, 1, 1, 4, "mx6") is None                     # microexponents
    assert kconv.conv_forward(torch.randn(1, 64, 5, 5), torch.randn(4, 32, 3, 3), None, 1, 1, 1, 2, "mxfp6") is None


@pytest.mark.parametrize("call,err,match", [
    (lambda x, w: kconv.conv_forward(x[0], w, None, 1, 1, 1, 4, "mxfp6"), ValueError, r"\[N, C, H, W\]"),
    (lambda x, w: kconv.conv_forward(x, w[:, :, 0], None, 1, 1, 1, 4, "mxfp6"), ValueError, r"\[O, C/G, kh, kw\]"),
    (lambda x, w: kconv.conv_forward(x, w, None, 1, 1, 1, 3, "mxfp6"), ValueError, "multiples of groups"),
    (lambda x, w: kconv.conv_forward(x, w, None, 1, 1, 1, 2, "mxfp6"), ValueError, "input channels"),
    (lambda x, w: kconv.conv_forward(x, w, None, 0, 1, 1, 4, "mxfp6"), ValueError, "stride and dilation"),
    (lambda x, w: kconv.conv_forward(x, w, None, (1, 1, 1), 1, 1, 4, "mxfp6"), TypeError, "pair of ints"),
    (lambda x, w: kconv.conv_forward(x, w, torch.zeros(3), 1, 1, 1, 4, "mxfp6"), ValueError, "bias"),
    (lambda x, w: kconv.conv_forward(x, w.half(), None, 1, 1, 1, 4, "mxfp6"), TypeError, "float32"),
    (lambda x, w: kconv.conv_forward(x, w, None, 1, 0, 4, 4, "mxfp6"), ValueError, "smaller than the dilated"),
    (lambda x, w: kconv.conv_forward(x, "w", None, 1, 1, 1, 4, "mxfp6"), TypeError, "tensors"),
])
def test_bad_calls_raise_before_c(call, err, match):
    with pytest.raises(err, match=match):
        call(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3))


def test_functional_entry_point():
    """nn.mx_grouped_conv2d directly: ints for stride/padding/dilation, the same result as the module."""
    torch.manual_seed(9)
    conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3)
    x = torch.randn(2, 6, 7, 8)
    q = mnn.quantize_model(copy.deepcopy(conv), "mxfp8")
    y = mnn.mx_grouped_conv2d(x, conv.weight, conv.bias, 2, 1, 1, 3, "mxfp8")
    assert torch.equal(y, q(x))
    with pytest.raises(ValueError, match="groups must be a positive int"):
        mnn.mx_grouped_conv2d(x, conv.weight, conv.bias, 2, 1, 1, 4, "mxfp8")


def test_threads_give_the_same_bits():
    """Every item (output tile, wgrad row) is computed by one thread in a fixed order: any thread count
    gives the same bits."""
    x = torch.randn(4, 32, 20, 20)
    wq = ms.fake_quantize(torch.randn(32, 9), "mxfp6", axis=1).view(32, 1, 3, 3)
    gyq = ms.fake_quantize(torch.randn(32, 1, 4 * 400), "mxfp6", axis=2)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append((kconv.conv_forward(x, wq, None, 1, 1, 1, 32, "mxfp6"),
                        kconv.conv_wgrad(x, gyq, (32, 1, 3, 3), 1, 1, 1, 32, "mxfp6")))
    finally:
        torch.set_num_threads(before)
    for y, gw in out[1:]:
        assert torch.equal(y, out[0][0]) and torch.equal(gw, out[0][1])


def test_c_boundary_check_holds():
    """The single C boundary check (kernels.checked_pointers) rejects a buffer of the wrong size."""
    with pytest.raises(ValueError, match="conv_forward: buffer 'y': expected exactly"):
        kernels.checked_pointers("conv_forward", [("y", torch.empty(3), torch.float32, 16)])


# ---- the modules: fused forward vs the im2col path -------------------------------------------------------
def run(module, x, gy, fused, monkeypatch):
    monkeypatch.setattr(mmod, "fused_grouped_conv", fused)
    x = x.clone().requires_grad_()
    for p_ in module.parameters():
        p_.grad = None
    y = module(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [p_.grad for p_ in module.parameters()]


MODULES = [
    lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
    lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
    lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8),
    lambda: nn.Conv2d(12, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=3),
    lambda: nn.Conv2d(8, 8, 4, padding="same", groups=8),                     # asymmetric padding
    lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
    lambda: nn.Conv1d(8, 8, 5, padding=2, groups=8),
]


@pytest.mark.parametrize("make", MODULES, ids=range(len(MODULES)))
@pytest.mark.parametrize("recipe", ["mxfp6", "mxfp8", "mxfp4", "mxint8"])
def test_module_fused_matches_im2col_path(make, recipe, monkeypatch):
    torch.manual_seed(4)
    conv = make()
    x = torch.randn(3, conv.in_channels, 11, 9) if isinstance(conv, nn.Conv2d) else torch.randn(3, 8, 23)
    gy = torch.randn_like(conv(x))
    q = mnn.quantize_model(copy.deepcopy(conv), recipe)
    fused, plain = run(q, x, gy, True, monkeypatch), run(q, x, gy, False, monkeypatch)
    for a, b in zip(fused, plain):   # output, dX, dW: the same quantized operands summed in another order
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max())
    if conv.bias is not None:
        assert torch.equal(fused[3], plain[3])   # the bias gradient is the same sum
    monkeypatch.setattr(mmod, "fused_grouped_conv", True)
    assert [c.op for c in mnn.coverage(q, x).gemms] == ["grouped_conv"]


@pytest.mark.parametrize("recipe", [
    mnn.Recipe.from_formats("mxfp6", "mxfp6", "mxfp6", grad_rounding="stochastic", seed=3),
    mnn.Recipe.from_formats("mxfp6", "mxfp6", "mxfp8", elementwise="bf16", seed=3),
], ids=["stochastic-grads", "bf16-elementwise"])
def test_backward_parts_outside_the_fused_kernels_match_the_im2col_path(recipe, monkeypatch):
    """Stochastic gradient rounding draws its noise by the columns' flat index and bf16 rounding applies to
    the dgrad columns: those parts take the im2col path, with the same seeds in the same order."""
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 9, 9)
    gy = torch.randn_like(conv(x))
    fused = run(mnn.quantize_model(copy.deepcopy(conv), recipe), x, gy, True, monkeypatch)
    plain = run(mnn.quantize_model(copy.deepcopy(conv), recipe), x, gy, False, monkeypatch)
    assert torch.equal(fused[1], plain[1])                                    # dX: the im2col path itself
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max())


def test_fused_path_is_taken_only_where_covered(monkeypatch):
    x = torch.randn(2, 8, 6, 6)
    ops = lambda m: [c.op for c in mnn.coverage(m, x).gemms]  # noqa: E731
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert ops(mnn.quantize_model(copy.deepcopy(dw), "mxfp6")) == ["grouped_conv"]
    stochastic = mnn.Recipe.from_formats("mxfp6", "mxfp6", "mxfp6", rounding="stochastic", seed=1)
    assert ops(mnn.quantize_model(copy.deepcopy(dw), stochastic)) == ["bmm"]
    assert ops(mnn.quantize_model(copy.deepcopy(dw), "mxfp6-w")) == ["bmm"]              # activations not quantized
    assert ops(mnn.quantize_model(nn.Conv2d(8, 8, 3, padding=1), "mxfp6")) == ["bmm"]    # groups = 1: im2col GEMM
    wide = nn.Conv2d(2, 2 * 257, 1, groups=2)                                             # 257 outputs per group
    assert [c.op for c in mnn.coverage(mnn.quantize_model(wide, "mxfp6"), torch.randn(1, 2, 3, 3)).gemms] == ["bmm"]
    with ms.use_backend("reference"):
        assert ops(mnn.quantize_model(copy.deepcopy(dw), "mxfp6")) == ["bmm"]            # the backend chosen rules
    monkeypatch.setattr(mmod, "fused_grouped_conv", False)
    assert ops(mnn.quantize_model(copy.deepcopy(dw), "mxfp6")) == ["bmm"]


def test_packed_depthwise_takes_the_fused_kernel_and_matches_training():
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 7, 6)
    train = mnn.quantize_model(copy.deepcopy(conv), "mxfp6")
    packed = mnn.quantize_model(copy.deepcopy(conv), "mxfp6", inference=True)
    with torch.no_grad():
        assert torch.equal(train(x), packed(x))
        assert [c.op for c in mnn.coverage(packed, x).gemms] == ["grouped_conv"]


_VARIANT_CHECK = """
import torch, torch.nn.functional as F, microscale as ms
from microscale.kernels import conv
from microscale.nn.functional import im2col
g = torch.Generator().manual_seed(5)
for fmt in ["mxfp8", "mxfp6", "mxfp4", "mxint8"]:
    for (n, c, h, w, o, G, k, s, p) in [(2, 16, 9, 9, 16, 16, 3, 1, 1), (3, 8, 11, 10, 16, 8, 3, 2, 1), (2, 32, 5, 5, 32, 4, 3, 1, 0)]:
        x = torch.randn(n, c, h, w, generator=g) * 4.0 ** torch.randint(-20, 20, (n, c, h, w), generator=g)
        x[0, 0, 0, 0] = float("nan")
        wq = ms.fake_quantize(torch.randn(o, c // G * k * k, generator=g), fmt, axis=1).view(o, c // G, k, k)
        y, win = conv.conv_forward(x, wq, None, s, p, 1, G, fmt, return_windows=True)
        cols, ho, wo = im2col(F.pad(x, (p, p, p, p)), (k, k), (s, s), (1, 1))
        cq = ms.fake_quantize(cols.view(G, -1, cols.shape[-1]), fmt, axis=1)
        assert torch.equal(win.view(torch.int32), cq.view(torch.int32)), (fmt, n, c)
        ref = torch.matmul(wq.reshape(G, o // G, -1), cq).reshape(o, n, ho, wo).transpose(0, 1)
        ok = torch.isfinite(ref)
        assert torch.allclose(y[ok], ref[ok], rtol=1e-5, atol=1e-30), (fmt, n, c)
        gyq = ms.fake_quantize(torch.randn(G, o // G, cols.shape[-1], generator=g), fmt, axis=2)
        xf = torch.randn(n, c, h, w, generator=g)
        gw, colsq = conv.conv_wgrad(xf, gyq, (o, c // G, k, k), s, p, 1, G, fmt, return_columns=True)
        colsf, _, _ = im2col(F.pad(xf, (p, p, p, p)), (k, k), (s, s), (1, 1))
        assert torch.equal(colsq, ms.fake_quantize(colsf.view(G, -1, colsf.shape[-1]), fmt, axis=2)), (fmt, n, c)
        ref = torch.matmul(gyq.double(), colsq.double().transpose(1, 2)).reshape(gw.shape)
        assert torch.allclose(gw.double(), ref, rtol=1e-5, atol=1e-6), (fmt, n, c)
print(ms.kernels._load().conv_info()["isa"])
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_compiled_isa_variant_matches(isa):
    env = dict(os.environ, MICROSCALE_KERNELS_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _VARIANT_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = out.stdout.strip().splitlines()[-1]
    assert got == isa or (isa == "avx2" and got == "baseline")


@pytest.mark.parametrize("make,x", [
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(8, 7, 9)),                      # unbatched
    (lambda: nn.Conv1d(6, 6, 3, padding=1, groups=3), torch.randn(6, 20)),                         # unbatched 1-D
    (lambda: nn.Conv2d(8, 16, 3, stride=2, groups=8),
     torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)),
], ids=["unbatched-2d", "unbatched-1d", "channels-last"])
def test_other_input_layouts(make, x, monkeypatch):
    torch.manual_seed(6)
    conv = make()
    gy = torch.randn_like(conv(x))
    q = mnn.quantize_model(copy.deepcopy(conv), "mxfp6")
    fused, plain = run(q, x, gy, True, monkeypatch), run(q, x, gy, False, monkeypatch)
    assert fused[0].shape == plain[0].shape
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max())

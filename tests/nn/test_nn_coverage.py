"""Training coverage (issue 11, acceptance items 1 and 6's correctness half): every forward GEMM of the
transformers / torch models below runs on MX operands under "mxfp6", as measured by a TorchDispatchMode
probe (ms.nn.coverage) that checks each mm/addmm/bmm/convolution operand is a fixed point of
fake_quantize along its reduction axis; grouped/depthwise convs as one batched GEMM equal to the
per-group loop they replace; subclass swaps; the full-precision warning; MHA under torch.compile."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import microscale as ms
from microscale import nn as mnn
from microscale.nn.modules import im2col

from test_nn_ops import MIXED, assert_all_equal, grads

transformers = pytest.importorskip("transformers")


# ---- the models of acceptance item 1 ------------------------------------------------------------------
def dw_separable_block():
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                         nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())


def _ids():
    return (torch.randint(0, 96, (2, 12)),)


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), _ids()


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96)
    return transformers.LlamaForCausalLM(cfg), _ids()


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  vocab_size=96)
    return transformers.BertForMaskedLM(cfg), _ids()


def vit():
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 image_size=32, patch_size=8, num_labels=10)
    return transformers.ViTForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def encoder_layer():
    return nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), (torch.randn(2, 9, 32),)


def mha():
    x = torch.randn(2, 9, 32)
    return nn.MultiheadAttention(32, 4, batch_first=True), (x, x, x)


def conv_block():
    return dw_separable_block(), (torch.randn(2, 16, 12, 12),)


CASES = [
    pytest.param(gpt2, "train", id="gpt2"), pytest.param(gpt2, "eval", id="gpt2-eval"),
    pytest.param(llama, "train", id="llama"), pytest.param(llama, "eval", id="llama-eval"),
    pytest.param(bert, "train", id="bert"), pytest.param(bert, "eval", id="bert-eval"),
    pytest.param(vit, "train", id="vit"), pytest.param(vit, "eval", id="vit-eval"),
    pytest.param(encoder_layer, "train", id="TransformerEncoderLayer"),
    pytest.param(encoder_layer, "eval", id="TransformerEncoderLayer-eval"),
    pytest.param(mha, "train", id="MultiheadAttention"), pytest.param(mha, "eval", id="MultiheadAttention-eval"),
    pytest.param(conv_block, "train", id="dw-separable-block"),
    pytest.param(conv_block, "eval", id="dw-separable-block-eval"),
]


@pytest.mark.parametrize("make,mode", CASES)
def test_every_forward_gemm_runs_mx(make, mode):
    """Acceptance 1: under "mxfp6", 100% of forward GEMM FLOPs on MX-quantized operands (eval runs under
    no_grad, where torch's fused inference fast paths would otherwise take over). The same probe on the
    unquantized model measures 0%, so it can tell the difference."""
    torch.manual_seed(0)
    model, inputs = make()
    model.train(mode == "train")
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in full precision: no warning either
        mnn.quantize_model(model, "mxfp6")
    with torch.set_grad_enabled(mode == "train"):
        report = mnn.coverage(model, *inputs)
        base = mnn.coverage(plain, *inputs, recipe="mxfp6")
    assert report.total_flops > 0 and report.total_flops == base.total_flops
    assert base.share == 0.0
    not_mx = [c for c in report.gemms if not c.is_mx]
    assert report.share == 1.0, f"{report}\nnot MX: {not_mx}"
    assert report.full_precision == []


@pytest.mark.parametrize("recipe", ["mxfp6", "mxfp4-w+mxfp6"])
def test_packed_inference_runs_mx(recipe):
    """inference=True: the dequantized packed weights and the quantized inputs are MX operands too."""
    from microscale.nn.models import GPTConfig, TinyGPT
    torch.manual_seed(0)
    model = mnn.quantize_model(TinyGPT(GPTConfig(n_embd=32)), recipe, inference=True).eval()
    with torch.no_grad():
        assert mnn.coverage(model, torch.randint(0, 64, (2, 16))).share == 1.0


def test_gpt2_conv1d_is_swapped_and_every_conv1d_runs_mx():
    """transformers' Conv1D (torch.addmm(b, x, W) with W stored [in, out]) is swapped: GPT-2's attention and
    MLP Conv1Ds all run MX (before the swap existed, only the lm_head did: 20% of GEMM FLOPs), with no
    full-precision warning."""
    torch.manual_seed(0)
    model, (ids,) = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mnn.quantize_model(model, "mxfp6")
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "MXHFConv1D"
    rows = {r.name: r for r in mnn.coverage(model, ids).rows}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                 "transformer.h.0.mlp.c_proj"):
        assert rows[name].share == 1.0 and rows[name].gemm_flops > 0, name


# ---- the probe itself ---------------------------------------------------------------------------------
class _RawGemms(nn.Module):
    """torch.mm / F.linear on operands fake-quantized along chosen axes, to test the probe's verdicts."""

    def __init__(self, x_axis, w_axis):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 64))
        self.x_axis, self.w_axis = x_axis, w_axis

    def forward(self, x):
        xq = ms.fake_quantize(x, "mxfp6_e3m2", axis=self.x_axis)
        wq = ms.fake_quantize(self.w.detach(), "mxfp6_e3m2", axis=self.w_axis)
        return torch.mm(xq, wq.t())


@pytest.mark.parametrize("x_axis,w_axis,expect", [(-1, 1, (True, True)), (0, 1, (False, True)),
                                                  (-1, 0, (True, False))])
def test_probe_checks_blocks_along_the_reduction_axis(x_axis, w_axis, expect):
    torch.manual_seed(1)
    m = _RawGemms(x_axis, w_axis)
    r = mnn.coverage(m, torch.randn(40, 64), recipe="mxfp6")
    (call,) = r.gemms
    assert call.op == "mm" and call.flops == 2 * 40 * 64 * 24 and call.module == ""
    assert call.operands_mx == expect
    assert r.share == (1.0 if all(expect) else 0.0)


def test_probe_flops_and_rows():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Conv1d(5, 6, 3, groups=1))
    q = mnn.quantize_model(copy.deepcopy(model), "mxfp8")
    r = mnn.coverage(q, torch.randn(3, 5, 40))
    rows = {row.name: row for row in r.rows}
    assert rows["0"].gemm_flops == 2 * 15 * 40 * 24
    assert rows["2"].gemm_flops == 2 * 3 * 6 * 22 * 5 * 3
    assert r.share == 1.0 and r.swapped == ["0", "2"]
    text = str(r)
    assert "MXLinear" in text and "100.00% of forward GEMM FLOPs" in text
    # An unquantized conv is counted through aten.convolution, with its reason.
    r0 = mnn.coverage(model, torch.randn(3, 5, 40), recipe="mxfp8")
    assert [c.op for c in r0.gemms] == ["addmm", "convolution"]
    assert r0.total_flops == r.total_flops and r0.share == 0.0
    assert "not swapped" in dict(r0.full_precision)["2"]


def test_probe_sees_fused_attention_as_full_precision():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    with torch.no_grad():
        r = mnn.coverage(layer, torch.randn(2, 9, 32), recipe="mxfp6")
    assert r.share == 0.0 and any("fast path" in c.note for c in r.gemms)


def test_probe_sees_unscoped_attention():
    """attention=None: the Linears run MX, F.scaled_dot_product_attention's fused kernel does not."""
    from microscale.nn.models import GPTConfig, TinyGPT
    torch.manual_seed(0)
    model = mnn.quantize_model(TinyGPT(GPTConfig(n_embd=32)), "mxfp6", attention=None)
    r = mnn.coverage(model, torch.randint(0, 64, (2, 16)))
    fused = [c for c in r.gemms if not c.is_mx]
    assert fused and all("fused attention" in c.note and c.module.endswith(".attn") for c in fused)
    assert r.mx_flops == r.total_flops - sum(c.flops for c in fused) and 0 < r.share < 1


def test_coverage_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        mnn.coverage(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="unknown recipe"):
        mnn.coverage(nn.Linear(2, 2), torch.randn(2), recipe="nope")


# ---- subclasses and the full-precision warning ----------------------------------------------------------
class _PlainSubclass(nn.Linear):
    """A Linear subclass that keeps Linear's forward (like NonDynamicallyQuantizableLinear)."""


class _Doubling(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclass_with_parent_forward_is_swapped_and_restored():
    torch.manual_seed(4)
    lin = _PlainSubclass(40, 24)
    q = mnn.quantize_model(copy.deepcopy(lin), MIXED)
    assert isinstance(q, mnn.MXLinear) and isinstance(q, _PlainSubclass)
    ref = mnn.quantize_model(nn.Linear(40, 24), MIXED)
    ref.load_state_dict(lin.state_dict())
    x, gy = torch.randn(3, 40), torch.randn(3, 24)
    assert_all_equal(grads(q, x, gy), grads(ref, x, gy))
    assert type(mnn.dequantize_model(q)) is _PlainSubclass


def test_mha_out_proj_is_swapped():
    m = mnn.quantize_model(nn.MultiheadAttention(32, 4), "mxfp6")
    assert isinstance(m.out_proj, mnn.MXLinear)
    assert isinstance(m.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)


def test_subclass_with_own_forward_is_left_and_reported():
    model = nn.Sequential(nn.Linear(8, 8), _Doubling(8, 8))
    with pytest.warns(UserWarning, match=r"1 \(_Doubling subclasses Linear with its own forward"):
        mnn.quantize_model(model, "mxfp6")
    assert type(model[1]) is _Doubling
    r = mnn.coverage(model, torch.randn(4, 8))
    assert r.share == pytest.approx(0.5) and [n for n, _ in r.full_precision] == ["1"]
    x = torch.randn(4, 8)
    assert torch.equal(model[1](x), 2 * F.linear(x, model[1].weight, model[1].bias))


class _RawWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.weight


def test_model_of_unknown_matmul_modules_warns():
    """A model of only unknown matmul modules must not report success silently."""
    model = nn.Sequential(_RawWeight(), nn.ReLU(), _RawWeight())
    with pytest.warns(UserWarning, match=r"left 2 matmul-bearing module\(s\) in full precision: 0 .*; 2 "):
        mnn.quantize_model(model, "mxfp6")
    assert mnn.coverage(model, torch.randn(3, 8)).share == 0.0


def test_lazy_module_is_left_with_a_reason():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.warns(UserWarning, match="LazyLinear is not initialized yet"):
        mnn.quantize_model(model, "mxfp6")
    model(torch.randn(2, 3))
    assert isinstance(mnn.quantize_model(model, "mxfp6")[0], mnn.MXLinear)


def test_known_model_does_not_warn():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.MultiheadAttention(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mnn.quantize_model(model, "mxfp6")


def test_addmm_in_attention_scope_is_mx_linear():
    """torch.addmm(b, x, W) with W a Parameter stored [in, out] (transformers' Conv1D) inside a scope is
    mx_linear(x, Wᵀ, b): weight blocks along in (the reduction)."""
    torch.manual_seed(5)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(40, 24))
            self.b = nn.Parameter(torch.randn(24))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w)

    m = Attention()
    q = mnn.quantize_model(copy.deepcopy(m), MIXED)
    x, gy = torch.randn(6, 40), torch.randn(6, 24)
    f = lambda mod, x: mnn.mx_linear(x, mod.w.t(), mod.b, MIXED)  # noqa: E731
    assert_all_equal(grads(q, x, gy), grads(m, x, gy, f))


# ---- grouped and depthwise convolutions: one batched GEMM == the per-group loop ----------------------
def per_group_loop(conv, x, recipe):
    """The code the batched GEMM replaces: im2col (F.unfold), then one mx_linear per group."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    spatial = x.dim() - 2
    if spatial == 1:
        x, k, s, d = x.unsqueeze(2), (1, *k), (1, *s), (1, *d)
    p = conv.padding if spatial == 2 else (0, *conv.padding)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
    n, g = x.shape[0], conv.groups
    tokens = cols.transpose(1, 2).reshape(n, cols.shape[-1], g, -1)
    w2 = conv.weight.reshape(conv.weight.shape[0], -1)
    og = w2.shape[0] // g
    outs = [mnn.mx_linear(tokens[:, :, i], w2[i * og:(i + 1) * og],
                          None if conv.bias is None else conv.bias[i * og:(i + 1) * og], recipe)
            for i in range(g)]
    y = torch.cat(outs, dim=-1).transpose(1, 2)
    ho = (x.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    y = y.reshape(n, -1, ho, y.shape[-1] // ho)
    return y.squeeze(2) if spatial == 1 else y


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 9, 9)),                 # depthwise
    (lambda: nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), (4, 32, 14, 14)),   # 784 tokens
    (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False), (2, 8, 7, 7)),        # multiplier 2
    (lambda: nn.Conv2d(12, 8, 3, stride=2, padding=2, dilation=2, groups=4), (3, 12, 11, 10)),
    (lambda: nn.Conv2d(64, 32, 3, padding=1, groups=2), (2, 64, 6, 6)),                  # K = 288
    (lambda: nn.Conv2d(6, 9, 1, groups=3), (2, 6, 5, 5)),
    (lambda: nn.Conv2d(5, 7, (3, 2), padding=1), (2, 5, 8, 6)),                          # groups = 1
    (lambda: nn.Conv1d(8, 8, 5, padding=2, groups=8), (3, 8, 37)),
])
@pytest.mark.parametrize("recipe", [MIXED, "mxfp6"])
def test_grouped_conv_equals_per_group_loop(make, shape, recipe):
    torch.manual_seed(6)
    conv = make()
    x = torch.randn(shape)
    gy = torch.randn_like(conv(x))
    q = mnn.quantize_model(copy.deepcopy(conv), recipe)
    assert_all_equal(grads(q, x, gy), grads(conv, x, gy, lambda m, x: per_group_loop(m, x, mnn.get_recipe(recipe))))


@pytest.mark.parametrize("fused,op", [(False, "bmm"), (True, "grouped_conv")])
def test_depthwise_conv_is_one_batched_gemm(fused, op, monkeypatch):
    """About 2,500 mm calls per MobileNetV3 forward before: now one bmm per convolution (or one fused
    grouped convolution, microscale_nn::grouped_conv)."""
    from microscale import kernels
    from microscale.nn import modules
    if fused and not kernels.available():
        pytest.skip("the fused kernel needs the compiled C kernels")
    monkeypatch.setattr(modules, "fused_grouped_conv", fused)
    conv = mnn.quantize_model(nn.Conv2d(32, 32, 3, padding=1, groups=32), "mxfp6")
    r = mnn.coverage(conv, torch.randn(2, 32, 8, 8))
    assert [c.op for c in r.gemms] == [op] and r.share == 1.0


def test_im2col_matches_unfold_and_its_gradient():
    torch.manual_seed(7)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    for k, s, d in [((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 2)), ((1, 1), (2, 2), (1, 1))]:
        cols, ho, wo = im2col(x, k, s, d)
        ref = F.unfold(x, k, dilation=d, stride=s)                     # [N, C·k, L]
        ref = ref.transpose(0, 1).reshape(ref.shape[1], -1)             # [C·k, N·L]
        assert torch.equal(cols, ref) and cols.shape[-1] == 2 * ho * wo
        g = torch.randn_like(ref)
        (a,) = torch.autograd.grad(cols, x, g)
        (b,) = torch.autograd.grad(ref, x, g)
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        im2col(torch.randn(1, 1, 2, 2), (3, 3), (1, 1), (1, 1))


def test_packed_depthwise_conv_matches_training_forward():
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 6, 6)
    train = mnn.quantize_model(copy.deepcopy(conv), "mxfp6")
    packed = mnn.quantize_model(copy.deepcopy(conv), "mxfp6", inference=True)
    with torch.no_grad():
        assert torch.equal(train(x), packed(x))


# ---- nn.MultiheadAttention under torch.compile ----------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: nn.MultiheadAttention(32, 4, batch_first=True),
                                  lambda: nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)],
                         ids=["MultiheadAttention", "TransformerEncoderLayer"])
def test_attention_scope_compiles_without_graph_breaks(make):
    torch.manual_seed(9)
    model = mnn.quantize_model(make(), "mxfp6").train()
    x = torch.randn(2, 9, 32)
    f = (lambda x: model(x, x, x, need_weights=False)[0]) if isinstance(model, nn.MultiheadAttention) else model
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_weight_only_packed_mha_without_scope_does_not_warn_but_training_does():
    """A weight-only recipe keeps activation x activation matmuls in the input dtype by design: an unscoped
    MHA whose projections are packed is fully covered (no warning); under a W+A recipe it is not."""
    mha_module, _ = mha()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mnn.quantize_model(copy.deepcopy(mha_module), "mxfp4-w", inference=True, attention=None)
    with pytest.warns(UserWarning, match="outside an attention scope"):
        mnn.quantize_model(copy.deepcopy(mha_module), "mxfp6", attention=None)

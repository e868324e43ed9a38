"""Packed weight-only inference on tiny random-init models (transformers GPT-2, Llama, BERT, ViT; torch's
TransformerEncoderLayer and MultiheadAttention; a depthwise-separable conv block), checkpoints
(save_quantized / load_quantized / from_pretrained / `microscale quantize`), ties and torch.compile.

The models and their inputs come from benchmarks/packed_models.py, whose table states the output
error of each; no downloads."""

import contextlib
import copy
import io
import pathlib
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import microscale as ms
from microscale import nn as mnn

pytest.importorskip("transformers")
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import packed_models as zoo  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

RECIPE = "mxfp4-w"


@pytest.fixture(autouse=True)
def no_fallback_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no packed rule.*")
        yield


def packed_params(model):
    return {id(p): p for p in model.parameters() if mnn.is_packed(p)}


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_packed_model_runs_shrinks_matches_fake_quant_and_round_trips(name, tmp_path):
    model, inputs = zoo.build(name)
    y = zoo.run(model, inputs)
    packed = mnn.quantize_model(copy.deepcopy(model), RECIPE, inference=True)
    yq = zoo.run(packed, inputs)
    # the same recipe with FP32 master weights (fake-quantized GEMM weights) gives the same numbers, once
    # an embedding tied to a GEMM weight (GPT-2 wte, BERT word embeddings) holds the quantized values its
    # packed storage shares
    fake = mnn.quantize_model(copy.deepcopy(model), RECIPE)
    gemm_weights = {id(m.weight) for m in fake.modules() if isinstance(m, mnn.modules.QuantizedModule)}
    with torch.no_grad():
        for m in fake.modules():
            if isinstance(m, nn.Embedding) and id(m.weight) in gemm_weights:
                m.weight.copy_(ms.fake_quantize(m.weight, "mxfp4_e2m1", axis=1))
    # equal up to fp32 summation order: the fused GEMV (<= 8 rows) sums in another order than F.linear
    yf = zoo.run(fake, inputs)
    assert torch.allclose(yq, yf, rtol=1e-4, atol=1e-5), float((yq - yf).abs().max())
    assert 0 < float((yq - y).norm() / y.norm()) < 0.5
    for m in packed.modules():
        for n, p in m._parameters.items():
            if mnn.is_packed(p):
                assert getattr(m, n).dtype == torch.float32 and getattr(m, n).shape == p.shape
    assert packed_params(packed)
    assert mnn.resident_bytes(packed) < 0.4 * mnn.resident_bytes(model)
    path = tmp_path / "m.safetensors"
    mnn.save_quantized(packed, path)
    fresh, _ = zoo.build(name, seed=1)  # other random weights: all must come from the file
    mnn.load_quantized(fresh, path)
    assert torch.equal(zoo.run(fresh, inputs), yq)


def test_gpt2_conv1d_packed_along_axis_0_and_tie_packed_once():
    model, inputs = zoo.build("gpt2")
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # [in, out]
    packed = mnn.quantize_model(copy.deepcopy(model), RECIPE, inference=True)
    attn = packed.transformer.h[0].attn.c_attn
    assert isinstance(attn, Conv1D) and type(attn).__name__ == "MXHFConv1D"
    assert attn.weight.shape == w.shape and attn.weight.transposed
    q = ms.quantize(w, "mxfp4_e2m1", axis=0)  # the reduction of x @ W
    assert torch.equal(attn.weight.codes, q.codes) and torch.equal(attn.weight.scales, q.scales)
    assert torch.equal(attn.weight.dequantize(), q.dequantize())
    # tied wte / lm_head: one packed Parameter, counted once
    assert packed.lm_head.weight is packed.transformer.wte.weight
    assert mnn.is_packed(packed.get_output_embeddings().weight)
    assert len(packed_params(packed)) == 2 * 4 + 1
    fp32 = mnn.resident_bytes(model)
    assert mnn.resident_bytes(packed) < 0.2 * fp32
    packed.tie_weights()
    assert packed.lm_head.weight is packed.transformer.wte.weight and mnn.is_packed(packed.lm_head.weight)
    y = zoo.run(packed, inputs)
    mnn.dequantize_model(packed)
    assert type(packed.transformer.h[0].attn.c_attn) is Conv1D
    assert packed.lm_head.weight is packed.transformer.wte.weight and packed.lm_head.weight.requires_grad
    assert torch.equal(packed.transformer.h[0].attn.c_attn.weight, q.dequantize())
    assert torch.allclose(zoo.run(packed, inputs), y, rtol=1e-5, atol=1e-5)


def test_packed_gpt2_generates_under_inference_mode():
    # views of a packed weight (Conv1D's weight.t()) made inside inference_mode stay normal tensors
    model, (ids,) = zoo.build("gpt2")
    packed = mnn.quantize_model(copy.deepcopy(model), RECIPE, inference=True)
    with torch.inference_mode():
        out = packed.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        logits = packed(out).logits
    with torch.no_grad():
        assert torch.equal(logits, packed(out).logits)


def test_gpt2_conv1d_training_swap():
    model, inputs = zoo.build("gpt2")
    c = model.transformer.h[0].mlp.c_fc
    w, b = c.weight.detach().clone(), c.bias.detach().clone()
    mnn.quantize_model(model, "mxfp6")
    assert type(c).__name__ == "MXHFConv1D" and c._gemm_weight().shape == (w.shape[1], w.shape[0])
    x = torch.randn(2, 5, w.shape[0], requires_grad=True)
    y = c(x)
    ref = F.linear(ms.fake_quantize(x.detach(), "mxfp6_e3m2"), ms.fake_quantize(w.t(), "mxfp6_e3m2", axis=1), b)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert c.weight.grad.shape == w.shape and x.grad.shape == x.shape
    model.train()
    logits = model(*inputs).logits
    logits.sum().backward()
    assert model.transformer.h[1].attn.c_attn.weight.grad is not None


def test_mha_cross_attention_uses_packed_in_proj_slices():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 2, batch_first=True).eval()
    q, kv = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    packed = mnn.quantize_model(copy.deepcopy(mha), RECIPE, inference=True)
    assert mnn.is_packed(packed.in_proj_weight) and packed.in_proj_weight.shape == (192, 64)
    fake = mnn.quantize_model(copy.deepcopy(mha), RECIPE)  # FP32 masters, the same quantized GEMM weights
    unscoped = mnn.quantize_model(copy.deepcopy(mha), RECIPE, inference=True, attention=None)
    ref = mnn.dequantize_model(copy.deepcopy(unscoped))  # plain MHA holding the packed values
    with torch.no_grad():
        # batch_first MHA feeds its projections transposed (non-contiguous) inputs: they run the fused packed
        # kernel (once they dequantized the whole weight), equal to the fake-quant GEMM up to summation order
        assert torch.allclose(packed(q, kv, kv)[0], fake(q, kv, kv)[0], rtol=1e-5, atol=1e-6)
        # no attention scope: q/k/v projections from row slices of the packed in_proj (w.split)
        assert torch.allclose(unscoped(q, kv, kv)[0], ref(q, kv, kv)[0], rtol=1e-5, atol=1e-6)
        # self-attention without a scope: the eval fast path's fused kernel, on the dequantized weights
        assert torch.allclose(unscoped(q, q, q)[0], ref(q, q, q)[0], rtol=1e-5, atol=1e-6)


def test_encoder_layer_eval_fast_path_check_with_packed_weights():
    layer, (x,) = zoo.build("encoder_layer")
    packed = mnn.quantize_model(copy.deepcopy(layer), RECIPE, inference=True, attention=None)
    assert packed.linear1.weight.dtype == torch.float32
    ref = mnn.dequantize_model(copy.deepcopy(packed))
    with torch.no_grad():
        assert torch.allclose(packed(x), ref(x), rtol=1e-5, atol=1e-5)


def test_embeddings_option_and_bf16(tmp_path):
    model, inputs = zoo.build("gpt2")
    packed = mnn.quantize_model(copy.deepcopy(model), RECIPE, inference=True, embeddings=True)
    assert mnn.is_packed(packed.transformer.wpe.weight)
    mnn.save_quantized(packed, tmp_path / "m.safetensors")
    fresh, _ = zoo.build("gpt2", seed=1)
    mnn.load_quantized(fresh, tmp_path / "m.safetensors")  # packs wpe because the file holds it packed
    assert mnn.is_packed(fresh.transformer.wpe.weight)
    assert torch.equal(zoo.run(fresh, inputs), zoo.run(packed, inputs))
    codes = packed.lm_head.weight.codes
    packed.to(torch.bfloat16)
    assert packed.lm_head.weight.dtype == torch.bfloat16 and torch.equal(packed.lm_head.weight.codes, codes)
    assert packed.lm_head.weight is packed.transformer.wte.weight
    assert zoo.run(packed, inputs).dtype == torch.bfloat16


def test_quantizing_a_packed_model_again_repacks_from_its_values():
    model, _ = zoo.build("gpt2")
    p = mnn.quantize_model(model, RECIPE, inference=True, embeddings=True)
    w = p.lm_head.weight.dequantize()
    p = mnn.quantize_model(p, "mxfp8-w", inference=True)
    assert p.lm_head.weight.format_name == "mxfp8_e4m3" and p.lm_head.weight is p.transformer.wte.weight
    assert not mnn.is_packed(p.transformer.wpe.weight)  # embeddings=False this time
    assert torch.equal(p.lm_head.weight.dequantize(), ms.fake_quantize(w, "mxfp8_e4m3", axis=1))
    mha, _ = zoo.build("mha")
    q = mnn.quantize_model(mha, RECIPE, inference=True, attention=None)
    q = mnn.quantize_model(q, "mxfp6-w", inference=True, attention=None)
    assert q.mha.in_proj_weight.format_name == "mxfp6_e2m3"


def test_load_errors_name_the_keys(tmp_path):
    model, _ = zoo.build("gpt2")
    packed = mnn.quantize_model(model, RECIPE, inference=True)
    state = mnn.quantized_state(packed)
    assert "lm_head.weight" not in state and isinstance(state["transformer.wte.weight"], ms.MXTensor)
    missing = dict(state)
    del missing["transformer.h.1.mlp.c_fc.weight"]
    ms.save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \[transformer\.h\.1\.mlp\.c_fc\.weight\]"):
        mnn.load_quantized(zoo.build("gpt2")[0], tmp_path / "missing.safetensors", recipe=RECIPE)
    ms.save_file({**state, "extra.weight": torch.zeros(3)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \[extra\.weight\]"):
        mnn.load_quantized(zoo.build("gpt2")[0], tmp_path / "extra.safetensors", recipe=RECIPE)
    mnn.save_quantized(packed, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="expects mxfp6_e2m3"):
        mnn.load_quantized(zoo.build("gpt2")[0], tmp_path / "ok.safetensors", recipe="mxfp6-w")


def test_from_pretrained_builds_packs_and_loads(tmp_path):
    from transformers import GPT2LMHeadModel
    model, inputs = zoo.build("gpt2")
    packed = mnn.quantize_model(copy.deepcopy(model), RECIPE, inference=True)
    model.config.save_pretrained(tmp_path)
    mnn.save_quantized(packed, tmp_path / "model.safetensors")
    loaded = mnn.from_pretrained(GPT2LMHeadModel, tmp_path)
    assert not loaded.training and loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(zoo.run(loaded, inputs), zoo.run(packed, inputs))
    state = ms.load_file(tmp_path / "model.safetensors")
    del state["transformer.h.0.attn.c_proj.weight"]
    ms.save_file(state, tmp_path / "model.safetensors", {"recipe": RECIPE})
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj\.weight"):
        mnn.from_pretrained(GPT2LMHeadModel, tmp_path)


def test_save_pretrained_of_a_packed_model_loads(tmp_path):
    # transformers' save_pretrained writes the state_dict parts (<name>_codes / _scales, uint8)
    from transformers import GPT2LMHeadModel
    model, inputs = zoo.build("gpt2")
    packed = mnn.quantize_model(copy.deepcopy(model), RECIPE, inference=True)
    packed.save_pretrained(tmp_path)
    assert "transformer.h.0.attn.c_attn.weight_codes" in ms.load_file(tmp_path / "model.safetensors")
    loaded = mnn.from_pretrained(GPT2LMHeadModel, tmp_path, recipe=RECIPE)
    assert torch.equal(zoo.run(loaded, inputs), zoo.run(packed, inputs))


def quantize_cli(*argv) -> str:
    from microscale.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["quantize", *map(str, argv)]) == 0
    return out.getvalue()


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit"])
def test_save_pretrained_then_cli_quantize_matches_in_memory_packing(name, tmp_path):
    model, inputs = zoo.build(name)
    model.save_pretrained(tmp_path)
    text = quantize_cli(tmp_path / "model.safetensors", tmp_path / "q.safetensors", "--format", "mxfp4")
    assert "reduction axes from" in text
    packed = mnn.quantize_model(copy.deepcopy(model), RECIPE, inference=True)
    fresh, _ = zoo.build(name, seed=1)
    mnn.load_quantized(fresh, tmp_path / "q.safetensors")  # no recipe recorded: weight-only mxfp4
    a, b = packed.state_dict(), fresh.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(zoo.run(fresh, inputs), zoo.run(packed, inputs))


def test_cli_blocks_conv1d_along_its_reduction(tmp_path):
    model, _ = zoo.build("gpt2")
    model.save_pretrained(tmp_path)
    quantize_cli(tmp_path / "model.safetensors", tmp_path / "q.safetensors", "--format", "mxfp4")
    q = ms.load_file(tmp_path / "q.safetensors")["transformer.h.0.attn.c_attn.weight"]
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    assert q.shape == tuple(w.shape) and q.axis == 0
    assert torch.equal(q.dequantize(), ms.fake_quantize(w, "mxfp4_e2m1", axis=0))
    assert isinstance(ms.load_file(tmp_path / "q.safetensors")["transformer.wpe.weight"], torch.Tensor)
    # a model type instead of a config; and "none": every matrix along --axis, as before
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "model.safetensors").rename(other / "model.safetensors")
    quantize_cli(other / "model.safetensors", tmp_path / "t.safetensors", "--format", "mxfp4", "--model", "gpt2")
    assert ms.load_file(tmp_path / "t.safetensors")["transformer.h.0.attn.c_attn.weight"].axis == 0
    from microscale.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # no config beside it: never silently along the output axis
        assert main(["quantize", str(other / "model.safetensors"), str(tmp_path / "n.safetensors"), "--format",
                     "mxfp4"]) == 1
    assert "looks like a transformers Conv1D weight" in err.getvalue() and "--model gpt2" in err.getvalue()
    quantize_cli(other / "model.safetensors", tmp_path / "n.safetensors", "--format", "mxfp4", "--model", "none")
    assert ms.load_file(tmp_path / "n.safetensors")["transformer.h.0.attn.c_attn.weight"].axis == 1


@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "bert", "mha", "encoder_layer"])
def test_dynamo_explain_packed_model_has_no_graph_breaks(name):
    model, inputs = zoo.build(name)
    packed = mnn.quantize_model(model, RECIPE, inference=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(packed)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.slow
def test_compiled_packed_llama_equals_eager():
    model, inputs = zoo.build("llama")
    packed = mnn.quantize_model(model, RECIPE, inference=True)
    torch._dynamo.reset()
    compiled = torch.compile(packed, backend="aot_eager", fullgraph=True)
    assert torch.equal(zoo.run(compiled, inputs), zoo.run(packed, inputs))


def test_weight_only_recipes():
    torch.manual_seed(0)
    x, w = torch.randn(6, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True)
    for name, fmt in [("mxfp8-w", "mxfp8_e4m3"), ("mxfp6-w", "mxfp6_e2m3"), ("mxfp4-w", "mxfp4_e2m1"),
                      ("mxint8-w", "mxint8")]:
        r = mnn.get_recipe(name)
        assert r.fwd_weight.format == fmt and r.fwd_input.is_none and r.wgrad_input.is_none
        y = mnn.mx_linear(x, w, None, name)
        assert torch.equal(y, F.linear(x.detach(), ms.fake_quantize(w.detach(), fmt, axis=1)))
        gy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), gy)
        assert torch.equal(gx, gy @ ms.fake_quantize(w.detach(), fmt, axis=0))
        assert torch.equal(gw, gy.t() @ x.detach())
        xb = x.detach().bfloat16()
        assert mnn.mx_linear(xb, w.detach().bfloat16(), None, name).dtype == torch.bfloat16
    assert mnn.get_recipe("mxfp4-w+mxfp6").fwd_input.format == "mxfp6_e3m2"

"""PackedWeight: the packed-weight tensor subclass (microscale.nn.packed) op by op, against the same op
on its dequantized value."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import microscale as ms
from microscale import nn as mnn
from microscale.nn.packed import PackedWeight


def packed(out=48, k=70, fmt="mxfp4_e2m1", seed=0, **kw):
    torch.manual_seed(seed)
    w = torch.randn(out, k)
    return w, PackedWeight.from_dense(w, fmt, **kw)


@pytest.fixture(autouse=True)
def no_fallback_warnings():
    """Every op below has a packed rule or an explicit dense rule: no 'no packed rule' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no packed rule.*")
        yield


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8", "mx6", "nvfp4"])
def test_value_shape_dtype(fmt):
    w, p = packed(fmt=fmt)
    q = ms.quantize(w, fmt, axis=1)
    assert p.shape == w.shape and p.dtype == torch.float32 and p.device == w.device and not p.requires_grad
    assert torch.equal(p.dequantize(), ms.fake_quantize(w, fmt, axis=1))
    assert p.packed_nbytes == q.nbytes
    assert all(torch.equal(a, b) for a, b in zip(p.mx.components().values(), q.components().values()))
    assert f"format={ms.get_format(fmt).name}" in repr(p)


@pytest.mark.parametrize("route", ["plan", "custom_op"])
def test_gemms_take_the_packed_custom_op(monkeypatch, route):
    """Every GEMM spelling reaches the packed kernel: eagerly through the weight's checked plan
    (``_eager_fused``), and through the custom op where that declines (tracing, autograd, other backends)."""
    from microscale.nn import packed as packed_module
    calls = []

    def counting(x, q, bias=None):
        calls.append(q.shape)
        return ms.packed_linear(x, q, bias)

    eager_fused = packed_module._eager_fused

    def counting_plan(x, w, bias):
        y = eager_fused(x, w, bias)
        assert y is not None, "an eager CPU call must take the weight's plan"
        calls.append(w.gemm_shape)
        return y

    if route == "plan":
        monkeypatch.setattr(packed_module, "_eager_fused", counting_plan)
    else:
        monkeypatch.setattr(packed_module, "_eager_fused", lambda x, w, bias: None)

    def no_dense(func, args, kwargs):
        raise AssertionError(f"{func} ran on the dequantized weight")

    w, p = packed()
    d = p.dequantize()
    x, b = torch.randn(3, 5, 70), torch.randn(48)
    cases = [(lambda: F.linear(x, p, b), lambda: F.linear(x, d, b)),
             (lambda: F.linear(x, p), lambda: F.linear(x, d)),
             (lambda: torch.addmm(b, x[0], p.t()), lambda: torch.addmm(b, x[0], d.t())),
             (lambda: torch.mm(x[0], p.t()), lambda: torch.mm(x[0], d.t())),
             (lambda: x @ p.t(), lambda: x @ d.t()),
             (lambda: torch.matmul(x, p.transpose(0, 1)), lambda: torch.matmul(x, d.transpose(0, 1)))]
    monkeypatch.setattr(packed_module, "packed_linear", counting)
    monkeypatch.setattr(packed_module, "_on_dense", no_dense)
    for i, (run_packed, run_dense) in enumerate(cases):
        y = run_packed()
        assert [tuple(c) for c in calls] == [(48, 70)] * (i + 1)
        assert torch.allclose(y, run_dense(), rtol=1e-5, atol=1e-5)
    assert torch.equal(F.linear(x, p, b), F.linear(x, d, b))


def test_packed_modules_reach_the_kernel_without_dispatch_round_trips(monkeypatch):
    """A packed Linear in an eager no-grad call goes straight to the weight's plan (nn.packed.eager_linear),
    not through aten.t + aten.addmm on the wrapper (two __torch_dispatch__ calls, ~25 µs each time); the
    result is the same bits as the F.linear route. eager_linear declines transposed views and tracing."""
    from microscale.nn import packed as packed_module
    torch.manual_seed(0)
    m = mnn.quantize_model(nn.Sequential(nn.Linear(70, 48)), "mxfp4-w", inference=True)
    p = m[0].weight
    assert isinstance(p, PackedWeight)
    x = torch.randn(3, 5, 70)
    with torch.no_grad():
        want = F.linear(x, p, m[0].bias)
        dispatched = []
        real = PackedWeight.__torch_dispatch__.__func__

        def counting(cls, func, types, args=(), kwargs=None):
            dispatched.append(func)
            return real(cls, func, types, args, kwargs)

        monkeypatch.setattr(PackedWeight, "__torch_dispatch__", classmethod(counting))
        y = m(x)
        assert dispatched == [] and torch.equal(y, want)
        assert packed_module.eager_linear(x, p.t(), None) is None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert packed_module.eager_linear(x, p, None) is None
        dispatched.clear()
        assert torch.equal(m(x), want) and dispatched   # the aten route, same bits


def test_the_kernel_plan_is_made_once_and_remade_when_a_component_changes():
    """A packed weight's storage is checked once (its plan, shared by its views); each call then checks x.
    copy_ into it keeps the plan (same storage, new codes: new results); a component resized in place
    makes the next call re-check the storage and raise before any C runs."""
    w, p = packed()
    x = torch.randn(2, 70)
    y0 = F.linear(x, p)
    plan = p._plan_cell[0]
    assert plan is not None and p.t()._plan_cell is p._plan_cell
    assert torch.equal(F.linear(x, p), y0) and p._plan_cell[0] is plan and p.t()._linear_plan() is plan
    w2 = torch.randn(48, 70)
    p.copy_(w2)
    assert p._plan_cell[0] is plan
    assert torch.allclose(F.linear(x, p), F.linear(x, PackedWeight.from_dense(w2, "mxfp4_e2m1").dequantize()),
                          rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 70\]"):
        F.linear(torch.randn(2, 71), p)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got torch.float64"):
        torch.mm(torch.randn(2, 70, dtype=torch.float64), p.t())
    p.codes.resize_(p.codes.numel() - 1)   # forced past every check the weight made when it was built
    with pytest.raises(ValueError, match=r"needs codes as torch.uint8 of shape \(2304,\), got torch.uint8 \(2303,\)"):
        F.linear(x, p)


def test_views_share_the_codes():
    w, p = packed()
    t = p.t()
    assert isinstance(t, PackedWeight) and t.shape == (70, 48) and t.transposed and t.codes is p.codes
    assert torch.equal(t.dequantize(), p.dequantize().t())
    assert not t.t().transposed and t.t().shape == p.shape
    b = p.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.codes is p.codes
    assert torch.equal(b.dequantize(), p.dequantize().bfloat16())
    assert p.detach().codes is p.codes and p.to("cpu").codes is p.codes
    c = p.clone()
    assert c.codes is not p.codes and torch.equal(c.codes, p.codes)
    _, conv = packed(8, 3 * 3 * 3, "mxfp6_e2m3", shape=(8, 3, 3, 3))
    assert conv.shape == (8, 3, 3, 3)
    flat = conv.reshape(8, -1)
    assert isinstance(flat, PackedWeight) and flat.shape == (8, 27)
    assert torch.equal(flat.dequantize(), conv.dequantize().reshape(8, 27))


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mx6", "nvfp4", "int8_channel"])
def test_row_slices_are_exact_and_packed(fmt):
    w, p = packed(fmt=fmt)
    d = p.dequantize()
    s = p[10:30]
    assert isinstance(s, PackedWeight) and torch.equal(s.dequantize(), d[10:30])
    parts = p.split([16, 32])
    assert all(isinstance(x, PackedWeight) for x in parts)
    assert all(torch.equal(a.dequantize(), b) for a, b in zip(parts, d.split([16, 32])))
    assert all(torch.equal(a.dequantize(), b) for a, b in zip(p.chunk(3), d.chunk(3)))


def test_conv_and_embedding_read_the_dequantized_weight():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    p = PackedWeight.from_dense(w.reshape(8, -1), "mxfp4_e2m1", shape=(8, 4, 3, 3))
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(F.conv2d(x, p, padding=1), F.conv2d(x, p.dequantize(), padding=1))


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e2m3", "mx6", "nvfp4", "int8_channel"])
def test_embedding_decodes_the_rows_it_reads(fmt):
    _, e = packed(100, 70, fmt)
    idx = torch.randint(0, 100, (3, 7))
    assert torch.equal(F.embedding(idx, e), F.embedding(idx, e.dequantize()))
    assert torch.equal(nn.Embedding.from_pretrained(e)(idx), e.dequantize()[idx])


def test_op_without_rule_warns_once_and_is_exact():
    _, p = packed()
    with pytest.warns(UserWarning, match="no packed rule"):
        y = torch.sin(p)
    assert torch.equal(y, torch.sin(p.dequantize()))


def test_in_place_ops_raise():
    _, p = packed()
    with pytest.raises(TypeError, match="read-only"):
        p.add_(1.0)
    with pytest.raises(TypeError, match="dequantize_model"):
        p.zero_()


def test_copy_from_dense_quantizes_and_from_packed_checks_format():
    w, p = packed()
    w2 = torch.randn_like(w)
    p.copy_(w2)
    assert torch.equal(p.dequantize(), ms.fake_quantize(w2, "mxfp4_e2m1", axis=1))
    _, other = packed(fmt="mxfp6_e3m2")
    with pytest.raises(ValueError, match="mxfp6_e3m2"):
        p.copy_(other)
    _, same = packed(seed=3)
    p.copy_(same)
    assert torch.equal(p.codes, same.codes)


def test_state_dict_stores_parts_and_loads_them():
    torch.manual_seed(0)
    a = mnn.quantize_model(nn.Linear(70, 48), "mxfp4-w", inference=True)
    sd = a.state_dict()
    assert set(sd) == {"weight_codes", "weight_scales", "bias"}
    assert sd["weight_codes"].dtype == torch.uint8
    b = mnn.quantize_model(nn.Linear(70, 48), "mxfp4-w", inference=True)
    b.load_state_dict(sd)
    x = torch.randn(4, 70)
    assert torch.equal(a(x), b(x))
    del sd["weight_scales"]
    with pytest.raises(RuntimeError, match="incomplete"):
        b.load_state_dict(sd)
    # a dense weight quantizes on load
    dense = nn.Linear(70, 48)
    b.load_state_dict(dense.state_dict())
    assert torch.equal(b.weight.dequantize(), ms.fake_quantize(dense.weight.detach(), "mxfp4_e2m1", axis=1))


def test_weight_only_keeps_bf16_activations_and_input_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    p = mnn.quantize_model(copy.deepcopy(lin), "mxfp4-w", inference=True)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    y = p(x)
    assert y.dtype == torch.bfloat16
    wq = ms.fake_quantize(lin.weight.detach(), "mxfp4_e2m1", axis=1)
    assert torch.equal(y, F.linear(x.detach(), wq.bfloat16(), lin.bias.detach().bfloat16()))
    y.float().sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 32, dtype=torch.bfloat16) @ wq.bfloat16())


def test_deepcopy_and_dequantize_of_a_copy():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    p = mnn.quantize_model(m, "mxfp6-w", inference=True)
    c = copy.deepcopy(p)
    x = torch.randn(3, 64)
    assert torch.equal(c(x), p(x))
    assert c[0].weight.codes.data_ptr() != p[0].weight.codes.data_ptr()
    mnn.dequantize_model(c)
    assert type(c[0]) is nn.Linear and c[0].weight.requires_grad
    assert set(c.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.equal(c(x), p(x))

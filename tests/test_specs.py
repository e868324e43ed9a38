"""Typed quantization specs (Rounding, ScaleMode, QuantSpec), resolved once at the public edges, and
unregistered BlockFormat objects end to end: train, pack, save, load, compile (issue 13 items 2 and 5)."""

import dataclasses
import io
import pickle

import pytest
import torch
import torch.nn as nn

import microscale as ms
import microscale.nn as mnn
from microscale import backends
from microscale.cli import main as cli_main
from microscale.formats import (ROUNDINGS, SCALE_MODES, QuantSpec, Rounding, ScaleMode, bdr_format,
                                format_key, get_format)
from microscale.tensor import COMPONENTS, component_specs


# ---- enums -----------------------------------------------------------------------------------------
def test_enums_are_their_strings():
    assert Rounding.EVEN == "even" and ScaleMode.RCEIL == "rceil"
    assert str(Rounding.STOCHASTIC) == "stochastic" and f"{ScaleMode.CEIL}" == "ceil"
    assert {"even": 1}[Rounding.EVEN] == 1                        # hash like the string
    assert tuple(Rounding) == ROUNDINGS and tuple(ScaleMode) == SCALE_MODES  # the C kernels' order
    assert Rounding("away") is Rounding.AWAY and ScaleMode(ScaleMode.EVEN) is ScaleMode.EVEN


@pytest.mark.parametrize("make, what, choices", [
    (lambda: Rounding("nearest"), "rounding", ROUNDINGS),
    (lambda: ScaleMode("round"), "scale_mode", SCALE_MODES),
    (lambda: QuantSpec.resolve("mxfp4", rounding="nearest"), "rounding", ROUNDINGS),
    (lambda: QuantSpec.resolve("mxfp4", scale_mode="round"), "scale_mode", SCALE_MODES),
    (lambda: ms.quantize(torch.ones(32), "mxfp4", rounding="nearest"), "rounding", ROUNDINGS),
    (lambda: ms.fake_quantize(torch.ones(32), "mxfp4", scale_mode="round"), "scale_mode", SCALE_MODES),
    (lambda: mnn.OperandSpec("mxfp6", rounding="nearest"), "rounding", ROUNDINGS),
    (lambda: mnn.Recipe.uniform("mxfp6", scale_mode="round"), "scale_mode", SCALE_MODES),
])
def test_bad_option_lists_the_choices(make, what, choices):
    with pytest.raises(ValueError) as info:
        make()
    msg = str(info.value)
    assert msg.startswith(f"{what} must be one of") and all(repr(c) in msg for c in choices), msg


def test_edges_accept_strings_and_enums_alike():
    x = torch.randn(4, 64)
    a = ms.fake_quantize(x, "mxfp6", rounding="zero", scale_mode="ceil")
    b = ms.fake_quantize(x, "mxfp6", rounding=Rounding.ZERO, scale_mode=ScaleMode.CEIL)
    c = ms.fake_quantize(x, QuantSpec.resolve("mxfp6", "zero", "ceil"))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, ms.fake_quantize(x, "mxfp6"))      # the options did reach the backend
    assert mnn.OperandSpec("mxfp6", "zero", "ceil") == mnn.OperandSpec("mxfp6", Rounding.ZERO, ScaleMode.CEIL)


def test_cli_rejects_a_bad_rounding(tmp_path, capsys):
    ms.save_file({"w": torch.randn(8, 32)}, tmp_path / "a.safetensors")
    args = ["quantize", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--format", "mxfp4",
            "--model", "none"]
    assert cli_main(args + ["--rounding", "nearest"]) == 2
    assert "'nearest'" in capsys.readouterr().err and not (tmp_path / "b.safetensors").exists()
    assert cli_main(args + ["--rounding", "zero", "--scale-mode", "ceil"]) == 0
    want = ms.quantize(ms.load_file(tmp_path / "a.safetensors")["w"], "mxfp4", rounding="zero", scale_mode="ceil")
    assert torch.equal(ms.load_file(tmp_path / "b.safetensors")["w"].codes, want.codes)


# ---- QuantSpec --------------------------------------------------------------------------------------
def test_quantspec_is_frozen_hashable_and_typed():
    s = QuantSpec.resolve("MXFP4", "away")
    assert s == QuantSpec.resolve(get_format("mxfp4_e2m1"), Rounding.AWAY, "floor")
    assert hash(s) == hash(QuantSpec.resolve("mxfp4", "away")) and len({s, QuantSpec.resolve("mxfp4", "away")}) == 1
    assert s.scale_mode is ScaleMode.FLOOR and s.rounding is Rounding.AWAY
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rounding = Rounding.EVEN
    # internals take resolved objects only: the constructor refuses names and strings
    for bad in (dict(format="mxfp4"), dict(format=s.format, rounding="even"),
                dict(format=s.format, scale_mode="floor")):
        with pytest.raises(TypeError, match="QuantSpec.resolve"):
            QuantSpec(**bad)
    with pytest.raises(ValueError, match="compat"):
        QuantSpec(s.format, compat="torchao")
    with pytest.raises(ValueError, match="inside the QuantSpec"):
        ms.quantize(torch.ones(32), s, rounding="zero")


def test_backends_receive_the_resolved_spec_itself(monkeypatch):
    seen = []
    real = backends.select
    monkeypatch.setattr(backends, "select", lambda spec, x: seen.append(spec) or real(spec, x))
    spec = QuantSpec.resolve(bdr_format(4, 16, k2=2, d2=1), "even", "rceil")
    ms.fake_quantize(torch.randn(3, 32), spec)
    ms.quantize(torch.randn(3, 32), spec)
    assert len(seen) == 2 and all(s is spec for s in seen)


def test_quantized_training_resolves_specs_once(monkeypatch):
    """A recipe resolves its specs when it is built; forward and backward passes only use them."""
    recipe = mnn.Recipe.from_formats("mxfp4", "mxfp6", "mxfp8_e5m2", grad_rounding="stochastic", seed=0)
    model = mnn.quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), recipe)
    calls = []
    real = QuantSpec.resolve.__func__
    monkeypatch.setattr(QuantSpec, "resolve", classmethod(lambda cls, *a, **k: calls.append(a) or real(cls, *a, **k)))
    model(torch.randn(8, 64)).square().sum().backward()
    assert calls == []
    assert isinstance(recipe.fwd_weight.quant, QuantSpec) and recipe.fwd_weight.rounding is Rounding.EVEN


# ---- unregistered formats ---------------------------------------------------------------------------
TWO_LEVEL = bdr_format(3, 32, 8, k2=4, d2=1)                                 # has micro
TENSOR_SCALED = dataclasses.replace(get_format("nvfp4"), name="nvfp4_unregistered")  # has tensor_scale


def test_bdr_constructor_is_reachable_from_ms_bdr():
    assert ms.bdr.bdr_format is bdr_format


def test_format_key_interns_unregistered_formats_only():
    assert format_key(get_format("mxfp4")) == "mxfp4_e2m1"
    key = format_key(TWO_LEVEL)
    assert key.startswith(TWO_LEVEL.name + "@") and get_format(key) is TWO_LEVEL
    assert format_key(dataclasses.replace(TWO_LEVEL, description="same format")) == key
    # a format that reuses a registered name with other facts gets its own key, not the registered one
    impostor = dataclasses.replace(get_format("mxfp4"), block_size=16)
    assert format_key(impostor) != "mxfp4_e2m1" and get_format(format_key(impostor)) == impostor
    with pytest.raises(ValueError, match="unknown format"):
        get_format(TWO_LEVEL.name)                                          # nothing was registered


def test_one_component_list():
    assert ms.io.COMPONENTS is COMPONENTS and mnn.packed.PART_NAMES is COMPONENTS
    assert tuple(f.name for f in dataclasses.fields(ms.MXTensor) if f.name in COMPONENTS) == COMPONENTS
    for fmt, extra in ((TWO_LEVEL, "micro"), (TENSOR_SCALED, "tensor_scale")):
        assert list(component_specs((4, 64), 1, fmt)) == ["codes", "scales", extra]


@pytest.mark.parametrize("fmt", [TWO_LEVEL, TENSOR_SCALED], ids=["micro", "tensor_scale"])
def test_unregistered_mxtensor_round_trips_through_a_file(fmt, tmp_path):
    q = ms.quantize(torch.randn(6, 64), fmt)
    path = tmp_path / "q.safetensors"
    ms.save_file({"q": q}, path)
    back = ms.load_file(path)["q"]
    assert back.format == fmt and back.format.name == fmt.name
    assert set(back.components()) == set(q.components()) == set(component_specs(q.shape, q.axis, fmt))
    for name, t in q.components().items():
        assert torch.equal(getattr(back, name), t), name
    assert torch.equal(back.dequantize(), q.dequantize())


def test_a_file_cannot_redefine_a_registered_name(tmp_path):
    impostor = dataclasses.replace(get_format("mxfp4"), block_size=16)
    path = tmp_path / "bad.safetensors"
    ms.save_file({"q": ms.quantize(torch.randn(2, 32), impostor)}, path)
    with pytest.raises(ValueError, match="differs from the registered one .*block_size"):
        ms.load_file(path)


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))


@pytest.mark.parametrize("fmt", [TWO_LEVEL, TENSOR_SCALED], ids=["micro", "tensor_scale"])
def test_unregistered_format_trains_packs_saves_loads_and_compiles(fmt, tmp_path):
    recipe = mnn.Recipe.from_formats(fmt, fmt, fmt, seed=0)
    model = mnn.quantize_model(_model(), recipe)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = torch.randn(16, 64), torch.randn(16, 32)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained = mnn.dequantize_model(model)

    packed = mnn.quantize_model(trained, recipe, inference=True)
    assert mnn.is_packed(packed[0].weight) and mnn.is_packed(packed[2].weight)
    assert packed[0].weight.mx.format == fmt
    with torch.no_grad():
        want = packed(x)
    path = tmp_path / "m.safetensors"
    mnn.save_quantized(packed, path)
    assert ms.load_file(path)["0.weight"].format == fmt

    fresh = mnn.load_quantized(_model(), path, recipe=recipe)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    clone = pickle.loads(pickle.dumps(fresh[0].weight))             # carries the format, not just its key
    assert torch.equal(clone.dequantize(), fresh[0].weight.dequantize())

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fresh)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("change, pattern", [
    (lambda s: s.update(subblock_size=0), "subblock_size must be >= 1"),
    (lambda s: s.update(micro_bits=9), "micro_bits <= 8"),
    (lambda s: s["element"].update(kind=True), "element.kind must be a string"),
    (lambda s: s["element"].update(specials="weird"), "specials must be"),
    (lambda s: s["scale"].update(kind="e9m0"), "scale kind must be"),
    (lambda s: s.pop("block_size"), "exactly the fields"),
    (lambda s: s.update(block_size=2.0), "block_size must be a string or a small integer"),
])
def test_a_stored_spec_that_is_not_a_format_is_refused(change, pattern):
    spec = ms.io.format_spec(TWO_LEVEL)
    assert ms.io.format_from_spec("fresh_name", spec) == dataclasses.replace(TWO_LEVEL, name="fresh_name")
    change(spec)
    with pytest.raises(ValueError, match=pattern):
        ms.io.format_from_spec("fresh_name", spec)


def test_operand_spec_holds_any_format_and_survives_copies():
    spec = mnn.OperandSpec(TWO_LEVEL, "away", "rceil")
    assert spec.block_format is TWO_LEVEL and spec.format == format_key(TWO_LEVEL)
    assert str(spec) == f"{TWO_LEVEL.name}/away/scale=rceil"
    assert mnn.OperandSpec(spec.quant) == spec and mnn.OperandSpec(quant=spec.quant) == spec
    other = QuantSpec.resolve("mxfp4")
    assert dataclasses.replace(spec, quant=other).quant is other
    recipe = mnn.Recipe.from_formats(TWO_LEVEL, "mxfp6", TENSOR_SCALED, name="mine")
    assert pickle.loads(pickle.dumps(recipe)) == recipe
    assert recipe.fwd_weight == spec.__class__(TWO_LEVEL) and recipe.dgrad_grad_output.block_format == TENSOR_SCALED

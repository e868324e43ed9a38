"""Error diffusion (GPTQ-style PTQ) for MX formats: exactness against direct cast, error reduction."""

import pytest
import torch
from torch import nn

import microscale as ms
from microscale.ptq import error_diffusion_model, error_diffusion_quantize, layer_error


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8"])
def test_error_diffusion_with_identity_hessian_is_direct_cast(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 80, generator=g)  # 80 columns: a ragged last block
    q = error_diffusion_quantize(w, torch.eye(80), fmt)
    assert torch.equal(q, ms.fake_quantize(w, fmt, axis=-1))


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e2m3"])
def test_error_diffusion_lowers_layer_error_on_correlated_inputs(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3 + torch.randn(512, 64, generator=g)
    h = x.T @ x
    q = error_diffusion_quantize(w, h, fmt)
    assert torch.equal(ms.fake_quantize(q, fmt, axis=-1), q)  # on the format's grid
    assert layer_error(w, q, h) < 0.9 * layer_error(w, ms.fake_quantize(w, fmt, axis=-1), h)


def test_error_diffusion_rejects_non_mx_formats_and_bad_shapes():
    with pytest.raises(ValueError, match="single-level MX"):
        error_diffusion_quantize(torch.randn(4, 32), torch.eye(32), "mx9")
    with pytest.raises(ValueError, match="hessian"):
        error_diffusion_quantize(torch.randn(4, 32), torch.eye(16), "mxfp4")


def test_error_diffusion_model_quantizes_every_linear_and_beats_direct_cast():
    torch.manual_seed(0)
    mix = torch.randn(64, 64) * 0.5
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    calib = [torch.randn(128, 64) @ mix + 0.2 * torch.randn(128, 64) for _ in range(4)]
    before = model[0].weight.detach().clone()
    ed, stats = error_diffusion_model(model, calib, "mxfp4")
    assert torch.equal(model[0].weight, before)  # the given model is left as it was (a copy is quantized)
    assert [s["layer"] for s in stats] == ["0", "2"]
    for lin in (ed[0], ed[2]):  # weights lie on the MXFP4 grid (blocks along in_features)
        assert torch.equal(ms.fake_quantize(lin.weight, "mxfp4", axis=-1), lin.weight)
    assert all(s["proxy_error_ed"] < s["proxy_error_direct"] for s in stats)
    x = torch.cat(calib)
    with torch.no_grad():
        ref = model(x)
        direct = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
        direct.load_state_dict(model.state_dict())
        for lin in (direct[0], direct[2]):
            lin.weight.copy_(ms.fake_quantize(lin.weight, "mxfp4", axis=-1))
        assert (ed(x) - ref).pow(2).mean() < (direct(x) - ref).pow(2).mean()

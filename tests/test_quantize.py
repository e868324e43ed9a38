"""Public verbs: fake_quantize == quantize().dequantize() bit for bit, dtypes, axes, interop, errors."""

import ml_dtypes
import numpy as np
import pytest
import torch

import microscale as ms
from microscale.reference import fake_quantize_reference

from bitcheck import same_bits

MX_FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"]


def _data(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    return x.to(dtype)


@pytest.mark.parametrize("name", MX_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,axis", [((6, 100), -1), ((6, 100), 0), ((2, 3, 40), 1), ((50,), 0)])
def test_fake_quantize_equals_quantize_dequantize(name, dtype, shape, axis):
    x = _data(shape, dtype)
    y = ms.fake_quantize(x, name, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    assert same_bits(y, ms.quantize(x, name, axis=axis).dequantize(dtype))
    assert same_bits(y, fake_quantize_reference(x, name, axis=axis))
    # (the fp16 data overflows to Inf in places: those blocks must be NaN on both paths)


@pytest.mark.parametrize("rounding", ["even", "away", "zero", "stochastic"])
@pytest.mark.parametrize("scale_mode", ["floor", "ceil", "even", "rceil"])
def test_every_rounding_and_scale_mode_round_trips(rounding, scale_mode):
    x = _data((4, 64))
    kw = dict(rounding=rounding, scale_mode=scale_mode, seed=5)
    y = ms.fake_quantize(x, "mxfp6_e2m3", **kw)
    assert torch.equal(y, ms.quantize(x, "mxfp6_e2m3", **kw).dequantize())
    assert torch.equal(y, fake_quantize_reference(x, "mxfp6_e2m3", **kw))


def test_bf16_input_quantizes_its_exact_values():
    x = _data((4, 64), torch.bfloat16)
    assert torch.equal(ms.quantize(x, "mxfp4").codes, ms.quantize(x.float(), "mxfp4").codes)


def test_straight_through_gradient():
    x = _data((3, 64)).requires_grad_()
    y = ms.fake_quantize(x, "mxfp4")
    (y * torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0).expand(3, 64))
    assert torch.equal(y.detach(), ms.fake_quantize(x.detach(), "mxfp4"))


def test_none_format_is_passthrough():
    x = _data((3, 5))
    assert ms.fake_quantize(x, "none") is x
    with pytest.raises(ValueError, match="'none' does not quantize"):
        ms.quantize(x, "none")


def test_interop_with_torch_and_ml_dtypes():
    x = _data((4, 64))
    q = ms.quantize(x, "mxfp8_e4m3")
    f8 = q.codes_as_torch()
    assert f8.dtype == torch.float8_e4m3fn
    scales = q.scales_as_e8m0().float()
    assert torch.equal(ms.layout.from_blocks(f8.float() * scales[:, None], q.layout), q.dequantize())
    q4 = ms.quantize(x, "mxfp4")
    packed4 = q4.codes_as_torch()
    assert packed4.dtype == torch.float4_e2m1fn_x2 and packed4.shape == (8, 16)
    back = ms.MXTensor.from_codes(packed4, q4.scales_as_e8m0(), q4.shape, q4.axis, "mxfp4")
    assert torch.equal(back.dequantize(), q4.dequantize())
    q6 = ms.quantize(x, "mxfp6_e3m2")
    arr = q6.codes_as_ml_dtypes()
    assert arr.dtype == ml_dtypes.float6_e3m2fn
    vals = arr.astype(np.float32) * np.exp2(q6.scales.numpy().astype(np.float32) - 127)[:, None]
    np.testing.assert_array_equal(ms.layout.from_blocks(torch.from_numpy(vals), q6.layout).numpy(),
                                  q6.dequantize().numpy())
    rebuilt = ms.MXTensor.from_codes(torch.from_numpy(arr.view(np.uint8)), q6.scales, q6.shape, q6.axis, "mxfp6_e3m2")
    assert torch.equal(rebuilt.codes, q6.codes)


def test_clear_errors():
    x = _data((4, 64))
    with pytest.raises(ValueError, match="unknown format"):
        ms.quantize(x, "mxfp7")
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ms.quantize(x, "mxfp4", axis=2)
    with pytest.raises(ValueError, match="rounding must be one of"):
        ms.quantize(x, "mxfp4", rounding="nearest")
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        ms.quantize(x, "mxfp4", scale_mode="round")
    with pytest.raises(ValueError, match="compat"):
        ms.quantize(x, "mxfp4", compat="torchao")
    with pytest.raises(TypeError, match="float32, bfloat16"):
        ms.quantize(torch.ones(4, dtype=torch.int32), "mxfp4")
    with pytest.raises(TypeError, match="torch.Tensor"):
        ms.quantize(np.ones(4), "mxfp4")
    with pytest.raises(ValueError, match="length is 0"):
        ms.quantize(torch.ones(3, 0), "mxfp4")
    with pytest.raises(ValueError, match="0-d"):
        ms.quantize(torch.tensor(1.0), "mxfp4")
    with pytest.raises(TypeError, match="dtype must be one of"):
        ms.quantize(x, "mxfp4").dequantize(torch.int8)
    q = ms.quantize(x, "mxfp4")
    with pytest.raises(ValueError, match=r"needs codes as torch.uint8 of shape \(128,\), got torch.uint8 \(127,\)"):
        ms.MXTensor(q.codes[:-1], q.scales, q.shape, q.axis, q.format)
    with pytest.raises(ValueError, match="needs scales as"):
        ms.MXTensor(q.codes, q.scales[:-1], q.shape, q.axis, q.format)


@pytest.mark.parametrize("dtype,nan_bits", [(torch.bfloat16, 0x7FC0), (torch.float16, 0x7E00),
                                            (torch.float32, 0x7FC00000)])
def test_nan_blocks_write_the_canonical_nan_whatever_the_length(dtype, nan_bits):
    # regression: torch's float64 -> bf16 cast writes 0xFFFF for NaN in its vectorized path (n >= 16)
    for n in (32, 4096):
        x = torch.ones(n, dtype=dtype)
        x[0] = float("nan")
        ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
        mask = (1 << (8 * x.element_size())) - 1
        for y in (ms.fake_quantize(x, "mxfp8_e4m3"), fake_quantize_reference(x, "mxfp8_e4m3"),
                  ms.quantize(x, "mxfp8_e4m3").dequantize(dtype)):
            assert set((y[:32].view(ints).to(torch.int64) & mask).tolist()) == {nan_bits}


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mxfp6_e2m3", "mx6"])  # kernel path and reference path
def test_out_argument_writes_in_place(name):
    x = _data((6, 100))
    out = torch.empty_like(x)
    y = ms.fake_quantize(x, name, out=out)
    assert y is out and same_bits(out, ms.fake_quantize(x, name))
    q = ms.quantize(x, name)
    buf = torch.empty(6, 100, dtype=torch.bfloat16)
    assert q.dequantize(torch.bfloat16, out=buf) is buf and same_bits(buf, q.dequantize(torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous torch.float32 tensor of shape \\(6, 100\\)"):
        ms.fake_quantize(x, name, out=torch.empty(100, 6).t())
    with pytest.raises(ValueError, match="contiguous torch.float32"):
        q.dequantize(out=torch.empty(6, 100, dtype=torch.float16))
    with pytest.raises(ValueError, match="automatic differentiation"):
        ms.fake_quantize(x.clone().requires_grad_(), name, out=out)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        ms.fake_quantize(x, name, out=np.empty((6, 100)))

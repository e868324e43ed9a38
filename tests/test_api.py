"""The public API named in DESIGN.md / README works as written, from `import microscale as ms` alone."""

import torch

import microscale as ms


def test_readme_quickstart(tmp_path):
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    q = ms.quantize(x, "mxfp4", axis=-1, rounding="even", scale_mode="floor")
    assert q.nbytes == 64 * 4096 // 2 + 64 * 4096 // 32 and q.bits_per_element == 4.25
    assert (q.shape, q.axis, q.format.name) == ((64, 4096), 1, "mxfp4_e2m1")
    assert torch.equal(q.dequantize(), ms.fake_quantize(x, "mxfp4"))
    assert ms.get_format("mxfp8_e4m3").bits_per_element == 8.25
    ms.save_file({"w": q, "b": torch.arange(3.0)}, tmp_path / "m.safetensors")
    back = ms.load_file(tmp_path / "m.safetensors")
    assert torch.equal(back["w"].codes, q.codes) and torch.equal(back["b"], torch.arange(3.0))
    model = ms.nn.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), "mxfp4-w+mxfp6")
    assert "mxfp4_e2m1" in repr(model)
    qsnr = ms.bdr.qsnr(x, "mx6")
    assert 25 < qsnr < 32 and 0 < ms.bdr.cost("mx6") < ms.bdr.cost("mx9")
    assert callable(ms.ptq.error_diffusion_quantize)


def test_readme_quickstart_models_interop_backends(tmp_path):
    """The README quickstart lines added with packed inference, coverage, interop and backends."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))  # noqa: E731
    x = torch.randn(4, 64)
    model = ms.nn.quantize_model(make(), "mxfp4-w+mxfp6")
    assert ms.nn.coverage(model, x).share == 1.0
    fresh, model = make(), make()
    model = ms.nn.quantize_model(model, "mxfp4-w", inference=True)
    assert model[0].weight.shape == (32, 64) and model[0].weight.dtype == torch.float32
    ms.nn.save_quantized(model, tmp_path / "m.safetensors")
    ms.nn.load_quantized(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh(x), model(x))
    q = ms.quantize(torch.randn(8, 64), "mxfp4")
    b = torch.randn(8)
    assert torch.allclose(ms.packed_linear(x, q, b), torch.nn.functional.linear(x, q.dequantize(), b), atol=1e-5)
    blocks, scales = ms.interop.to_gpt_oss(q)
    assert blocks.shape == (8, 2, 16) and scales.shape == (8, 2)
    assert ms.interop.to_gguf(q).shape[-1] == 2 * 17
    with ms.use_backend("torch"):
        y = ms.fake_quantize(x, "mxfp8")
    assert torch.equal(y, ms.fake_quantize(x, "mxfp8"))
    assert {b["name"] for b in ms.backends() if b["available"]} >= {"c", "torch", "reference"}

"""microscale.interop: gpt-oss / transformers MXFP4, GGUF (ggml) MXFP4 and torchao MX exchange, bit for bit.

Each target's own decoder is the oracle: transformers' ``convert_moe_packed_tensors``, gguf-py's
``gguf.quants.dequantize(..., MXFP4)`` and torchao's ``MXTensor.dequantize``. The exhaustive tensors hold
every E2M1 code under every non-NaN E8M0 scale byte (0..254).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors.torch as st
import torch

import microscale as ms
from microscale import cli, interop
from microscale.tensor import MXTensor

gguf = pytest.importorskip("gguf")
GGML_MXFP4 = gguf.GGMLQuantizationType.MXFP4


def _exhaustive_mxfp4(lead=(1,)) -> MXTensor:
    """Shape [*lead, 255, 32]: block s has scale byte s (0..254) and codes 0..15 twice, so every code
    (zero, -0, the subnormal 0.5, the max 6.0, ...) meets every finite scale, the smallest and the
    largest (whose large codes overflow float32 to inf in every decoder) included."""
    n = int(np.prod(lead)) * 255
    codes = torch.arange(16, dtype=torch.uint8).repeat(n, 2)
    scales = torch.arange(255, dtype=torch.uint8).repeat(n // 255)
    return MXTensor.from_codes(codes, scales, (*lead, 255, 32), -1, "mxfp4")


def _random_mxfp4(shape, seed=0) -> MXTensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape[:-1], generator=g).float())[..., None]
    return ms.quantize(x, "mxfp4", axis=-1)


def _same_mx(a: MXTensor, b: MXTensor) -> bool:
    return (a.format == b.format and a.shape == b.shape and a.axis == b.axis and torch.equal(a.codes, b.codes)
            and torch.equal(a.scales, b.scales))


def _convert_moe_packed_tensors():
    return pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors


def _nan_block_tensor() -> MXTensor:
    x = torch.randn(2, 64)
    x[1, 40] = float("nan")
    q = ms.quantize(x, "mxfp4")
    assert int((q.scales == 0xFF).sum()) == 1
    return q


# ---- gpt-oss / transformers -----------------------------------------------------------------------------
def test_gpt_oss_layout_is_our_packed_storage():
    q = _random_mxfp4((3, 5, 64))
    blocks, scales = interop.to_gpt_oss(q)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2)
    # byte j of a block: element 2j in the low nibble, element 2j+1 in the high nibble
    codes = q.element_codes()
    assert torch.equal(blocks & 0x0F, codes[..., 0::2].reshape(3, 5, 2, 16))
    assert torch.equal(blocks >> 4, codes[..., 1::2].reshape(3, 5, 2, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_decodes_our_gpt_oss_blocks_exactly(dtype):
    convert_moe_packed_tensors = _convert_moe_packed_tensors()
    for q in (_exhaustive_mxfp4((2,)), _random_mxfp4((4, 6, 96)), _random_mxfp4((2, 3, 4, 64), seed=1)):
        blocks, scales = interop.to_gpt_oss(q)
        if q.ndim == 4:  # the reader transposes dims 1, 2 of its [experts, rows, K] result
            blocks, scales = blocks.reshape(6, 4, -1, 16), scales.reshape(6, 4, -1)
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        ours = q.dequantize(dtype).reshape(theirs.shape[0], -1, theirs.shape[1]).transpose(1, 2)
        assert torch.equal(theirs, ours)
        assert torch.equal(torch.signbit(theirs), torch.signbit(ours))  # -0 stays -0


def test_gpt_oss_exhaustive_includes_the_edges():
    d = _exhaustive_mxfp4().dequantize(torch.float64)[0]
    assert d[0, 1] == 0.5 * 2.0 ** -127 and d[0, 8] == 0 and torch.signbit(d[0, 8])
    assert d[254, 7] == 6 * 2.0 ** 127


@pytest.mark.parametrize("shape", [(64,), (7, 32), (3, 5, 64), (2, 3, 4, 96)])
def test_gpt_oss_round_trip_is_bit_exact(shape):
    q = _random_mxfp4(shape)
    back = interop.from_gpt_oss(*interop.to_gpt_oss(q))
    assert _same_mx(back, q)
    ex = _exhaustive_mxfp4()
    assert _same_mx(interop.from_gpt_oss(*interop.to_gpt_oss(ex)), ex)


def test_gpt_oss_accepts_e8m0_scales_and_numpy():
    q = _random_mxfp4((4, 64))
    blocks, scales = interop.to_gpt_oss(q)
    assert _same_mx(interop.from_gpt_oss(blocks.numpy(), scales.view(torch.float8_e8m0fnu)), q)


def test_gpt_oss_ragged_k_pads_with_zero_codes():
    convert_moe_packed_tensors = _convert_moe_packed_tensors()
    q = _random_mxfp4((2, 3, 40))  # 40 = 32 + 8: the second block of each row holds 24 padding codes
    blocks, scales = interop.to_gpt_oss(q)
    assert blocks.shape == (2, 3, 2, 16)
    assert torch.all(blocks[..., 1, 4:] == 0)  # elements 40..63 of each row: zero codes
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [2, 64, 3]
    assert torch.equal(theirs[:, :40], q.dequantize().transpose(1, 2))
    assert torch.all(theirs[:, 40:] == 0)
    assert _same_mx(interop.from_gpt_oss(blocks, scales, shape=(2, 3, 40)), q)
    assert interop.from_gpt_oss(blocks, scales).shape == (2, 3, 64)
    with pytest.raises(ValueError, match="ceil"):
        interop.from_gpt_oss(blocks, scales, shape=(2, 3, 70))


def test_gpt_oss_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="NaN"):
        interop.to_gpt_oss(_nan_block_tensor())
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"MXFP4 only.*mxfp6_e2m3.*axis 1"):
        interop.to_gpt_oss(ms.quantize(x, "mxfp6_e2m3"))
    with pytest.raises(ValueError, match="nvfp4"):
        interop.to_gpt_oss(ms.quantize(x, "nvfp4"))
    with pytest.raises(ValueError, match=r"last dimension.*axis 0.*required: axis 1"):
        interop.to_gpt_oss(ms.quantize(torch.randn(64, 4), "mxfp4", axis=0))
    with pytest.raises(TypeError, match="MXTensor"):
        interop.to_gpt_oss(x)
    with pytest.raises(ValueError, match=r"\[\.\.\., G, 16\]"):
        interop.from_gpt_oss(torch.zeros(4, 2, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="blocks.shape"):
        interop.from_gpt_oss(torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        interop.from_gpt_oss(torch.zeros(4, 2, 16), torch.zeros(4, 2, dtype=torch.uint8))


# ---- GGUF -----------------------------------------------------------------------------------------------
def test_gguf_block_layout_by_hand():
    # one block, scale byte 130; element i < 16 has code i, element 16 + j has code 15 - j
    codes = torch.cat([torch.arange(16), 15 - torch.arange(16)]).to(torch.uint8)
    q = MXTensor.from_codes(codes, torch.tensor([130], dtype=torch.uint8), (32,), 0, "mxfp4")
    raw = interop.to_gguf(q)
    expected = [130] + [j | (15 - j) << 4 for j in range(16)]
    assert raw.dtype == np.uint8 and raw.shape == (17,) and raw.tolist() == expected


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # scale 254: inf, as ours
def test_gguf_package_decodes_our_bytes_exactly():
    for q in (_exhaustive_mxfp4(), _random_mxfp4((4, 6, 96)), _random_mxfp4((2, 3, 4, 64), seed=1),
              _random_mxfp4((64,), seed=2)):
        raw = interop.to_gguf(q)
        assert raw.shape == (*q.shape[:-1], q.shape[-1] // 32 * 17)
        theirs = gguf.quants.dequantize(raw, GGML_MXFP4)
        ours = q.dequantize().numpy()
        # ggml's table has no -0 (code 8 decodes as +0): equal as values, which == compares
        assert theirs.dtype == np.float32 and theirs.shape == ours.shape
        assert np.array_equal(theirs, ours)


@pytest.mark.parametrize("shape", [(32,), (7, 64), (3, 5, 64), (2, 3, 4, 96)])
def test_gguf_round_trip_is_bit_exact(shape):
    q = _random_mxfp4(shape)
    raw = interop.to_gguf(q)
    assert _same_mx(interop.from_gguf(raw, shape), q)
    assert _same_mx(interop.from_gguf(raw.tobytes(), shape), q)
    assert _same_mx(interop.from_gguf(torch.from_numpy(raw.reshape(-1)), shape), q)
    ex = _exhaustive_mxfp4()
    assert _same_mx(interop.from_gguf(interop.to_gguf(ex), ex.shape), ex)


def test_gguf_repacking_in_chunks_is_the_same(monkeypatch):
    q = _random_mxfp4((5, 128), seed=5)  # 20 blocks
    whole = interop.to_gguf(q)
    monkeypatch.setattr(interop, "_CHUNK_BLOCKS", 3)  # 7 chunks, the last one short
    assert np.array_equal(interop.to_gguf(q), whole)
    assert _same_mx(interop.from_gguf(whole, q.shape), q)
    assert np.array_equal(gguf.quants.dequantize(whole, GGML_MXFP4), q.dequantize().numpy())


def test_from_gguf_reads_ggml_quantizer_output():
    # bytes made by gguf-py's own MXFP4 quantizer decode to what gguf-py decodes them to
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, GGML_MXFP4)
    q = interop.from_gguf(raw, x.shape)
    assert np.array_equal(q.dequantize().numpy(), gguf.quants.dequantize(raw, GGML_MXFP4))
    assert np.array_equal(interop.to_gguf(q), raw)


def test_gguf_ragged_k_pads_with_zero_codes():
    q = _random_mxfp4((3, 40))
    raw = interop.to_gguf(q)
    assert raw.shape == (3, 34)
    assert np.all(raw[:, 17 + 1:] & 0xF0 == 0) and np.all(raw[:, 17 + 9:] == 0)  # elements 40..63: zero codes
    theirs = gguf.quants.dequantize(raw, GGML_MXFP4)
    assert np.array_equal(theirs[:, :40], q.dequantize().numpy()) and np.all(theirs[:, 40:] == 0)
    assert _same_mx(interop.from_gguf(raw, (3, 40)), q)


def test_gguf_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="NaN"):
        interop.to_gguf(_nan_block_tensor())
    with pytest.raises(ValueError, match=r"mxfp8_e4m3"):
        interop.to_gguf(ms.quantize(torch.randn(4, 64), "mxfp8_e4m3"))
    with pytest.raises(ValueError, match=r"axis 0"):
        interop.to_gguf(ms.quantize(torch.randn(64, 4), "mxfp4", axis=0))
    with pytest.raises(ValueError, match=r"needs 2 blocks of 17 bytes = 34 bytes, got 33"):
        interop.from_gguf(np.zeros(33, dtype=np.uint8), (64,))
    with pytest.raises(TypeError, match="uint8"):
        interop.from_gguf(np.zeros(34, dtype=np.int8), (64,))


# ---- torchao --------------------------------------------------------------------------------------------
TORCHAO_FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4"]


def _torchao():
    pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor as AOTensor
    return AOTensor


def _exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fmt", TORCHAO_FORMATS)
def test_torchao_round_trip_and_decode(fmt):
    AOTensor = _torchao()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * 8
    x[2, 4, 33] = float("nan")  # one NaN block: torchao reads scale 0xFF as NaN too
    q = ms.quantize(x, fmt)
    t = interop.to_torchao(q)
    assert isinstance(t, AOTensor) and t.shape == q.shape and t.block_size == 32
    _exact(t.dequantize(torch.float32), q.dequantize())
    assert _same_mx(interop.from_torchao(t), q)
    # blocked along dim 0 of a 2-D tensor: torchao's transposed qdata
    w = ms.quantize(torch.randn(64, 5, generator=g), fmt, axis=0)
    tw = interop.to_torchao(w)
    assert not tw.qdata.is_contiguous() and tw.shape == (64, 5)
    _exact(tw.dequantize(torch.float32), w.dequantize())
    assert _same_mx(interop.from_torchao(tw), w)


@pytest.mark.parametrize("fmt", TORCHAO_FORMATS)
def test_torchao_decodes_every_code_under_every_scale(fmt):
    _torchao()
    bits = ms.get_format(fmt).element.bits
    width = max(32, 2 ** bits)  # row r: every element code, in blocks that all have scale byte r (255 = NaN)
    codes = torch.arange(2 ** bits).repeat(256, width // 2 ** bits).to(torch.uint8)
    scales = torch.arange(256).repeat_interleave(width // 32).to(torch.uint8)
    q = MXTensor.from_codes(codes, scales, (256, width), -1, fmt)
    t = interop.to_torchao(q)
    _exact(t.dequantize(torch.float32), q.dequantize())
    assert _same_mx(interop.from_torchao(t), q)


@pytest.mark.parametrize("fmt", TORCHAO_FORMATS)
def test_from_torchao_reads_torchao_quantizer_output(fmt):
    AOTensor = _torchao()
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    elem = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp6_e2m3": DTYPE_FP6_E2M3,
            "mxfp6_e3m2": DTYPE_FP6_E3M2, "mxfp4": torch.float4_e2m1fn_x2}[fmt]
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(1)) * 3
    t = AOTensor.to_mx(x, elem, 32)
    q = interop.from_torchao(t)
    _exact(q.dequantize(), t.dequantize(torch.float32))
    assert torch.equal(q.scales, ms.quantize(x, fmt).scales)  # both floor the shared exponent (OCP §6.3)
    _exact(interop.from_torchao(t.t()).dequantize(), t.t().dequantize(torch.float32))


def test_torchao_refuses_what_it_cannot_hold():
    _torchao()
    with pytest.raises(ValueError, match="mxint8"):
        interop.to_torchao(ms.quantize(torch.randn(4, 64), "mxint8"))
    with pytest.raises(ValueError, match="multiple of the block size 32.*40"):
        interop.to_torchao(ms.quantize(torch.randn(4, 40), "mxfp8_e4m3"))
    with pytest.raises(ValueError, match="last dimension.*axis 1"):
        interop.to_torchao(ms.quantize(torch.randn(2, 64, 3), "mxfp8_e4m3", axis=1))
    with pytest.raises(TypeError, match="torchao MXTensor"):
        interop.from_torchao(torch.randn(4))


# ---- whole files ----------------------------------------------------------------------------------------
def _model_tensors():
    g = torch.Generator().manual_seed(3)
    return {"model.layers.0.mlp.experts.gate_up_proj": _random_mxfp4((2, 6, 64)),
            "model.layers.0.mlp.experts.down_proj": _random_mxfp4((2, 4, 96), seed=4),
            "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(2, 6, generator=g),
            "model.embed_tokens.weight": torch.randn(10, 8, generator=g).bfloat16(),
            "model.norm.weight": torch.randn(8, generator=g).half(),
            "position_ids": torch.arange(5, dtype=torch.int64)}


def _assert_same_dict(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        if isinstance(a[k], MXTensor):
            assert isinstance(b[k], MXTensor) and _same_mx(a[k], b[k]), k
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_gpt_oss_file_round_trip_and_transformers_reads_it(tmp_path):
    convert_moe_packed_tensors = _convert_moe_packed_tensors()
    tensors = _model_tensors()
    path = tmp_path / "gpt_oss.safetensors"
    interop.save_gpt_oss(tensors, path)
    raw = st.load_file(path)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert raw[name + "_blocks"].shape == (2, 6, 2, 16) and raw[name + "_scales"].shape == (2, 6, 2)
    assert name not in raw
    assert torch.equal(convert_moe_packed_tensors(raw[name + "_blocks"], raw[name + "_scales"], dtype=torch.float32),
                       tensors[name].dequantize().transpose(1, 2))
    _assert_same_dict(interop.load_gpt_oss(path), tensors)


def test_gguf_file_reads_back_with_gguf_reader(tmp_path):
    tensors = _model_tensors()
    path = tmp_path / "m.gguf"
    interop.save_gguf(tensors, path)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert list(by_name) == list(tensors)
    T = gguf.GGMLQuantizationType
    for name, value in tensors.items():
        t = by_name[name]
        assert tuple(reversed(t.shape.tolist())) == tuple(value.shape)
        if isinstance(value, MXTensor):
            assert t.tensor_type == T.MXFP4
            assert np.array_equal(t.data, interop.to_gguf(value))
            assert np.array_equal(gguf.quants.dequantize(t.data, T.MXFP4), value.dequantize().numpy())
    assert by_name["model.norm.weight"].tensor_type == T.F16
    assert np.array_equal(by_name["model.norm.weight"].data, tensors["model.norm.weight"].numpy())
    assert by_name["model.embed_tokens.weight"].tensor_type == T.BF16
    assert by_name["position_ids"].tensor_type == T.I64
    _assert_same_dict(interop.load_gguf(path), tensors)


def test_file_writers_refuse_before_writing(tmp_path):
    path = tmp_path / "out.gguf"
    path.write_bytes(b"old")  # an existing output stays untouched by every failed write below
    bad = {"ok": _random_mxfp4((2, 64)), "ragged": _random_mxfp4((2, 40))}
    with pytest.raises(ValueError, match="'ragged'.*multiple of 32"):
        interop.save_gguf(bad, path)
    with pytest.raises(ValueError, match="'ragged'.*multiple of 32"):
        interop.save_gpt_oss(bad, tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match=r"'w'.*mxfp6_e3m2"):
        interop.save_gguf({"w": ms.quantize(torch.randn(2, 64), "mxfp6_e3m2")}, path)
    with pytest.raises(ValueError, match=r"'b'.*torch.uint8"):
        interop.save_gguf({"b": torch.zeros(3, dtype=torch.uint8)}, path)
    with pytest.raises(ValueError, match="GGML_MAX_NAME"):
        interop.save_gguf({"x" * 64: torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="NaN"):  # found while writing: nothing is left behind
        interop.save_gguf({"a": _random_mxfp4((2, 64)), "n": _nan_block_tensor()}, path)
    assert os.listdir(tmp_path) == ["out.gguf"] and path.read_bytes() == b"old"


def test_gguf_reader_refuses_inexact_types(tmp_path):
    path = tmp_path / "q8.gguf"
    w = gguf.GGUFWriter(path, "test")
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("w", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="'w' is GGML Q8_0"):
        interop.load_gguf(path)


def test_gpt_oss_reader_refuses_malformed_pairs(tmp_path):
    path = tmp_path / "bad.safetensors"
    st.save_file({"w_blocks": torch.zeros(2, 3, 16, dtype=torch.uint8), "w_scales": torch.zeros(2, 4, dtype=torch.uint8)},
                 path)
    with pytest.raises(ValueError, match="'w_blocks'.*uint8 \\[..., G, 16\\]"):
        interop.load_gpt_oss(path)


# ---- microscale convert ---------------------------------------------------------------------------------
def test_cli_convert_round_trips_every_layout(tmp_path, capsys):
    tensors = _model_tensors()
    src = tmp_path / "a.safetensors"
    ms.save_file(tensors, src)
    steps = [("gguf", "b.gguf"), ("microscale", "c.safetensors"), ("gpt-oss", "d.safetensors"),
             ("microscale", "e.safetensors"), ("gguf", "f.gguf"), ("gpt-oss", "g.safetensors")]
    prev = src
    for to, name in steps:
        out = tmp_path / name
        assert cli.main(["convert", str(prev), str(out), "--to", to]) == 0
        assert f"6 tensors (2 MX, 4 plain)" in capsys.readouterr().out
        prev = out
    _assert_same_dict(ms.load_file(tmp_path / "e.safetensors"), tensors)
    with interop.open_checkpoint(tmp_path / "g.safetensors") as ck:
        _assert_same_dict(dict(ck), tensors)
    assert open(tmp_path / "b.gguf", "rb").read() == open(tmp_path / "f.gguf", "rb").read()


def test_cli_convert_errors(tmp_path, capsys):
    src = tmp_path / "a.safetensors"
    ms.save_file({"w": ms.quantize(torch.randn(4, 64), "mxfp6_e2m3")}, src)
    assert cli.main(["convert", str(src), str(tmp_path / "b.gguf"), "--to", "gguf"]) == 1
    assert "'w'" in capsys.readouterr().err and not (tmp_path / "b.gguf").exists()
    assert cli.main(["convert", str(src), str(tmp_path / "b.gguf"), "--to", "onnx"]) == 2
    assert cli.main(["convert", str(src), str(src), "--to", "microscale"]) == 1
    assert "same file" in capsys.readouterr().err

"""The pieces of benchmarks/llamacpp.py that do not need llama.cpp: the Llama GGUF writer (read back with
gguf-py and our own ``from_gguf``), the q/k row order for ggml's RoPE (checked against transformers' own
rotary embedding), ggml's Q8_0 activation rounding and the library search. No llama.cpp here."""

import pathlib
import sys

import numpy as np
import pytest
import torch

import microscale as ms

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import llamacpp  # noqa: E402


def _interleaved_rope(x, pos, base):
    """ggml's normal RoPE by its definition: pairs (2i, 2i+1) of each head rotated by pos * base^(-2i/d)."""
    d = x.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * theta.cos() - b * theta.sin()
    out[..., 1::2] = a * theta.sin() + b * theta.cos()
    return out


def test_rope_row_order_turns_transformers_rope_into_ggml_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    n_head, d, k, pos, base = 3, 8, 16, 5, 10000.0
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_head * d, k, generator=g, dtype=torch.float64)
    x = torch.randn(k, generator=g, dtype=torch.float64)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([pos * inv_freq, pos * inv_freq])
    q = (w @ x).reshape(1, n_head, 1, d)
    hf, _ = apply_rotary_pos_emb(q, q, emb.cos()[None, None], emb.sin()[None, None])
    ours = _interleaved_rope((llamacpp.rope_rows_to_interleaved(w, n_head) @ x).reshape(n_head, d), pos, base)
    # the same rotated vector, rows in GGUF order: row h*d + 2i + j <- transformers row h*d + j*d/2 + i
    want = hf.reshape(n_head, 2, d // 2).transpose(1, 2).reshape(n_head, d)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)
    # and attention scores between two heads' rotated vectors are the same numbers
    assert torch.allclose(ours @ ours.T, hf.reshape(n_head, d) @ hf.reshape(n_head, d).T, atol=1e-10)


def test_write_llama_gguf_reads_back_bit_for_bit(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=300, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "m.gguf"
    info = llamacpp.write_llama_gguf(model, path)
    r = gguf.GGUFReader(path)

    def field(name):
        f = r.fields[name]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.rope.dimension_count")) == (2, 64, 96, 2, 1, 32)
    assert field("tokenizer.ggml.model") == "llama"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 300 and tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x0A] == "<0x0A>"
    assert len(set(tokens)) == 300
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == info["tensors"] == 1 + 2 * 9 + 2
    assert info["tensor_bytes"] == sum(int(t.n_bytes) for t in r.tensors)
    sd = model.state_dict()
    want = {"blk.1.attn_q.weight": llamacpp.rope_rows_to_interleaved(sd["model.layers.1.self_attn.q_proj.weight"], 2),
            "blk.1.attn_k.weight": llamacpp.rope_rows_to_interleaved(sd["model.layers.1.self_attn.k_proj.weight"], 1),
            "blk.0.ffn_down.weight": sd["model.layers.0.mlp.down_proj.weight"],
            "output.weight": sd["lm_head.weight"]}
    for name, w in want.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
        got = ms.interop.from_gguf(np.array(t.data), tuple(w.shape))
        q = ms.quantize(w, "mxfp4", axis=1)
        assert torch.equal(got.codes, q.codes) and torch.equal(got.scales, q.scales), name
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(np.array(emb.data).reshape(300, 64), sd["model.embed_tokens.weight"].numpy())
    with pytest.raises(ValueError, match="MXFP4 only"):
        llamacpp.write_llama_gguf(model, tmp_path / "x.gguf", weight_format="mxfp8")


def test_q8_0_roundtrip_matches_ggml_rule():
    # amax 127: d = 1 exactly, so values are round-half-even of x
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -3.5, -0.5, 126.4, -7.25] + [0.0] * 24)
    assert llamacpp.q8_0_roundtrip(x).tolist()[:8] == [127.0, 0.0, 2.0, 2.0, -4.0, -0.0, 126.0, -7.0]
    # amax 1: d = 1/127 stored as fp16, so the max comes back as 127 * fp16(1/127), not 1
    y = torch.zeros(2, 32)
    y[0, 0], y[0, 1] = 1.0, -0.25
    d16 = float(np.float16(np.float32(1.0) / np.float32(127.0)))
    got = llamacpp.q8_0_roundtrip(y)
    assert got[0, 0].item() == np.float32(127 * d16)
    assert got[0, 1].item() == np.float32(-32 * d16)   # -0.25 * 127 = -31.75 -> -32
    assert torch.equal(got[1], torch.zeros(32))         # a zero block stays zero
    with pytest.raises(ValueError, match="multiple of 32"):
        llamacpp.q8_0_roundtrip(torch.zeros(31))


def test_find_lib_dir_says_why_not(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMACPP_LIB", raising=False)
    got, why = llamacpp.find_lib_dir(lib_dir=str(tmp_path))
    assert got is None and "libggml-base.so" in why and "libggml-cpu.so" in why
    got, why = llamacpp.find_lib_dir(python=str(tmp_path / "venv" / "bin" / "python"))
    assert got is None and "no llama_cpp/lib" in why
    for n in ("libggml-base.so", "libggml-cpu.so"):
        (tmp_path / n).write_bytes(b"")
    assert llamacpp.find_lib_dir(lib_dir=str(tmp_path)) == (str(tmp_path), "")

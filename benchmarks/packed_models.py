"""Packed weight-only inference on tiny random-init models: bytes, output error, save/load round trip.

For each model (transformers GPT-2, Llama, BERT, ViT built from tiny configs, no downloads; torch's
nn.TransformerEncoderLayer and nn.MultiheadAttention; a depthwise-separable conv block), in ``eval()``:

- ``quantize_model(copy, recipe, inference=True)``: modules swapped/packed, resident bytes FP32 ->
  packed (every storage counted once, tied weights included);
- relative output error ``||y_packed - y_fp32|| / ||y_fp32||`` on one random input;
- ``save_quantized`` -> ``load_quantized`` into a freshly built model: ``torch.equal`` outputs.

Prints a markdown table (and writes it to ``--out`` when given).

    python benchmarks/packed_models.py                 # mxfp4-w
    python benchmarks/packed_models.py --recipe mxfp8-w --out results/bench/packed_models.md
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import tempfile

import torch
import torch.nn as nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import microscale as ms  # noqa: E402

HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 2, 256


def _first(out):
    """The main output of a model call: logits / last hidden state / the first tuple element."""
    if isinstance(out, tuple):
        return out[0]
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg), (torch.randint(0, VOCAB, (2, 16)),)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=1, vocab_size=VOCAB,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg), (torch.randint(0, VOCAB, (2, 16)),)


def bert():
    from transformers import BertConfig, BertForMaskedLM
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=64)
    return BertForMaskedLM(cfg), (torch.randint(0, VOCAB, (2, 16)),)


def vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, num_labels=10)
    return ViTForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def encoder_layer():
    return (nn.TransformerEncoderLayer(HIDDEN, HEADS, 2 * HIDDEN, dropout=0.0, batch_first=True),
            (torch.randn(2, 16, HIDDEN),))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention called as self-attention (query = key = value)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def mha():
    return SelfAttention(), (torch.randn(2, 16, HIDDEN),)


def dsconv():
    """A MobileNet-style depthwise-separable block: depthwise 3x3, BN, ReLU, pointwise 1x1, BN, ReLU."""
    block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    return block, (torch.randn(2, 32, 16, 16),)


#: name -> builder returning (model, example inputs); each builder draws its weights from torch's RNG.
MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "encoder_layer": encoder_layer,
          "mha": mha, "dsconv": dsconv}


def build(name: str, seed: int = 0):
    """The model ``name`` in eval() mode and its example inputs, from seed ``seed``."""
    torch.manual_seed(seed)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return _first(model(*inputs))


def measure(name: str, recipe: str = "mxfp4-w", directory: str | None = None) -> dict:
    """One row of the table for model ``name`` (see the module docstring)."""
    model, inputs = build(name)
    y = run(model, inputs)
    fp32_bytes = ms.nn.resident_bytes(model)
    packed = ms.nn.quantize_model(copy.deepcopy(model), recipe, inference=True)
    yq = run(packed, inputs)
    n_packed = len({id(p) for p in packed.parameters() if ms.nn.is_packed(p)})
    n_gemm = sum(isinstance(m, ms.nn.modules.QuantizedModule) for m in packed.modules())
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = pathlib.Path(tmp) / f"{name}.safetensors"
        ms.nn.save_quantized(packed, path)
        fresh, _ = build(name, seed=1)  # different random weights: everything must come from the file
        ms.nn.load_quantized(fresh, path)
        equal = torch.equal(run(fresh, inputs), yq)
        file_bytes = path.stat().st_size
    packed_bytes = ms.nn.resident_bytes(packed)
    return {"model": name, "swapped": n_gemm, "packed": n_packed, "fp32_bytes": fp32_bytes,
            "packed_bytes": packed_bytes, "ratio": packed_bytes / fp32_bytes, "file_bytes": file_bytes,
            "rel_err": float((yq - y).norm() / y.norm()), "weight_dtype": str(_weight(packed).dtype),
            "save_load_equal": equal}


def _weight(model):
    return next(p for p in model.parameters() if ms.nn.is_packed(p))


def table(rows) -> str:
    head = ("| model | GEMM modules swapped | packed weights | bytes FP32 -> packed | ratio | file bytes | "
            "rel. output error | .weight.dtype | save/load equal |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['swapped']} | {r['packed']} | {r['fp32_bytes']} -> {r['packed_bytes']} | "
                     f"{r['ratio']:.3f} | {r['file_bytes']} | {r['rel_err']:.4f} | {r['weight_dtype']} | "
                     f"{r['save_load_equal']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="mxfp4-w", help="packing recipe (default mxfp4-w)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", type=pathlib.Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(name, args.recipe) for name in args.models]
    text = f"recipe {args.recipe}, torch {torch.__version__}\n\n" + table(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Greedy decode speed of a Llama-architecture model: FP32 vs BF16 vs packed MX weights (weight-only).

The model is built from a transformers ``LlamaConfig`` (hidden 2048, 4 layers, vocab 32000 by default)
with random weights (nothing is downloaded), then decodes ``--tokens`` tokens greedily from an 8-token
prompt with the KV cache. All variants are converted from the same model and decode round-robin in one process
(best of ``--repeat``), so machine noise hits them alike; the bytes of each model's parameters and buffers
are printed beside it, and its resident memory measured alone in a fresh subprocess (VmRSS after
building it). Variants:

- ``fp32``, ``bf16``: the plain model (BF16: ``model.bfloat16()``).
- ``mxfp4-w``, ``mxfp8-w``: ``ms.nn.quantize_model(model, recipe, inference=True)``: every Linear weight
  (lm_head included) packed in MXFP4 / MXFP8 E4M3, activations unquantized. If this checkout has no
  recipe of that name, the equivalent ``Recipe`` (only ``fwd_weight`` set) is built here and the row
  says so.
- ``mxfp4-w/kernel``, ``mxfp8-w/kernel``: the same packed weights, every ``nn.Linear`` replaced by a small
  module that calls ``ms.packed_linear`` (the fused kernels) directly: a control for the library path
  above, whose packed weights reach the same kernels through the ``microscale::packed_linear`` op.
- ``llama.cpp-mxfp4``: the same model written as a GGUF file of llama.cpp's ``llama`` architecture with the
  same MXFP4 codes and scales in every Linear weight (``benchmarks/llamacpp.py`` ``write_llama_gguf``),
  decoded greedily by llama.cpp (llama-cpp-python) with the same thread count in a worker process
  (``benchmarks/llamacpp_worker.py``, run by ``--llamacpp-python``), round-robin with the others. Its
  weights column is the GGUF tensor bytes, its RSS the worker's after loading. Where llama-cpp-python is
  not installed the row is skipped with a line saying why.

    python benchmarks/decode.py                          # all variants, 64 tokens
    python benchmarks/decode.py --quick                  # 2 layers, 16 tokens
    python benchmarks/decode.py --variants fp32 mxfp4-w/kernel --tokens 32
    python benchmarks/decode.py --variants fp32 mxfp4-w llama.cpp-mxfp4 --llamacpp-python /venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LLAMACPP = "llama.cpp-mxfp4"
VARIANTS = ["fp32", "bf16", "mxfp4-w", "mxfp8-w", "mxfp4-w/kernel", "mxfp8-w/kernel", LLAMACPP]
WEIGHT_FORMATS = {"mxfp4-w": "mxfp4_e2m1", "mxfp8-w": "mxfp8_e4m3"}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return -1


def _weight_only_recipe(name: str):
    """The named recipe when this checkout registers it, else the equivalent Recipe (fwd_weight only)."""
    import microscale as ms
    from microscale.nn.recipe import Recipe, get_recipe
    try:
        return get_recipe(name), False
    except ValueError:
        return Recipe(fwd_weight=WEIGHT_FORMATS[name], name=name), True
    finally:
        del ms


def _swap_linears_for_packed_linear(model, fmt: str) -> None:
    """Replace every nn.Linear by a module that keeps only its packed weight and calls ms.packed_linear."""
    import torch
    import microscale as ms

    class PackedLinear(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            q = ms.quantize(lin.weight.detach(), fmt, axis=1)
            self.q = q
            for name, t in q.components().items():   # registered so that memory accounting sees them
                self.register_buffer("weight_" + name, t)
            self.bias = lin.bias

        def forward(self, x):
            return ms.packed_linear(x, self.q, self.bias)

    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(model, name, PackedLinear(child))
        else:
            _swap_linears_for_packed_linear(child, fmt)


class LlamaCppDecoder:
    """llama.cpp's greedy decode of a transformers Llama, behind ``generate(prompt, max_new_tokens=N)``:
    the model written as an MXFP4 GGUF file in ``tmpdir``, decoded by ``benchmarks/llamacpp_worker.py``
    running under ``python`` (a venv with llama-cpp-python). Raises RuntimeError saying why when the
    worker does not start."""

    def __init__(self, model, python: str | None, threads: int, tmpdir: str):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from llamacpp import DEFAULT_PYTHON, write_llama_gguf
        python = python or DEFAULT_PYTHON
        if not os.path.exists(python):
            raise RuntimeError(f"no interpreter {python} (pass --llamacpp-python of a venv with llama-cpp-python)")
        path = os.path.join(tmpdir, "model.gguf")
        self.weight_bytes = write_llama_gguf(model, path)["tensor_bytes"]
        self._err = open(os.path.join(tmpdir, "worker.stderr"), "w+")
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp_worker.py")
        self.proc = subprocess.Popen([python, worker, "--model", path, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._err.seek(0)
            tail = self._err.read().strip().splitlines()[-3:]
            raise RuntimeError(f"the llama.cpp worker exited ({self.proc.returncode}): {' / '.join(tail)}")
        ready = json.loads(line)
        self.rss_mb = ready["rss_mb"]
        self.note = f"{LLAMACPP}: llama-cpp-python {ready['llama_cpp']}; {ready['system_info']}"

    def generate(self, prompt, max_new_tokens: int, **_):
        import torch
        self.proc.stdin.write(json.dumps({"prompt": prompt[0].tolist(), "tokens": max_new_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return torch.cat([prompt, torch.tensor([reply["tokens"]], dtype=prompt.dtype)], dim=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self._err.close()


def build_variants(variants, layers: int, hidden: int, vocab: int, seed: int) -> dict:
    """Every variant converted from one random-weight model (deep copies): {name: (model, note)}."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import microscale as ms
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    out = {}
    for variant in variants:
        if variant == LLAMACPP:   # built in main(): it needs the thread count and a worker process
            continue
        model, note = (base if variant == "fp32" else copy.deepcopy(base)), ""
        if variant == "bf16":
            model = model.bfloat16()
        elif variant in WEIGHT_FORMATS:
            recipe, built = _weight_only_recipe(variant)
            if built:
                note = f"recipe {variant!r} not registered here: built Recipe(fwd_weight={WEIGHT_FORMATS[variant]!r})"
            ms.nn.quantize_model(model, recipe, inference=True)
        elif variant.endswith("/kernel"):
            _swap_linears_for_packed_linear(model, WEIGHT_FORMATS[variant.split("/")[0]])
        out[variant] = (model, note)
    if LLAMACPP in variants:
        out["_base"] = (base, "")   # the fp32 model the llama.cpp GGUF is written from (popped in main)
    return out


def model_bytes(model) -> int:
    """Resident bytes of parameters and buffers, packed weights at their packed size, shared ones once
    (for llama.cpp: the GGUF file's tensor bytes)."""
    import microscale as ms
    if isinstance(model, LlamaCppDecoder):
        return model.weight_bytes
    return ms.nn.resident_bytes(model)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved decode runs per variant, best kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's); 1 avoids OpenMP team hand-offs, which cost "
                         "milliseconds each on an oversubscribed machine")
    ap.add_argument("--quick", action="store_true", help="2 layers, 16 tokens")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant resident-memory subprocesses")
    ap.add_argument("--llamacpp-python", default=None,
                    help="python of a venv with llama-cpp-python, for the llama.cpp row (default: $LLAMACPP_PYTHON, "
                         "else benchmarks/llamacpp.py's DEFAULT_PYTHON)")
    ap.add_argument("--out", default="results/bench/decode", help="write OUT.json and OUT.md ('' to skip)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.tokens = 2, 16
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:   # one variant alone in this process: its resident memory after building it
        models = build_variants(args.variants, args.layers, args.hidden, args.vocab, args.seed)
        import gc
        gc.collect()
        print(json.dumps({"rss_mb": _status("VmRSS") / 2**20, "peak_rss_mb": _status("VmHWM") / 2**20}))
        return
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    print(f"# Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; greedy decode of {args.tokens} "
          f"tokens, {threads} threads, best of {args.repeat} interleaved; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    models = build_variants(args.variants, args.layers, args.hidden, args.vocab, args.seed)
    base, _ = models.pop("_base", (None, ""))
    tmp = tempfile.TemporaryDirectory(prefix="decode_llamacpp_")
    if LLAMACPP in args.variants:
        try:
            dec = LlamaCppDecoder(base, args.llamacpp_python, threads, tmp.name)
            models[LLAMACPP] = (dec, dec.note)
        except RuntimeError as e:
            print(f"# {LLAMACPP}: llama.cpp not available: {e}", flush=True)
    if "fp32" not in models:
        del base
    prompt = torch.randint(0, args.vocab, (1, 8), generator=torch.Generator().manual_seed(args.seed + 1))
    kw = dict(do_sample=False, min_new_tokens=args.tokens, max_new_tokens=args.tokens, eos_token_id=None,
              pad_token_id=0)
    best = {v: float("inf") for v in models}
    first = {}
    with torch.inference_mode():
        for v, (m, _) in models.items():   # warm-up
            m.generate(prompt, **dict(kw, min_new_tokens=2, max_new_tokens=2))
        for r in range(args.repeat):
            for v, (m, _) in models.items():
                t0 = time.perf_counter()
                out = m.generate(prompt, **kw)
                best[v] = min(best[v], time.perf_counter() - t0)
                first[v] = out[0, 8:16].tolist()
                print(f"# run {r + 1}: {v}: {args.tokens / (time.perf_counter() - t0):.2f} tokens/s", flush=True)
    results = []
    for v, (m, note) in models.items():
        rec = {"variant": v, "tokens": args.tokens, "seconds": best[v], "tokens_per_s": args.tokens / best[v],
               "model_mb": model_bytes(m) / 2**20, "threads": threads, "note": note, "first_tokens": first[v]}
        if isinstance(m, LlamaCppDecoder):
            rec["rss_mb"] = m.rss_mb   # the worker's, after loading the GGUF file
        elif not args.no_memory:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--variants", v, "--layers",
                   str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0:
                rec.update(json.loads(res.stdout.strip().splitlines()[-1]))
        results.append(rec)
    for m, _ in models.values():
        if isinstance(m, LlamaCppDecoder):
            m.close()
    tmp.cleanup()
    del models
    base = next((r["tokens_per_s"] for r in results if r["variant"] == "fp32"), None)
    lines = ["| variant | tokens/s | vs FP32 | weights MB | RSS MB (alone, after build) |", "|---|---|---|---|---|"]
    for r in results:
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        rss = f"{r['rss_mb']:.0f}" if "rss_mb" in r else "-"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.3f} | {rel} | {r['model_mb']:.0f} | {rss} |")
    print("\n".join(lines))
    notes = sorted({r["note"] for r in results if r["note"]})
    for n in notes:
        print(f"# note: {n}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"load_average": load, "args": vars(args), "results": results}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"Greedy decode, Llama {args.layers} layers / hidden {args.hidden} / vocab {args.vocab}, "
                    f"{args.tokens} tokens, random weights; {threads} threads, best of {args.repeat} interleaved, "
                    f"load average {load:.1f}. Regenerate: `python benchmarks/decode.py`.\n\n")
            f.write("\n".join(lines) + "\n" + "".join(f"\nNote: {n}\n" for n in notes))


if __name__ == "__main__":
    main()

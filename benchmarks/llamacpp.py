"""llama.cpp (ggml) as the peer for MX inference on CPU: its MXFP4 matrix product on the same weights.

For each weight shape [out, K] (those of ``benchmarks/packed_linear.py``) and number of rows of x, one
random weight is quantized to MXFP4 once (``ms.quantize(w, "mxfp4", axis=1)``) and exported to ggml's
``block_mxfp4`` bytes with ``ms.interop.to_gguf``, so both libraries multiply by identical weights. Timed,
interleaved round-robin (best of ``--repeat``), on the same thread count:

- ``F.linear(x, w)`` in FP32 (the dense weight the MXFP4 one was quantized from);
- ``ms.packed_linear(x, q)``;
- ggml ``mul_mat(W, x)`` with W in a plain CPU buffer (``ggml_vec_dot_mxfp4_q8_0``: ggml's generic path);
- the same with W in the ``CPU_REPACK`` buffer (W repacked to 8 interleaved rows, ``mxfp4_8x8_q8_0``), which
  is what llama.cpp itself does with MXFP4 weights when it loads a model on an AVX2 / AVX-512 CPU.

ggml is called through ctypes (``libggml-base.so`` and ``libggml-cpu.so`` of a ``llama-cpp-python`` build):
a graph ``y = mul_mat(W, x)`` computed by the CPU backend (``ggml_backend_graph_compute``), which quantizes
x to Q8_0 on every call (counted in its time) and reads the MXFP4 weight in place. Numerics: ggml's
MXFP4 dot product multiplies the weight codes by x *quantized to Q8_0* (32-element blocks, int8 values,
fp16 scale amax/127: ``quantize_row_q8_0``); ours uses x exactly. The table reports each result's
relative error (2-norm) against ``x · dequantize(W)ᵀ`` computed in float64, and, as the expected size of
ggml's, the error of ``Q8_0(x) · dequantize(W)ᵀ`` (Q8_0 emulated here, :func:`q8_0_roundtrip`).

    python benchmarks/llamacpp.py                        # shapes of packed_linear.py, rows 1 and 8
    python benchmarks/llamacpp.py --shapes 16384x4096 --rows 1 --repeat 15
    python benchmarks/llamacpp.py --llamacpp-lib /path/to/site-packages/llama_cpp/lib

Where no llama.cpp library is found (``--llamacpp-lib``, else ``$LLAMACPP_LIB``, else the ``llama_cpp/lib``
folder of the ``--llamacpp-python`` interpreter's environment) the script says so and exits 0.
``benchmarks/decode.py`` uses :func:`write_llama_gguf` and ``benchmarks/llamacpp_worker.py`` for its
llama.cpp row.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys

#: Interpreter of a venv where ``pip install llama-cpp-python`` built (its ``llama_cpp/lib`` holds the libraries).
DEFAULT_PYTHON = os.environ.get("LLAMACPP_PYTHON") or "/work/llvenv/bin/python"

# ggml.h (llama.cpp 0c1e57098, vendored by llama-cpp-python 0.3.36): enum ggml_type, enum ggml_status.
GGML_TYPE_F32 = 0
GGML_TYPE_MXFP4 = 39
GGML_STATUS_SUCCESS = 0
#: ggml ``block_mxfp4``: 32 elements in 17 bytes (checked against the loaded library).
MXFP4_BLOCK, MXFP4_BLOCK_BYTES = 32, 17


def find_lib_dir(lib_dir: str | None = None, python: str | None = None) -> tuple[str | None, str]:
    """The folder holding ``libggml-base.so`` and ``libggml-cpu.so``: ``lib_dir`` if given, else
    ``$LLAMACPP_LIB``, else ``<venv of python>/lib/python3*/site-packages/llama_cpp/lib``.
    Returns (folder, "") or (None, the reason none was found)."""
    if lib_dir is None:
        lib_dir = os.environ.get("LLAMACPP_LIB") or None
    if lib_dir is None:
        python = python or DEFAULT_PYTHON
        prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
        found = sorted(glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages", "llama_cpp", "lib")))
        if not found:
            return None, (f"no llama_cpp/lib under {prefix} (interpreter {python}); pass --llamacpp-lib DIR or "
                          f"--llamacpp-python PY of a venv where `pip install llama-cpp-python` built")
        lib_dir = found[-1]
    missing = [n for n in ("libggml-base.so", "libggml-cpu.so") if not os.path.exists(os.path.join(lib_dir, n))]
    if missing:
        return None, f"{lib_dir} lacks {', '.join(missing)}"
    return lib_dir, ""


class _InitParams(ctypes.Structure):
    """``struct ggml_init_params`` (ggml.h): size_t mem_size; void *mem_buffer; bool no_alloc."""
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class GGML:
    """The few ggml functions a matrix product needs, from ``libggml-base.so`` / ``libggml-cpu.so``.

    Only opaque pointers cross the boundary (contexts, tensors, graphs, backends, buffers), besides
    ``ggml_init_params`` passed by value; the MXFP4 type number and block size are checked on load."""

    def __init__(self, lib_dir: str):
        mode = ctypes.RTLD_GLOBAL
        self.base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"), mode=mode)
        self.cpu = ctypes.CDLL(os.path.join(lib_dir, "libggml-cpu.so"), mode=mode)
        P, S, I, I64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int64
        sig = {  # name: (library, restype, argtypes)
            "ggml_version": (self.base, ctypes.c_char_p, []),
            "ggml_commit": (self.base, ctypes.c_char_p, []),
            "ggml_type_name": (self.base, ctypes.c_char_p, [I]),
            "ggml_blck_size": (self.base, I64, [I]),
            "ggml_type_size": (self.base, S, [I]),
            "ggml_tensor_overhead": (self.base, S, []),
            "ggml_graph_overhead": (self.base, S, []),
            "ggml_init": (self.base, P, [_InitParams]),
            "ggml_free": (self.base, None, [P]),
            "ggml_new_tensor_2d": (self.base, P, [P, I, I64, I64]),
            "ggml_mul_mat": (self.base, P, [P, P, P]),
            "ggml_new_graph": (self.base, P, [P]),
            "ggml_build_forward_expand": (self.base, None, [P, P]),
            "ggml_nbytes": (self.base, S, [P]),
            "ggml_backend_alloc_ctx_tensors_from_buft": (self.base, P, [P, P]),
            "ggml_backend_buffer_free": (self.base, None, [P]),
            "ggml_backend_buft_name": (self.base, ctypes.c_char_p, [P]),
            "ggml_backend_tensor_set": (self.base, None, [P, P, S, S]),
            "ggml_backend_tensor_get": (self.base, None, [P, P, S, S]),
            "ggml_backend_graph_compute": (self.base, I, [P, P]),
            "ggml_backend_free": (self.base, None, [P]),
            "ggml_backend_reg_dev_get": (self.base, P, [P, S]),
            "ggml_backend_reg_get_proc_address": (self.base, P, [P, ctypes.c_char_p]),
            "ggml_backend_cpu_init": (self.cpu, P, []),
            "ggml_backend_cpu_set_n_threads": (self.cpu, None, [P, I]),
            "ggml_backend_cpu_buffer_type": (self.cpu, P, []),
            "ggml_backend_cpu_reg": (self.cpu, P, []),
        }
        for name, (lib, res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
            setattr(self, name[5:] if name.startswith("ggml_") else name, fn)
        for feat in ("avx2", "avx512", "avx512_vnni", "avx512_bf16"):
            getattr(self.cpu, f"ggml_cpu_has_{feat}").restype = ctypes.c_int
        got = (self.type_name(GGML_TYPE_MXFP4), self.blck_size(GGML_TYPE_MXFP4), self.type_size(GGML_TYPE_MXFP4))
        if got != (b"mxfp4", MXFP4_BLOCK, MXFP4_BLOCK_BYTES):
            raise RuntimeError(f"this ggml's type {GGML_TYPE_MXFP4} is {got}, expected (b'mxfp4', 32, 17)")

    def describe(self) -> str:
        feats = [f for f in ("avx2", "avx512", "avx512_vnni", "avx512_bf16") if getattr(self.cpu, f"ggml_cpu_has_{f}")()]
        return f"ggml {self.version().decode()} (commit {self.commit().decode()}), CPU features {'+'.join(feats)}"

    def buffer_types(self) -> dict[str, int]:
        """{name: buffer type}: "CPU" and the CPU device's extra types ("CPU_REPACK", ...), as llama.cpp
        lists them (``ggml_backend_dev_get_extra_bufts`` through the registry's proc address)."""
        out = {"CPU": self.backend_cpu_buffer_type()}
        reg = self.backend_cpu_reg()
        addr = self.backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if addr:
            fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
            arr = fn(self.backend_reg_dev_get(reg, 0))
            i = 0
            while arr and arr[i]:
                out[self.backend_buft_name(arr[i]).decode()] = arr[i]
                i += 1
        return out


class MulMat:
    """``y = mul_mat(W, x)`` on the ggml CPU backend: W an MXFP4 [n_out, K] weight given as ggml
    ``block_mxfp4`` bytes (``ms.interop.to_gguf``), stored in buffer type ``buft`` ("CPU" or
    "CPU_REPACK"), x float32 [rows, K], y float32 [rows, n_out]."""

    def __init__(self, g: GGML, raw_w, n_out: int, k: int, rows: int, threads: int, buft: str = "CPU"):
        import numpy as np
        self.g, self.rows, self.n_out = g, rows, n_out
        bufts = g.buffer_types()
        if buft not in bufts:
            raise ValueError(f"ggml buffer type {buft!r} not offered here; have {sorted(bufts)}")
        raw_w = np.ascontiguousarray(raw_w, dtype=np.uint8)
        want = n_out * (k // MXFP4_BLOCK) * MXFP4_BLOCK_BYTES
        if k % MXFP4_BLOCK or raw_w.nbytes != want:
            raise ValueError(f"MXFP4 weight [{n_out}, {k}] needs K a multiple of 32 and {want} bytes, got "
                             f"K={k}, {raw_w.nbytes} bytes")
        ov = g.tensor_overhead()
        self._ctx_w = g.init(_InitParams(4 * ov, None, True))
        self.w = g.new_tensor_2d(self._ctx_w, GGML_TYPE_MXFP4, k, n_out)     # ne0 = K (contiguous), ne1 = rows of W
        self._buf_w = g.backend_alloc_ctx_tensors_from_buft(self._ctx_w, bufts[buft])
        if not self._buf_w or g.nbytes(self.w) != raw_w.nbytes:
            raise RuntimeError(f"ggml could not allocate the MXFP4 weight in {buft}")
        g.backend_tensor_set(self.w, raw_w.ctypes.data, 0, raw_w.nbytes)       # CPU_REPACK repacks here
        self._ctx = g.init(_InitParams(8 * ov + g.graph_overhead(), None, True))
        self.x = g.new_tensor_2d(self._ctx, GGML_TYPE_F32, k, rows)
        self.y = g.mul_mat(self._ctx, self.w, self.x)                         # ne0 = n_out, ne1 = rows
        self.graph = g.new_graph(self._ctx)
        g.build_forward_expand(self.graph, self.y)
        self._buf = g.backend_alloc_ctx_tensors_from_buft(self._ctx, bufts["CPU"])
        self.backend = g.backend_cpu_init()
        g.backend_cpu_set_n_threads(self.backend, threads)

    def set_x(self, x) -> None:
        """Copy x (float32 torch tensor [rows, K]) into the graph's input."""
        xc = x.detach().float().contiguous()
        if tuple(xc.shape) != (self.rows, self.g.nbytes(self.x) // 4 // self.rows):
            raise ValueError(f"x must be [{self.rows}, K], got {list(xc.shape)}")
        self.g.backend_tensor_set(self.x, xc.data_ptr(), 0, xc.numel() * 4)

    def run(self) -> None:
        status = self.g.backend_graph_compute(self.backend, self.graph)
        if status != GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml_backend_graph_compute returned status {status}")

    def output(self):
        """y as a float32 torch tensor [rows, n_out] (a copy)."""
        import torch
        y = torch.empty(self.rows, self.n_out)
        self.g.backend_tensor_get(self.y, y.data_ptr(), 0, y.numel() * 4)
        return y

    def close(self) -> None:
        for free, attr in ((self.g.backend_free, "backend"), (self.g.backend_buffer_free, "_buf"),
                           (self.g.backend_buffer_free, "_buf_w"), (self.g.free, "_ctx"), (self.g.free, "_ctx_w")):
            if getattr(self, attr, None):
                free(getattr(self, attr))
                setattr(self, attr, None)


def q8_0_roundtrip(x):
    """x (float32, last dimension a multiple of 32) as ggml's Q8_0 holds it (``quantize_row_q8_0``, x86):
    per block of 32, d = amax / 127 stored as fp16, q = round-half-even(x · (127 / amax)) as int8;
    the value q · fp16(d). A zero block stays zero."""
    import torch
    if x.dtype != torch.float32 or x.shape[-1] % 32:
        raise ValueError(f"q8_0_roundtrip needs float32 x with a last dimension multiple of 32, got "
                         f"{x.dtype} {list(x.shape)}")
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    d16 = (amax / 127.0).half().float()
    return (torch.round(b * inv) * d16).reshape(x.shape)


def rel_error(y, ref) -> float:
    """||y - ref||_2 / ||ref||_2 in float64."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm())


# ---- a Llama model as a GGUF file llama.cpp runs ----------------------------------------------------------
def rope_rows_to_interleaved(w, n_head: int):
    """Rows of a q or k projection [n_head * d, K] reordered from transformers' rotate-half RoPE layout
    (pairs i, i + d/2 in each head) to ggml's normal RoPE layout (pairs 2i, 2i + 1), which llama.cpp's
    ``llama`` architecture applies: GGUF row h·d + 2i + j is transformers row h·d + j·d/2 + i."""
    n, k = w.shape
    return w.reshape(n_head, 2, n // n_head // 2, k).transpose(1, 2).reshape(n, k)


def synthetic_spm_vocab(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """A SentencePiece-style ("llama") vocabulary that llama.cpp loads: <unk>, <s>, </s>, the 256 byte
    tokens <0x00>..<0xFF>, then "t{i}" pieces; token types as gguf's TokenType (1 normal, 2 unknown,
    3 control, 6 byte)."""
    if n_vocab < 259:
        raise ValueError(f"a llama vocabulary needs at least 259 tokens (3 special + 256 bytes), got {n_vocab}")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"t{i}".encode() for i in range(len(tokens), n_vocab)]
    types += [1] * (n_vocab - len(types))
    return tokens, [0.0] * 3 + [-float(i) for i in range(3, n_vocab)], types


def write_llama_gguf(model, path, weight_format: str = "mxfp4") -> dict:
    """Write a transformers ``LlamaForCausalLM`` as a GGUF file of llama.cpp's ``llama`` architecture:
    every Linear weight (lm_head included) MXFP4, quantized along its input dimension exactly as
    ``ms.quantize(w, "mxfp4", axis=1)`` and exported with ``ms.interop.to_gguf``; embeddings and norms
    float32; a synthetic SPM vocabulary (:func:`synthetic_spm_vocab`). q/k rows are reordered for ggml's
    RoPE (:func:`rope_rows_to_interleaved`). Returns {"tensor_bytes": ..., "tensors": ...}."""
    import gguf
    import numpy as np
    import torch

    import microscale as ms
    if weight_format != "mxfp4":
        raise ValueError(f"llama.cpp holds MX weights as MXFP4 only, got {weight_format!r}")
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    if head_dim * n_head != cfg.hidden_size:
        raise ValueError(f"head_dim {head_dim} x {n_head} heads != hidden {cfg.hidden_size}: not written")
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor | tuple] = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    linear = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors[f"blk.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        tensors[f"blk.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for hf, gg in linear.items():
            w = sd[p + hf + ".weight"]
            if hf == "self_attn.q_proj":
                w = rope_rows_to_interleaved(w, n_head)
            elif hf == "self_attn.k_proj":
                w = rope_rows_to_interleaved(w, n_kv)
            tensors[f"blk.{i}.{gg}.weight"] = ms.quantize(w, weight_format, axis=1)
    tensors["output_norm.weight"] = sd["model.norm.weight"]
    lm_head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    tensors["output.weight"] = ms.quantize(lm_head, weight_format, axis=1)

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    tokens, scores, types = synthetic_spm_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    nbytes = 0
    for name, t in tensors.items():
        if isinstance(t, ms.MXTensor):
            raw = ms.interop.to_gguf(t)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        else:
            raw = t.contiguous().numpy().astype(np.float32)
            w.add_tensor(name, raw)
        nbytes += raw.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensor_bytes": nbytes, "tensors": len(tensors)}


# ---- the GEMV / GEMM table ------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["16384x4096", "4096x4096", "4096x1024"],
                    help="weight shapes OUTxK (default: %(default)s, those of packed_linear.py)")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8], help="rows of x (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=9, help="interleaved repetitions, best kept (default: 9)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch, our kernels and ggml alike (default: torch's)")
    ap.add_argument("--llamacpp-lib", default=None,
                    help="folder with libggml-base.so and libggml-cpu.so (default: $LLAMACPP_LIB, else the "
                         "llama_cpp/lib folder of --llamacpp-python's venv)")
    ap.add_argument("--llamacpp-python", default=DEFAULT_PYTHON,
                    help="python of a venv with llama-cpp-python (default: $LLAMACPP_PYTHON or %(default)s)")
    ap.add_argument("--out", default="results/bench/llamacpp",
                    help="write OUT.json and OUT.md (default: %(default)s; '' to skip)")
    args = ap.parse_args(argv)
    lib_dir, why = find_lib_dir(args.llamacpp_lib, args.llamacpp_python)
    if lib_dir is None:
        print(f"# llama.cpp not available: {why}")
        return 0
    try:
        g = GGML(lib_dir)
    except (OSError, AttributeError, RuntimeError) as e:
        print(f"# llama.cpp not available: loading ggml from {lib_dir} failed: {e}")
        return 0

    import torch
    import torch.nn.functional as F

    import microscale as ms
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from packed_linear import interleaved_best   # the same round-robin best-of-N as packed_linear.py
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    bufts = [b for b in ("CPU", "CPU_REPACK") if b in g.buffer_types()]
    head = (f"# {g.describe()}, from {lib_dir}; torch {torch.__version__}; {threads} threads for all; "
            f"load average {load:.1f} on {os.cpu_count()} CPUs; best of {args.repeat} interleaved, wall time")
    print(head, flush=True)
    header = ("| shape | rows | candidate | ms | vs FP32 | vs ours | weight GB/s | rel. error vs exact |")
    lines = [header, "|" + "---|" * 8]
    print("\n".join(lines), flush=True)
    names = {"fp32": "FP32 F.linear", "ours": "ms.packed_linear MXFP4",
             "CPU": "ggml mul_mat MXFP4 (vec_dot)", "CPU_REPACK": "ggml mul_mat MXFP4 (CPU_REPACK 8x8)"}
    records = []
    for shape in args.shapes:
        n_out, k = (int(v) for v in shape.lower().split("x"))
        gen = torch.Generator().manual_seed(0)   # the weights and inputs of packed_linear.py
        w = torch.randn(n_out, k, generator=gen) * 0.02
        q = ms.quantize(w, "mxfp4", axis=1)
        raw = ms.interop.to_gguf(q)
        wd = q.dequantize().double()
        for m in args.rows:
            x = torch.randn(m, k, generator=gen)
            exact = x.double() @ wd.T
            mats = {b: MulMat(g, raw, n_out, k, m, threads, b) for b in bufts}
            for mm in mats.values():
                mm.set_x(x)
            fns = {"fp32": lambda: F.linear(x, w), "ours": lambda: ms.packed_linear(x, q)}
            fns.update({b: mm.run for b, mm in mats.items()})
            with torch.inference_mode():
                best = interleaved_best(fns, args.repeat)
                errs = {"ours": rel_error(ms.packed_linear(x, q), exact), "fp32": rel_error(F.linear(x, w), exact)}
            q8_ref = q8_0_roundtrip(x).double() @ wd.T
            q8_floor = rel_error(q8_ref, exact)
            vs_q8 = {}
            for b, mm in mats.items():
                y = mm.output()
                errs[b], vs_q8[b] = rel_error(y, exact), rel_error(y, q8_ref)
                mm.close()
            for c in fns:
                t = best[c]
                gbs = (q.nbytes if c != "fp32" else w.numel() * 4) / t / 1e9
                err = f"{errs[c]:.2e}" if c != "fp32" else "- (dense weight)"
                line = (f"| {shape} | {m} | {names[c]} | {t * 1e3:.3f} | {best['fp32'] / t:.2f}x | "
                        f"{best['ours'] / t:.2f}x | {gbs:.2f} | {err} |")
                lines.append(line)
                print(line, flush=True)
                records.append({"shape": shape, "rows": m, "candidate": c, "ms": t * 1e3,
                                "speedup_fp32": best["fp32"] / t, "speedup_ours": best["ours"] / t,
                                "weight_gbs": gbs, "rel_error": errs[c], "threads": threads})
            lines.append(f"| {shape} | {m} | Q8_0(x) · W in float64 (ggml's rounding of x, emulated) | - | - | - | - | "
                         f"{q8_floor:.2e} |")
            print(lines[-1], flush=True)
            note = ", ".join(f"{names[b]} {v:.1e}" for b, v in vs_q8.items())
            print(f"# {shape} rows {m}: rel. error of ggml against the emulated Q8_0(x) · W: {note}", flush=True)
            records.append({"shape": shape, "rows": m, "candidate": "q8_0_emulated", "rel_error": q8_floor,
                            "ggml_vs_q8_0_emulated": vs_q8})
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"ggml": g.describe(), "lib_dir": lib_dir, "threads": threads, "load_average": load,
                       "torch": torch.__version__, "repeat": args.repeat, "rows": records}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"MXFP4 matrix product, microscale vs llama.cpp's ggml on identical weights. {head[2:]}. "
                    f"ms / GB/s are per call (GB/s of the packed weight bytes; FP32: of its fp32 weight). "
                    f"Rel. error: 2-norm against x · dequantize(W)ᵀ in float64. Regenerate: "
                    f"`python benchmarks/llamacpp.py{''.join(' ' + a for a in (sys.argv[1:] if argv is None else argv))}`.\n\n")
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

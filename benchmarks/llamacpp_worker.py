"""Greedy decode with llama.cpp (llama-cpp-python) in a process of its own: the llama.cpp row of
``benchmarks/decode.py``, which starts this script with the interpreter of a venv where llama-cpp-python is
installed (it needs only ``llama_cpp`` and numpy; no torch, no microscale).

Protocol (one JSON object per line): on start-up, after loading the GGUF model, it writes
``{"ready": true, "rss_mb": ..., "llama_cpp": version, "system_info": ...}``; then for each request line
``{"prompt": [token ids], "tokens": N}`` on stdin it clears the KV cache, evaluates the prompt in one batch,
and appends N tokens, each the argmax of the last logits (the first from the prompt's logits, then N - 1
single-token steps: what transformers' ``generate`` does for N new tokens), and writes
``{"seconds": wall time of the whole decode, "tokens": [the N ids]}``. An empty line or EOF ends it.

    python benchmarks/llamacpp_worker.py --model m.gguf --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file (benchmarks/llamacpp.py write_llama_gguf)")
    ap.add_argument("--threads", type=int, required=True, help="n_threads and n_threads_batch")
    ap.add_argument("--ctx", type=int, default=256, help="context length (default: %(default)s)")
    args = ap.parse_args(argv)
    import numpy as np
    import llama_cpp
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.ctx, n_batch=args.ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()
    print(json.dumps({"ready": True, "rss_mb": _rss_mb(), "llama_cpp": llama_cpp.__version__,
                      "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}),
          flush=True)

    def last_argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(req["prompt"])
        out = [last_argmax()]
        while len(out) < req["tokens"]:
            llm.eval([out[-1]])
            out.append(last_argmax())
        print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

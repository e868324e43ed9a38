"""Speed of microscale's quantization kernels relative to a plain memory copy, measured in one run.

For each MX format (and BDR's MX9 / MX6 / MX4) and op (fake-quantize along the last axis and along the
first axis, quantize to a packed MXTensor, dequantize it, bf16 fake-quantize) prints our best-of-N time,
the best-of-N time of ``y.copy_(x)`` into a preallocated fp32 tensor of the same shape, their ratio, and
the ratios to microsoft/microxcaling (``--microxcaling PATH`` to a local checkout; its ``_quantize_mx``
fake-quantize is compared with our fake-quantize) and torchao (``to_mx``, compared with our packed quantize) when
they can be imported. "out=" columns time the same verbs writing into preallocated outputs (``out=``), i.e.
without the page faults that any freshly allocated output pays.

    python benchmarks/quantize.py                    # 4096 x 4096 fp32, all formats
    python benchmarks/quantize.py --microxcaling /tmp/microxcaling --memory

``--table`` times only microscale's own kernel table (every quantize / fake-quantize / dequantize op of
each format, axis -1 and axis 0, allocating and ``out=``) against its memory-bound reference
(``x.clone()`` for allocating forms, ``y.copy_(x)`` for ``out=``); ``--build PATH`` (repeatable) adds
another compiled ``_mxkernels`` shared object, loaded by path, and every build is timed interleaved with
the installed one in the same run (repetition r times build A, then B, ...; best of N each):

    python benchmarks/quantize.py --table --build .before/_mxkernels_before.so
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

import microscale as ms
from microscale import kernels

FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mx9", "mx6", "mx4"]
MX_ELEM = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e3m2": "fp6_e3m2",
           "mxfp6_e2m3": "fp6_e2m3", "mxfp4_e2m1": "fp4_e2m1", "mxint8": "int8"}


def best_of(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def load_microxcaling(path):
    if not path:
        return None
    sys.path.insert(0, os.path.abspath(path))
    try:
        from mx.mx_ops import _quantize_mx
        return _quantize_mx
    except Exception as e:  # noqa: BLE001
        print(f"# microxcaling not usable from {path}: {e}")
        return None


def load_torchao():
    try:
        import torchao
        from torchao.prototype.mx_formats import constants as C
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    except Exception as e:  # noqa: BLE001
        print(f"# torchao not usable: {type(e).__name__}: {e}")
        return None, None
    dts = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
           "mxfp6_e3m2": getattr(C, "DTYPE_FP6_E3M2", None), "mxfp6_e2m3": getattr(C, "DTYPE_FP6_E2M3", None),
           "mxfp4_e2m1": getattr(torch, "float4_e2m1fn_x2", None)}
    return (lambda x, fmt: to_mx(x, dts[fmt], 32)) if to_mx else None, (torchao.__version__, dts)


def memory_check(gib: float) -> dict:
    """Peak resident memory of quantizing a ``gib`` GiB fp32 tensor to MXFP4, in a fresh subprocess
    (Linux: the peak is reset with /proc/self/clear_refs after the input is resident, then read as VmHWM)."""
    code = f"""
import json, torch, microscale as ms
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
n = int({gib} * 2**30) // 4
x = torch.empty(n // 4096, 4096).uniform_(-1, 1)   # filled in place: no temporaries before the baseline
ms.quantize(x[:64], "mxfp4")                        # load the kernels before measuring
open("/proc/self/clear_refs", "w").write("5")       # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
q = ms.quantize(x, "mxfp4")
peak = status("VmHWM:")
print(json.dumps(dict(input=x.numel() * 4, output=q.nbytes, base_rss=base, peak_rss=peak,
                      kernels=ms.kernels.available())))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # the input was resident before quantizing; the peak may grow by the output plus any temporaries
    r["extra_over_output"] = r["peak_rss"] - r["base_rss"] - r["output"]
    r["peak_over_in_plus_out"] = (r["peak_rss"] - r["base_rss"] + r["input"]) / (r["input"] + r["output"])
    return r


def load_build(path: str):
    """A compiled ``_mxkernels`` loaded from ``path`` (a copy of the shared object under any file name)."""
    spec = importlib.util.spec_from_file_location("microscale.kernels._mxkernels", os.path.abspath(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernel_table(a) -> dict:
    """Best-of-N times of every kernel op per build, interleaved, with ratios to clone / copy."""
    kernels.available()
    builds = [("current", kernels._lib)] + [(os.path.basename(b), load_build(b)) for b in a.build]
    torch.manual_seed(0)
    x = torch.randn(a.size, a.size)
    xb = x.bfloat16()
    y = torch.empty_like(x)
    yb = torch.empty_like(xb)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, tensor {a.size}x{a.size} fp32, "
          f"best of {a.repeat} interleaved, loadavg {' '.join(load)}; builds: "
          + ", ".join(f"{n} ({m.info()['isa']})" for n, m in builds))

    def timed(fns):
        """best time of each fn, repetitions interleaved (fns[0] once, fns[1] once, ...)."""
        for fn in fns:
            fn()
        best = [float("inf")] * len(fns)
        for _ in range(a.repeat):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
        return best

    def with_lib(lib, fn):
        def run():
            kernels._lib = lib
            return fn()
        return run

    copy, clone, copyb, cloneb = timed([lambda: y.copy_(x), lambda: x.clone(), lambda: yb.copy_(xb), lambda: xb.clone()])
    print(f"# fp32 copy_ {copy * 1e3:.2f} ms, clone {clone * 1e3:.2f} ms; bf16 copy_ {copyb * 1e3:.2f} ms, "
          f"clone {cloneb * 1e3:.2f} ms")
    names = [n for n, _ in builds]
    hdr = f"| {'format':11s} | {'op':24s} | {'ref':6s} | " + " | ".join(f"{n[:14]:>14s} ms | x ref" for n in names)
    if len(builds) > 1:
        hdr += " | " + " | ".join(f"{n[:10]}/{names[0][:7]}" for n in names[1:])
    print(hdr + " |")
    print("|" + "|".join("-" * len(c) for c in (hdr + " |").split("|")[1:-1]) + "|")
    rows = []
    for fmt in a.formats:
        kernels._lib = builds[0][1]
        q = ms.quantize(x, fmt)
        q0 = ms.quantize(x, fmt, axis=0)
        qb = ms.quantize(xb, fmt)
        ops = [
            ("fake-quant axis -1", "clone", clone, lambda: ms.fake_quantize(x, fmt, axis=-1)),
            ("fake-quant axis -1 out=", "copy", copy, lambda: ms.fake_quantize(x, fmt, axis=-1, out=y)),
            ("fake-quant axis 0", "clone", clone, lambda: ms.fake_quantize(x, fmt, axis=0)),
            ("fake-quant axis 0 out=", "copy", copy, lambda: ms.fake_quantize(x, fmt, axis=0, out=y)),
            ("bf16 fake-quant out=", "copy", copyb, lambda: ms.fake_quantize(xb, fmt, out=yb)),
            ("quantize axis -1", "clone", clone, lambda: ms.quantize(x, fmt)),
            ("quantize axis 0", "clone", clone, lambda: ms.quantize(x, fmt, axis=0)),
            ("bf16 quantize", "clone", cloneb, lambda: ms.quantize(xb, fmt)),
            ("dequantize axis -1", "clone", clone, lambda: q.dequantize()),
            ("dequantize axis -1 out=", "copy", copy, lambda: q.dequantize(out=y)),
            ("dequantize axis 0 out=", "copy", copy, lambda: q0.dequantize(out=y)),
            ("dequantize bf16 out=", "copy", copyb, lambda: qb.dequantize(dtype=torch.bfloat16, out=yb)),
        ]
        for op, refname, ref, fn in ops:
            if a.ops and not any(o in op for o in a.ops):
                continue
            ts = timed([with_lib(lib, fn) for _, lib in builds])
            refn = refname if "bf16" not in op else refname + "16"
            line = f"| {fmt:11s} | {op:24s} | {refn:6s} | " + " | ".join(
                f"{t * 1e3:17.2f} | {t / ref:5.2f}" for t in ts)
            if len(ts) > 1:
                line += " | " + " | ".join(f"{t / ts[0]:{len(n[:10]) + 8}.3f}" for t, n in zip(ts[1:], names[1:]))
            print(line + " |", flush=True)
            rows.append(dict(format=fmt, op=op, ref=refn, ref_ms=ref * 1e3,
                             ms={n: t * 1e3 for n, t in zip(names, ts)}))
    kernels._lib = builds[0][1]
    return dict(copy_ms=copy * 1e3, clone_ms=clone * 1e3, threads=torch.get_num_threads(), loadavg=load, rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="the tensor is SIZE x SIZE fp32 (default 4096)")
    p.add_argument("--repeat", type=int, default=7, help="timed repetitions per op; best is kept (default 7)")
    p.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    p.add_argument("--microxcaling", metavar="PATH", help="local checkout of microsoft/microxcaling")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of a 1 GiB MXFP4 quantize")
    p.add_argument("--memory-gib", type=float, default=1.0)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--table", action="store_true",
                   help="only microscale's kernel table, ratios to clone (allocating) / copy (out=)")
    p.add_argument("--build", action="append", default=[], metavar="SO",
                   help="(--table) another compiled _mxkernels .so to time interleaved with the installed one")
    p.add_argument("--ops", nargs="+", help="(--table) only ops whose name contains one of these strings")
    a = p.parse_args(argv)
    if a.table:
        result = kernel_table(a)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(result, fh, indent=1)
        return

    torch.manual_seed(0)
    x = torch.randn(a.size, a.size)
    xb = x.bfloat16()
    y = torch.empty_like(x)
    mx = load_microxcaling(a.microxcaling)
    ao, ao_info = load_torchao()
    print(f"# torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"kernels {kernels.info()}, torchao {ao_info[0] if ao_info else 'n/a'}, "
          f"microxcaling {'yes' if mx else 'n/a'}, tensor {a.size}x{a.size} fp32, best of {a.repeat}")
    copy = best_of(lambda: y.copy_(x), a.repeat)
    print(f"# copy: {copy * 1e3:.2f} ms ({2 * x.numel() * 4 / copy / 1e9:.1f} GB/s)")

    rows = []
    hdr = (f"| {'format':11s} | {'op':18s} | {'ours ms':>8s} | {'x copy':>6s} | {'out= ms':>9s} | "
           f"{'out= x copy':>11s} | {'microxcaling/ours':>17s} | {'torchao/ours':>12s} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for fmt in a.formats:
        f = ms.get_format(fmt)
        q = ms.quantize(x, fmt)
        out, outb = torch.empty_like(x), torch.empty_like(xb)
        params = kernels._params(f)

        def into(t, o, axis):  # the public verb writing into a preallocated output (out=)
            return lambda: ms.fake_quantize(t, fmt, axis=axis, out=o)

        ops = [("fake-quant axis -1", lambda: ms.fake_quantize(x, fmt, axis=-1), into(x, out, -1)),
               ("fake-quant axis 0", lambda: ms.fake_quantize(x, fmt, axis=0), into(x, out, 0)),
               ("quantize packed", lambda: ms.quantize(x, fmt), None),
               ("dequantize", lambda: q.dequantize(), lambda: q.dequantize(out=out)),
               ("bf16 fake-quant", lambda: ms.fake_quantize(xb, fmt), into(xb, outb, -1))]
        for op, fn, kfn in ops:
            t = best_of(fn, a.repeat)
            kt = best_of(kfn, a.repeat) if kfn and params else None
            r_mx = r_ao = None
            if mx is not None and op == "fake-quant axis -1" and fmt in MX_ELEM:
                r_mx = best_of(lambda: mx(x, 8, MX_ELEM[fmt], axes=[-1], block_size=32, round="even"),
                               max(2, a.repeat // 3)) / t
            if ao is not None and op == "quantize packed" and ao_info[1].get(fmt) is not None:
                try:
                    r_ao = best_of(lambda: ao(x, fmt), max(2, a.repeat // 2)) / t
                except Exception as e:  # noqa: BLE001
                    print(f"# torchao to_mx({fmt}) failed: {e}")
            rows.append(dict(format=fmt, op=op, ms=t * 1e3, ratio=t / copy, kernel_ms=kt and kt * 1e3,
                             kernel_ratio=kt and kt / copy, microxcaling_over_ours=r_mx, torchao_over_ours=r_ao))
            fmtr = lambda v, s="{:.2f}": s.format(v) if v is not None else "-"  # noqa: E731
            print(f"| {fmt:11s} | {op:18s} | {t * 1e3:8.2f} | {t / copy:6.2f} | {fmtr(kt and kt * 1e3):>9s} | "
                  f"{fmtr(kt and kt / copy):>11s} | {fmtr(r_mx, '{:.1f}'):>17s} | {fmtr(r_ao, '{:.1f}'):>12s} |",
                  flush=True)
    result = dict(copy_ms=copy * 1e3, threads=torch.get_num_threads(), rows=rows)
    if a.memory:
        m = memory_check(a.memory_gib)
        result["memory"] = m
        print(f"# memory: MXFP4 quantize of {m['input'] / 2**30:.2f} GiB fp32 -> {m['output'] / 2**20:.0f} MiB packed; "
              f"peak RSS grew {(m['peak_rss'] - m['base_rss']) / 2**20:.0f} MiB over the resident input "
              f"(output + {m['extra_over_output'] / 2**20:.0f} MiB); peak / (input + output) = "
              f"{m['peak_over_in_plus_out']:.3f} (kernels {m['kernels']})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

"""GPU quantization table: the torch backend (eager and torch.compile'd), the Triton kernels, torchao's
``to_mx`` and a plain copy, measured in one run.

For each format and op (fake-quantize along the last axis, quantize to packed codes + scales, dequantize)
prints best-of-N milliseconds and ratios: each path over ``y.copy_(x)`` of the same fp32 tensor (so 1.0
means "as fast as moving the data once"), Triton over compiled torch, and torchao ``to_mx`` (packing
quantize; OCP formats it has) over ours. On a GPU inductor turns the compiled torch backend into Triton
code, so "compiled" is the generated-Triton baseline for the hand-written kernels.

    python benchmarks/gpu.py                     # CUDA, 8192 x 8192 bf16, every format
    python benchmarks/gpu.py --formats mxfp4_e2m1 mx6 --shape 4096 4096 --dtype float32
    python benchmarks/gpu.py --dry-run           # CPU, tiny shapes: checks the script end to end

``--dry-run`` runs on the CPU with a 64 x 256 tensor, two formats, 2 repeats, torch.compile with the
``aot_eager`` backend (no inductor code generation: seconds instead of minutes) and the Triton kernels
under ``TRITON_INTERPRET=1`` when triton is installed; its numbers say nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

FORMATS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mx9", "mx6", "mx4"]
OPS = ["fake_quantize", "quantize", "dequantize"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 formats (checks the script runs)")
    p.add_argument("--device", default=None, help="torch device (default: cuda, or cpu for --dry-run)")
    p.add_argument("--shape", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                   help="input shape, blocked along COLS (default 8192 8192; 64 256 for --dry-run)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--formats", nargs="+", default=None, help=f"formats (default: {' '.join(FORMATS)})")
    p.add_argument("--repeat", type=int, default=None, help="timed repeats, best kept (default 20; 2 dry-run)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                                                           "aot_eager for --dry-run)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (by torch.compile too)
    import torch

    import microscale as ms
    from microscale.backends import QuantSpec, get_backend
    from microscale.backends.torch_native import dequantize_parts, fake_quantize_bits, quantize_bits

    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run (CPU) or --device cpu", file=sys.stderr)
        return 2
    shape = tuple(args.shape or ((64, 256) if args.dry_run else (8192, 8192)))
    repeat = args.repeat or (2 if args.dry_run else 20)
    formats = args.formats or (["mxfp4_e2m1", "mx6"] if args.dry_run else FORMATS)
    cbackend = args.compile_backend or ("aot_eager" if args.dry_run else "inductor")
    dtype = getattr(torch, args.dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "xpu":
            torch.xpu.synchronize()

    def best_ms(fn) -> float:
        fn()
        sync()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    tri = get_backend("triton")
    tri_reason = tri.unavailable_reason()
    try:
        from torchao.prototype.mx_formats.mx_tensor import to_mx
        from torchao.prototype.mx_formats import constants as ao_c
        ao_dtypes = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
                     "mxfp6_e3m2": getattr(ao_c, "DTYPE_FP6_E3M2", None),
                     "mxfp6_e2m3": getattr(ao_c, "DTYPE_FP6_E2M3", None),
                     "mxfp4_e2m1": getattr(torch, "float4_e2m1fn_x2", None)}
    except Exception as e:  # noqa: BLE001
        to_mx, ao_dtypes = None, {}
        print(f"# torchao to_mx not usable: {type(e).__name__}: {e}")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    x32 = x.float()
    y32 = torch.empty_like(x32)
    copy_ms = best_ms(lambda: y32.copy_(x32))
    interp = " (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    tri_state = "available" + interp if tri_reason is None else tri_reason
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# device {device} ({gpu_name}), torch {torch.__version__}, input {args.dtype} {list(shape)}, best of "
          f"{repeat}; copy of the fp32 tensor: {copy_ms:.3f} ms; torch.compile backend: {cbackend}; "
          f"triton: {tri_state}")
    if args.dry_run:
        print("# DRY RUN: tiny CPU shapes, numbers say nothing about speed")
    head = ("| format | op | copy ms | torch ms | compiled ms | triton ms | torchao ms | torch/copy | compiled/copy "
            "| triton/copy | triton/compiled | torchao/ours |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in formats:
        spec = QuantSpec.resolve(name)
        q = ms.quantize(x, name)   # the packed input of dequantize (any backend: same bits)
        parts = (q.codes, q.scales, q.micro)
        eager = {"fake_quantize": lambda: fake_quantize_bits(x, spec, -1),
                 "quantize": lambda: quantize_bits(x, spec, -1),
                 "dequantize": lambda: dequantize_parts(*parts, q.shape, q.axis, q.format, dtype)}
        torch._dynamo.reset()
        def comp(fn):
            return torch.compile(fn, fullgraph=True, backend=cbackend)

        compiled = {"fake_quantize": comp(lambda t: fake_quantize_bits(t, spec, -1)),
                    "quantize": comp(lambda t: quantize_bits(t, spec, -1)),
                    "dequantize": comp(lambda c, s, m: dequantize_parts(c, s, m, q.shape, q.axis, q.format, dtype))}
        tri_ok = tri_reason is None and bool(tri.covers(spec, x))
        for op in OPS:
            t_eager = best_ms(eager[op])
            t_comp = best_ms((lambda f=compiled[op]: f(*parts)) if op == "dequantize" else
                             (lambda f=compiled[op]: f(x)))
            t_tri = None
            if tri_ok:
                t_tri = best_ms({"fake_quantize": lambda: tri.fake_quantize(x, spec, -1, None),
                                 "quantize": lambda: tri.quantize(x, spec, -1, None),
                                 "dequantize": lambda: tri.dequantize(q, dtype)}[op])
            t_ao = None
            if op == "quantize" and to_mx is not None and ao_dtypes.get(name) is not None:
                try:
                    t_ao = best_ms(lambda: to_mx(x, ao_dtypes[name], 32))
                except Exception as e:  # noqa: BLE001
                    print(f"# torchao to_mx {name}: {type(e).__name__}: {e}")

            def fmt_ms(v):
                return "-" if v is None else f"{v:.3f}"

            def ratio(a, b):
                return "-" if a is None or b is None else f"{a / b:.2f}"

            print(f"| {name} | {op} | {copy_ms:.3f} | {t_eager:.3f} | {t_comp:.3f} | {fmt_ms(t_tri)} | {fmt_ms(t_ao)} "
                  f"| {ratio(t_eager, copy_ms)} | {ratio(t_comp, copy_ms)} | {ratio(t_tri, copy_ms)} "
                  f"| {ratio(t_tri, t_comp)} | {ratio(t_ao, min(v for v in (t_comp, t_tri) if v is not None))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

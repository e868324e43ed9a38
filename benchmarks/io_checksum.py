"""Cost of microscale.io's checksums on a large file, measured in one run.

Writes a file of MX tensors (mxfp4, packed) plus a plain bf16 tensor totalling ``--gb`` GB with
``ms.save_file`` (which computes a CRC-32C of every tensor), then loads it with ``verify=True`` and
``verify=False`` (file in the page cache both times: the least favourable case for the checksum, since
the read itself is then as fast as it gets). Prints best-of-``--repeat`` wall times, the time of the
checksum alone over the same bytes (CRC-32C from the ``crc32c`` package and zlib's CRC-32 for
comparison) and the ratios the issue asks for: checksum time / load time and / save time. The file is
deleted at the end.

    python benchmarks/io_checksum.py               # 1 GB, 1 repetition
    python benchmarks/io_checksum.py --gb 0.2 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib

import torch

import microscale as ms
from microscale import io as msio
from microscale.tensor import MXTensor


def _tensors(total_bytes: int) -> dict:
    """~total_bytes of stored data: MX tensors with random codes (16 MiB each) and one plain bf16 tensor."""
    fmt = ms.get_format("mxfp4")
    g = torch.Generator().manual_seed(0)
    out, have, i = {}, 0, 0
    shape = (4096, 8192)  # 16 MiB of codes + 0.5 MiB of scales
    specs = msio.component_specs(shape, 1, fmt)
    while have + 17 * 2**20 <= total_bytes * 3 // 4:
        codes = torch.randint(0, 256, specs["codes"][1], dtype=torch.uint8, generator=g)
        scales = torch.randint(110, 140, specs["scales"][1], dtype=torch.uint8, generator=g)
        out[f"layer.{i}.weight"] = MXTensor(codes, scales, shape, 1, fmt)
        have += codes.numel() + scales.numel()
        i += 1
    rest = (total_bytes - have) // 2
    out["embedding"] = torch.randn(rest, generator=g).bfloat16()
    return out


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="file size in GB (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions of each timing, best kept (default 1)")
    p.add_argument("--dir", default=None, help="directory for the temporary file (default: system temp)")
    args = p.parse_args(argv)

    tensors = _tensors(int(args.gb * 1e9))
    nbytes = sum(t.nbytes if isinstance(t, MXTensor) else t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "bench.safetensors")
        t_save = _best(lambda: ms.save_file(tensors, path), args.repeat)
        ms.load_file(path, verify=False)  # warm the page cache
        t_plain = _best(lambda: ms.load_file(path, verify=False), args.repeat)
        t_verify = _best(lambda: ms.load_file(path), args.repeat)
        t_verify_cmd = _best(lambda: msio.verify_file(path), args.repeat)
        size = os.path.getsize(path)
    bufs = []
    for t in tensors.values():
        parts = t.components().values() if isinstance(t, MXTensor) else [t]
        bufs += [memoryview(c.contiguous().reshape(-1).view(torch.uint8).numpy()) for c in parts]
    algos = {"crc32c": msio.CHECKSUMS.get("crc32c"), "zlib crc32": zlib.crc32}
    crc = {name: _best(lambda f=f: [f(b, 0) for b in bufs], args.repeat) for name, f in algos.items() if f}

    print(f"file: {size / 1e9:.3f} GB ({len(tensors)} tensors, {nbytes / 1e9:.3f} GB of data); "
          f"best of {args.repeat}; torch threads {torch.get_num_threads()}; "
          f"checksum written: {msio.CHECKSUM_ALGORITHM}")
    print()
    print("| step | seconds | GB/s |")
    print("|---|---:|---:|")
    for name, t in [("save_file (checksums included)", t_save), ("load_file(verify=False)", t_plain),
                    ("load_file(verify=True)", t_verify), ("verify_file (microscale verify)", t_verify_cmd)]:
        print(f"| {name} | {t:.3f} | {size / 1e9 / t:.2f} |")
    for name, t in crc.items():
        print(f"| {name} alone over the data | {t:.3f} | {nbytes / 1e9 / t:.2f} |")
    print()
    print("| ratio | value |")
    print("|---|---:|")
    print(f"| load: (verify=True - verify=False) / verify=False | {(t_verify - t_plain) / t_plain:+.1%} |")
    for name, t in crc.items():
        print(f"| {name} time / load_file(verify=False) time | {t / t_plain:.1%} |")
        print(f"| {name} time / save_file time | {t / t_save:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

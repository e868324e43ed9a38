"""The ``microscale`` console script: thin subcommands that parse, call the library and print.

    microscale formats                         every registered format and its derived facts
    microscale quantize IN OUT --format F      convert a safetensors checkpoint's weight matrices, streaming
    microscale inspect FILE                    per-tensor facts and code statistics of a file
    microscale demo                            quantize test tensors to every format: bits, bytes, QSNR
    microscale convert IN OUT --to gguf        gpt-oss / GGUF / microscale MXFP4 files, bit for bit, streaming

Adding a subcommand: put a :class:`Command` (help, add_arguments, run) into :data:`COMMANDS`, e.g.
``register_command("explore", "...", add_explore_arguments, run_explore)``. ``run(args)`` returns an
exit code (None means 0). ValueError and OSError raised by ``run`` are printed as a one-line error
with exit code 1; argparse errors exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import __version__
from .bdr.qsnr import qsnr_of
from .formats import ROUNDINGS, SCALE_MODES, BlockFormat, get_format, list_formats
from .io import MXSpec, PlainSpec, SafetensorsReader, SafetensorsWriter, load_file, save_file
from .layout import make_layout, to_blocks
from .quantize import quantize
from .tensor import MXTensor

__all__ = ["main", "Command", "COMMANDS", "register_command", "format_table", "code_stats"]


@dataclass(frozen=True)
class Command:
    """A subcommand: one-line help, a function adding its arguments to a parser, and its body."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


#: Subcommands by name, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments, run) -> Command:
    """Add (or replace) a subcommand."""
    COMMANDS[name] = Command(help, add_arguments, run)
    return COMMANDS[name]


# ---- small shared helpers -------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """Plain-text table; ``align`` has one char per column, "l" or "r" (default: text left, numbers right)."""
    cells = [[str(c) for c in r] for r in rows]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l"
                        for i in range(len(headers)))
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(vals):
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt_db(v: float) -> str:
    return "inf" if v == math.inf else "nan" if math.isnan(v) else f"{v:.2f}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"  # unreachable


def _tensor_nbytes(t: MXTensor | torch.Tensor) -> int:
    return t.nbytes if isinstance(t, MXTensor) else t.numel() * t.element_size()


def _quantizing_format(name: str) -> BlockFormat:
    """argparse type: a registered format that quantizes (not "none")."""
    try:
        fmt = get_format(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if fmt.element is None:
        raise argparse.ArgumentTypeError(f"format {fmt.name!r} does not quantize; choose one of "
                                         f"{', '.join(_quantizing_names())}")
    return fmt


def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {pattern!r}: {e}") from None


def _quantizing_names() -> list[str]:
    return [n for n in list_formats() if get_format(n).element is not None]


# ---- formats --------------------------------------------------------------------------------------
def _formats_arguments(p: argparse.ArgumentParser) -> None:
    pass


def _run_formats(args) -> int:
    aliases: dict[str, list[str]] = {}
    for a in list_formats(include_aliases=True):
        canonical = get_format(a).name
        if a != canonical.lower():
            aliases.setdefault(canonical, []).append(a)
    rows = []
    for n in list_formats():
        f = get_format(n)
        quantizes = f.element is not None
        block = {None: "axis", 0: "tensor"}.get(f.block_size, f.block_size)
        scale = [f.scale.name] if f.scale is not None else []
        if f.subblock_size:
            scale.append(f"+{f.micro_bits}b/{f.subblock_size}")
        if f.tensor_scale is not None:
            scale.append(f"+{f.tensor_scale.name}/tensor")
        scale = " ".join(scale) or "-"
        rows.append([f.name, ",".join(aliases.get(f.name, [])) or "-",
                     f.element.describe() if quantizes else "-",
                     block if quantizes else "-", scale, f"{f.bits_per_element:g}",
                     f.emax if quantizes else "-", f"{f.max_value:.6g}"])
    print(format_table(["format", "aliases", "element", "block", "scale", "bits/elem", "emax", "max value"],
                       rows, "lllllrrr"))
    return 0


# ---- quantize -------------------------------------------------------------------------------------
def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="safetensors checkpoint to read")
    p.add_argument("output", help="safetensors file to write (atomically)")
    p.add_argument("--format", "-f", required=True, type=_quantizing_format,
                   help="target format, e.g. mxfp4, mxfp6_e2m3, mxfp8_e4m3 (see `microscale formats`)")
    p.add_argument("--skip", action="append", type=_regex, default=[], metavar="REGEX",
                   help="leave tensors whose name matches REGEX (re.search) as they are; repeatable")
    p.add_argument("--axis", type=int, default=-1, help="block axis (default -1: the last, input features)")
    p.add_argument("--min-numel", type=int, default=0, metavar="N",
                   help="leave tensors with fewer than N elements as they are (default 0)")
    p.add_argument("--rounding", choices=ROUNDINGS, default="even", help="element rounding (default even)")
    p.add_argument("--scale-mode", choices=SCALE_MODES, default=None,
                   help="shared-scale rule (default: the format's, floor for OCP MX)")
    p.add_argument("--seed", type=int, default=0, help="seed for --rounding stochastic (default 0)")


_QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _should_quantize(name: str, entry, args) -> bool:
    """Weight matrices: floating tensors with ndim >= 2 and at least --min-numel elements, not --skip'ped."""
    numel = math.prod(entry.shape)
    return (entry.dtype in _QUANTIZABLE_DTYPES and len(entry.shape) >= 2 and numel > 0
            and numel >= args.min_numel and not any(r.search(name) for r in args.skip))


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _run_quantize(args) -> int:
    from tqdm import tqdm

    fmt: BlockFormat = args.format
    with SafetensorsReader(args.input) as reader:
        header = reader.header
        names = reader.names()
        # Every output tensor's spec is known from the input header alone, so the output header is
        # written first and the data streams in one tensor at a time.
        specs, convert = {}, set()
        for name in names:
            if name in header.mx:  # already MX: copied as it is
                m = header.mx[name]
                specs[name] = MXSpec(m.format, m.shape, m.axis)
            elif _should_quantize(name, header.entries[name], args):
                shape = header.entries[name].shape
                try:
                    make_layout(shape, args.axis, fmt.block_size)
                except ValueError as e:
                    raise ValueError(f"{args.input}: tensor {name!r} of shape {list(shape)}: {e}") from None
                specs[name] = MXSpec(fmt, shape, args.axis)
                convert.add(name)
            else:
                e = header.entries[name]
                specs[name] = PlainSpec(e.dtype, e.shape)
        rows, before_total, after_total = [], 0, 0
        seed = args.seed if args.rounding == "stochastic" else None
        with SafetensorsWriter(args.output, specs, header.user_metadata) as writer, \
                tqdm(names, unit="tensor", desc=f"quantize {fmt.name}", disable=None, leave=False) as bar:
            for name in bar:
                x = reader.get(name)
                before = _tensor_nbytes(x)
                if name in convert:
                    t0 = time.perf_counter()
                    q = quantize(x, fmt, axis=args.axis, rounding=args.rounding, scale_mode=args.scale_mode,
                                 seed=seed)
                    elapsed_ms = (time.perf_counter() - t0) * 1e3
                    writer.write(name, q)
                    rows.append([name, "mx", list(x.shape), f"{_dtype_str(x.dtype)}->{fmt.name}", before, q.nbytes,
                                 f"{before / q.nbytes:.2f}", _fmt_db(qsnr_of(x, q.dequantize())), f"{elapsed_ms:.0f}"])
                    after = q.nbytes
                else:
                    writer.write(name, x)
                    kind, dtype = (("mx (kept)", x.format.name) if isinstance(x, MXTensor)
                                   else ("plain", _dtype_str(x.dtype)))
                    rows.append([name, kind, list(x.shape), dtype, before, before, "1.00", "-", "-"])
                    after = before
                before_total += before
                after_total += after
                del x
    print(format_table(["tensor", "kind", "shape", "dtype", "bytes before", "bytes after", "ratio", "QSNR dB",
                        "ms"], rows, "llllrrrrr"))
    print(f"\n{len(convert)} of {len(rows)} tensors converted to {fmt.name}; tensor bytes {before_total} -> "
          f"{after_total} ({_human_bytes(before_total)} -> {_human_bytes(after_total)}, "
          f"{before_total / max(after_total, 1):.2f}x smaller); wrote {args.output} "
          f"({os.path.getsize(args.output)} bytes)")
    return 0


# ---- inspect --------------------------------------------------------------------------------------
def code_stats(q: MXTensor) -> dict:
    """Code-level facts of an MXTensor (padding excluded):

    - ``saturated``: elements whose code is ±(largest finite magnitude) of the element format;
    - ``zeros``: zero codes in live blocks (blocks whose scale is neither NaN nor the smallest code a
      zero block gets): underflows plus true zeros, which the codes cannot tell apart;
    - ``nan_blocks``: blocks with a NaN scale;
    - ``scale_exponents``: log2 of each non-NaN power-of-two scale (E8M0-style scales), else None;
    - ``scale_values``: float64 value of each non-NaN scale.
    """
    fmt, elem = q.format, q.format.element
    lay = q.layout
    blocks = q.to_blocks()
    valid = to_blocks(torch.ones(q.shape, dtype=torch.uint8), lay).bool()
    values = torch.tensor(elem.code_values)[blocks.codes.to(torch.int64)]
    scale = fmt.scale
    if scale is None:
        scale_vals = torch.ones(lay.n_blocks, dtype=torch.float64)
    elif scale.kind == "e8m0":
        scale_vals = torch.tensor(scale.code_values)[blocks.scales.to(torch.int64)]
    elif scale.kind == "fp":
        scale_vals = torch.tensor(scale.element.code_values)[blocks.scales.to(torch.int64)]
    else:
        scale_vals = blocks.scales.to(torch.float64)
    nan_block = torch.isnan(scale_vals)
    smallest = (blocks.scales == 0) if scale is not None and scale.kind == "e8m0" else (scale_vals == 0)
    live = (~nan_block & ~smallest)[:, None]
    finite = torch.isfinite(values)
    saturated = finite & (values.abs() >= elem.max_normal) & valid & ~nan_block[:, None]
    zeros = (values == 0) & valid & live
    good = scale_vals[~nan_block]
    exps = None
    if scale is not None and scale.kind == "e8m0":
        exps = blocks.scales[~nan_block].to(torch.int64) - scale.bias
    return {"saturated": int(saturated.sum()), "zeros": int(zeros.sum()), "nan_blocks": int(nan_block.sum()),
            "n_blocks": lay.n_blocks, "scale_exponents": exps, "scale_values": good}


def _scale_summary(stats: dict, top: int = 3) -> str:
    exps = stats["scale_exponents"]
    if exps is not None:
        if exps.numel() == 0:
            return "-"
        e_min, e_med, e_max = int(exps.min()), int(exps.median()), int(exps.max())
        vals, counts = torch.unique(exps, return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)[:top]
        bins = " ".join(f"{int(vals[i])}:{int(counts[i])}" for i in order)
        return f"2^[{e_min},{e_max}] med {e_med}; top {bins}"
    v = stats["scale_values"]
    if v.numel() == 0:
        return "-"
    return f"[{float(v.min()):.3g}, {float(v.max()):.3g}] med {float(v.median()):.3g}"


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="safetensors file (microscale MX tensors and/or plain tensors)")


def _run_inspect(args) -> int:
    rows, total = [], 0
    with SafetensorsReader(args.file) as reader:
        header = reader.header
        for name in reader.names():
            t = reader.get(name)
            nbytes = _tensor_nbytes(t)
            total += nbytes
            if isinstance(t, MXTensor):
                st = code_stats(t)
                rows.append([name, "mx", t.format.name, list(t.shape), f"packed/{t.axis}", nbytes,
                             f"{t.bits_per_element:.3f}", st["saturated"], st["zeros"],
                             f"{st['nan_blocks']}/{st['n_blocks']}", _scale_summary(st)])
            else:
                rows.append([name, "plain", "-", list(t.shape), _dtype_str(t.dtype), nbytes,
                             f"{8 * t.element_size()}", "-", "-", "-", "-"])
            del t
    print(format_table(["tensor", "kind", "format", "shape", "dtype/axis", "bytes", "bits/elem", "saturated",
                        "zero codes", "NaN blocks", "block scales (E8M0: log2)"], rows, "llllllrrrrl"))
    meta = header.user_metadata
    print(f"\n{len(rows)} tensors ({len(header.mx)} MX), {total} bytes of tensor data, file "
          f"{os.path.getsize(args.file)} bytes" + (f"; metadata: {meta}" if meta else ""))
    return 0


# ---- demo -----------------------------------------------------------------------------------------
def _demo_tensors(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Test tensors, fixed seed: Gaussian, Laplace (heavy-tailed), and a small model's weight matrices."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(128, 512, generator=g)
    u = torch.rand(128, 512, generator=g) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())  # inverse CDF of Laplace(0, 1)
    torch.manual_seed(seed)
    model = torch.nn.TransformerEncoderLayer(d_model=96, nhead=4, dim_feedforward=384, batch_first=True)
    weights = [p.detach().clone() for p in model.parameters() if p.dim() >= 2]
    return {"gaussian 128x512": [gauss], "laplace 128x512": [laplace],
            f"transformer layer ({len(weights)} weights)": weights}


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--formats", nargs="+", type=_quantizing_format, default=None, metavar="FORMAT",
                   help="formats to try (default: every registered quantizing format)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test tensors (default 0)")


def _run_demo(args) -> int:
    formats = args.formats or [get_format(n) for n in _quantizing_names()]
    groups = _demo_tensors(args.seed)
    rows, skipped, to_save = [], [], {}
    for fmt in formats:
        for group, tensors in groups.items():
            qs, elapsed = [], 0.0
            try:
                for x in tensors:
                    t0 = time.perf_counter()
                    qs.append(quantize(x, fmt))
                    elapsed += time.perf_counter() - t0
            except (NotImplementedError, ValueError) as e:  # a registered format the quantizer lacks
                skipped.append(f"{fmt.name}: {e}")
                break
            to_save.setdefault(fmt.name, qs[0])
            x = torch.cat([t.reshape(-1) for t in tensors])
            y = torch.cat([q.dequantize().reshape(-1) for q in qs])
            nbytes, numel = sum(q.nbytes for q in qs), x.numel()
            rows.append([fmt.name, group, f"{8 * nbytes / numel:.3f}", nbytes, f"{4 * numel / nbytes:.2f}x",
                         _fmt_db(qsnr_of(x, y)), f"{float((x - y).abs().max()):.3g}", f"{elapsed * 1e3:.0f}"])
    print("Quantizing test tensors to every registered format (each format's scale rule, round half to even).")
    print("QSNR = -10 log10(||x - Q(x)||^2 / ||x||^2); bits/element and bytes are measured from packed storage.\n")
    print(format_table(["format", "tensors", "bits/elem", "bytes", "vs fp32", "QSNR dB", "max |err|", "quantize ms"],
                       rows, "llrrrrrr"))
    for s in skipped:
        print(f"skipped {s}")

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "demo.safetensors")
        saved = dict(to_save)
        saved["bias"] = torch.arange(7, dtype=torch.float32)
        save_file(saved, path, {"source": "microscale demo"})
        loaded = load_file(path)
        exact = set(loaded) == set(saved) and all(_same(saved[n], loaded[n]) for n in saved)
        size = os.path.getsize(path)
    print(f"\nsave_file/load_file round trip: {len(saved) - 1} MX tensors + 1 plain tensor, {size} bytes on "
          f"disk, bit-exact: {'yes' if exact else 'NO'}")
    return 0 if exact else 1


def _same(a, b) -> bool:
    """Bit-for-bit equality of two saved/loaded tensors (MXTensor or plain)."""
    if isinstance(a, MXTensor):
        return (isinstance(b, MXTensor) and a.format == b.format and a.shape == b.shape and a.axis == b.axis
                and all(_same(getattr(a, c), getattr(b, c)) for c in ("codes", "scales", "micro", "tensor_scale")))
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


# ---- entry point ----------------------------------------------------------------------------------
register_command("formats", "list every registered format and its derived facts", _formats_arguments,
                 _run_formats)
register_command("quantize", "convert a safetensors checkpoint's weight matrices to an MX format (streaming)",
                 _quantize_arguments, _run_quantize)
register_command("inspect", "per-tensor facts and code statistics of a safetensors file", _inspect_arguments,
                 _run_inspect)
register_command("demo", "quantize test tensors to every format: bits, bytes, QSNR, error, round trip",
                 _demo_arguments, _run_demo)


def _bdr_explore_command() -> None:
    from .bdr.cli import add_explore_arguments, run_explore
    register_command("explore", "sweep block formats: QSNR vs hardware cost, Pareto frontier (JSON, table, PNG)",
                     add_explore_arguments, run_explore)


_bdr_explore_command()


# ---- convert --------------------------------------------------------------------------------------
def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="microscale safetensors, gpt-oss-layout safetensors (*_blocks/*_scales) or GGUF")
    p.add_argument("output", help="file to write (atomically)")
    p.add_argument("--to", required=True, choices=("gguf", "gpt-oss", "microscale"),
                   help="output layout: GGUF (ggml MXFP4), gpt-oss / transformers MXFP4, or microscale")


def _run_convert(args) -> int:
    from tqdm import tqdm

    from .interop import convert_file

    def bar(names):
        return tqdm(names, unit="tensor", desc=f"convert to {args.to}", disable=None, leave=False)

    counts = convert_file(args.input, args.output, args.to, progress=bar)
    print(f"{counts['tensors']} tensors ({counts['mx']} MX, {counts['plain']} plain) copied bit for bit into "
          f"{args.to} layout: wrote {args.output} ({os.path.getsize(args.output)} bytes)")
    return 0


register_command("convert", "convert a checkpoint between microscale, gpt-oss MXFP4 and GGUF MXFP4 (bit-exact, "
                 "streaming)", _convert_arguments, _run_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microscale", description="Microscaling (MX) block formats for PyTorch.")
    parser.add_argument("--version", action="version", version=f"microscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``microscale``; returns the exit code (0 ok, 1 runtime error such as a bad file, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as e:
        print(f"microscale {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

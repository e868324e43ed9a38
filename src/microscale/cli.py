"""The ``microscale`` console script: thin subcommands that parse, call the library and print.

    microscale formats                         every registered format and its derived facts
    microscale quantize IN OUT --format F      convert a safetensors checkpoint's weight matrices, streaming,
                                               each along its reduction (transformers config / --model)
    microscale inspect FILE                    per-tensor facts and code statistics of a file (streaming)
    microscale verify FILE...                  structure and checksums of files; exit 1 on the first bad one
    microscale demo                            every format on test tensors; a transformers model packed, saved, loaded, timed
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
from .formats import ROUNDINGS, SCALE_MODES, BlockFormat, QuantSpec, get_format, list_formats
from .io import MXSpec, PlainSpec, SafetensorsReader, SafetensorsWriter, load_file, save_file, verify_file
from .layout import make_layout
from .packing import unpack_codes
from .quantize import packed_linear, quantize
from .tensor import COMPONENTS, MXTensor

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
    p.add_argument("--model", default="auto", metavar="auto|none|CONFIG|MODEL_TYPE",
                   help="where each weight's reduction axis comes from. auto (default): a transformers "
                        "config.json beside INPUT, when there is one; a config.json file or its directory; "
                        "a transformers model_type such as gpt2 (its default config); none: block every "
                        "matrix along --axis. With a model, exactly the weights quantize_model(..., "
                        "inference=True) packs are quantized, each along its reduction (transformers' "
                        "Conv1D along axis 0, convolutions as [out, C*kh*kw]), so the file loads with "
                        "microscale.nn.load_quantized / from_pretrained")
    p.add_argument("--embeddings", action="store_true",
                   help="with a model: also quantize nn.Embedding weights (quantize_model(..., embeddings=True))")
    p.add_argument("--axis", type=int, default=-1,
                   help="block axis when no model is known (--model none, or auto without a config.json; "
                        "default -1: the last, input features of nn.Linear)")
    p.add_argument("--min-numel", type=int, default=0, metavar="N",
                   help="leave tensors with fewer than N elements as they are (default 0)")
    p.add_argument("--rounding", choices=ROUNDINGS, default="even", help="element rounding (default even)")
    p.add_argument("--scale-mode", choices=SCALE_MODES, default=None,
                   help="shared-scale rule (default floor, OCP MX v1.0 §6.3)")
    p.add_argument("--seed", type=int, default=0, help="seed for --rounding stochastic (default 0)")


_QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _should_quantize(name: str, entry, args) -> bool:
    """Weight matrices: floating tensors with ndim >= 2 and at least --min-numel elements, not --skip'ped."""
    numel = math.prod(entry.shape)
    return (entry.dtype in _QUANTIZABLE_DTYPES and len(entry.shape) >= 2 and numel > 0
            and numel >= args.min_numel and not any(r.search(name) for r in args.skip))


def _model_plan(spec: str, input_path: str, embeddings: bool) -> tuple[Callable[[str], str | None], str] | None:
    """``(kind_of, description)`` for the model named by ``--model`` (see its help), built on the meta
    device from its transformers config: ``kind_of(tensor name)`` is its packing kind (see
    microscale.nn.packing_plan) or None when quantize_model leaves it unpacked. None for "none" or
    "auto" without a config.json."""
    if spec == "none":
        return None
    config_dir = None
    if spec == "auto":
        config_dir = os.path.dirname(os.path.abspath(input_path))
        if not os.path.exists(os.path.join(config_dir, "config.json")):
            return None
    elif os.path.isdir(spec) or spec.endswith(".json"):
        config_dir = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
        if not os.path.exists(os.path.join(config_dir, "config.json")):
            raise ValueError(f"--model {spec}: no config.json in {config_dir}")
    try:
        import transformers
    except ImportError:
        raise ValueError(f"--model {spec} needs the transformers package (or use --model none)") from None
    from .nn.convert import checkpoint_key_mapper, packing_plan
    if config_dir is not None:
        config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
    else:
        try:
            config = transformers.AutoConfig.for_model(spec)
        except ValueError:
            raise ValueError(f"--model {spec!r} is not a config.json, a directory holding one, 'auto', 'none' or a "
                             f"transformers model_type (e.g. gpt2, llama, bert, vit)") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    plan, to_model = packing_plan(model, embeddings), checkpoint_key_mapper(model)

    def kind_of(name: str) -> str | None:
        return _plan_kind(to_model(name), plan)

    return kind_of, f"{type(model).__name__} ({config.model_type})"


def _plan_kind(name: str, plan: dict[str, str]) -> str | None:
    """The plan entry for a file tensor ``name``: the same name, or the longest name that matches it on
    whole dotted components at the end (files of a base model lack the head's prefix, and back)."""
    if name in plan:
        return plan[name]
    best = None
    for key, kind in plan.items():
        if key.endswith("." + name) or name.endswith("." + key):
            if best is None or len(key) > len(best[0]):
                best = (key, kind)
    return None if best is None else best[1]


#: Names of transformers Conv1D weights in GPT-2-family checkpoints (blocked wrongly by a plain --axis -1).
_CONV1D_NAME = re.compile(r"(^|\.)(attn\.c_attn|attn\.c_proj|attn\.q_attn|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _gemm_layout(kind: str, shape) -> tuple[tuple[int, ...], int]:
    """(shape to quantize, axis) for a weight of ``shape`` packed as ``kind`` (see packing_plan)."""
    shape = tuple(shape)
    if kind == "transposed":
        return shape, 0
    if kind == "conv":
        return (shape[0], math.prod(shape[1:])), 1
    return shape, 1


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _run_quantize(args) -> int:
    from tqdm import tqdm

    fmt: BlockFormat = args.format
    found = _model_plan(args.model, args.input, args.embeddings)
    kind_of = None if found is None else found[0]
    with SafetensorsReader(args.input) as reader:
        header = reader.header
        names = reader.names()
        if found is None and args.model == "auto":
            conv1d = [n for n in names if _CONV1D_NAME.search(n) and len(header.entries[n].shape) == 2]
            if conv1d:
                raise ValueError(f"{args.input}: {conv1d[0]!r} looks like a transformers Conv1D weight (GPT-2 family, "
                                 f"stored [in, out]) and no config.json is beside the file: pass --model gpt2 (or "
                                 f"a config) so it is blocked along its reduction (axis 0), or --model none to "
                                 f"block every matrix along --axis {args.axis} anyway")
        # Every output tensor's spec is known from the input header alone, so the output header is
        # written first and the data streams in one tensor at a time.
        specs, convert = {}, {}
        for name in names:
            entry = header.entries.get(name)
            kind = None if kind_of is None else kind_of(name)
            if name in header.mx:  # already MX: copied as it is
                m = header.mx[name]
                specs[name] = MXSpec(m.format, m.shape, m.axis)
            elif (kind_of is None or kind is not None) and _should_quantize(name, entry, args):
                shape, axis = (tuple(entry.shape), args.axis) if kind is None else _gemm_layout(kind, entry.shape)
                try:
                    make_layout(shape, axis, fmt.block_size)
                except ValueError as e:
                    raise ValueError(f"{args.input}: tensor {name!r} of shape {list(shape)}: {e}") from None
                specs[name] = MXSpec(fmt, shape, axis)
                convert[name] = (shape, axis)
            else:
                e = header.entries[name]
                specs[name] = PlainSpec(e.dtype, e.shape)
        rows, before_total, after_total = [], 0, 0
        spec = QuantSpec.resolve(fmt, args.rounding, args.scale_mode)   # resolved once for every tensor
        seed = args.seed if spec.rounding == "stochastic" else None
        with SafetensorsWriter(args.output, specs, header.user_metadata) as writer, \
                tqdm(names, unit="tensor", desc=f"quantize {fmt.name}", disable=None, leave=False) as bar:
            for name in bar:
                x = reader.get(name)
                before = _tensor_nbytes(x)
                if name in convert:
                    shape, axis = convert[name]
                    t0 = time.perf_counter()
                    q = quantize(x.reshape(shape), spec, axis=axis, seed=seed)
                    elapsed_ms = (time.perf_counter() - t0) * 1e3
                    writer.write(name, q)
                    qsnr = _fmt_db(qsnr_of(x.reshape(shape), q.dequantize()))
                    rows.append([name, f"mx axis {axis}", list(q.shape), f"{_dtype_str(x.dtype)}->{fmt.name}", before,
                                 q.nbytes, f"{before / q.nbytes:.2f}", qsnr, f"{elapsed_ms:.0f}"])
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
    if found is not None:
        print(f"reduction axes from {found[1]}: {len(convert)} weights blocked along their reduction "
              f"({sum(a == 0 for _, a in convert.values())} along axis 0, transformers' Conv1D)")
    else:
        print(f"no model known (--model {args.model}): every matrix blocked along axis {args.axis}")
    print(f"\n{len(convert)} of {len(rows)} tensors converted to {fmt.name}; tensor bytes {before_total} -> "
          f"{after_total} ({_human_bytes(before_total)} -> {_human_bytes(after_total)}, "
          f"{before_total / max(after_total, 1):.2f}x smaller); wrote {args.output} "
          f"({os.path.getsize(args.output)} bytes)")
    return 0


# ---- inspect --------------------------------------------------------------------------------------
#: Elements per chunk of the streaming code statistics. inspect's memory grows by a few tens of times
#: this in bytes (the chunk's temporaries, as the allocator keeps them), whatever the file's size.
STATS_CHUNK_ELEMENTS = 1 << 18


def _stats_chunks(lay, chunk_elements: int) -> list[tuple[int, int]]:
    """Block ranges [b0, b1) of about ``chunk_elements`` elements; b0 is a multiple of 8 blocks, so every
    packed part of a chunk starts on a byte boundary whatever its bits per block."""
    per = max(8, (max(chunk_elements, 1) // lay.block_size) // 8 * 8)
    return [(b0, min(b0 + per, lay.n_blocks)) for b0 in range(0, lay.n_blocks, per)]


def _byte_bounds(chunks, bits_per_block: int) -> list[int]:
    """Byte sizes of the parts of a packed array (``bits_per_block`` bits per block) that the chunks read."""
    ends = [(b1 * bits_per_block + 7) // 8 for _, b1 in chunks]
    return [e - s for s, e in zip([0] + ends[:-1], ends)]


def _is_any(codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """codes == any of ``values`` (a handful), elementwise, without widening ``codes``."""
    out = torch.zeros(codes.shape, dtype=torch.bool)
    for v in values.tolist():
        out |= codes == v
    return out


class _CodeStats:
    """Streaming accumulator of :func:`code_stats` over chunks of whole blocks (blocked order)."""

    def __init__(self, fmt: BlockFormat, lay):
        self.fmt, self.lay = fmt, lay
        elem = fmt.element
        values = torch.tensor(elem.code_values, dtype=torch.float64)
        codes = torch.arange(values.numel(), dtype=torch.int64)
        # the few codes that saturate (±max) or are zero (±0): compared per element, no int64 copies
        dtype = torch.uint8 if elem.bits <= 8 else torch.int16
        self.saturated_codes = codes[torch.isfinite(values) & (values.abs() >= elem.max_normal)].to(dtype)
        self.zero_codes = codes[values == 0].to(dtype)
        scale = fmt.scale
        self.scale_table = None
        if scale is not None and scale.kind == "e8m0":
            self.scale_table = torch.tensor(scale.code_values, dtype=torch.float64)
        elif scale is not None and scale.kind == "fp":
            self.scale_table = torch.tensor(scale.element.code_values, dtype=torch.float64)
        self.e8m0 = scale is not None and scale.kind == "e8m0"
        self.exp_hist = torch.zeros(1 << scale.bits if self.e8m0 else 0, dtype=torch.int64)
        self.values: list[torch.Tensor] = []  # non-E8M0 scales: one float32 per block (not per element)
        self.saturated = self.zeros = self.nan_blocks = 0

    def add(self, b0: int, codes: torch.Tensor, scale_codes: torch.Tensor | None) -> None:
        """``codes``: unpacked [nb, k] element codes of blocks b0..b0+nb; ``scale_codes``: their scales."""
        lay, scale = self.lay, self.fmt.scale
        nb, k = codes.shape
        pos = torch.arange(b0, b0 + nb) % lay.blocks_per_vector
        n_valid = torch.where(pos == lay.blocks_per_vector - 1, lay.axis_len - (lay.blocks_per_vector - 1) * k, k)
        valid = torch.arange(k)[None, :] < n_valid[:, None]
        if scale is None:
            vals = torch.ones(nb, dtype=torch.float64)
        elif self.scale_table is not None:
            vals = self.scale_table[scale_codes.to(torch.int64)]
        else:
            vals = scale_codes.to(torch.float64)
        nan_block = torch.isnan(vals)
        smallest = (scale_codes == 0) if self.e8m0 else (vals == 0)
        live = ~nan_block & ~smallest
        self.saturated += int((_is_any(codes, self.saturated_codes) & valid & ~nan_block[:, None]).sum())
        self.zeros += int((_is_any(codes, self.zero_codes) & valid & live[:, None]).sum())
        self.nan_blocks += int(nan_block.sum())
        if self.e8m0:
            self.exp_hist += torch.bincount(scale_codes[~nan_block].to(torch.int64), minlength=self.exp_hist.numel())
        else:
            self.values.append(vals[~nan_block].to(torch.float32))

    def result(self) -> dict:
        counts = None
        if self.e8m0:
            bias = self.fmt.scale.bias
            counts = {int(c) - bias: int(self.exp_hist[c]) for c in self.exp_hist.nonzero().reshape(-1)}
        values = None if self.e8m0 else (torch.cat(self.values) if self.values else torch.empty(0))
        return {"saturated": self.saturated, "zeros": self.zeros, "nan_blocks": self.nan_blocks,
                "n_blocks": self.lay.n_blocks, "scale_exponent_counts": counts, "scale_values": values}


def code_stats(q: MXTensor, chunk_elements: int | None = None) -> dict:
    """Code-level facts of an MXTensor (padding excluded), computed chunk by chunk (memory: a few times
    ``chunk_elements`` bytes, whatever the tensor's size):

    - ``saturated``: elements whose code is ±(largest finite magnitude) of the element format;
    - ``zeros``: zero codes in live blocks (blocks whose scale is neither NaN nor the smallest code a
      zero block gets): underflows plus true zeros, which the codes cannot tell apart;
    - ``nan_blocks``: blocks with a NaN scale; ``n_blocks``;
    - ``scale_exponent_counts``: {log2 of the scale: number of blocks} over non-NaN E8M0 scales, else None;
    - ``scale_values``: float32 value of each non-NaN scale of other scale formats (one per block), else None.
    """
    lay = q.layout
    chunk_elements = chunk_elements or STATS_CHUNK_ELEMENTS
    acc = _CodeStats(q.format, lay)
    bits, k = q.format.element.bits, lay.block_size
    scales = q.scales.reshape(-1)
    for b0, b1 in _stats_chunks(lay, chunk_elements):
        packed = q.codes[(b0 * k * bits) // 8:(b1 * k * bits + 7) // 8]
        codes = unpack_codes(packed, bits, (b1 - b0) * k).reshape(b1 - b0, k)
        acc.add(b0, codes, scales[b0:b1] if scales.numel() else None)
    return acc.result()


def _file_code_stats(reader: SafetensorsReader, entry, chunk_elements: int | None = None) -> dict:
    """:func:`code_stats` of MX tensor ``entry`` read chunk by chunk from the file (never the whole
    tensor in memory); its components' checksums are verified on the way, the small ones (microexponents,
    tensor scales) by reading them whole."""
    fmt = entry.format
    chunk_elements = chunk_elements or STATS_CHUNK_ELEMENTS
    lay = make_layout(entry.shape, entry.axis, fmt.block_size)
    k, bits = lay.block_size, fmt.element.bits
    acc = _CodeStats(fmt, lay)
    chunks = _stats_chunks(lay, chunk_elements)
    codes_it = reader.iter_chunks(entry.components["codes"], _byte_bounds(chunks, k * bits))
    scale_dtype = reader.header.entries[entry.components["scales"]].dtype
    scale_size = torch.empty((), dtype=scale_dtype).element_size()
    has_scales = fmt.scale is not None
    scales_it = reader.iter_chunks(entry.components["scales"],
                                   [(b1 - b0) * scale_size for b0, b1 in chunks] if has_scales else [])
    for (b0, b1), buf in zip(chunks, codes_it):
        codes = unpack_codes(torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8),
                             bits, (b1 - b0) * k).reshape(b1 - b0, k)
        sc = None
        if has_scales:
            raw = next(scales_it)
            sc = torch.frombuffer(raw, dtype=scale_dtype) if raw else torch.empty(0, dtype=scale_dtype)
        acc.add(b0, codes, sc)
    for it in (codes_it, scales_it):  # finish both: the checksum verdict comes after the last piece
        for _ in it:
            pass
    for suffix in COMPONENTS[2:]:   # micro, tensor_scale
        if suffix in entry.components:
            reader.get_stored(entry.components[suffix])
    return acc.result()


def _scale_summary(stats: dict, top: int = 3) -> str:
    counts = stats.get("scale_exponent_counts")
    if counts is not None:
        if not counts:
            return "-"
        exps = sorted(counts)
        n = sum(counts.values())
        cum, med = 0, exps[-1]
        for e in exps:  # lower median, as torch.median
            cum += counts[e]
            if cum > (n - 1) // 2:
                med = e
                break
        order = sorted(counts, key=lambda e: (-counts[e], e))[:top]
        bins = " ".join(f"{e}:{counts[e]}" for e in order)
        return f"2^[{exps[0]},{exps[-1]}] med {med}; top {bins}"
    v = stats["scale_values"]
    if v is None or v.numel() == 0:
        return "-"
    return f"[{float(v.min()):.3g}, {float(v.max()):.3g}] med {float(v.median()):.3g}"


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="safetensors file (microscale MX tensors and/or plain tensors)")


def _run_inspect(args) -> int:
    """Per-tensor facts, streaming: MX codes chunk by chunk, plain tensors only checksummed; memory stays
    at a few chunks whatever the file's size. Checksums are verified as the data streams past."""
    rows, total = [], 0
    with SafetensorsReader(args.file) as reader:
        header = reader.header
        for name in reader.names():
            mx = header.mx.get(name)
            if mx is not None:
                fmt = mx.format
                nbytes = sum(header.entries[c].nbytes for c in mx.components.values())
                numel = math.prod(mx.shape)
                st = _file_code_stats(reader, mx)
                rows.append([name, "mx", fmt.name, list(mx.shape), f"packed/{mx.axis}", nbytes,
                             f"{8.0 * nbytes / max(numel, 1):.3f}", st["saturated"], st["zeros"],
                             f"{st['nan_blocks']}/{st['n_blocks']}", _scale_summary(st)])
            else:
                e = header.entries[name]
                nbytes = e.nbytes
                for _ in reader.iter_chunks(name, 1 << 24):  # verify the checksum, 16 MiB at a time
                    pass
                rows.append([name, "plain", "-", list(e.shape), _dtype_str(e.dtype), nbytes,
                             f"{8 * torch.empty((), dtype=e.dtype).element_size()}", "-", "-", "-", "-"])
            total += nbytes
    print(format_table(["tensor", "kind", "format", "shape", "dtype/axis", "bytes", "bits/elem", "saturated",
                        "zero codes", "NaN blocks", "block scales (E8M0: log2)"], rows, "llllllrrrrl"))
    meta = header.user_metadata
    sums = header.checksums
    print(f"\n{len(rows)} tensors ({len(header.mx)} MX), {total} bytes of tensor data, file "
          f"{os.path.getsize(args.file)} bytes; checksums: "
          f"{'verified (' + sums.algorithm + ')' if sums is not None else 'none in the file'}"
          + (f"; metadata: {meta}" if meta else ""))
    return 0


# ---- verify ---------------------------------------------------------------------------------------
def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="safetensors file(s) to check")


def _run_verify(args) -> int:
    """Structure, header checksum and every tensor's checksum, streaming; exit 1 at the first bad file."""
    for path in args.files:
        r = verify_file(path)
        what = (f"checksums verified ({r['algorithm']})" if r["algorithm"]
                else "no checksums in the file (structure checked only)")
        print(f"{path}: OK, {r['tensors']} stored tensors, {r['bytes']} bytes; {what}")
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
    p.add_argument("--no-model", action="store_true",
                   help="skip the model part (a tiny random-init transformers Llama packed, saved, loaded and run)")


def _demo_model(seed: int) -> bool:
    """The user path on a model we did not write: a random-init transformers Llama (no download) packed
    with weight-only recipes, its coverage, output error, resident bytes, save/load round trip through
    ``from_pretrained`` (which refuses missing keys), and batch-1 forward time against FP32."""
    try:
        import transformers
    except ImportError:
        print("\nmodel part skipped: transformers is not installed (pip install transformers)")
        return True
    import copy
    from . import nn as mnn
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                                   max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(seed))
    one = ids[:, :1]

    def paired_ms(a, b, x, n=15):
        """Best-of-n batch-1 forward times of two models, interleaved, on one thread (a shared machine's
        OpenMP hand-offs would otherwise dominate a few-millisecond forward)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            best = [math.inf, math.inf]
            with torch.inference_mode():
                a(x), b(x)
                for _ in range(n):
                    for i, m in enumerate((a, b)):
                        t0 = time.perf_counter()
                        m(x)
                        best[i] = min(best[i], time.perf_counter() - t0)
            return 1e3 * best[0], 1e3 * best[1]
        finally:
            torch.set_num_threads(threads)

    with torch.inference_mode():
        ref = model(ids).logits
    base_bytes = mnn.resident_bytes(model)
    n_gemm = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows, ok = [["fp32", f"0/{n_gemm}", base_bytes, "1.00x", "0", "-", "-", "1.00x", "-"]], True
    for recipe in ("mxfp8-w", "mxfp4-w"):
        packed = mnn.quantize_model(copy.deepcopy(model), recipe, inference=True)
        n_packed = sum(1 for m in packed.modules() if isinstance(m, torch.nn.Linear) and mnn.is_packed(m.weight))
        with torch.inference_mode():
            out = packed(ids).logits
        err = float((out - ref).norm() / ref.norm())
        with tempfile.TemporaryDirectory() as d:
            mnn.save_quantized(packed, os.path.join(d, "model.safetensors"))
            cfg.save_pretrained(d)
            fresh = mnn.from_pretrained(transformers.LlamaForCausalLM, d).eval()
            with torch.inference_mode():
                same = torch.equal(fresh(ids).logits, out)
        ok &= same
        nbytes = mnn.resident_bytes(packed)
        t_fp32, t = paired_ms(model, packed, one)
        rows.append([recipe, f"{n_packed}/{n_gemm}", nbytes, f"{base_bytes / nbytes:.2f}x", f"{err:.4f}",
                     f"{t_fp32:.2f}", f"{t:.2f}", f"{t_fp32 / t:.2f}x", "yes" if same else "NO"])
    print("\nA model we did not write: transformers LlamaForCausalLM (random init, hidden 512, 2 layers, vocab "
          "4096), packed weight-only. logit error = ||logits - fp32|| / ||fp32|| on 32 tokens; batch-1 forward "
          "of one token, best of 15 interleaved with FP32, 1 thread; 'saved -> loaded' = save_quantized, then "
          "nn.from_pretrained into a fresh model, outputs bit-equal.\n")
    print(format_table(["recipe", "packed Linear", "resident bytes", "smaller", "logit error", "fp32 ms",
                        "packed ms", "faster", "saved -> loaded"], rows, "lrrrrrrrl"))
    speedups = [float(r[7].rstrip("x")) for r in rows[1:]]
    verdict = ("faster than FP32" if min(speedups) > 1 else "slower than FP32" if max(speedups) < 1
               else "about FP32 speed")
    print(f"\nAt this size (42 MB of FP32 weights) the packed batch-1 forward runs at {min(speedups):.2f}-"
          f"{max(speedups):.2f}x FP32 speed ({verdict}, measured in this run). Where the weight "
          "bytes are large, e.g. one 8192 x 4096 weight (FP32 134 MB), y = x W^T at batch 1, best of 15 "
          "interleaved, "
          f"{torch.get_num_threads()} thread(s):")
    g = torch.Generator().manual_seed(seed)
    w, x1 = torch.randn(8192, 4096, generator=g), torch.randn(1, 4096, generator=g)
    best = {}
    qs = {name: quantize(w, name, axis=1) for name in ("mxfp8_e4m3", "mxfp4_e2m1")}
    fns = {"fp32": lambda: torch.nn.functional.linear(x1, w)}
    fns.update({n: (lambda q=q: packed_linear(x1, q)) for n, q in qs.items()})
    for _ in range(15):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[n] = min(best.get(n, math.inf), time.perf_counter() - t0)
    for n in fns:
        nbytes = w.numel() * 4 if n == "fp32" else qs[n].nbytes
        print(f"  {n:11s} {1e3 * best[n]:7.2f} ms  {nbytes / 2**20:6.1f} MiB of weights  "
              f"{best['fp32'] / best[n]:.2f}x FP32")
    return ok


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
    model_ok = args.no_model or _demo_model(args.seed)
    return 0 if exact and model_ok else 1


def _same(a, b) -> bool:
    """Bit-for-bit equality of two saved/loaded tensors (MXTensor or plain)."""
    if isinstance(a, MXTensor):
        return (isinstance(b, MXTensor) and a.format == b.format and a.shape == b.shape and a.axis == b.axis
                and all(_same(getattr(a, c), getattr(b, c)) for c in COMPONENTS))
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
register_command("verify", "check safetensors files: structure, header and per-tensor checksums (streaming)",
                 _verify_arguments, _run_verify)
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

"""Safetensors files of MXTensors and plain tensors, with format metadata. Never unpickles.

A file written here is an ordinary safetensors file (https://github.com/huggingface/safetensors,
"Format"): an 8-byte little-endian header length N, N bytes of JSON header, then the tensor bytes.
The plain ``safetensors`` library opens it. Each MXTensor named ``w`` is stored as its components:

    w.codes          U8   [n]          packed element codes (packing.py)
    w.scales         U8   [n_blocks]   (F32 for formats with FP32 scales)
    w.micro          U8   [m]          packed microexponents (two-level formats only)
    w.tensor_scale   F32  []           per-tensor scale (formats with one only)

and the header's ``__metadata__`` (a str -> str map) holds

    "microscale.version": "1"
    "microscale.mx": JSON {"w": {"format": name, "shape": [...], "axis": int, "spec": {...}}, ...}

``spec`` is the decoding-relevant part of the BlockFormat (element, block sizes, scale formats). On
load the format is looked up by name in the registry; an unknown name, or a registered format whose
spec differs from the stored one, is an error (decoding with a different format would give a silently
wrong tensor). Plain tensors are stored as themselves.

Loading parses and validates the header itself before reading any tensor data: header length against
file size, JSON, dtype names, shapes, ``data_offsets`` (size == numel * itemsize, contiguous, no
overlap, ending exactly at the end of the file), the microscale metadata, and every MXTensor's
component sizes (MXTensor.validate). Every problem raises ValueError naming the file, the tensor and
the problem.

Writing is streaming and atomic (:class:`SafetensorsWriter`): the header is computed ahead from the
names, dtypes and shapes of all tensors, then tensor data is written one tensor at a time to a
temporary file in the target directory, fsynced and moved into place with os.replace. On any error the
temporary file is removed and ``path`` is untouched.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from .formats import BlockFormat, ElementFormat, ScaleFormat, get_format
from .layout import make_layout
from .packing import packed_nbytes
from .tensor import MXTensor

__all__ = [
    "save_file",
    "load_file",
    "iter_file",
    "read_header",
    "FileHeader",
    "TensorEntry",
    "MXEntry",
    "SafetensorsWriter",
    "mx_components",
    "FORMAT_VERSION",
]

#: Version of the microscale metadata layout written into ``__metadata__``.
FORMAT_VERSION = "1"
VERSION_KEY = "microscale.version"
MX_KEY = "microscale.mx"
_RESERVED_PREFIX = "microscale."
#: MXTensor component name suffixes, in storage order (``name + "." + suffix``).
COMPONENTS = ("codes", "scales", "micro", "tensor_scale")
#: Largest header accepted (the safetensors library's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names <-> torch dtypes (the ones the safetensors torch loader knows).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}


# ---- header model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor of a safetensors header: dtype, shape and byte range within the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class MXEntry:
    """One MXTensor recorded in the microscale metadata, and the stored names of its components."""

    name: str
    format: BlockFormat
    shape: tuple[int, ...]
    axis: int
    components: dict[str, str]  # suffix -> stored tensor name (only those present in the file)


@dataclass(frozen=True)
class FileHeader:
    """A validated safetensors header (see :func:`read_header`)."""

    path: str
    entries: dict[str, TensorEntry]          # stored tensors, in header order
    metadata: dict[str, str]                 # the whole __metadata__ (microscale keys included)
    mx: dict[str, MXEntry]                   # MXTensors, keyed by their name
    data_start: int                          # file offset of the data section (8 + header length)

    def names(self) -> list[str]:
        """Logical tensor names (MXTensors once, by their own name), in header order."""
        owner = {stored: e.name for e in self.mx.values() for stored in e.components.values()}
        out, seen = [], set()
        for stored in self.entries:
            n = owner.get(stored, stored)
            if n not in seen:
                seen.add(n)
                out.append(n)
        return out

    @property
    def user_metadata(self) -> dict[str, str]:
        """``__metadata__`` without the microscale keys."""
        return {k: v for k, v in self.metadata.items() if not k.startswith(_RESERVED_PREFIX)}


class _Problem:
    """Builds ValueErrors that name the file (and the tensor) they are about."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __call__(self, msg: str, tensor: str | None = None) -> ValueError:
        where = f"{self.path}: tensor {tensor!r}: " if tensor is not None else f"{self.path}: "
        return ValueError(where + msg)


# ---- format spec (decoding-relevant part of a BlockFormat) ----------------------------------------
def _element_spec(e: ElementFormat | None) -> dict | None:
    if e is None:
        return None
    return {"name": e.name, "kind": e.kind, "ebits": e.ebits, "mbits": e.mbits, "specials": e.specials,
            "int_bits": e.int_bits, "frac_bits": e.frac_bits, "encoding": e.encoding}


def _scale_spec(s: ScaleFormat | None) -> dict | None:
    if s is None:
        return None
    return {"name": s.name, "kind": s.kind, "bits": s.bits, "element": _element_spec(s.element)}


def format_spec(fmt: BlockFormat) -> dict:
    """The facts needed to decode stored codes of ``fmt`` (scale_mode and description are left out:
    they affect how a tensor is quantized, not how its codes decode)."""
    return {"element": _element_spec(fmt.element), "block_size": fmt.block_size,
            "scale": _scale_spec(fmt.scale), "subblock_size": fmt.subblock_size,
            "micro_bits": fmt.micro_bits, "tensor_scale": _scale_spec(fmt.tensor_scale)}


# ---- component plan -------------------------------------------------------------------------------
def mx_components(shape, axis: int, fmt: str | BlockFormat) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of each stored component of an MXTensor of ``shape`` quantized along ``axis``.

    Exact ahead of quantization (this is what lets :class:`SafetensorsWriter` write the header first).
    Mirrors MXTensor.validate, which checks the same sizes on real tensors.
    """
    fmt = get_format(fmt)
    if fmt.element is None:
        raise ValueError("format 'none' does not quantize: it has no stored components")
    lay = make_layout(shape, axis, fmt.block_size)
    fp32_scale = fmt.scale is not None and fmt.scale.kind == "fp32"
    out = {"codes": (torch.uint8, (packed_nbytes(lay.n_elements_padded, fmt.element.bits),)),
           "scales": (torch.float32 if fp32_scale else torch.uint8, (lay.n_blocks,))}
    if fmt.subblock_size:
        n_sub = lay.n_blocks * (lay.block_size // fmt.subblock_size)
        out["micro"] = (torch.uint8, (packed_nbytes(n_sub, fmt.micro_bits),))
    if fmt.tensor_scale is not None:
        out["tensor_scale"] = (torch.float32, ())
    return out


def _mx_parts(q: MXTensor) -> dict[str, torch.Tensor]:
    parts = {"codes": q.codes, "scales": q.scales}
    if q.micro is not None:
        parts["micro"] = q.micro
    if q.tensor_scale is not None:
        parts["tensor_scale"] = q.tensor_scale.reshape(())
    return parts


def _mx_record(q: MXTensor) -> dict:
    return {"format": q.format.name, "shape": list(q.shape), "axis": q.axis, "spec": format_spec(q.format)}


# ---- writing --------------------------------------------------------------------------------------
def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name).__name__} ({name!r})")
    if not name or name == "__metadata__":
        raise ValueError(f"invalid tensor name {name!r}")
    return name


def _check_metadata(metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str -> str, got {k!r}: {type(v).__name__}")
        if k.startswith(_RESERVED_PREFIX):
            raise ValueError(f"metadata key {k!r} is reserved (keys starting with {_RESERVED_PREFIX!r})")
    return dict(metadata)


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in a safetensors file "
                        f"(supported: {', '.join(str(d) for d in _DTYPE_NAMES)})")
    return _DTYPE_NAMES[dtype]


class SafetensorsWriter:
    """Streaming, atomic safetensors writer.

    Give every tensor's name, dtype and shape up front (``plan``, in the header order wanted) plus the
    ``__metadata__`` map; the header is written first, then :meth:`write` each tensor in
    :attr:`order` (data is laid out largest itemsize first, so every tensor is aligned to its
    itemsize, as the safetensors library does). Use as a context manager: leaving the block normally
    after all tensors were written fsyncs and moves the file into place; an exception (or a missing
    tensor) removes the temporary file and leaves ``path`` untouched.
    """

    def __init__(self, path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self._plan = {}
        for name, dtype, shape in plan:
            _check_name(name)
            if name in self._plan:
                raise ValueError(f"tensor name {name!r} is used twice")
            self._plan[name] = (dtype, tuple(int(s) for s in shape))
        itemsize = {n: torch.empty((), dtype=d).element_size() for n, (d, _) in self._plan.items()}
        #: the order in which :meth:`write` expects tensors (stable: ties keep plan order)
        self.order = sorted(self._plan, key=lambda n: -itemsize[n])
        offsets, pos = {}, 0
        for n in self.order:
            dtype, shape = self._plan[n]
            size = math.prod(shape) * itemsize[n]
            offsets[n] = (pos, pos + size)
            pos += size
        header: dict = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        for n, (dtype, shape) in self._plan.items():
            header[n] = {"dtype": _dtype_name(dtype, n), "shape": list(shape), "data_offsets": list(offsets[n])}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data section starts 8-byte aligned
        self._header = struct.pack("<Q", len(raw)) + raw
        self._offsets = offsets
        self._next = 0
        self._file = None
        self._tmp = None
        self.nbytes = pos

    def __enter__(self) -> "SafetensorsWriter":
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp",
                                         dir=directory)
        try:
            self._file = os.fdopen(fd, "wb")
            self._file.write(self._header)
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor's data; it must be the next name in :attr:`order`, of the planned
        dtype and shape."""
        if self._file is None:
            raise RuntimeError("SafetensorsWriter.write outside its `with` block")
        if self._next >= len(self.order) or self.order[self._next] != name:
            want = self.order[self._next] if self._next < len(self.order) else "nothing (all written)"
            raise ValueError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        dtype, shape = self._plan[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: planned {dtype} {list(shape)}, got {tensor.dtype} "
                             f"{list(tensor.shape)}")
        if tensor.numel():
            t = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            if sys.byteorder != "little" and tensor.element_size() > 1:
                raise NotImplementedError("writing safetensors files on a big-endian machine")
            self._file.write(memoryview(t.numpy()))
        self._next += 1

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self._next != len(self.order):
                raise ValueError(f"{self.path}: tensor {self.order[self._next]!r} was never written")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self._abort()
            raise
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _flatten(tensors) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Stored tensors (name -> tensor, in user order) and microscale records of a save_file argument."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> MXTensor or torch.Tensor, got {type(tensors).__name__}")
    stored: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    mx: dict[str, dict] = {}
    for name, value in tensors.items():
        _check_name(name)
        if isinstance(value, MXTensor):
            value.validate()
            parts = {f"{name}.{suffix}": t for suffix, t in _mx_parts(value).items()}
            mx[name] = _mx_record(value)
        elif isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise TypeError(f"tensor {name!r}: only dense tensors can be saved, got layout {value.layout}")
            _dtype_name(value.dtype, name)
            parts = {name: value}
        else:
            raise TypeError(f"tensor {name!r}: expected an MXTensor or a torch.Tensor, got {type(value).__name__}")
        for stored_name, t in parts.items():
            if stored_name in stored:
                raise ValueError(f"tensor {name!r} would be stored as {stored_name!r}, which clashes with "
                                 f"tensor {source[stored_name]!r}; rename one of them")
            stored[stored_name] = t
            source[stored_name] = name
    return stored, mx


def save_file(tensors: Mapping[str, MXTensor | torch.Tensor], path, metadata: Mapping[str, str] | None = None
              ) -> None:
    """Save MXTensors and plain tensors to a safetensors file at ``path``, atomically.

    ``metadata``: extra str -> str entries for the header's ``__metadata__`` (keys starting with
    "microscale." are reserved). Raises TypeError/ValueError for bad input before touching the disk.
    """
    stored, mx = _flatten(tensors)
    meta = _check_metadata(metadata)
    meta[VERSION_KEY] = FORMAT_VERSION
    if mx:
        meta[MX_KEY] = json.dumps(mx, separators=(",", ":"))
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in stored.items()]
    with SafetensorsWriter(path, plan, meta) as w:
        for n in w.order:
            w.write(n, stored[n])


# ---- reading --------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(name: str, info, problem: _Problem) -> TensorEntry:
    if not isinstance(info, dict):
        raise problem(f"header entry must be an object, got {type(info).__name__}", name)
    if set(info) != {"dtype", "shape", "data_offsets"}:
        raise problem(f"header entry must have exactly the keys dtype, shape, data_offsets; got "
                      f"{sorted(info)}", name)
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise problem(f"unsupported dtype {info['dtype']!r} (known: {', '.join(_DTYPES)})", name)
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise problem(f"shape must be a list of non-negative integers, got {shape!r}", name)
    offs = info["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise problem(f"data_offsets must be [start, end] with 0 <= start <= end, got {offs!r}", name)
    want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offs[1] - offs[0] != want:
        raise problem(f"data_offsets {offs} span {offs[1] - offs[0]} bytes, but {info['dtype']} {shape} "
                      f"needs {want}", name)
    return TensorEntry(name, dtype, tuple(shape), offs[0], offs[1])


def _check_layout(entries: dict[str, TensorEntry], data_size: int, problem: _Problem) -> None:
    """Tensor byte ranges must tile the data section exactly: no gap, no overlap, nothing past the end."""
    pos, prev = 0, None
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.end > data_size:
            raise problem(f"data_offsets [{e.start}, {e.end}] run past the end of the data section "
                          f"({data_size} bytes): the file is truncated or the header lies", e.name)
        if e.start < pos:
            raise problem(f"data_offsets [{e.start}, {e.end}] overlap tensor {prev!r}", e.name)
        if e.start > pos:
            raise problem(f"data_offsets [{e.start}, {e.end}] leave a gap of {e.start - pos} bytes "
                          f"after byte {pos}", e.name)
        pos, prev = e.end, e.name
    if pos != data_size:
        raise problem(f"the header describes {pos} bytes of tensor data, but the file holds {data_size} "
                      f"(trailing bytes)")


def _spec_diff(a, b, prefix=""):
    """First path at which two spec dicts differ (for error messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _spec_diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix[:-1]}: file has {a!r}, registry has {b!r}"


def _parse_mx(metadata: dict[str, str], entries: dict[str, TensorEntry], problem: _Problem) -> dict[str, MXEntry]:
    version = metadata.get(VERSION_KEY)
    raw = metadata.get(MX_KEY)
    if raw is None:
        return {}
    if version != FORMAT_VERSION:
        raise problem(f"microscale metadata version {version!r} is not supported (this microscale "
                      f"reads version {FORMAT_VERSION!r})")
    try:
        records = json.loads(raw)
    except ValueError as e:
        raise problem(f"metadata {MX_KEY!r} is not valid JSON: {e}") from None
    if not isinstance(records, dict):
        raise problem(f"metadata {MX_KEY!r} must be a JSON object, got {type(records).__name__}")
    out, owner = {}, {}
    for name, rec in records.items():
        if not isinstance(rec, dict) or not {"format", "shape", "axis"} <= set(rec):
            raise problem("microscale metadata must give format, shape and axis", name)
        if not isinstance(rec["format"], str):
            raise problem(f"format must be a name, got {rec['format']!r}", name)
        try:
            fmt = get_format(rec["format"])
        except ValueError as e:
            raise problem(f"{e}; register the format (microscale.register_format) before loading",
                          name) from None
        if fmt.element is None:
            raise problem(f"format {fmt.name!r} does not quantize", name)
        spec = rec.get("spec")
        if spec is not None:
            diff = _spec_diff(spec, format_spec(fmt))
            if diff:
                raise problem(f"format {fmt.name!r} in the file differs from the registered one ({diff})",
                              name)
        shape, axis = rec["shape"], rec["axis"]
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise problem(f"shape must be a list of non-negative integers, got {shape!r}", name)
        if not _is_int(axis):
            raise problem(f"axis must be an integer, got {axis!r}", name)
        try:
            want = mx_components(shape, axis, fmt)
        except ValueError as e:
            raise problem(f"bad shape/axis for {fmt.name}: {e}", name) from None
        comps = {}
        for suffix in COMPONENTS:
            stored = f"{name}.{suffix}"
            if stored in entries:
                if stored in owner:
                    raise problem(f"component {stored!r} is claimed by MX tensor {owner[stored]!r} too", name)
                owner[stored] = name
                comps[suffix] = stored
        for suffix in want:
            if suffix not in comps:
                raise problem(f"{fmt.name} tensor is missing its component {name + '.' + suffix!r}", name)
        for suffix, stored in comps.items():
            if suffix not in want:
                raise problem(f"{fmt.name} has no {suffix}, but the file stores {stored!r}", name)
            dtype, cshape = want[suffix]
            e = entries[stored]
            if e.dtype != dtype or e.shape != cshape:
                raise problem(f"{fmt.name} of shape {tuple(shape)} along axis {axis} needs {stored!r} to be "
                              f"{_DTYPE_NAMES[dtype]} {list(cshape)}, but the file stores "
                              f"{_DTYPE_NAMES[e.dtype]} {list(e.shape)}", name)
        out[name] = MXEntry(name, fmt, tuple(shape), axis, comps)
    return out


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return d


def read_header(path) -> FileHeader:
    """Parse and validate the header of the safetensors file at ``path`` (no tensor data is read)."""
    problem = _Problem(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise problem(f"truncated: the file is {size} bytes, too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise problem(f"header length {n} is larger than the {MAX_HEADER_BYTES}-byte limit "
                          f"(not a safetensors file?)")
        if 8 + n > size:
            raise problem(f"truncated: the header length says {n} bytes, but only {size - 8} follow")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise problem(f"the header is not valid JSON (corrupted or not a safetensors file): {e}") from None
    if not isinstance(header, dict):
        raise problem(f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise problem("__metadata__ must be an object of string -> string")
    entries = {name: _parse_entry(name, info, problem) for name, info in header.items()}
    _check_layout(entries, size - 8 - n, problem)
    mx = _parse_mx(metadata, entries, problem)
    return FileHeader(os.fspath(path), entries, metadata, mx, 8 + n)


def _read_tensor(f, header: FileHeader, entry: TensorEntry) -> torch.Tensor:
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    f.seek(header.data_start + entry.start)
    buf = bytearray(entry.nbytes)
    got = f.readinto(buf)
    if got != entry.nbytes:  # the file shrank after its header was checked
        raise _Problem(header.path)(f"truncated: expected {entry.nbytes} bytes of data, read {got}", entry.name)
    if sys.byteorder != "little" and entry.dtype.itemsize > 1:
        raise NotImplementedError("reading safetensors files on a big-endian machine")
    return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)


def _build_mx(f, header: FileHeader, mx: MXEntry) -> MXTensor:
    parts = {s: _read_tensor(f, header, header.entries[n]) for s, n in mx.components.items()}
    try:
        return MXTensor(parts["codes"], parts["scales"], mx.shape, mx.axis, mx.format,
                        parts.get("micro"), parts.get("tensor_scale"))
    except (TypeError, ValueError) as e:
        raise _Problem(header.path)(f"inconsistent MX tensor: {e}", mx.name) from None


def iter_file(path, header: FileHeader | None = None) -> Iterator[tuple[str, MXTensor | torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time (MXTensors assembled from their components), reading only
    that tensor's bytes: memory stays at one tensor. The header is validated first (see :func:`load_file`)."""
    header = header or read_header(path)
    with open(path, "rb") as f:
        for name in header.names():
            if name in header.mx:
                yield name, _build_mx(f, header, header.mx[name])
            else:
                yield name, _read_tensor(f, header, header.entries[name])


def load_file(path) -> dict[str, MXTensor | torch.Tensor]:
    """Load every tensor of a safetensors file: MXTensors (from microscale metadata) and plain tensors.

    Validates the whole header before reading data; any problem raises ValueError naming the file,
    the tensor and the problem. OSError (e.g. FileNotFoundError) passes through.
    """
    return dict(iter_file(path))

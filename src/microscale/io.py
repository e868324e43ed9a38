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

import contextlib
import dataclasses
import json
import math
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from .formats import BlockFormat, get_format
from .layout import normalize_axis
from .tensor import MXTensor, component_specs

__all__ = [
    "save_file",
    "load_file",
    "iter_file",
    "read_header",
    "SafetensorsReader",
    "FileHeader",
    "TensorEntry",
    "MXEntry",
    "SafetensorsWriter",
    "atomic_path",
    "MXSpec",
    "PlainSpec",
    "spec_of",
    "component_specs",
    "format_spec",
    "FORMAT_VERSION",
]

#: Version of the microscale metadata layout written into ``__metadata__``.
FORMAT_VERSION = "1"
VERSION_KEY = "microscale.version"
MX_KEY = "microscale.mx"
_RESERVED_PREFIX = "microscale."
#: MXTensor components; ``w``'s are stored as ``w.codes``, ``w.scales``, ...
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
#: BlockFormat fields that say how a tensor is quantized, not how its stored codes decode.
_NOT_DECODING = ("name", "scale_mode")


def _spec(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _spec(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.compare}
    return obj


def format_spec(fmt: BlockFormat) -> dict:
    """The facts needed to decode stored codes of ``fmt``: every compared field of the BlockFormat
    (element and scale formats in full) except its name and scale_mode."""
    return {k: v for k, v in _spec(fmt).items() if k not in _NOT_DECODING}


# ---- what will be stored --------------------------------------------------------------------------
@dataclass(frozen=True)
class PlainSpec:
    """A plain tensor to be written: its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class MXSpec:
    """An MXTensor to be written: format, shape and (non-negative) block axis."""

    format: BlockFormat
    shape: tuple[int, ...]
    axis: int

    def __post_init__(self):
        object.__setattr__(self, "format", get_format(self.format))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "axis", normalize_axis(self.axis, len(self.shape)))

    def components(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return component_specs(self.shape, self.axis, self.format)

    def record(self) -> dict:
        """The JSON record stored in the ``microscale.mx`` metadata."""
        return {"format": self.format.name, "shape": list(self.shape), "axis": self.axis,
                "spec": json.loads(json.dumps(format_spec(self.format), default=str))}


def spec_of(value: MXTensor | torch.Tensor) -> MXSpec | PlainSpec:
    """The spec of a tensor about to be saved."""
    if isinstance(value, MXTensor):
        return MXSpec(value.format, value.shape, value.axis)
    return PlainSpec(value.dtype, tuple(value.shape))


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
    """Streaming, atomic writer of MXTensors and plain tensors.

    Give every tensor's spec up front (name -> :class:`MXSpec` or :class:`PlainSpec`, in the order the
    header should list them); the header, with each stored tensor's byte range, is computed from them.
    Then :meth:`write` each tensor, in any order, one at a time: only that tensor is ever in memory.
    Use as a context manager: leaving the block normally after every tensor was written fsyncs the
    temporary file and moves it onto ``path`` (os.replace); an exception, or a tensor never written,
    removes the temporary file and leaves ``path`` untouched.

    Data is laid out largest itemsize first, as the safetensors library does, so each tensor starts
    aligned to its itemsize (the library's torch loader needs that).
    """

    def __init__(self, path, specs: Mapping[str, MXSpec | PlainSpec], metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        if not isinstance(specs, Mapping):
            raise TypeError(f"specs must be a dict of name -> MXSpec | PlainSpec, got {type(specs).__name__}")
        meta = _check_metadata(metadata)
        self.specs = dict(specs)
        stored: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        source: dict[str, str] = {}
        mx_records = {}
        for name, spec in self.specs.items():
            _check_name(name)
            if isinstance(spec, MXSpec):
                parts = {f"{name}.{sfx}": c for sfx, c in spec.components().items()}
                mx_records[name] = spec.record()
            elif isinstance(spec, PlainSpec):
                _dtype_name(spec.dtype, name)
                parts = {name: (spec.dtype, tuple(int(s) for s in spec.shape))}
            else:
                raise TypeError(f"tensor {name!r}: expected an MXSpec or PlainSpec, got {type(spec).__name__}")
            for sname, c in parts.items():
                if sname in stored:
                    raise ValueError(f"tensor {name!r} would be stored as {sname!r}, which clashes with "
                                     f"tensor {source[sname]!r}; rename one of them")
                stored[sname] = c
                source[sname] = name
        meta[VERSION_KEY] = FORMAT_VERSION
        if mx_records:
            meta[MX_KEY] = json.dumps(mx_records, separators=(",", ":"))

        itemsize = {n: torch.empty((), dtype=d).element_size() for n, (d, _) in stored.items()}
        offsets, pos = {}, 0
        for n in sorted(stored, key=lambda n: -itemsize[n]):  # stable: ties keep header order
            size = math.prod(stored[n][1]) * itemsize[n]
            offsets[n] = (pos, pos + size)
            pos += size
        header: dict = {"__metadata__": meta}
        for n, (dtype, shape) in stored.items():
            header[n] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": list(offsets[n])}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data section starts 8-byte aligned
        self._header = struct.pack("<Q", len(raw)) + raw
        self._stored = stored
        self._offsets = offsets
        self._pending = set(self.specs)
        self._file = None
        self._tmp = None
        #: bytes of tensor data the file will hold (header excluded)
        self.data_nbytes = pos

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

    def write(self, name: str, value: MXTensor | torch.Tensor) -> None:
        """Write tensor ``name``; it must match its spec (MX: same format, shape and axis)."""
        if self._file is None:
            raise RuntimeError("SafetensorsWriter.write outside its `with` block")
        if name not in self.specs:
            raise ValueError(f"{self.path}: tensor {name!r} is not in the planned header")
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} was already written")
        spec = self.specs[name]
        if isinstance(spec, MXSpec):
            if not isinstance(value, MXTensor):
                raise TypeError(f"tensor {name!r}: planned as an MXTensor, got {type(value).__name__}")
            value.validate()
            got = spec_of(value)
            if got != spec:
                raise ValueError(f"tensor {name!r}: planned {spec.format.name} {list(spec.shape)} axis "
                                 f"{spec.axis}, got {got.format.name} {list(got.shape)} axis {got.axis}")
            parts = {f"{name}.{sfx}": t for sfx, t in value.components().items()}
        else:
            if not isinstance(value, torch.Tensor) or isinstance(value, MXTensor):
                raise TypeError(f"tensor {name!r}: planned as a plain tensor, got {type(value).__name__}")
            parts = {name: value}
        for sname, t in parts.items():
            dtype, shape = self._stored[sname]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"tensor {sname!r}: planned {dtype} {list(shape)}, got {t.dtype} "
                                 f"{list(t.shape)}")
            if t.layout != torch.strided:
                raise TypeError(f"tensor {sname!r}: only dense tensors can be saved, got {t.layout}")
        for sname, t in parts.items():
            if not t.numel():
                continue
            if sys.byteorder != "little" and t.element_size() > 1:
                raise NotImplementedError("writing safetensors files on a big-endian machine")
            flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.seek(len(self._header) + self._offsets[sname][0])
            self._file.write(memoryview(flat.numpy()))
        self._pending.discard(name)

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
            if self._pending:
                missing = [n for n in self.specs if n in self._pending]
                raise ValueError(f"{self.path}: tensors never written: {', '.join(map(repr, missing))}")
            self._file.truncate(len(self._header) + self.data_nbytes)  # exact size even if the last is empty
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


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """A temporary path next to ``path`` for a writer that opens its file itself (e.g. gguf's GGUFWriter).

    Leaving the block normally fsyncs the temporary file and moves it onto ``path`` (os.replace), as
    :class:`SafetensorsWriter` does; an exception removes it and leaves ``path`` untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def save_file(tensors: Mapping[str, MXTensor | torch.Tensor], path, metadata: Mapping[str, str] | None = None
              ) -> None:
    """Save MXTensors and plain tensors to a safetensors file at ``path``, atomically.

    ``metadata``: extra str -> str entries for the header's ``__metadata__`` (keys starting with
    "microscale." are reserved). Raises TypeError/ValueError for bad input before touching the disk.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> MXTensor or torch.Tensor, "
                        f"got {type(tensors).__name__}")
    specs = {}
    for name, value in tensors.items():
        _check_name(name)
        if not isinstance(value, (MXTensor, torch.Tensor)):
            raise TypeError(f"tensor {name!r}: expected an MXTensor or a torch.Tensor, got {type(value).__name__}")
        if isinstance(value, MXTensor):
            value.validate()
        elif value.layout != torch.strided:
            raise TypeError(f"tensor {name!r}: only dense tensors can be saved, got layout {value.layout}")
        specs[name] = spec_of(value)
    with SafetensorsWriter(path, specs, metadata) as w:
        for name, value in tensors.items():
            w.write(name, value)


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
    for e in entries.values():
        if e.end > data_size:
            raise problem(f"data_offsets [{e.start}, {e.end}] run past the end of the data section "
                          f"({data_size} bytes): the file is truncated or the header lies", e.name)
    pos, prev = 0, None
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start < pos:
            raise problem(f"data_offsets [{e.start}, {e.end}] overlap tensor {prev!r}", e.name)
        if e.start > pos:
            raise problem(f"data_offsets [{e.start}, {e.end}] leave a gap of {e.start - pos} bytes "
                          f"after byte {pos}", e.name)
        pos, prev = e.end, e.name
    if pos != data_size:
        raise problem(f"the header describes {pos} bytes of tensor data, but the file holds {data_size} "
                      f"(trailing bytes)")


def _spec_diff(file_spec, registry_spec, prefix=""):
    """First field at which a stored format spec differs from the registry's (for error messages).

    Only fields the file records are compared: a field added to BlockFormat after the file was written
    took its default then."""
    if isinstance(file_spec, dict) and isinstance(registry_spec, dict):
        for k in file_spec:
            d = _spec_diff(file_spec[k], registry_spec.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    if file_spec == registry_spec:
        return None
    return f"{prefix[:-1]}: file has {file_spec!r}, registry has {registry_spec!r}"


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
        if name in entries:
            raise problem("a stored tensor has the same name as this MX tensor", name)
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
            registered = json.loads(json.dumps(format_spec(fmt), default=str))  # as it would be stored
            diff = _spec_diff(spec, registered)
            if diff:
                raise problem(f"format {fmt.name!r} in the file differs from the registered one ({diff})",
                              name)
        shape, axis = rec["shape"], rec["axis"]
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise problem(f"shape must be a list of non-negative integers, got {shape!r}", name)
        if not _is_int(axis):
            raise problem(f"axis must be an integer, got {axis!r}", name)
        try:
            want = component_specs(shape, axis, fmt)
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


class SafetensorsReader:
    """Random access to the tensors of a validated safetensors file, one tensor at a time.

    ``with SafetensorsReader(path) as r: r.get("w")`` reads only the bytes of ``w`` (all components of
    an MXTensor). The header is validated on opening (see :func:`read_header`).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.header = read_header(path)
        self._file = open(path, "rb")

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def names(self) -> list[str]:
        """Logical tensor names in header order (an MXTensor once, by its own name)."""
        return self.header.names()

    def get_stored(self, name: str) -> torch.Tensor:
        """One stored tensor as saved (for an MXTensor ``w``: ``w.codes``, ``w.scales``, ...)."""
        entry = self.header.entries.get(name)
        if entry is None:
            raise KeyError(f"{self.path}: no stored tensor {name!r}")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        self._file.seek(self.header.data_start + entry.start)
        buf = bytearray(entry.nbytes)
        got = self._file.readinto(buf)
        if got != entry.nbytes:  # the file shrank after its header was checked
            raise _Problem(self.path)(f"truncated: expected {entry.nbytes} bytes of data, read {got}", name)
        if sys.byteorder != "little" and entry.dtype.itemsize > 1:
            raise NotImplementedError("reading safetensors files on a big-endian machine")
        return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)

    def get(self, name: str) -> MXTensor | torch.Tensor:
        """The tensor called ``name``: an MXTensor when the metadata says so, else a plain tensor."""
        mx = self.header.mx.get(name)
        if mx is None:
            return self.get_stored(name)
        parts = {suffix: self.get_stored(stored) for suffix, stored in mx.components.items()}
        try:
            return MXTensor(parts["codes"], parts["scales"], mx.shape, mx.axis, mx.format,
                            parts.get("micro"), parts.get("tensor_scale"))
        except (TypeError, ValueError) as e:
            raise _Problem(self.path)(f"inconsistent MX tensor: {e}", name) from None


def iter_file(path) -> Iterator[tuple[str, MXTensor | torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time in file order, reading only that tensor's bytes, so memory
    stays at about one tensor. The header is validated first (see :func:`load_file`)."""
    with SafetensorsReader(path) as r:
        for name in r.names():
            yield name, r.get(name)


def load_file(path) -> dict[str, MXTensor | torch.Tensor]:
    """Load every tensor of a safetensors file: MXTensors (from microscale metadata) and plain tensors.

    Validates the whole header before reading data; any problem raises ValueError naming the file,
    the tensor and the problem. OSError (e.g. FileNotFoundError) passes through.
    """
    return dict(iter_file(path))

"""Safetensors files of MXTensors and plain tensors, with format metadata and checksums. Never unpickles.

A file written here is an ordinary safetensors file (https://github.com/huggingface/safetensors,
"Format"): an 8-byte little-endian header length N, N bytes of JSON header, then the tensor bytes.
The plain ``safetensors`` library opens it. Each MXTensor named ``w`` is stored as its components:

    w.codes          U8   [n]          packed element codes (packing.py)
    w.scales         U8   [n_blocks]   (F32 for formats with FP32 scales)
    w.micro          U8   [m]          packed microexponents (two-level formats only)
    w.tensor_scale   F32  []           per-tensor scale (formats with one only)

and the header's ``__metadata__`` (a str -> str map) holds

    "microscale.version":   "1"
    "microscale.mx":        JSON {"w": {"format": name, "shape": [...], "axis": int, "spec": {...}}, ...}
    "microscale.checksums": JSON {"algorithm": "crc32c", "header": "8 hex digits",
                                  "tensors": {"w.codes": "8 hex digits", ...}}

``spec`` is the decoding-relevant part of the BlockFormat (element, block sizes, scale formats). On
load the format is looked up by name in the registry; version-1 files must carry the full spec and it
must equal the registered one (decoding with a different format would give a silently wrong tensor).
Plain tensors are stored as themselves; the ``F8_E8M0`` and ``F4`` dtypes (torch.float8_e8m0fnu and
torch.float4_e2m1fn_x2, whose header shape counts 4-bit elements) are read and written like the
safetensors library does. docs/io.md describes the format and the guarantees.

Integrity (``microscale.checksums``): every stored tensor's data bytes have a CRC-32C (Castagnoli,
RFC 3720 §B.4; zlib's CRC-32 ``"crc32"`` where the ``crc32c`` package is missing), and the header has
one over its canonical JSON (sorted keys, no spaces, ASCII; the checksums entry left out), so a flipped
dtype, shape or name is caught as well as a flipped data byte. :func:`load_file` verifies both by
default (``verify=False`` skips) and names the tensor that fails. Files without the entry (older
microscale, other writers) load unverified.

Loading parses and validates the header itself before reading any tensor data: header length against
file size, JSON (duplicate keys at every level; nesting that exhausts the recursion limit), dtype names, shapes (every dimension and the product
within int64), ``data_offsets`` (size == numel * itemsize, contiguous, no overlap, ending exactly at the
end of the file), the microscale metadata, and every MXTensor's component sizes (MXTensor.validate);
an MXTensor's padding codes must be zero. Every problem raises ValueError naming the file, the tensor
and the problem. Only regular files are read (a FIFO or device is refused without blocking).

Writing is streaming and atomic (:class:`SafetensorsWriter`): the header is computed ahead from the
names, dtypes and shapes of all tensors, then tensor data is written one tensor at a time to a
temporary file ``.<name>.<pid>-<random>.tmp`` next to the target, the checksums are filled into the
header (fixed width, so it keeps its size), the file is fsynced and moved into place with os.replace.
On any exception the temporary file is removed and ``path`` is untouched. A temporary file of the same
target left by a killed process (its pid no longer running on this machine) is removed by the next save
to that target. When ``path`` is a symbolic link the file it points to is replaced and the link stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import re
import secrets
import stat
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from .formats import BlockFormat, ElementFormat, ScaleFormat, get_format
from .layout import normalize_axis
from .packing import unpack_codes
from .tensor import COMPONENTS, MAX_DIM, MXTensor, check_shape, component_specs

__all__ = [
    "save_file",
    "load_file",
    "load_bytes",
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
    "format_from_spec",
    "verify_file",
    "sweep_stale_temp_files",
    "CHECKSUMS",
    "CHECKSUM_ALGORITHM",
    "FORMAT_VERSION",
]

#: Version of the microscale metadata layout written into ``__metadata__``.
FORMAT_VERSION = "1"
VERSION_KEY = "microscale.version"
MX_KEY = "microscale.mx"
CHECKSUMS_KEY = "microscale.checksums"
_KNOWN_KEYS = (VERSION_KEY, MX_KEY, CHECKSUMS_KEY)
_RESERVED_PREFIX = "microscale."
#: Largest header accepted (the safetensors library's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


def _crc32c():
    try:
        import crc32c
    except ImportError:
        return None
    return crc32c.crc32c


#: Checksum functions by the name files record: f(bytes-like, running value) -> running value.
CHECKSUMS = {"crc32": zlib.crc32}
if _crc32c() is not None:
    CHECKSUMS["crc32c"] = _crc32c()
#: What save_file writes: CRC-32C (hardware-accelerated, ~10 GB/s) when the crc32c package is there.
CHECKSUM_ALGORITHM = "crc32c" if "crc32c" in CHECKSUMS else "crc32"

# safetensors dtype names <-> torch dtypes (the ones the safetensors torch loader knows).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
#: safetensors "F4" counts 4-bit elements; torch's float4_e2m1fn_x2 holds two per element (last axis).
_X2 = torch.float4_e2m1fn_x2


def _file_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> list[int]:
    """The header shape of a torch tensor (F4: the last dimension counts 4-bit elements)."""
    return list(shape[:-1]) + [2 * shape[-1]] if dtype == _X2 else list(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * _itemsize(dtype)


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
    checksums: "Checksums | None" = None     # the microscale.checksums entry, None when absent

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
#: BlockFormat fields that do not say how its stored codes decode (the name is stored next to the spec).
_NOT_DECODING = ("name",)


def _spec(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _spec(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.compare}
    return obj


@functools.lru_cache(maxsize=256)
def _stored_spec_json(fmt: BlockFormat) -> str:
    return json.dumps(format_spec(fmt), default=str)


def _stored_spec(fmt: BlockFormat) -> dict:
    """format_spec(fmt) as it reads back from a file (JSON types)."""
    return json.loads(_stored_spec_json(fmt))


def format_spec(fmt: BlockFormat) -> dict:
    """The facts needed to decode stored codes of ``fmt``: every compared field of the BlockFormat
    (element and scale formats in full) except its name. (How values were rounded into the format, the
    rounding and scale rule of a QuantSpec, is not needed to decode them and is not stored.)"""
    return {k: v for k, v in _spec(fmt).items() if k not in _NOT_DECODING}


def _build(cls, spec, what: str, **given):
    """An instance of dataclass ``cls`` from its stored spec: exactly the compared fields (minus those
    ``given`` as keyword arguments), scalars as JSON strings / integers / null, nested element and scale formats built alike."""
    if not isinstance(spec, dict):
        raise ValueError(f"{what} must be an object, got {spec!r:.60}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.compare and f.name not in given}
    if set(spec) != set(fields):
        raise ValueError(f"{what} must give exactly the fields {sorted(fields)}, got {sorted(spec)}")
    kwargs = dict(given)
    for name, value in spec.items():
        if name == "element" and value is not None:
            value = _build(ElementFormat, value, f"{what}.{name}")
        elif name in ("scale", "tensor_scale") and value is not None:
            value = _build(ScaleFormat, value, f"{what}.{name}")
        elif value is not None and (type(value) not in (int, str) or (type(value) is int and abs(value) > 1 << 20)):
            raise ValueError(f"{what}.{name} must be a string or a small integer, got {value!r:.60}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ValueError(f"{what} is not a valid {cls.__name__}: {e}") from None


def format_from_spec(name: str, spec: dict) -> BlockFormat:
    """The BlockFormat called ``name`` whose :func:`format_spec` is ``spec`` (so a file can hold formats
    that are not registered, e.g. from ``bdr_format``). ValueError when the spec is not a valid format, or
    when ``name`` is registered with a different spec (a file cannot redefine a registered name)."""
    try:
        known = get_format(name)
    except ValueError:
        known = None
    if known is not None:
        diff = _spec_diff(spec, _stored_spec(known))
        if diff:
            raise ValueError(f"format {known.name!r} in the file differs from the registered one ({diff})")
        return known
    fmt = _build(BlockFormat, spec, "spec", name=name)
    diff = _spec_diff(spec, _stored_spec(fmt))
    if diff:  # e.g. a value of the wrong JSON type that the constructor accepted
        raise ValueError(f"spec does not describe a format exactly ({diff})")
    return fmt


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


def _dtype_name(dtype: torch.dtype, name: str, shape=None) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in a safetensors file "
                        f"(supported: {', '.join(str(d) for d in _DTYPE_NAMES)})")
    if dtype == _X2 and shape is not None and len(shape) == 0:
        raise ValueError(f"tensor {name!r}: a 0-d {dtype} tensor has no F4 shape in safetensors (F4 counts "
                         f"4-bit elements along the last axis); give it at least one dimension")
    return _DTYPE_NAMES[dtype]


def _canonical(obj) -> bytes:
    """The bytes a header checksum covers: sorted keys, no spaces, ASCII-escaped."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def _header_checksum(header: dict, algorithm: str) -> str:
    """Checksum of a parsed header (``__metadata__`` included) without its checksums entry."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != CHECKSUMS_KEY}
    rest = {k: v for k, v in header.items() if k != "__metadata__"}
    return _hex(CHECKSUMS[algorithm](_canonical({"__metadata__": meta, **rest}), 0))


# ---- temporary files: naming, sweeping stale ones ---------------------------------------------------
def _temp_name(target: str) -> str:
    d, base = os.path.split(target)
    return os.path.join(d, f".{base}.{os.getpid()}-{secrets.token_hex(8)}.tmp")


#: Temporary files of the writer in microscale <= 0.1 (tempfile.mkstemp; no pid in the name).
_LEGACY_TEMP_AGE_S = 3600


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process / not a pid: leave it alone
        return True
    except OSError:
        return True
    return True


def sweep_stale_temp_files(target) -> list[str]:
    """Remove temporary files that an earlier save to ``target`` left behind when it was killed.

    A temporary file is ``.<name>.<pid>-<16 hex>.tmp`` next to the target; it is stale when no process
    with that pid runs on this machine. Files of the older ``.<name>.<8 chars>.tmp`` form (no pid) are
    stale once unmodified for an hour. Returns the paths removed. Called by every save."""
    d, base = os.path.split(os.path.abspath(os.fspath(target)))
    pat = re.compile(r"\." + re.escape(base) + r"\.(?:(\d{1,10})-[0-9a-f]{16}|([a-z0-9_]{8}))\.tmp\Z")
    removed = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    now = time.time()
    for n in names:
        m = pat.match(n)
        if m is None:
            continue
        full = os.path.join(d, n)
        try:
            st_ = os.lstat(full)
            if not stat.S_ISREG(st_.st_mode):
                continue
            stale = (not _pid_running(int(m.group(1))) if m.group(1) is not None
                     else now - st_.st_mtime > _LEGACY_TEMP_AGE_S)
            if stale:
                os.unlink(full)
                removed.append(full)
        except OSError:
            continue
    return removed


def _resolve_target(path: str) -> str:
    """The file a save to ``path`` replaces: the end of a chain of symbolic links (the links stay)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _user_path_error(e: OSError, path: str, what: str) -> OSError:
    """The same kind of OSError, about the user's ``path`` rather than a temporary file's name."""
    if e.errno is None:
        return e
    return OSError(e.errno, f"cannot {what} {path}: {e.strerror or e}", path)


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
                shape = check_shape(spec.shape)
                _dtype_name(spec.dtype, name, shape)
                parts = {name: (spec.dtype, shape)}
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

        itemsize = {n: _itemsize(d) for n, (d, _) in stored.items()}
        offsets, pos = {}, 0
        for n in sorted(stored, key=lambda n: -itemsize[n]):  # stable: ties keep header order
            size = math.prod(stored[n][1]) * itemsize[n]
            offsets[n] = (pos, pos + size)
            pos += size
        header: dict = {"__metadata__": meta}
        for n, (dtype, shape) in stored.items():
            header[n] = {"dtype": _DTYPE_NAMES[dtype], "shape": _file_shape(dtype, shape),
                         "data_offsets": list(offsets[n])}
        self._algorithm = CHECKSUM_ALGORITHM
        self._header_dict = header
        self._header_crc = _header_checksum(header, self._algorithm)
        self._crcs = {n: 0 for n in stored}
        self._header = self._render()  # zero checksums for now; the same length once they are filled in
        self._stored = stored
        self._offsets = offsets
        self._pending = set(self.specs)
        self._file = None
        self._tmp = None
        self._target = None
        #: bytes of tensor data the file will hold (header excluded)
        self.data_nbytes = pos

    def _render(self) -> bytes:
        """The header bytes with the current checksums (each 8 hex digits: the length never changes)."""
        meta = dict(self._header_dict["__metadata__"])
        meta[CHECKSUMS_KEY] = json.dumps({"algorithm": self._algorithm, "header": self._header_crc,
                                          "tensors": {n: _hex(c) for n, c in self._crcs.items()}},
                                         separators=(",", ":"))
        raw = json.dumps({**self._header_dict, "__metadata__": meta}, separators=(",", ":"),
                         ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data section starts 8-byte aligned
        return struct.pack("<Q", len(raw)) + raw

    def __enter__(self) -> "SafetensorsWriter":
        self._target = _resolve_target(self.path)
        sweep_stale_temp_files(self._target)
        tmp = _temp_name(os.path.abspath(self._target))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except OSError as e:
            raise _user_path_error(e, self.path, "write") from None
        self._tmp = tmp
        try:
            self._file = os.fdopen(fd, "wb")
            self._file.write(self._header)
        except OSError as e:
            self._abort()
            raise _user_path_error(e, self.path, "write") from None
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
            if value.device.type == "meta":
                raise ValueError(f"tensor {name!r} is on the meta device: it has no data to save")
            why = _padding_problem(value)
            if why is not None:
                raise ValueError(f"tensor {name!r}: {why} (it would not load back)")
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
            if t.device.type == "meta":
                raise ValueError(f"tensor {sname!r} is on the meta device: it has no data to save")
            flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            data = memoryview(flat.numpy())
            self._file.seek(len(self._header) + self._offsets[sname][0])
            self._file.write(data)
            self._crcs[sname] = CHECKSUMS[self._algorithm](data, 0)
        self._pending.discard(name)

    def _abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
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
            final = self._render()
            if len(final) != len(self._header):  # cannot happen: fixed-width checksums
                raise RuntimeError("header changed size when its checksums were filled in")
            self._file.seek(0)
            self._file.write(final)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            try:
                os.replace(self._tmp, self._target)
            except OSError as e:
                raise _user_path_error(e, self.path, "replace") from None
            self._tmp = None
        except BaseException:
            self._abort()
            raise
        _fsync_dir(os.path.dirname(os.path.abspath(self._target)))


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

    Same rules as :class:`SafetensorsWriter`: stale temporary files of the target are swept first, a
    symbolic link at ``path`` is written through (the link stays), leaving the block normally fsyncs the
    temporary file and moves it onto the target (os.replace), and an exception removes it and leaves
    ``path`` untouched. OSErrors name ``path``, not the temporary file.
    """
    user_path = os.fspath(path)
    target = _resolve_target(user_path)
    sweep_stale_temp_files(target)
    tmp = _temp_name(os.path.abspath(target))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    except OSError as e:
        raise _user_path_error(e, user_path, "write") from None
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(target)))


def save_file(tensors: Mapping[str, MXTensor | torch.Tensor], path, metadata: Mapping[str, str] | None = None
              ) -> None:
    """Save MXTensors and plain tensors to a safetensors file at ``path``, atomically, with a CRC-32C
    of every stored tensor and of the header (see the module docstring and docs/io.md).

    ``metadata``: extra str -> str entries for the header's ``__metadata__`` (keys starting with
    "microscale." are reserved). Raises TypeError/ValueError for bad input before touching the disk.
    Removes stale temporary files of the same target left by killed saves; writes through a symbolic
    link at ``path``; OSErrors name ``path``.
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
        if value.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: it has no data to save")
        specs[name] = spec_of(value)
    with SafetensorsWriter(path, specs, metadata) as w:
        for name, value in tensors.items():
            w.write(name, value)


# ---- reading --------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bounded_shape(shape, problem: "_Problem", name: str) -> tuple[int, ...]:
    """A header shape: a list of non-negative ints, each and the product within int64 (zeros included)."""
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise problem(f"shape must be a list of non-negative integers, got {shape!r}", name)
    try:
        return check_shape(shape)
    except ValueError as e:
        raise problem(str(e), name) from None


def _parse_entry(name: str, info, problem: _Problem) -> TensorEntry:
    if not isinstance(info, dict):
        raise problem(f"header entry must be an object, got {type(info).__name__}", name)
    if set(info) != {"dtype", "shape", "data_offsets"}:
        raise problem(f"header entry must have exactly the keys dtype, shape, data_offsets; got "
                      f"{sorted(info)}", name)
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise problem(f"unsupported dtype {info['dtype']!r} (known: {', '.join(_DTYPES)})", name)
    shape = _bounded_shape(info["shape"], problem, name)
    offs = info["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1] <= MAX_DIM):
        raise problem(f"data_offsets must be [start, end] with 0 <= start <= end < 2^63, got {offs!r}", name)
    if dtype == _X2:  # F4: 4-bit elements, two per byte along the last axis
        if not shape or shape[-1] % 2:
            raise problem(f"F4 shape must have an even last dimension (two 4-bit elements per byte), "
                          f"got {list(shape)}", name)
        shape = shape[:-1] + (shape[-1] // 2,)
    want = _nbytes(dtype, shape)
    if offs[1] - offs[0] != want:
        raise problem(f"data_offsets {offs} span {offs[1] - offs[0]} bytes, but {info['dtype']} "
                      f"{info['shape']} needs {want}", name)
    return TensorEntry(name, dtype, shape, offs[0], offs[1])


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
    """First field at which a stored format spec differs from the registry's (for error messages):
    a value, a missing field or an extra field."""
    if isinstance(file_spec, dict) and isinstance(registry_spec, dict):
        for k in registry_spec:
            if k not in file_spec:
                return f"{prefix}{k}: missing in the file, registry has {registry_spec[k]!r}"
        for k in file_spec:
            if k not in registry_spec:
                return f"{prefix}{k}: file has {file_spec[k]!r}, the registry has no such field"
            d = _spec_diff(file_spec[k], registry_spec[k], f"{prefix}{k}.")
            if d:
                return d
        return None
    if type(file_spec) is type(registry_spec) and file_spec == registry_spec:
        return None
    return f"{prefix[:-1] or 'spec'}: file has {file_spec!r}, registry has {registry_spec!r}"


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return d


def _loads(text: str, what: str, problem: "_Problem", tensor: str | None = None):
    """json.loads that rejects duplicate keys, and turns every failure into ValueError (RecursionError
    included: JSON nested deeper than the interpreter's recursion limit)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise problem(f"{what} nests JSON too deep (corrupted or hostile)", tensor) from None
    except (ValueError, TypeError) as e:
        raise problem(f"{what} is not valid JSON: {e}", tensor) from None


def _parse_mx(metadata: dict[str, str], entries: dict[str, TensorEntry], problem: _Problem) -> dict[str, MXEntry]:
    version = metadata.get(VERSION_KEY)
    raw = metadata.get(MX_KEY)
    if raw is None:
        return {}
    if version != FORMAT_VERSION:
        raise problem(f"microscale metadata version {version!r} is not supported (this microscale "
                      f"reads version {FORMAT_VERSION!r})")
    records = _loads(raw, f"metadata {MX_KEY!r}", problem)
    if not isinstance(records, dict):
        raise problem(f"metadata {MX_KEY!r} must be a JSON object, got {type(records).__name__}")
    out, owner = {}, {}
    for name, rec in records.items():
        if not isinstance(rec, dict) or set(rec) != {"format", "shape", "axis", "spec"}:
            got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise problem(f"microscale metadata must give exactly format, shape, axis and spec; got {got}", name)
        if name in entries:
            raise problem("a stored tensor has the same name as this MX tensor", name)
        if not isinstance(rec["format"], str):
            raise problem(f"format must be a name, got {rec['format']!r}", name)
        if not isinstance(rec["spec"], dict):
            raise problem(f"spec must be the format's full spec (an object), got {rec['spec']!r:.60}", name)
        try:  # a registered name must match its registry entry; any other name is built from its spec
            fmt = format_from_spec(rec["format"], rec["spec"])
        except ValueError as e:
            raise problem(str(e), name) from None
        if fmt.element is None:
            raise problem(f"format {fmt.name!r} does not quantize", name)
        shape, axis = rec["shape"], rec["axis"]
        shape = _bounded_shape(shape, problem, name)
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
                              f"{_DTYPE_NAMES[e.dtype]} {_file_shape(e.dtype, e.shape)}", name)
        out[name] = MXEntry(name, fmt, shape, normalize_axis(axis, len(shape)), comps)
    return out


@dataclass(frozen=True)
class Checksums:
    """The ``microscale.checksums`` entry: algorithm, the header's checksum, each stored tensor's."""

    algorithm: str
    header: str
    tensors: dict[str, str]


def _parse_checksums(metadata: dict[str, str], entries: dict[str, TensorEntry], problem: _Problem,
                     verify: bool = True) -> Checksums | None:
    raw = metadata.get(CHECKSUMS_KEY)
    if raw is None:
        return None
    rec = _loads(raw, f"metadata {CHECKSUMS_KEY!r}", problem)
    if not isinstance(rec, dict) or set(rec) != {"algorithm", "header", "tensors"}:
        raise problem(f"metadata {CHECKSUMS_KEY!r} must be an object with algorithm, header and tensors")
    algorithm, header, tensors = rec["algorithm"], rec["header"], rec["tensors"]
    if algorithm not in ("crc32c", "crc32"):
        raise problem(f"unknown checksum algorithm {algorithm!r} (known: crc32c, crc32)")
    if verify and algorithm not in CHECKSUMS:
        raise problem(f"the file's checksums are {algorithm}, which needs the 'crc32c' package "
                      f"(pip install crc32c), or load with verify=False")
    hex8 = re.compile(r"[0-9a-f]{8}\Z")
    if not isinstance(header, str) or not hex8.match(header):
        raise problem(f"header checksum must be 8 hex digits, got {header!r}")
    if not isinstance(tensors, dict) or set(tensors) != set(entries):
        raise problem(f"metadata {CHECKSUMS_KEY!r} must give a checksum for every stored tensor")
    for n, v in tensors.items():
        if not isinstance(v, str) or not hex8.match(v):
            raise problem(f"checksum must be 8 hex digits, got {v!r}", n)
    return Checksums(algorithm, header, dict(tensors))


def _open_regular(path):
    """Open ``path`` for reading, refusing anything but a regular file without blocking on it (a FIFO
    opened normally would wait for a writer forever)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or
                    stat.S_ISBLK(mode) else "not a regular file")
            raise _Problem(path)(f"is {kind}; only regular files are read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_header(path, verify: bool = True) -> FileHeader:
    """Parse and validate the header of the safetensors file at ``path`` (no tensor data is read).

    ``verify``: check the header checksum when the file has one (see the module docstring)."""
    with _open_regular(path) as f:
        return _read_header(f, path, verify, os.fstat(f.fileno()).st_size)


def _read_header(f, path, verify: bool, size: int) -> FileHeader:
    problem = _Problem(path)
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
    if len(raw) != n:
        raise problem(f"truncated: expected {n} header bytes, read {len(raw)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise problem(f"the header is not valid JSON (corrupted or not a safetensors file): {e}") from None
    header = _loads(text, "the header", problem)
    if not isinstance(header, dict):
        raise problem(f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise problem(f"__metadata__ must be an object of string -> string, got "
                      f"{type(metadata).__name__ if not isinstance(metadata, dict) else 'other values'}")
    unknown = sorted(k for k in metadata if k.startswith(_RESERVED_PREFIX) and k not in _KNOWN_KEYS)
    if unknown:
        raise problem(f"unknown microscale metadata key {unknown[0]!r} (known: {', '.join(_KNOWN_KEYS)}); "
                      f"the {_RESERVED_PREFIX!r} namespace is reserved")
    entries = {name: _parse_entry(name, info, problem) for name, info in header.items() if name != "__metadata__"}
    _check_layout(entries, size - 8 - n, problem)
    mx = _parse_mx(metadata, entries, problem)
    checksums = _parse_checksums(metadata, entries, problem, verify)
    if verify and checksums is not None:  # last, so that structural problems get their own message
        got = _header_checksum(header, checksums.algorithm)
        if got != checksums.header:
            raise problem(f"header checksum mismatch: stored {checksums.algorithm} {checksums.header}, "
                          f"computed {got} (the header is corrupted)")
    return FileHeader(os.fspath(path), entries, dict(metadata), mx, 8 + n, checksums)


def _padding_problem(q: MXTensor) -> str | None:
    """Why ``q``'s padding is not all zero, or None: the element codes past each vector's end in its
    last block, and the unused high bits of the last byte of the packed codes and microexponents."""
    fmt, lay = q.format, q.layout
    bits = fmt.element.bits
    parts = [("codes", q.codes, lay.n_elements_padded * bits)]
    if q.micro is not None:
        parts.append(("micro", q.micro, lay.n_blocks * (lay.block_size // fmt.subblock_size) * fmt.micro_bits))
    for name, t, used_bits in parts:
        if used_bits % 8 and t.numel() and int(t[-1]) >> (used_bits % 8):
            return f"the unused high bits of the last byte of {name} must be zero, got {int(t[-1]):#04x}"
    live = lay.axis_len % lay.block_size
    if live == 0 or lay.n_blocks == 0:
        return None
    k, bpv = lay.block_size, lay.blocks_per_vector
    last = torch.arange(bpv - 1, lay.n_blocks, bpv)                       # each vector's last block
    if (k * bits) % 8 == 0:                                                # whole bytes per block: slice them
        per = k * bits // 8
        blocks = q.codes.reshape(lay.n_blocks, per)[last]
        codes = unpack_codes(blocks.reshape(-1), bits, last.numel() * k).reshape(-1, k)
    else:
        codes = unpack_codes(q.codes, bits, lay.n_elements_padded).reshape(lay.n_blocks, k)[last]
    pad = codes[:, live:]
    if bool((pad != 0).any()):
        i = int((pad != 0).any(dim=1).nonzero()[0])
        return (f"padding codes must be zero: vector {i}'s last block holds nonzero codes past the "
                f"{lay.axis_len} real elements")
    return None


#: Bytes read (and checksummed) at a time: small enough to stay in the CPU cache between the two.
_READ_CHUNK = 1 << 20
#: Tensors at least this large are read and checksummed in a pipeline (two threads).
_PIPELINE_MIN = 8 << 20


class SafetensorsReader:
    """Random access to the tensors of a validated safetensors file, one tensor at a time.

    ``with SafetensorsReader(path) as r: r.get("w")`` reads only the bytes of ``w`` (all components of
    an MXTensor). The header is validated on opening (see :func:`read_header`); ``verify`` checks the
    header's and each tensor's checksums (when the file has them) as they are read.
    """

    def __init__(self, path, verify: bool = True, *, data: bytes | None = None):
        self.path = os.fspath(path)
        self.verify = verify
        self._file = _open_regular(path) if data is None else io.BytesIO(data)
        try:
            size = len(data) if data is not None else os.fstat(self._file.fileno()).st_size
            self.header = _read_header(self._file, self.path, verify, size)
        except BaseException:
            self._file.close()
            raise

    @classmethod
    def from_bytes(cls, data: bytes, verify: bool = True, name: str = "<bytes>") -> "SafetensorsReader":
        """A reader of a whole file held in memory (errors name it ``name``)."""
        return cls(name, verify, data=bytes(data))

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def names(self) -> list[str]:
        """Logical tensor names in header order (an MXTensor once, by its own name)."""
        return self.header.names()

    def _owner(self, stored: str) -> str:
        for e in self.header.mx.values():
            if stored in e.components.values():
                return e.name
        return stored

    def read_bytes(self, stored: str, start: int = 0, nbytes: int | None = None) -> bytearray:
        """``nbytes`` bytes (default: to the end) of stored tensor ``stored``'s data from byte ``start``.
        Not checksummed (see :meth:`get_stored` and :func:`verify_file`)."""
        entry = self.header.entries.get(stored)
        if entry is None:
            raise KeyError(f"{self.path}: no stored tensor {stored!r}")
        if nbytes is None:
            nbytes = entry.nbytes - start
        if not 0 <= start <= start + nbytes <= entry.nbytes:
            raise ValueError(f"{self.path}: bytes [{start}, {start + nbytes}) are outside tensor {stored!r} "
                             f"({entry.nbytes} bytes)")
        buf = bytearray(nbytes)
        if nbytes:
            self._file.seek(self.header.data_start + entry.start + start)
            got = self._file.readinto(buf)
            if got != nbytes:  # the file shrank after its header was checked
                raise _Problem(self.path)(f"truncated: expected {nbytes} bytes of data, read {got}",
                                          self._owner(stored))
        return buf

    def checksum_mismatch(self, stored: str, value: int) -> ValueError | None:
        """The error for stored tensor ``stored`` whose data has checksum ``value``, or None if it matches
        (or the file has no checksums)."""
        sums = self.header.checksums
        if sums is None:
            return None
        want = sums.tensors[stored]
        if _hex(value) == want:
            return None
        owner = self._owner(stored)
        part = "" if owner == stored else f"component {stored!r}: "
        return _Problem(self.path)(f"{part}checksum mismatch: stored {sums.algorithm} {want}, computed "
                                   f"{_hex(value)} (the data is corrupted)", owner)

    def iter_chunks(self, stored: str, chunks) -> Iterator[bytearray]:
        """The data of stored tensor ``stored`` in consecutive pieces: ``chunks`` is a piece size in bytes,
        or an iterable of piece sizes that add up to the tensor's size. With ``verify`` the checksum is
        computed along the way and a mismatch raises ValueError after the last piece (a consumer that
        acts on the data should hold its verdict until then)."""
        entry = self.header.entries.get(stored)
        if entry is None:
            raise KeyError(f"{self.path}: no stored tensor {stored!r}")
        if isinstance(chunks, int):
            if chunks <= 0:
                raise ValueError(f"chunk size must be positive, got {chunks}")
            step = chunks
            chunks = (min(step, entry.nbytes - a) for a in range(0, entry.nbytes, step))
        sums = self.header.checksums if self.verify else None
        crc = CHECKSUMS[sums.algorithm] if sums is not None else None
        pos, value = 0, 0
        for n in chunks:
            buf = self.read_bytes(stored, pos, n)
            pos += n
            if crc is not None:
                value = crc(buf, value)
            yield buf
        if pos != entry.nbytes:
            raise ValueError(f"{self.path}: read {pos} of the {entry.nbytes} bytes of {stored!r}")
        if sums is not None:
            err = self.checksum_mismatch(stored, value)
            if err is not None:
                raise err

    def _read_checksummed(self, entry: TensorEntry, crc) -> tuple[bytearray, int]:
        """Read ``entry``'s bytes piece by piece and checksum each piece while it is still in the CPU
        cache; for large tensors a worker thread checksums piece k while piece k + 1 is read (both
        release the GIL), which hides most of the checksum's cost."""
        n = entry.nbytes
        buf = bytearray(n)
        view, value = memoryview(buf), [0]

        def step(piece):
            value[0] = crc(piece, value[0])

        pool = ThreadPoolExecutor(1) if n >= _PIPELINE_MIN else None  # per call: safe across fork()
        try:
            futures = []
            self._file.seek(self.header.data_start + entry.start)
            for a in range(0, n, _READ_CHUNK):
                piece = view[a:a + _READ_CHUNK]
                got = self._file.readinto(piece)
                if got != len(piece):  # the file shrank after its header was checked
                    raise _Problem(self.path)(f"truncated: expected {n} bytes of data, read {a + got}",
                                              self._owner(entry.name))
                if pool is None:
                    step(piece)
                else:
                    futures.append(pool.submit(step, piece))  # one worker: in order
            for f in futures:
                f.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        return buf, value[0]

    def get_stored(self, name: str) -> torch.Tensor:
        """One stored tensor as saved (for an MXTensor ``w``: ``w.codes``, ``w.scales``, ...)."""
        entry = self.header.entries.get(name)
        if entry is None:
            raise KeyError(f"{self.path}: no stored tensor {name!r}")
        sums = self.header.checksums if self.verify else None
        if sums is None:
            buf = self.read_bytes(name)
        else:
            buf, value = self._read_checksummed(entry, CHECKSUMS[sums.algorithm])
            err = self.checksum_mismatch(name, value)
            if err is not None:
                raise err
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if sys.byteorder != "little" and _itemsize(entry.dtype) > 1:
            raise NotImplementedError("reading safetensors files on a big-endian machine")
        return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)

    def get(self, name: str) -> MXTensor | torch.Tensor:
        """The tensor called ``name``: an MXTensor when the metadata says so, else a plain tensor."""
        mx = self.header.mx.get(name)
        if mx is None:
            if name not in self.header.entries:
                raise KeyError(f"{self.path}: no tensor {name!r}")
            return self.get_stored(name)
        parts = {suffix: self.get_stored(stored) for suffix, stored in mx.components.items()}
        try:
            q = MXTensor(parts["codes"], parts["scales"], mx.shape, mx.axis, mx.format,
                         parts.get("micro"), parts.get("tensor_scale"))
        except (TypeError, ValueError) as e:
            raise _Problem(self.path)(f"inconsistent MX tensor: {e}", name) from None
        why = _padding_problem(q)
        if why is not None:
            raise _Problem(self.path)(why, name)
        return q


def iter_file(path, verify: bool = True) -> Iterator[tuple[str, MXTensor | torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time in file order, reading only that tensor's bytes, so memory
    stays at about one tensor. The header is validated first (see :func:`load_file`)."""
    with SafetensorsReader(path, verify) as r:
        for name in r.names():
            yield name, r.get(name)


def load_file(path, verify: bool = True) -> dict[str, MXTensor | torch.Tensor]:
    """Load every tensor of a safetensors file: MXTensors (from microscale metadata) and plain tensors.

    Validates the whole header before reading data; any problem raises ValueError naming the file,
    the tensor and the problem. ``verify`` (default True): check the header's and every tensor's
    checksum where the file has them (files without, e.g. from the safetensors library, load as they
    are); ``verify=False`` skips the checks (CRC-32C costs ~0.1 s per GB). OSError (e.g.
    FileNotFoundError) passes through; a path that is not a regular file (FIFO, device, directory) is
    a ValueError.
    """
    return dict(iter_file(path, verify))


def load_bytes(data: bytes, verify: bool = True, name: str = "<bytes>") -> dict[str, MXTensor | torch.Tensor]:
    """:func:`load_file` of a whole safetensors file held in memory (``bytes``); errors name it ``name``."""
    with SafetensorsReader.from_bytes(data, verify, name) as r:
        return {n: r.get(n) for n in r.names()}


def verify_file(path, chunk_bytes: int = 1 << 24) -> dict:
    """Check a file completely without building tensors, streaming ``chunk_bytes`` at a time: the header
    (as :func:`read_header`), the header checksum and every stored tensor's checksum. Returns
    ``{"tensors": n_stored, "bytes": data bytes, "algorithm": name or None}``; raises ValueError naming
    the first tensor that fails. A file without checksums gets the structural checks only
    (``algorithm`` None)."""
    with SafetensorsReader(path, verify=True) as r:
        total = 0
        for stored, entry in sorted(r.header.entries.items(), key=lambda kv: kv[1].start):
            for _ in r.iter_chunks(stored, chunk_bytes):
                pass
            total += entry.nbytes
        sums = r.header.checksums
        return {"tensors": len(r.header.entries), "bytes": total,
                "algorithm": None if sums is None else sums.algorithm}

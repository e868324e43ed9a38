"""Exchange with other MX layouts, bit for bit: gpt-oss / transformers MXFP4, GGUF (ggml) MXFP4, torchao.

Every conversion moves codes and scale bytes; nothing is dequantized on the way. Each target is defined
by its own reader, which the tests run on our output:

- **gpt-oss / transformers** (``transformers/integrations/mxfp4.py``, ``convert_moe_packed_tensors``;
  the gpt-oss checkpoints store MoE expert weights as ``*_blocks`` / ``*_scales``):
  ``blocks`` uint8 ``[..., G, 16]`` (byte j of a block holds element 2j in its low nibble and element
  2j+1 in its high nibble, E2M1 codes of OCP MX v1.0 §5.3.3) and ``scales`` uint8 ``[..., G]``, the E8M0
  byte; the reader decodes ``ldexp(E2M1[code], scale - 127)``. That is exactly our packed MXFP4 storage
  along the last axis, so :func:`to_gpt_oss` is a reshape.
- **GGUF / ggml** ``GGML_TYPE_MXFP4`` (type 39; gguf-py ``gguf/quants.py`` class ``MXFP4``,
  ``GGML_QUANT_SIZES[MXFP4] = (32, 17)``): 17 bytes per block of 32, the E8M0 byte first, then 16
  bytes whose low nibbles are elements 0-15 and high nibbles elements 16-31. ggml decodes with a table
  of doubled E2M1 values ``(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ...)`` times a halved scale
  (``ggml_e8m0_to_fp32_half``: 2^(e-128), with e = 0 and 1 as float32 subnormals), which equals the OCP
  value for every code and every scale byte except 0xFF: ggml reads 0xFF as 2^127, not NaN, so NaN
  blocks cannot be written (ValueError). ggml's table has no -0: code 8 (-0) decodes as +0, equal in
  value; the code itself round-trips.
- **torchao** ``torchao.prototype.mx_formats.mx_tensor.MXTensor`` (0.18): ``qdata`` in the tensor's own
  shape (fp8 as float8 dtypes, fp6 one code per uint8, fp4 two codes per uint8, first in the low
  nibble), ``scale`` float8_e8m0fnu ``[..., K / block_size]``, blocks along the last dimension of a
  contiguous ``qdata`` (or, for a 2-D tensor whose ``qdata`` is a transposed view, along dimension 0);
  element formats fp8 e4m3/e5m2, fp6 e2m3/e3m2, fp4 e2m1; no padding, no swizzled scales here.

gpt-oss and GGUF hold MXFP4 only (E2M1 elements, 32-element blocks, one E8M0 scale per block),
blocked along the last dimension. A last dimension K that is not a multiple of 32 is padded with zero
codes to whole blocks, as our own layout pads (:func:`from_gpt_oss` / :func:`from_gguf` take the true
shape back); file writers refuse it because neither file format can record K.

Whole files: :func:`open_checkpoint` reads a microscale, gpt-oss-layout or GGUF file tensor by tensor;
:func:`save_gpt_oss`, :func:`save_gguf` write them; :func:`convert_file` streams one into another
(``microscale convert``). Writing is atomic (io.py).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from .formats import BlockFormat, get_format
from .io import MXSpec, PlainSpec, SafetensorsReader, SafetensorsWriter, atomic_path, format_spec, spec_of
from .layout import make_layout
from .packing import pack_codes, unpack_codes
from .tensor import MXTensor

__all__ = [
    "to_gpt_oss", "from_gpt_oss", "to_gguf", "from_gguf", "to_torchao", "from_torchao",
    "open_checkpoint", "Checkpoint", "load_gpt_oss", "save_gpt_oss", "load_gguf", "save_gguf",
    "convert_file", "TARGETS", "GGUF_BLOCK_BYTES",
]

#: Bytes of one ggml MXFP4 block (GGML_QUANT_SIZES[MXFP4] = (32, 17)).
GGUF_BLOCK_BYTES = 17
#: E8M0 byte that encodes NaN (OCP MX v1.0 §5.2); gpt-oss and ggml decode it as a number.
_E8M0_NAN = 0xFF
#: Longest GGUF tensor name (GGML_MAX_NAME = 64 bytes including the terminating NUL).
_GGUF_MAX_NAME = 63
#: ``microscale convert --to`` targets.
TARGETS = ("gguf", "gpt-oss", "microscale")

_MXFP4 = get_format("mxfp4")


def _mxfp4() -> BlockFormat:
    return _MXFP4


# ---- what a target can hold -------------------------------------------------------------------------
def _check_mxfp4_last_axis(fmt: BlockFormat, shape, axis: int, target: str, what: str = "tensor") -> None:
    """gpt-oss and GGUF hold OCP MXFP4 (E2M1, k = 32, E8M0) blocked along the last dimension only."""
    if format_spec(get_format(fmt)) != format_spec(_MXFP4):
        raise ValueError(f"{target} stores MXFP4 only (E2M1 elements, 32-element blocks, E8M0 scales); {what} "
                         f"is {get_format(fmt).name} (along axis {axis} of shape {list(shape)})")
    if axis != len(shape) - 1:
        raise ValueError(f"{target} stores blocks along the last dimension; {what} is {get_format(fmt).name} "
                         f"of shape {list(shape)} blocked along axis {axis} (required: axis {len(shape) - 1}; "
                         f"quantize the transposed tensor along its last axis instead)")


def _check_mx(q, target: str) -> MXTensor:
    if not isinstance(q, MXTensor):
        raise TypeError(f"{target}: expected a microscale MXTensor, got {type(q).__name__}")
    q.validate()
    return q


def _check_no_nan_scales(scales: torch.Tensor, target: str, what: str = "tensor") -> None:
    n_nan = int((scales == _E8M0_NAN).sum())
    if n_nan:
        raise ValueError(f"{target} cannot represent NaN blocks (its reader decodes scale byte 0xFF as a "
                         f"number); {what} has {n_nan} of {scales.numel()} blocks with a NaN scale")


def _as_uint8_tensor(x, name: str) -> torch.Tensor:
    """A torch uint8 tensor from a torch/numpy uint8 array (float8_e8m0fnu scales reinterpreted)."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8, got numpy {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x) if x.flags.writeable else x.copy())
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a uint8 torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype == torch.float8_e8m0fnu:
        x = x.view(torch.uint8)
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {x.dtype}")
    return x.detach().cpu().contiguous()


def _true_shape(prefix: tuple[int, ...], n_blocks: int, shape, what: str) -> tuple[int, ...]:
    """The tensor shape: ``shape`` when given (its last dimension padded must fill ``n_blocks`` blocks of
    32), else ``prefix + (32 * n_blocks,)``."""
    if shape is None:
        return tuple(prefix) + (32 * n_blocks,)
    shape = tuple(int(s) for s in shape)
    if not shape or shape[:-1] != tuple(prefix) or not 0 < shape[-1] <= 32 * n_blocks \
            or -(-shape[-1] // 32) != n_blocks:
        raise ValueError(f"{what}: shape {list(shape)} does not match {n_blocks} blocks of 32 per row and leading "
                         f"dimensions {list(prefix)} (expected [..., K] with ceil(K / 32) == {n_blocks})")
    return shape


# ---- gpt-oss / transformers ---------------------------------------------------------------------------
def to_gpt_oss(q: MXTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of an MXFP4 tensor in the gpt-oss / transformers layout.

    ``blocks``: uint8 ``[*q.shape[:-1], G, 16]``, ``scales``: uint8 ``[*q.shape[:-1], G]`` with
    G = ceil(K / 32) (a ragged K is padded with zero codes). Views of ``q``'s storage (no copy).
    Defined by transformers' ``integrations/mxfp4.py`` (``convert_moe_packed_tensors``: low nibble =
    even element, value ``ldexp(FP4_VALUES[code], scale - 127)``). NaN blocks (scale 0xFF) raise
    ValueError: that reader decodes 0xFF as 2^128.
    """
    q = _check_mx(q, "to_gpt_oss")
    _check_mxfp4_last_axis(q.format, q.shape, q.axis, "gpt-oss / transformers MXFP4")
    _check_no_nan_scales(q.scales, "gpt-oss / transformers MXFP4")
    g = q.layout.blocks_per_vector
    return q.codes.reshape(*q.shape[:-1], g, 16), q.scales.reshape(*q.shape[:-1], g)


def from_gpt_oss(blocks, scales, shape=None) -> MXTensor:
    """MXFP4 MXTensor (blocked along the last axis) from gpt-oss / transformers ``blocks`` [..., G, 16]
    and ``scales`` [..., G] (uint8; scales may be float8_e8m0fnu). ``shape``: the true tensor shape
    [..., K] when K is not 32 * G (padding codes are kept as given); default ``[..., 32 * G]``.
    Inverse of :func:`to_gpt_oss`, bit for bit."""
    blocks = _as_uint8_tensor(blocks, "blocks")
    scales = _as_uint8_tensor(scales, "scales")
    if blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise ValueError(f"blocks must be uint8 [..., G, 16] (16 bytes = 32 E2M1 codes per block), got shape "
                         f"{list(blocks.shape)}")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"scales must have shape blocks.shape[:-1] = {list(blocks.shape[:-1])}, got "
                         f"{list(scales.shape)}")
    prefix, g = tuple(blocks.shape[:-2]), int(blocks.shape[-2])
    if g == 0:
        raise ValueError("blocks hold no block (G = 0)")
    true = _true_shape(prefix, g, shape, "from_gpt_oss")
    return MXTensor(blocks.reshape(-1), scales.reshape(-1), true, len(true) - 1, _mxfp4())


# ---- GGUF / ggml --------------------------------------------------------------------------------------
#: Blocks repacked per step (bounds the temporary memory of a large tensor to a few MiB).
_CHUNK_BLOCKS = 1 << 18


def _our_codes_to_ggml(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Our packed E2M1 bytes [n_blocks, 16] (byte j: elements 2j | 2j+1 << 4) into ggml's order in
    ``out`` [n_blocks, 16] (byte j: elements j | j+16 << 4), uint8 throughout."""
    for start in range(0, codes.shape[0], _CHUNK_BLOCKS):
        b = codes[start:start + _CHUNK_BLOCKS]
        elements = torch.stack([b & 0x0F, b >> 4], dim=2).reshape(-1, 32)
        out[start:start + _CHUNK_BLOCKS] = elements[:, :16] | (elements[:, 16:] << 4)


def _ggml_codes_to_ours(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_our_codes_to_ggml`: ggml bytes [n_blocks, 16] -> our packed bytes, flat."""
    out = torch.empty(qs.shape, dtype=torch.uint8)
    for start in range(0, qs.shape[0], _CHUNK_BLOCKS):
        b = qs[start:start + _CHUNK_BLOCKS]
        elements = torch.cat([b & 0x0F, b >> 4], dim=1)
        out[start:start + _CHUNK_BLOCKS] = elements[:, 0::2] | (elements[:, 1::2] << 4)
    return out.reshape(-1)


def to_gguf(q: MXTensor) -> np.ndarray:
    """The ggml ``MXFP4`` bytes of an MXFP4 tensor: uint8 ``[*q.shape[:-1], G * 17]`` (the byte shape
    gguf's GGUFWriter/GGUFReader use for quantized tensors), G = ceil(K / 32) blocks per row, each the
    E8M0 byte then 16 bytes with elements 0-15 in the low nibbles and 16-31 in the high nibbles
    (gguf-py ``quants.py`` ``MXFP4``; ggml ``block_mxfp4``). A ragged K is padded with zero codes.
    NaN blocks raise ValueError (ggml decodes scale 0xFF as 2^127)."""
    q = _check_mx(q, "to_gguf")
    _check_mxfp4_last_axis(q.format, q.shape, q.axis, "GGUF MXFP4")
    _check_no_nan_scales(q.scales, "GGUF MXFP4")
    lay = q.layout
    raw = torch.empty(lay.n_blocks, GGUF_BLOCK_BYTES, dtype=torch.uint8)
    raw[:, 0] = q.scales
    _our_codes_to_ggml(q.codes.reshape(lay.n_blocks, 16), raw[:, 1:])
    return raw.numpy().reshape(*q.shape[:-1], lay.blocks_per_vector * GGUF_BLOCK_BYTES)


def from_gguf(raw, shape) -> MXTensor:
    """MXFP4 MXTensor of ``shape`` [..., K] (blocked along the last axis) from ggml ``MXFP4`` bytes:
    ``prod(shape[:-1]) * ceil(K / 32) * 17`` bytes in any array shape (numpy/torch uint8 or ``bytes``).
    Inverse of :func:`to_gguf`, bit for bit."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    raw = _as_uint8_tensor(raw, "raw")
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    lay = make_layout(shape, len(shape) - 1, 32) if shape else None
    if lay is None:
        raise ValueError("shape must have at least one dimension [..., K]")
    want = lay.n_blocks * GGUF_BLOCK_BYTES
    if raw.numel() != want:
        raise ValueError(f"ggml MXFP4 tensor of shape {list(shape)} needs {lay.n_blocks} blocks of "
                         f"{GGUF_BLOCK_BYTES} bytes = {want} bytes, got {raw.numel()}")
    blocks = raw.reshape(lay.n_blocks, GGUF_BLOCK_BYTES)
    return MXTensor(_ggml_codes_to_ours(blocks[:, 1:]), blocks[:, 0].contiguous(), shape, len(shape) - 1,
                    _mxfp4())


# ---- torchao ------------------------------------------------------------------------------------------
def _torchao_elements() -> dict[str, object]:
    """Our element-format name -> torchao's elem_dtype (torchao.prototype.mx_formats.constants)."""
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    return {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m3": DTYPE_FP6_E2M3,
            "e3m2": DTYPE_FP6_E3M2, "e2m1": torch.float4_e2m1fn_x2}


#: Registered formats whose element format torchao has, by element name.
_TORCHAO_FORMATS = {"e4m3": "mxfp8_e4m3", "e5m2": "mxfp8_e5m2", "e2m3": "mxfp6_e2m3", "e3m2": "mxfp6_e3m2",
                    "e2m1": "mxfp4_e2m1"}


def _torchao_element_of(fmt: BlockFormat) -> str:
    """Our element name when ``fmt`` is an OCP MX format torchao can hold (E8M0 scale, one level)."""
    name = fmt.element.name if fmt.element is not None else None
    ref = _TORCHAO_FORMATS.get(name)
    ok = (ref is not None and fmt.element == get_format(ref).element and fmt.scale == get_format(ref).scale
          and fmt.subblock_size is None and fmt.tensor_scale is None)
    if not ok:
        raise ValueError(f"torchao MXTensor holds {', '.join(_TORCHAO_FORMATS.values())} (E8M0 scales, one level); "
                         f"got {fmt.name}")
    return name


def to_torchao(q: MXTensor, orig_dtype: torch.dtype = torch.float32):
    """A ``torchao.prototype.mx_formats.mx_tensor.MXTensor`` with the same codes and scales.

    Blocked along the last axis (qdata contiguous), or along axis 0 of a 2-D tensor (qdata a transposed
    view, as torchao's own ``.t()`` gives). K must be a multiple of the block size (torchao does not
    pad). ``orig_dtype``: the high-precision dtype torchao reports and dequantizes to by default.
    Needs torchao (ImportError otherwise)."""
    q = _check_mx(q, "to_torchao")
    from torchao.prototype.mx_formats.mx_tensor import MXTensor as AOTensor
    from torchao.quantization.quantize_.common import KernelPreference
    elem = _torchao_element_of(q.format)
    lay = q.layout
    transposed = q.ndim == 2 and q.axis == 0
    if q.axis != q.ndim - 1 and not transposed:
        raise ValueError(f"torchao MXTensor blocks along the last dimension (or dimension 0 of a 2-D tensor); "
                         f"got {q.format.name} of shape {list(q.shape)} along axis {q.axis}")
    if lay.padded_len != lay.axis_len:
        raise ValueError(f"torchao MXTensor needs the blocked dimension to be a multiple of the block size "
                         f"{lay.block_size}; {q.format.name} tensor of shape {list(q.shape)} has {lay.axis_len} "
                         f"along axis {q.axis}")
    moved = lay.moved_shape  # blocked axis last: the row-major order of our codes
    if elem == "e2m1":
        qdata = q.codes.view(*moved[:-1], moved[-1] // 2)
    elif elem in ("e4m3", "e5m2"):
        qdata = q.codes.view(_torchao_elements()[elem]).view(moved)
    else:
        qdata = unpack_codes(q.codes, q.format.element.bits, lay.n_elements_padded).view(moved)
    scale = q.scales.view(torch.float8_e8m0fnu).view(*moved[:-1], lay.blocks_per_vector)
    if transposed:
        qdata, scale = qdata.t(), scale.t()
    return AOTensor(qdata, scale, _torchao_elements()[elem], lay.block_size, orig_dtype,
                    KernelPreference.EMULATED, None, False)


def from_torchao(t) -> MXTensor:
    """Our MXTensor from a torchao ``MXTensor`` (codes and scales moved as they are). Swizzled scales and
    layouts other than contiguous (blocks along the last dimension) or a transposed 2-D view raise
    ValueError; so does a block size other than our format's."""
    from torchao.prototype.mx_formats.mx_tensor import MXTensor as AOTensor
    if not isinstance(t, AOTensor):
        raise TypeError(f"from_torchao: expected a torchao MXTensor, got {type(t).__name__}")
    if t.is_swizzled_scales:
        raise ValueError("from_torchao: swizzled (blocked-for-cuBLAS) scales are not supported; dequantize-free "
                         "exchange needs plain [..., K / block_size] scales")
    by_dtype = {v: k for k, v in _torchao_elements().items()}
    elem = by_dtype.get(t.elem_dtype)
    if elem is None:
        raise ValueError(f"from_torchao: unknown torchao element dtype {t.elem_dtype!r}")
    fmt = get_format(_TORCHAO_FORMATS[elem])
    if t.block_size != fmt.block_size:
        raise ValueError(f"from_torchao: {fmt.name} has {fmt.block_size}-element blocks, the torchao tensor has "
                         f"block_size {t.block_size}")
    qdata, scale = t.qdata, t.scale
    shape = tuple(t.shape)
    if qdata.is_contiguous():
        axis = len(shape) - 1
    elif qdata.dim() == 2 and qdata.t().is_contiguous():
        axis, qdata, scale = 0, qdata.t(), scale.t()
    else:
        raise ValueError(f"from_torchao: qdata must be contiguous or a transposed 2-D view, got shape "
                         f"{list(qdata.shape)} strides {list(qdata.stride())}")
    qdata = qdata.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    scale = scale.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    codes = qdata if elem in ("e2m1", "e4m3", "e5m2") else pack_codes(qdata, fmt.element.bits)
    return MXTensor(codes, scale, shape, axis, fmt)


# ---- whole files: reading -----------------------------------------------------------------------------
_GGUF_MAGIC = b"GGUF"


class Checkpoint:
    """A tensor file opened for reading one tensor at a time: a microscale safetensors file (MXTensors
    from its metadata), a gpt-oss-layout safetensors file (each ``X_blocks`` / ``X_scales`` pair becomes
    the MXFP4 MXTensor ``X``), or a GGUF file (``MXFP4`` tensors become MXTensors; F32/F16/BF16/F64 and
    integer tensors stay plain). ``specs``: name -> MXSpec | PlainSpec in file order, known from the
    header alone. Use as a context manager; :meth:`get` reads one tensor."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        self.kind = "gguf" if magic == _GGUF_MAGIC else "safetensors"
        self.specs: dict[str, MXSpec | PlainSpec] = {}
        self._getters: dict[str, Callable[[], MXTensor | torch.Tensor]] = {}
        self._reader = None
        if self.kind == "gguf":
            self._open_gguf()
        else:
            self._open_safetensors()

    # safetensors: microscale metadata, gpt-oss pairs, plain tensors
    def _open_safetensors(self) -> None:
        reader = self._reader = SafetensorsReader(self.path)
        entries = reader.header.entries
        pairs = {}
        for name in reader.names():
            if name in reader.header.mx or not name.endswith("_blocks"):
                continue
            base = name[: -len("_blocks")]
            if base + "_scales" in entries and base + "_scales" not in reader.header.mx:
                pairs[name] = base
        taken = set(pairs) | {b + "_scales" for b in pairs.values()}
        for name in reader.names():
            if name in pairs:
                base = pairs[name]
                b, s = entries[name], entries[base + "_scales"]
                if b.dtype != torch.uint8 or s.dtype != torch.uint8 or len(b.shape) < 2 or b.shape[-1] != 16 \
                        or s.shape != b.shape[:-1] or b.shape[-2] == 0:
                    raise ValueError(f"{self.path}: {name!r} / {base + '_scales'!r} look like a gpt-oss MXFP4 pair "
                                     f"but are {b.dtype} {list(b.shape)} / {s.dtype} {list(s.shape)} (expected "
                                     f"uint8 [..., G, 16] and uint8 [..., G])")
                if base in entries or base in self.specs:
                    raise ValueError(f"{self.path}: gpt-oss pair {name!r} would become tensor {base!r}, which the "
                                     f"file also stores")
                self.specs[base] = MXSpec(_mxfp4(), b.shape[:-2] + (32 * b.shape[-2],), len(b.shape) - 2)
                self._getters[base] = (lambda n=name, base=base: from_gpt_oss(reader.get_stored(n),
                                                                               reader.get_stored(base + "_scales")))
            elif name not in taken:
                self.specs[name] = (_mx_spec(reader.header.mx[name]) if name in reader.header.mx
                                    else PlainSpec(entries[name].dtype, entries[name].shape))
                self._getters[name] = (lambda n=name: reader.get(n))

    def _open_gguf(self) -> None:
        from gguf import GGMLQuantizationType as T
        from gguf import GGUFReader
        reader = self._reader = GGUFReader(self.path)
        plain = {T.F32: torch.float32, T.F16: torch.float16, T.F64: torch.float64, T.BF16: torch.bfloat16,
                 T.I8: torch.int8, T.I16: torch.int16, T.I32: torch.int32, T.I64: torch.int64}
        for t in reader.tensors:
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            if t.name in self.specs:
                raise ValueError(f"{self.path}: tensor {t.name!r} appears twice")
            if t.tensor_type == T.MXFP4:
                self.specs[t.name] = MXSpec(_mxfp4(), shape, len(shape) - 1)
                self._getters[t.name] = (lambda t=t, shape=shape: from_gguf(np.array(t.data), shape))
            elif t.tensor_type in plain:
                dtype = plain[t.tensor_type]
                self.specs[t.name] = PlainSpec(dtype, shape)
                self._getters[t.name] = (lambda t=t, shape=shape, dtype=dtype: _gguf_plain(t.data, shape, dtype))
            else:
                raise ValueError(f"{self.path}: tensor {t.name!r} is GGML {T(t.tensor_type).name}; only MXFP4 and "
                                 f"F32/F16/BF16/F64/I8-I64 tensors convert exactly")

    def names(self) -> list[str]:
        return list(self.specs)

    def get(self, name: str) -> MXTensor | torch.Tensor:
        if name not in self._getters:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._getters[name]()

    def __iter__(self) -> Iterator[tuple[str, MXTensor | torch.Tensor]]:
        for name in self.specs:
            yield name, self.get(name)

    def close(self) -> None:
        if isinstance(self._reader, SafetensorsReader):
            self._reader.close()
        self._reader = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mx_spec(entry) -> MXSpec:
    return MXSpec(entry.format, entry.shape, entry.axis)


def _gguf_plain(data: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    arr = np.array(data)  # copy out of the memory map
    if dtype == torch.bfloat16:  # the reader hands BF16 over as raw bytes
        return torch.from_numpy(arr.reshape(-1).view(np.uint16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(arr).reshape(shape)


def open_checkpoint(path) -> Checkpoint:
    """Open a microscale, gpt-oss-layout or GGUF file for reading tensor by tensor (see :class:`Checkpoint`)."""
    return Checkpoint(path)


def load_gpt_oss(path) -> dict[str, MXTensor | torch.Tensor]:
    """Every tensor of a gpt-oss-layout safetensors file: ``X_blocks`` / ``X_scales`` pairs as MXFP4
    MXTensors named ``X`` (shape [..., 32 * G], blocked along the last axis), other tensors as stored."""
    with open_checkpoint(path) as ck:
        if ck.kind != "safetensors":
            raise ValueError(f"{ck.path}: a {ck.kind} file, not a safetensors file")
        return dict(ck)


def load_gguf(path) -> dict[str, MXTensor | torch.Tensor]:
    """Every tensor of a GGUF file: ``MXFP4`` tensors as MXTensors, F32/F16/BF16/F64/integer as plain."""
    with open_checkpoint(path) as ck:
        if ck.kind != "gguf":
            raise ValueError(f"{ck.path}: not a GGUF file (no 'GGUF' magic)")
        return dict(ck)


# ---- whole files: writing -----------------------------------------------------------------------------
def _specs_of(tensors: Mapping[str, MXTensor | torch.Tensor]) -> dict[str, MXSpec | PlainSpec]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> MXTensor or torch.Tensor, got {type(tensors).__name__}")
    out = {}
    for name, value in tensors.items():
        if not isinstance(value, (MXTensor, torch.Tensor)):
            raise TypeError(f"tensor {name!r}: expected an MXTensor or a torch.Tensor, got {type(value).__name__}")
        out[name] = spec_of(value)
    return out


class _GptOssSink:
    """Writes MXFP4 tensors as ``X_blocks`` / ``X_scales`` and plain tensors as they are (safetensors)."""

    def __init__(self, path, specs: Mapping[str, MXSpec | PlainSpec]):
        stored: dict[str, PlainSpec] = {}
        for name, spec in specs.items():
            if isinstance(spec, MXSpec):
                _check_mxfp4_last_axis(spec.format, spec.shape, spec.axis, "gpt-oss layout", f"tensor {name!r}")
                if spec.shape[-1] % 32:
                    raise ValueError(f"gpt-oss layout: tensor {name!r} of shape {list(spec.shape)} has a last "
                                     f"dimension that is not a multiple of 32; the file cannot record its length")
                g = spec.shape[-1] // 32
                parts = {name + "_blocks": PlainSpec(torch.uint8, spec.shape[:-1] + (g, 16)),
                         name + "_scales": PlainSpec(torch.uint8, spec.shape[:-1] + (g,))}
            else:
                parts = {name: spec}
            for sname, s in parts.items():
                if sname in stored:
                    raise ValueError(f"gpt-oss layout: tensor {name!r} would be stored as {sname!r}, which another "
                                     f"tensor uses too")
                stored[sname] = s
        self._writer = SafetensorsWriter(path, stored)

    def __enter__(self):
        self._writer.__enter__()
        return self

    def __exit__(self, *exc):
        return self._writer.__exit__(*exc)

    def write(self, name: str, value: MXTensor | torch.Tensor) -> None:
        if isinstance(value, MXTensor):
            blocks, scales = to_gpt_oss(value)
            self._writer.write(name + "_blocks", blocks)
            self._writer.write(name + "_scales", scales)
        else:
            self._writer.write(name, value)


def _gguf_plain_type(dtype: torch.dtype):
    from gguf import GGMLQuantizationType as T
    return {torch.float32: T.F32, torch.float16: T.F16, torch.float64: T.F64, torch.bfloat16: T.BF16,
            torch.int8: T.I8, torch.int16: T.I16, torch.int32: T.I32, torch.int64: T.I64}.get(dtype)


class _GGUFSink:
    """Writes a GGUF file with gguf's GGUFWriter: MXFP4 tensors as raw ``MXFP4`` blocks, plain float and
    integer tensors as F32/F16/BF16/F64/I8-I64, streaming (tensor infos first, then data in order)."""

    def __init__(self, path, specs: Mapping[str, MXSpec | PlainSpec], arch: str = "microscale"):
        self.path = os.fspath(path)
        self._plan = []
        for name, spec in specs.items():
            if len(name.encode("utf-8")) > _GGUF_MAX_NAME:
                raise ValueError(f"GGUF: tensor name {name!r} is longer than {_GGUF_MAX_NAME} bytes (GGML_MAX_NAME)")
            if len(spec.shape) == 0:
                raise ValueError(f"GGUF: tensor {name!r} is 0-dimensional; GGUF tensors have at least one dimension")
            if isinstance(spec, MXSpec):
                _check_mxfp4_last_axis(spec.format, spec.shape, spec.axis, "GGUF", f"tensor {name!r}")
                if spec.shape[-1] % 32:
                    raise ValueError(f"GGUF: tensor {name!r} of shape {list(spec.shape)} has a last dimension that "
                                     f"is not a multiple of 32 (ggml MXFP4 rows are whole blocks)")
            elif _gguf_plain_type(spec.dtype) is None:
                raise ValueError(f"GGUF: tensor {name!r} is {spec.dtype}; plain tensors must be float32/16/64, "
                                 f"bfloat16 or int8/16/32/64")
            self._plan.append((name, spec))
        self._arch = arch
        self._atomic = None
        self._writer = None
        self._next = 0

    def __enter__(self):
        from gguf import GGMLQuantizationType as T
        from gguf import GGUFWriter
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            w = self._writer = GGUFWriter(tmp, self._arch)
            w.add_string("microscale.version", "1")
            for name, spec in self._plan:
                if isinstance(spec, MXSpec):
                    byte_shape = spec.shape[:-1] + (spec.shape[-1] // 32 * GGUF_BLOCK_BYTES,)
                    w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _prod(byte_shape), raw_dtype=T.MXFP4)
                else:
                    size = torch.empty((), dtype=spec.dtype).element_size()
                    byte_shape = spec.shape[:-1] + (spec.shape[-1] * size,)
                    w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _prod(byte_shape),
                                      raw_dtype=_gguf_plain_type(spec.dtype))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        except BaseException:
            self._close(sys.exc_info())
            raise
        return self

    def write(self, name: str, value: MXTensor | torch.Tensor) -> None:
        want, spec = self._plan[self._next]
        if name != want:  # GGUF data follows the tensor-info order
            raise ValueError(f"GGUF: tensors must be written in plan order: expected {want!r}, got {name!r}")
        got = spec_of(value)
        if got != spec:
            raise ValueError(f"GGUF: tensor {name!r} was planned as {spec}, got {got}")
        if isinstance(value, MXTensor):
            data = to_gguf(value)
        else:
            t = value.detach().cpu().contiguous()
            if sys.byteorder != "little" and t.element_size() > 1:
                raise NotImplementedError("writing GGUF files on a big-endian machine")
            data = t.reshape(-1).view(torch.uint8).numpy()
        self._writer.write_tensor_data(data)
        self._next += 1

    def _close(self, exc_info) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(*exc_info)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self._next != len(self._plan):
            missing = [n for n, _ in self._plan[self._next:]]
            try:
                raise ValueError(f"GGUF: tensors never written: {', '.join(map(repr, missing))}")
            except ValueError:
                self._close(sys.exc_info())
                raise
        self._close((exc_type, exc, tb))


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _sink(to: str, path, specs):
    if to == "gguf":
        return _GGUFSink(path, specs)
    if to == "gpt-oss":
        return _GptOssSink(path, specs)
    if to == "microscale":
        return SafetensorsWriter(path, specs)
    raise ValueError(f"unknown target {to!r}; expected one of {', '.join(TARGETS)}")


def _write_all(to: str, path, tensors: Mapping[str, MXTensor | torch.Tensor]) -> None:
    with _sink(to, path, _specs_of(tensors)) as sink:
        for name, value in tensors.items():
            sink.write(name, value)


def save_gpt_oss(tensors: Mapping[str, MXTensor | torch.Tensor], path) -> None:
    """Write a gpt-oss-layout safetensors file, atomically: each MXFP4 MXTensor ``X`` (last axis, K a
    multiple of 32) as ``X_blocks`` uint8 [..., G, 16] and ``X_scales`` uint8 [..., G]; plain tensors as
    they are. Other MX formats or axes raise ValueError before anything is written."""
    _write_all("gpt-oss", path, tensors)


def save_gguf(tensors: Mapping[str, MXTensor | torch.Tensor], path) -> None:
    """Write a GGUF file (gguf's GGUFWriter), atomically: MXFP4 MXTensors (last axis, K a multiple of 32)
    as ``MXFP4`` tensors, plain float32/float16/bfloat16/float64/int tensors as F32/F16/BF16/F64/I*.
    The file carries ``general.architecture = "microscale"`` and no model metadata: a container that
    gguf/ggml tools read, not a model llama.cpp can run by itself."""
    _write_all("gguf", path, tensors)


def convert_file(src, dst, to: str, progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, int]:
    """Stream every tensor of ``src`` (microscale, gpt-oss-layout or GGUF; see :class:`Checkpoint`) into
    ``dst`` in layout ``to`` ("gguf", "gpt-oss" or "microscale"), one tensor in memory at a time, written
    atomically. Every tensor is checked against the target before anything is written. ``progress``
    wraps the iteration over names (e.g. tqdm). Returns counts: tensors, mx (MX tensors), plain."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; expected one of {', '.join(TARGETS)}")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"input and output are the same file: {os.fspath(src)}")
    with open_checkpoint(src) as ck:
        names = ck.names()
        with _sink(to, dst, ck.specs) as sink:
            for name in (progress(names) if progress is not None else names):
                value = ck.get(name)
                sink.write(name, value)
                del value
        n_mx = sum(isinstance(s, MXSpec) for s in ck.specs.values())
    return {"tensors": len(names), "mx": n_mx, "plain": len(names) - n_mx}

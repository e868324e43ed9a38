"""MXTensor: a block-quantized tensor stored packed (element codes + scales), with its shape and axis.

Storage (see layout.py for the blocked order):
- ``codes``: 1-D uint8, the element codes of all blocks in blocked order, bit-packed (packing.py):
  ceil(n_blocks * block_size * element_bits / 8) bytes.
- ``scales``: one scale per block, shape [n_blocks]: uint8 codes for E8M0 / small-float scale formats,
  float32 for FP32 scales.
- ``micro`` (two-level BDR formats only): 1-D uint8, the d2-bit microexponents of every sub-block,
  bit-packed.
- ``tensor_scale`` (formats with a per-tensor FP32 scale, e.g. NVFP4): a 0-d float32 tensor.

An MXTensor is immutable: its fields cannot be reassigned after construction (``q.codes = ...`` raises
``dataclasses.FrozenInstanceError``), and construction validates every component's dtype, shape and
device against :func:`component_specs`. The component tensors themselves are ordinary torch tensors
whose storage could still be changed in place, so the C kernels re-check every buffer they are handed
(``microscale.kernels.checked_pointers``). All components live on one device; on ``meta`` an MXTensor
carries shapes only.

For an OCP MX format ``nbytes`` is exactly (elements in whole blocks) * (element_bits + 8/32) / 8, i.e.
4.25 / 6.25 / 8.25 bits per element for MXFP4 / MXFP6 / MXFP8, plus the zero padding of each vector's
last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import select_dequantize
from .formats import BlockFormat, get_format
from .layout import BlockLayout, QuantizedBlocks, as_int, from_blocks, make_layout, normalize_axis
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["MXTensor", "COMPONENTS", "component_specs", "check_out", "check_shape", "MAX_DIM"]

_OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Largest dimension, and largest product of dimensions, of a tensor (torch sizes are int64).
MAX_DIM = 2**63 - 1
#: The stored components of an MXTensor, in order: the one list of their names (MXTensor's fields,
#: :func:`component_specs`' keys, the suffixes io.py stores them under, packed parameters' state_dict parts).
COMPONENTS = ("codes", "scales", "micro", "tensor_scale")


def check_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints, each and their product (zeros included, so ``[0, 2^64]``
    is refused too) within int64 as torch requires. Raises TypeError / ValueError."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of integers, got {type(shape).__name__}") from None
    out, prod = [], 1
    for d in dims:
        d = as_int(d, f"each dimension of shape {list(dims)!r}")
        if not 0 <= d <= MAX_DIM:
            raise ValueError(f"shape dimensions must lie in [0, 2^63 - 1], got {d} in {list(dims)!r}")
        out.append(d)
    for d in out:  # product of the non-zero dimensions: a zero does not excuse an overflowing rest
        prod *= max(d, 1)
        if prod > MAX_DIM:
            raise ValueError(f"shape {list(dims)!r} has more than 2^63 - 1 elements (counting non-zero "
                             f"dimensions), more than a torch tensor can index")
    return tuple(out)


def component_specs(shape, axis: int, fmt: str | BlockFormat) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of each stored component of an MXTensor of ``shape`` quantized along ``axis``.

    The one statement of MXTensor's storage sizes: MXTensor.validate checks real tensors against it, and
    io.py uses it to write a safetensors header before any tensor is quantized.
    """
    fmt = get_format(fmt)
    if fmt.element is None:
        raise ValueError("format 'none' does not quantize: it has no stored components")
    lay = make_layout(check_shape(shape), axis, fmt.block_size)
    fp32_scale = fmt.scale is not None and fmt.scale.kind == "fp32"
    n_scales = lay.n_blocks if fmt.scale is not None else 0  # unscaled / per-tensor only: no block scales
    out = {"codes": (torch.uint8, (packed_nbytes(lay.n_elements_padded, fmt.element.bits),)),
           "scales": (torch.float32 if fp32_scale else torch.uint8, (n_scales,))}
    if fmt.subblock_size:
        n_sub = lay.n_blocks * (lay.block_size // fmt.subblock_size)
        out["micro"] = (torch.uint8, (packed_nbytes(n_sub, fmt.micro_bits),))
    if fmt.tensor_scale is not None:
        per_vector = fmt.tensor_scale_granularity != "tensor"
        out["tensor_scale"] = (torch.float32, (lay.n_vectors,) if per_vector else ())
    return out


def check_out(out: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """``out=`` must be a contiguous dense tensor of the result's shape and dtype, on the input's
    ``device`` (it is written in place)."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.device != torch.device(device):
        raise ValueError(f"out must be on the input's device {torch.device(device)}, got {out.device}")
    if out.layout != torch.strided:
        raise ValueError(f"out must be a dense (strided) tensor, got layout {out.layout}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)}, got "
                         f"{out.dtype} {tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    if out.requires_grad:
        raise ValueError("out= does not support automatic differentiation (out requires grad)")


@dataclass(eq=False, frozen=True)
class MXTensor:
    """Packed block-quantized tensor. Build with :func:`microscale.quantize`; read with :meth:`dequantize`.

    Immutable and validated: construction checks every component against :func:`component_specs`
    (dtype, shape, dense layout, one device for all) and normalizes ``axis`` to a non-negative int;
    the fields cannot be reassigned afterwards."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    axis: int
    format: BlockFormat
    micro: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def __post_init__(self):
        shape = check_shape(self.shape)
        object.__setattr__(self, "format", get_format(self.format))
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "axis", normalize_axis(self.axis, len(shape)))
        self.validate()

    # ---- structure ------------------------------------------------------------------------------
    @property
    def layout(self) -> BlockLayout:
        return make_layout(self.shape, self.axis, self.format.block_size)

    @property
    def n_codes(self) -> int:
        return self.layout.n_elements_padded

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def validate(self) -> None:
        """Check that the stored arrays have exactly the dtypes and sizes the shape and format imply, are
        dense, and share one device. Changes nothing."""
        if self.format.element is None:
            raise ValueError("an MXTensor needs a quantizing format, not 'none'")
        specs = component_specs(self.shape, self.axis, self.format)
        device = None
        for name in COMPONENTS:
            value = getattr(self, name)
            if name not in specs:
                if value is not None:
                    raise ValueError(f"{self.format.name} has no {name}, but {name} was given")
                continue
            dtype, shape = specs[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{self.format.name} tensor of shape {self.shape} along axis {self.axis} needs "
                                f"{name} as a {dtype} tensor of shape {shape}, got {type(value).__name__}")
            if value.dtype != dtype or tuple(value.shape) != shape:
                raise ValueError(f"{self.format.name} tensor of shape {self.shape} along axis {self.axis} needs "
                                 f"{name} as {dtype} of shape {shape}, got {value.dtype} {tuple(value.shape)}")
            if value.layout != torch.strided:
                raise ValueError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
            if device is None:
                device = value.device
            elif value.device != device:
                raise ValueError(f"all components of an MXTensor must be on one device: codes are on {device}, "
                                 f"{name} on {value.device}")

    @property
    def device(self) -> torch.device:
        """The device of the stored components (``meta``: shapes only, no data)."""
        return self.codes.device

    def components(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (codes, scales, and micro / tensor_scale where the format has them),
        in the order of :func:`component_specs`."""
        return {name: getattr(self, name) for name in component_specs(self.shape, self.axis, self.format)}

    @property
    def nbytes(self) -> int:
        """Bytes of packed storage: codes + scales (+ microexponents + tensor scale)."""
        n = self.codes.numel() + self.scales.numel() * self.scales.element_size()
        if self.micro is not None:
            n += self.micro.numel()
        if self.tensor_scale is not None:
            n += 4 * self.tensor_scale.numel()
        return n

    @property
    def bits_per_element(self) -> float:
        """Measured storage bits per (unpadded) element."""
        return 8.0 * self.nbytes / max(self.numel(), 1)

    # ---- conversion ---------------------------------------------------------------------------------
    @classmethod
    def from_blocks(cls, q: QuantizedBlocks, layout: BlockLayout, fmt: BlockFormat) -> "MXTensor":
        """Pack unpacked blocks (from the reference quantizer) into an MXTensor."""
        fmt = get_format(fmt)
        micro = None if q.micro is None else pack_codes(q.micro, fmt.micro_bits)
        return cls(pack_codes(q.codes, fmt.element.bits), q.scales.reshape(-1).contiguous(), layout.shape,
                   layout.axis, fmt, micro, q.tensor_scale)

    def to_blocks(self) -> QuantizedBlocks:
        """Unpacked codes as QuantizedBlocks ([n_blocks, block_size] codes)."""
        lay = self.layout
        codes = unpack_codes(self.codes, self.format.element.bits, lay.n_elements_padded)
        micro = None
        if self.micro is not None:
            per = lay.block_size // self.format.subblock_size
            micro = unpack_codes(self.micro, self.format.micro_bits, lay.n_blocks * per).reshape(lay.n_blocks, per)
        return QuantizedBlocks(codes.reshape(lay.n_blocks, lay.block_size), self.scales, micro, self.tensor_scale)

    def element_codes(self) -> torch.Tensor:
        """Unpacked element codes in the tensor's own shape (padding dropped)."""
        return from_blocks(self.to_blocks().codes, self.layout)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to a dense tensor of ``dtype`` (float32 by default) and the original shape; ``out``: a
        preallocated contiguous tensor of that shape and dtype to write into."""
        if dtype not in _OUT_DTYPES:
            raise TypeError(f"dtype must be one of {_OUT_DTYPES}, got {dtype}")
        self.validate()  # cheap; the fields are frozen, but this keeps a hand-built subclass honest
        check_out(out, self.shape, dtype, self.device)
        if self.device.type == "meta":  # shapes only: nothing to decode
            return torch.empty(self.shape, dtype=dtype, device="meta") if out is None else out
        return select_dequantize(self, dtype).dequantize(self, dtype, out)

    # ---- interop ------------------------------------------------------------------------------------
    def scales_as_e8m0(self) -> torch.Tensor:
        """Scales as torch.float8_e8m0fnu (same bits), for E8M0-scaled formats."""
        if self.format.scale is None or self.format.scale.kind != "e8m0" or self.format.scale.bits != 8:
            raise ValueError(f"{self.format.name} does not use E8M0 scales")
        return self.scales.view(torch.float8_e8m0fnu)

    def codes_as_torch(self) -> torch.Tensor:
        """Element codes as a torch low-precision dtype with the same bits.

        E4M3 -> float8_e4m3fn, E5M2 -> float8_e5m2 (shape [n_blocks, block_size]);
        E2M1 -> float4_e2m1fn_x2 (two codes per byte, first in the low nibble: [n_blocks, block_size/2]).
        """
        elem = self.format.element
        lay = self.layout
        if elem.name == "e2m1" and lay.block_size % 2 == 0:
            return self.codes.view(torch.float4_e2m1fn_x2).reshape(lay.n_blocks, lay.block_size // 2)
        dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}.get(elem.name)
        if dt is None:
            raise ValueError(f"torch has no dtype for {elem.name} elements")
        return self.codes.view(dt).reshape(lay.n_blocks, lay.block_size)

    def codes_as_ml_dtypes(self):
        """Unpacked element codes as a numpy array of the matching ml_dtypes type, [n_blocks, block_size]."""
        import ml_dtypes
        name = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2", "e3m2": "float6_e3m2fn",
                "e2m3": "float6_e2m3fn", "e2m1": "float4_e2m1fn"}.get(self.format.element.name)
        if name is None:
            raise ValueError(f"ml_dtypes has no type for {self.format.element.name} elements")
        return self.to_blocks().codes.numpy().view(getattr(ml_dtypes, name))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, shape, axis: int, fmt) -> "MXTensor":
        """Build from unpacked element codes in blocked order ([n_blocks, block_size] or flat) and scale
        codes. Accepts uint8 or torch float8/float4/e8m0 dtypes (reinterpreted bit for bit)."""
        fmt = get_format(fmt)
        if codes.dtype == torch.float4_e2m1fn_x2:
            packed = codes.contiguous().view(torch.uint8).reshape(-1)
        else:
            if codes.dtype != torch.uint8 and codes.element_size() == 1:
                codes = codes.view(torch.uint8)
            packed = pack_codes(codes, fmt.element.bits)
        if scales.dtype == torch.float8_e8m0fnu:
            scales = scales.view(torch.uint8)
        return cls(packed, scales.reshape(-1).contiguous(), tuple(shape), axis, fmt)

    def __repr__(self) -> str:
        return (f"MXTensor(format={self.format.name}, shape={self.shape}, axis={self.axis}, "
                f"nbytes={self.nbytes}, bits/elem={self.bits_per_element:.3f})")

"""Block layout: how a tensor of any rank is cut into blocks along one axis.

The canonical ("blocked") order, used by the reference quantizer, the kernels and MXTensor storage:
move ``axis`` to the end, zero-pad its length L up to a multiple of the block size k
(Lp = ceil(L / k) * k), and view the result as ``[n_blocks, k]`` in row-major order. Scales are stored
in the same order, one per row. Padding elements are zeros, so they never change a block's amax.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

__all__ = ["BlockLayout", "QuantizedBlocks", "as_int", "normalize_axis", "make_layout", "to_blocks", "from_blocks"]


def as_int(value, what: str) -> int:
    """``value`` as a Python int: any integer type (``operator.index``: int, numpy integers, 0-d integer
    tensors), not bool; TypeError naming ``what`` otherwise."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an integer, got {type(value).__name__}")


def normalize_axis(axis: int, ndim: int) -> int:
    """Return ``axis`` as a non-negative Python int, with a clear error when it is out of range.
    Any integer type is accepted (:func:`as_int`)."""
    axis = as_int(axis, "axis")
    if ndim == 0:
        raise ValueError("cannot quantize a 0-d tensor in blocks: give it at least one dimension")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


@dataclass(frozen=True)
class BlockLayout:
    """Shape bookkeeping for the blocked order of a tensor (see module docstring)."""

    shape: tuple[int, ...]   # the original tensor's shape
    axis: int                # non-negative block axis
    block_size: int          # k (the axis length for per-axis formats)

    @property
    def axis_len(self) -> int:
        return self.shape[self.axis]

    @property
    def padded_len(self) -> int:
        return math.ceil(self.axis_len / self.block_size) * self.block_size if self.block_size else 0

    @property
    def n_vectors(self) -> int:
        """Number of 1-D vectors along the axis (product of the other dimensions)."""
        return math.prod(self.shape) // self.axis_len if self.axis_len else math.prod(
            s for i, s in enumerate(self.shape) if i != self.axis)

    @property
    def blocks_per_vector(self) -> int:
        return self.padded_len // self.block_size if self.block_size else 0

    @property
    def n_blocks(self) -> int:
        return self.n_vectors * self.blocks_per_vector

    @property
    def n_elements_padded(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def moved_shape(self) -> tuple[int, ...]:
        """Shape with the block axis moved last (before padding)."""
        return tuple(s for i, s in enumerate(self.shape) if i != self.axis) + (self.axis_len,)


def make_layout(shape, axis: int, block_size: int | None) -> BlockLayout:
    """Layout for a tensor of ``shape`` blocked along ``axis``; ``block_size=None`` means the whole axis."""
    shape = tuple(int(s) for s in shape)
    ax = normalize_axis(axis, len(shape))
    if shape[ax] == 0:
        raise ValueError(f"cannot quantize along axis {axis}: its length is 0 (shape {shape})")
    k = shape[ax] if block_size is None else int(block_size)
    if k <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return BlockLayout(shape, ax, k)


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """View ``x`` (of ``layout.shape``) as ``[n_blocks, block_size]`` in blocked order (zero padded)."""
    if tuple(x.shape) != layout.shape:
        raise ValueError(f"tensor shape {tuple(x.shape)} does not match layout shape {layout.shape}")
    moved = torch.movedim(x, layout.axis, -1)
    pad = layout.padded_len - layout.axis_len
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(layout.n_blocks, layout.block_size)


def from_blocks(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: drop padding and restore the original shape and axis order."""
    moved = blocks.reshape(*layout.moved_shape[:-1], layout.padded_len)[..., : layout.axis_len]
    return torch.movedim(moved, -1, layout.axis)


@dataclass
class QuantizedBlocks:
    """Element codes and scale codes of a blocked tensor (unpacked, one code per element).

    ``codes``: uint8 (int32 for elements wider than 8 bits) of shape [n_blocks, block_size].
    ``scales``: scale codes of shape [n_blocks] (uint8 for E8M0 and small-float scales, float32 values
    for FP32 scales).
    ``micro``: two-level formats only: uint8 microexponents, [n_blocks, block_size // subblock_size].
    ``tensor_scale``: formats with a per-tensor FP32 scale only: a 0-d float32 tensor.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    micro: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

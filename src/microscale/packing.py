"""Sub-byte bit packing of element codes.

Codes form a little-endian bit stream: code i occupies bits [i*b, (i+1)*b) of the stream, and bit j of
the stream is bit (j mod 8) of byte j // 8. So for b = 4 the first code is the low nibble of byte 0
(the convention of torch.float4_e2m1fn_x2 and of NVIDIA's FP4 layout), and for b = 6 four codes fill
three bytes:  byte0 = c0 | c1<<6,  byte1 = c1>>2 | c2<<4,  byte2 = c2>>4 | c3<<2.
The packed size of n codes is exactly ceil(n * b / 8) bytes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["packed_nbytes", "pack_codes", "pack_bits", "unpack_codes"]


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed for ``n_codes`` codes of ``bits`` bits: ceil(n * bits / 8)."""
    return (int(n_codes) * int(bits) + 7) // 8


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")
    return bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, read in row-major order) into a 1-D uint8 tensor.

    Codes must lie in [0, 2^bits); a code out of range raises ValueError (it would corrupt neighbours).
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if flat.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"codes must be an integer tensor, got {flat.dtype}")
    if bits == 8 and flat.dtype == torch.uint8:
        return flat.clone()
    if n and flat.device.type != "meta":
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(f"codes out of range for {bits}-bit packing: [{lo}, {hi}]")
    return pack_bits(flat, bits)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` without its checks: codes already known to lie in [0, 2^bits). Pure tensor ops
    on the codes' device (CPU, CUDA, meta, ...), with no data-dependent control flow (torch.compile)."""
    wide = codes.reshape(-1).to(torch.int64)
    n, dev = wide.numel(), wide.device
    if bits == 8:
        return wide.to(torch.uint8)
    group = 8 // math.gcd(bits, 8)            # codes per group
    group_bytes = bits * group // 8           # bytes per group
    if bits * group <= 63:
        pad = (-n) % group
        if pad:
            wide = torch.cat([wide, wide.new_zeros(pad)])
        g = wide.reshape(-1, group)
        shifts = torch.arange(group, dtype=torch.int64, device=dev) * bits
        word = (g << shifts).sum(dim=1)       # disjoint bit fields: sum == bitwise or
        byte_shifts = torch.arange(group_bytes, dtype=torch.int64, device=dev) * 8
        out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    else:  # wide codes: go through a bit array
        bit_idx = torch.arange(bits, dtype=torch.int64, device=dev)
        stream = ((wide[:, None] >> bit_idx) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out = (stream.reshape(-1, 8) << torch.arange(8, dtype=torch.int64, device=dev)).sum(dim=1).to(torch.uint8)
    return out[: packed_nbytes(n, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n_codes`` codes (uint8 for bits <= 8, else int32).
    Pure tensor ops on ``packed``'s device."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} with shape "
                        f"{tuple(packed.shape)}")
    need = packed_nbytes(n_codes, bits)
    if packed.numel() < need:
        raise ValueError(f"{n_codes} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    out_dtype = torch.uint8 if bits <= 8 else torch.int32
    dev = packed.device
    if bits == 8:
        return packed[:n_codes].clone()
    group = 8 // math.gcd(bits, 8)
    group_bytes = bits * group // 8
    if bits * group <= 63:
        n_groups = math.ceil(n_codes / group)
        b = packed[:need].to(torch.int64)
        pad = n_groups * group_bytes - b.numel()
        if pad:
            b = torch.cat([b, b.new_zeros(pad)])
        b = b.reshape(n_groups, group_bytes)
        word = (b << (torch.arange(group_bytes, dtype=torch.int64, device=dev) * 8)).sum(dim=1)
        shifts = torch.arange(group, dtype=torch.int64, device=dev) * bits
        codes = ((word[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    else:
        stream = ((packed[:need].to(torch.int64)[:, None] >> torch.arange(8, device=dev)) & 1).reshape(-1)
        stream = stream[: n_codes * bits].reshape(n_codes, bits)
        codes = (stream << torch.arange(bits, dtype=torch.int64, device=dev)).sum(dim=1)
    return codes[:n_codes].to(out_dtype)

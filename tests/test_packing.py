"""Bit packing: exact layouts, round trips for every width, exact packed sizes of MXTensors."""

import math

import pytest
import torch

import microscale as ms
from microscale.packing import pack_codes, packed_nbytes, unpack_codes


def test_fp4_layout_low_nibble_first():
    assert pack_codes(torch.tensor([0x1, 0x2, 0xF], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]


def test_fp6_layout_four_codes_in_three_bytes():
    c = torch.tensor([0b000001, 0b000010, 0b000011, 0b111111], dtype=torch.uint8)
    # stream (LSB first): c0 | c1<<6 | c2<<12 | c3<<18
    word = 1 | (2 << 6) | (3 << 12) | (63 << 18)
    assert pack_codes(c, 6).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack_codes(c[:1], 6).tolist() == [1]


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_round_trip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 33, 1000):
        codes = torch.randint(0, 1 << bits, (n,), generator=g)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
        assert torch.equal(unpack_codes(packed, bits, n).to(torch.int64), codes)


def test_pack_rejects_out_of_range_and_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 0)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(torch.tensor([1], dtype=torch.uint8), 6, 2)


@pytest.mark.parametrize("name,bits", [("mxfp4_e2m1", 4), ("mxfp6_e3m2", 6), ("mxfp6_e2m3", 6),
                                       ("mxfp8_e4m3", 8), ("mxfp8_e5m2", 8), ("mxint8", 8)])
@pytest.mark.parametrize("shape,axis", [((4096,), 0), ((3, 100), -1), ((3, 100), 0), ((2, 5, 33), 1),
                                        ((7, 1), 0), ((1, 31), -1)])
def test_packed_size_exact_and_round_trip(name, bits, shape, axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    q = ms.quantize(x, name, axis=axis)
    length = shape[axis]
    n_vectors = x.numel() // length
    n_blocks = n_vectors * math.ceil(length / 32)
    assert q.nbytes == math.ceil(n_blocks * 32 * bits / 8) + n_blocks
    assert q.codes.numel() == math.ceil(n_blocks * 32 * bits / 8) and q.scales.numel() == n_blocks
    # unpack -> repack is the identity, and the unpacked codes are those of the reference quantizer
    blocks = q.to_blocks()
    assert torch.equal(pack_codes(blocks.codes, bits), q.codes)
    assert q.element_codes().shape == x.shape


def test_bits_per_element_for_whole_blocks():
    x = torch.randn(64, 4096)
    assert ms.quantize(x, "mxfp4").bits_per_element == 4.25
    assert ms.quantize(x, "mxfp6_e2m3").bits_per_element == 6.25
    assert ms.quantize(x, "mxfp8_e4m3").bits_per_element == 8.25

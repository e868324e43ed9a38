"""Element, scale and block formats: every code against ml_dtypes, and the OCP MX v1.0 Table 1 facts."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import microscale as ms
from microscale.formats import E2M1, E2M3, E3M2, E4M3, E5M2, E8M0, INT8
from microscale.reference import decode_element, encode_element

ML_DTYPES = {
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e2m1": ml_dtypes.float4_e2m1fn,
}
ELEMENTS = [E4M3, E5M2, E3M2, E2M3, E2M1]


@pytest.mark.parametrize("elem", ELEMENTS, ids=lambda e: e.name)
def test_every_code_decodes_like_ml_dtypes(elem):
    codes = np.arange(elem.n_codes, dtype=np.uint8)
    expected = codes.view(ML_DTYPES[elem.name]).astype(np.float64)
    ours = decode_element(torch.from_numpy(codes.astype(np.int64)), elem).numpy()
    np.testing.assert_array_equal(ours, expected)  # NaN == NaN for assert_array_equal
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(np.signbit(ours[finite]), np.signbit(expected[finite]))  # -0.0 too


@pytest.mark.parametrize("elem", ELEMENTS, ids=lambda e: e.name)
def test_every_value_encodes_back_to_its_code(elem):
    codes = torch.arange(elem.n_codes)
    vals = decode_element(codes, elem)
    back = encode_element(vals, elem)
    nan = torch.isnan(vals)
    assert torch.equal(back[~nan], codes[~nan])  # includes -0.0 -> the sign-bit code
    if nan.any():  # every NaN code re-encodes to the one canonical NaN (S=0, all ones)
        assert set(back[nan].tolist()) == {elem.nan_code}
        assert elem.nan_code == (1 << (elem.bits - 1)) - 1


def test_e8m0_codes_like_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    expected = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    np.testing.assert_array_equal(E8M0.code_values, expected)
    assert E8M0.code_values[127] == 1.0 and math.isnan(E8M0.code_values[255])
    assert (E8M0.emin, E8M0.emax, E8M0.bias, E8M0.nan_code) == (-127, 127, 127, 255)


# OCP MX v1.0 Table 1 and §5.3: emax_elem, max normal, min normal, min subnormal.
@pytest.mark.parametrize("elem,emax,maxn,minn,mins", [
    (E4M3, 8, 448.0, 2.0**-6, 2.0**-9),
    (E5M2, 15, 57344.0, 2.0**-14, 2.0**-16),
    (E3M2, 4, 28.0, 0.25, 0.0625),
    (E2M3, 2, 7.5, 1.0, 0.125),
    (E2M1, 2, 6.0, 1.0, 0.5),
    (INT8, 0, 127 / 64, 1 / 64, 1 / 64),
], ids=lambda v: getattr(v, "name", None))
def test_spec_facts(elem, emax, maxn, minn, mins):
    assert elem.emax == emax
    assert elem.max_normal == maxn
    assert elem.min_normal == minn
    assert elem.min_subnormal == mins


def test_int8_codes_are_twos_complement_fixed_point():
    vals = INT8.code_values
    assert vals[0x01] == 1 / 64 and vals[0x7F] == 127 / 64
    assert vals[0xFF] == -1 / 64 and vals[0x81] == -127 / 64
    assert vals[0x80] == -2.0  # the encoding's value; quantization never produces it (symmetric range)
    back = encode_element(torch.tensor(vals), INT8)
    assert torch.equal(back, torch.arange(256))


@pytest.mark.parametrize("name,bits", [("mxfp8_e4m3", 8.25), ("mxfp8_e5m2", 8.25), ("mxfp6_e3m2", 6.25),
                                       ("mxfp6_e2m3", 6.25), ("mxfp4_e2m1", 4.25), ("mxint8", 8.25)])
def test_mx_formats_registered(name, bits):
    fmt = ms.get_format(name)
    assert fmt.block_size == 32 and fmt.scale is E8M0 and fmt.is_mx
    assert fmt.bits_per_element == bits


def test_aliases_and_unknown_names():
    assert ms.get_format("MXFP4") is ms.get_format("mxfp4_e2m1")
    assert ms.get_format("mxfp8") is ms.get_format("mxfp8_e4m3")
    with pytest.raises(ValueError, match="unknown format 'mxfp5'.*mxfp4_e2m1"):
        ms.get_format("mxfp5")
    with pytest.raises(TypeError, match="format must be a name"):
        ms.get_format(4)
    assert "mxint8" in ms.list_formats()


def test_bad_format_definitions_rejected():
    with pytest.raises(ValueError, match="ebits"):
        ms.ElementFormat("bad", "fp", ebits=0, mbits=3)
    with pytest.raises(ValueError, match="subblock_size"):
        ms.BlockFormat("bad", E2M1, block_size=16, scale=E8M0, subblock_size=3, micro_bits=1)
    with pytest.raises(ValueError, match="already registered"):
        ms.register_format(ms.BlockFormat("mxfp4_e2m1", E2M1, 32, E8M0))

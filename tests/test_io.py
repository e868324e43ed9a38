"""microscale.io: safetensors files of MXTensors — round trips, interop, validation, atomic writes."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open

import microscale as ms
from microscale import io as msio
from microscale.packing import pack_codes, unpack_codes
from microscale.tensor import MXTensor

QUANTIZING = [n for n in ms.list_formats() if ms.get_format(n).element is not None]
RAGGED = [(3, 70), (5, 7, 33), (1, 1)]


def _random_mx(fmt, shape, axis, seed=0) -> MXTensor:
    """An MXTensor with random component bytes of exactly the sizes the format implies."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for suffix, (dtype, cshape) in msio.component_specs(shape, axis, fmt).items():
        if dtype == torch.uint8:
            parts[suffix] = torch.randint(0, 256, cshape, generator=g, dtype=torch.uint8)
        else:
            parts[suffix] = torch.randn(cshape, generator=g, dtype=dtype)
    fmt_ = ms.get_format(fmt)
    lay = ms.layout.make_layout(shape, axis, fmt_.block_size)
    if "micro" in parts:  # the pad bits after the last microexponent are zero in a real tensor
        n_bits = lay.n_blocks * (lay.block_size // fmt_.subblock_size) * fmt_.micro_bits
        if n_bits % 8:
            parts["micro"][-1] &= (1 << (n_bits % 8)) - 1
    # padding element codes (past each vector's end) are zero in a real tensor, and files require it
    live = ms.layout.to_blocks(torch.ones(shape, dtype=torch.uint8), lay).reshape(-1)
    codes = unpack_codes(parts["codes"], fmt_.element.bits, lay.n_elements_padded) * live
    parts["codes"] = pack_codes(codes, fmt_.element.bits)
    return MXTensor(parts["codes"], parts["scales"], shape, axis, fmt, parts.get("micro"),
                    parts.get("tensor_scale"))


def _assert_same_mx(a: MXTensor, b: MXTensor):
    assert isinstance(b, MXTensor)
    assert (a.format, a.shape, a.axis) == (b.format, b.shape, b.axis)
    for c in ("codes", "scales", "micro", "tensor_scale"):
        x, y = getattr(a, c), getattr(b, c)
        if x is None:
            assert y is None, c
        else:
            assert x.dtype == y.dtype and x.shape == y.shape, c
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), c


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", QUANTIZING)
def test_round_trip_is_bit_exact_for_every_format(tmp_path, fmt):
    """Real quantized tensors, and tensors with random component bytes (every code and scale pattern),
    ragged shapes, both axes, for every registered quantizing format."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, shape in enumerate(RAGGED):
        for axis in (0, -1):
            x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 4, shape, generator=g)
            tensors[f"q{i}.axis{axis}"] = ms.quantize(x, fmt, axis=axis)
            tensors[f"r{i}/axis{axis}"] = _random_mx(fmt, shape, axis, seed=i)
    path = tmp_path / "m.safetensors"
    ms.save_file(tensors, path)
    loaded = ms.load_file(path)
    assert list(loaded) == list(tensors)
    for name, q in tensors.items():
        _assert_same_mx(q, loaded[name])
        if name.startswith("q"):
            assert torch.equal(loaded[name].dequantize(), q.dequantize())


PLAIN = {
    "f32": torch.randn(3, 5),
    "f16": torch.randn(7).half(),
    "bf16": torch.randn(2, 3).bfloat16(),
    "f64": torch.randn(4, dtype=torch.float64),
    "i64": torch.arange(-5, 5),
    "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    "i16": torch.tensor([-2, 7], dtype=torch.int16),
    "i8": torch.tensor([-128, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "fp8": torch.randn(9).to(torch.float8_e4m3fn),
    "fp8e5": torch.randn(3).to(torch.float8_e5m2),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "transposed": torch.arange(12.0).reshape(3, 4).t(),
}


def test_plain_tensors_round_trip(tmp_path):
    path = tmp_path / "p.safetensors"
    ms.save_file(PLAIN, path)
    loaded = ms.load_file(path)
    assert list(loaded) == list(PLAIN)
    for k, v in PLAIN.items():
        assert _bits_equal(loaded[k], v), k


def test_plain_safetensors_library_reads_the_file(tmp_path):
    q = ms.quantize(torch.randn(4, 70), "mxfp4", axis=-1)
    path = tmp_path / "m.safetensors"
    ms.save_file({"w": q, **PLAIN}, path, metadata={"author": "me"})
    raw = st.load_file(path)
    assert raw["w.codes"].dtype == torch.uint8 and raw["w.scales"].dtype == torch.uint8
    assert torch.equal(raw["w.codes"], q.codes) and torch.equal(raw["w.scales"], q.scales)
    for k, v in PLAIN.items():
        assert _bits_equal(raw[k], v), k
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(PLAIN) | {"w.codes", "w.scales"}
    assert meta["author"] == "me" and meta["microscale.version"] == "1"
    rec = json.loads(meta["microscale.mx"])["w"]
    assert rec["format"] == "mxfp4_e2m1" and rec["shape"] == [4, 70] and rec["axis"] == 1
    assert msio.read_header(path).user_metadata == {"author": "me"}


def test_file_written_by_safetensors_library_loads(tmp_path):
    path = tmp_path / "hf.safetensors"
    st.save_file({"a": torch.randn(3, 4), "b": torch.arange(5)}, path, metadata={"format": "pt"})
    loaded = ms.load_file(path)
    assert torch.equal(loaded["a"], st.load_file(path)["a"]) and torch.equal(loaded["b"], torch.arange(5))


def test_iter_file_streams_in_file_order(tmp_path):
    q = ms.quantize(torch.randn(2, 40), "mxfp6")
    path = tmp_path / "m.safetensors"
    ms.save_file({"a": torch.ones(2), "w": q, "z": torch.zeros(3)}, path)
    it = msio.iter_file(path)
    name, first = next(it)
    assert name == "a" and torch.equal(first, torch.ones(2))
    assert [n for n, _ in it] == ["w", "z"]
    with msio.SafetensorsReader(path) as r:
        _assert_same_mx(q, r.get("w"))


def test_data_is_aligned_for_the_torch_loader(tmp_path):
    """Mixed itemsizes: every tensor starts at a multiple of its itemsize (safetensors needs it)."""
    q = _random_mx("nvfp4" if "nvfp4" in QUANTIZING else "mxfp4", (3, 19), -1)
    tensors = {"u": torch.ones(3, dtype=torch.uint8), "w": q, "d": torch.ones(1, dtype=torch.float64),
               "h": torch.ones(1, dtype=torch.float16)}
    path = tmp_path / "a.safetensors"
    ms.save_file(tensors, path)
    h = msio.read_header(path)
    assert h.data_start % 8 == 0
    for e in h.entries.values():
        assert e.start % torch.empty((), dtype=e.dtype).element_size() == 0, e.name
    st.load_file(path)


# ---- bad input on save -------------------------------------------------------------------------------
@pytest.mark.parametrize("tensors, metadata, exc, match", [
    ([("w", torch.ones(1))], None, TypeError, "dict"),
    ({1: torch.ones(1)}, None, TypeError, "str"),
    ({"w": [1.0, 2.0]}, None, TypeError, "MXTensor or a torch.Tensor"),
    ({"": torch.ones(1)}, None, ValueError, "invalid tensor name"),
    ({"w": torch.ones(1, dtype=torch.complex128)}, None, TypeError, "cannot be stored"),
    ({"w": torch.ones(1)}, {"microscale.version": "9"}, ValueError, "reserved"),
    ({"w": torch.ones(1)}, {"k": 3}, TypeError, "str -> str"),
    ({"w": torch.ones(1)}, "k=v", TypeError, "metadata"),
])
def test_save_rejects_bad_input(tmp_path, tensors, metadata, exc, match):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(exc, match=match):
        ms.save_file(tensors, path, metadata)
    assert os.listdir(tmp_path) == []


def test_save_rejects_component_name_clash(tmp_path):
    q = ms.quantize(torch.randn(2, 32), "mxfp8")
    with pytest.raises(ValueError, match=r"'w\.codes'.*clashes with tensor 'w'"):
        ms.save_file({"w": q, "w.codes": torch.ones(1)}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


# ---- atomicity -------------------------------------------------------------------------------------
def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    real_write = msio.SafetensorsWriter.write
    calls = []

    def failing_write(self, name, value):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real_write(self, name, value)

    monkeypatch.setattr(msio.SafetensorsWriter, "write", failing_write)
    path = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="disk on fire"):
        ms.save_file({"a": torch.ones(1000), "b": torch.ones(1000), "c": torch.ones(3)}, path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_failure_at_commit_keeps_the_old_file(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "m.safetensors"
    ms.save_file({"old": torch.ones(2)}, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(f"{fail_at} failed")

    monkeypatch.setattr(msio.os, fail_at, boom)
    with pytest.raises(OSError, match=f"{fail_at} failed"):
        ms.save_file({"new": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.safetensors"] and path.read_bytes() == before


def test_writer_refuses_to_commit_an_incomplete_file(tmp_path):
    path = tmp_path / "m.safetensors"
    specs = {"a": msio.PlainSpec(torch.float32, (2,)), "b": msio.PlainSpec(torch.int64, (3,))}
    with pytest.raises(ValueError, match="never written: 'b'"):
        with msio.SafetensorsWriter(path, specs) as w:
            w.write("a", torch.ones(2))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="planned torch.int64 \\[3\\]"):
        with msio.SafetensorsWriter(path, specs) as w:
            w.write("b", torch.ones(3))
    assert os.listdir(tmp_path) == []


# ---- broken files ---------------------------------------------------------------------------------
def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _expect(path, *patterns):
    with pytest.raises(ValueError) as info:
        ms.load_file(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert p in msg, msg
    return msg


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1])
def test_truncated_file(good_file, keep):
    raw = good_file.read_bytes()
    good_file.write_bytes(raw[:keep] if keep >= 0 else raw[:-3])
    _expect(good_file, "truncated" if keep != -1 else "run past the end")


def test_corrupt_header_json(good_file):
    raw = bytearray(good_file.read_bytes())
    raw[8] = ord("[")  # '{' -> '[': no longer the header object
    raw[12] = 0xFF     # and not UTF-8 either
    good_file.write_bytes(bytes(raw))
    _expect(good_file, "not valid JSON")


def test_header_length_past_end_of_file(good_file):
    raw = good_file.read_bytes()
    good_file.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    _expect(good_file, "truncated: the header length says")


def test_trailing_bytes(good_file):
    good_file.write_bytes(good_file.read_bytes() + b"\0" * 8)
    _expect(good_file, "trailing bytes")


@pytest.mark.parametrize("mutate, patterns", [
    (lambda h: h["b"].update(data_offsets=[h["b"]["data_offsets"][0], h["b"]["data_offsets"][1] + 4]),
     ["'b'", "needs 16"]),                                      # size disagrees with dtype * shape
    (lambda h: h["b"].update(shape=[5]), ["'b'", "needs 20"]),
    (lambda h: h["b"].update(dtype="F99"), ["'b'", "unsupported dtype"]),
    (lambda h: h["b"].update(shape=[-4]), ["'b'", "non-negative"]),
    (lambda h: h["b"].update(data_offsets=[10**9, 10**9 + 16]), ["'b'", "past the end"]),
    (lambda h: h["w.scales"].update(data_offsets=[8, 17]), ["'w.scales'", "overlap tensor 'b'"]),
    (lambda h: h.pop("b"), ["gap"]),
    (lambda h: h["__metadata__"].update({"microscale.version": "7"}), ["version '7'"]),
    (lambda h: h["__metadata__"].update({"x": 1}), ["__metadata__ must be"]),
])
def test_header_that_lies(good_file, mutate, patterns):
    header, data = _split(good_file)
    assert header["b"]["data_offsets"] == [0, 16] and header["w.scales"]["shape"] == [9]
    mutate(header)
    _join(good_file, header, data)
    _expect(good_file, *patterns)


def _mutate_record(path, **changes):
    header, data = _split(path)
    mx = json.loads(header["__metadata__"]["microscale.mx"])
    for k, v in changes.items():
        if k == "spec_mbits":
            mx["w"]["spec"]["element"]["mbits"] = v
        else:
            mx["w"][k] = v
    header["__metadata__"]["microscale.mx"] = json.dumps(mx)
    _join(path, header, data)


def test_unknown_format_name_is_built_from_a_valid_spec_only(good_file):
    # an unregistered name is built from its stored spec (files may hold any BlockFormat), so a name the
    # registry lacks is refused only when its spec is not a valid format
    _mutate_record(good_file, format="mxfp3_e1m1", spec_mbits=-1)
    _expect(good_file, "'w'", "not a valid ElementFormat", "mbits")


def test_format_spec_disagrees_with_registry(good_file):
    _mutate_record(good_file, spec_mbits=2)
    _expect(good_file, "'w'", "differs from the registered one", "element.mbits")


@pytest.mark.parametrize("change, pattern", [
    ({"shape": [3, 200]}, "needs 'w.codes' to be U8"),
    ({"shape": [6, 70]}, "needs 'w.codes'"),
    ({"axis": 0}, "along axis 0"),
    ({"axis": 5}, "out of range"),
    ({"format": "mxfp8", "spec": None}, "spec must be the format's full spec"),
    ({"shape": "3x70"}, "shape must be"),
])
def test_metadata_disagrees_with_stored_sizes(good_file, change, pattern):
    _mutate_record(good_file, **change)
    _expect(good_file, "'w'", pattern)


def test_missing_extra_or_clashing_component(tmp_path):
    q = ms.quantize(torch.randn(3, 70), "mxfp4")
    ok = tmp_path / "ok.safetensors"
    ms.save_file({"w": q}, ok)
    meta = msio.read_header(ok).metadata
    bad = tmp_path / "bad.safetensors"
    st.save_file({"w.codes": q.codes}, bad, metadata=meta)  # w.scales left out
    _expect(bad, "'w'", "missing its component 'w.scales'")
    st.save_file({"w.codes": q.codes, "w.scales": q.scales, "w.micro": q.codes.clone()}, bad, metadata=meta)
    _expect(bad, "'w'", "has no micro")
    st.save_file({"w.codes": q.codes, "w.scales": q.scales, "w": q.codes.clone()}, bad, metadata=meta)
    _expect(bad, "'w'", "same name as this MX tensor")


def test_duplicate_header_key(good_file):
    raw = good_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].decode().rstrip()
    entry = json.dumps({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]})
    text = text[:-1] + f',"b":{entry}}}'
    h = text.encode()
    good_file.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    _expect(good_file, "appears twice")


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        ms.load_file(tmp_path / "nope.safetensors")

"""Seeded fuzzing of microscale.io's loader: a hostile or damaged file only ever raises ValueError.

- data-byte flips with checksums on: every one is a ValueError naming the tensor that owns the byte;
- header-byte flips: ValueError, or the very same tensors (a flip in padding or user metadata);
- truncations: ValueError; hostile shapes and nested JSON: ValueError naming the file.

The default suite runs a few seconds of it (fixed seeds); ``test_fuzz_long`` (marked slow) runs more
flips on a larger file: ``pytest -m slow tests/test_io_fuzz.py``; FUZZ_SEED / FUZZ_ROUNDS override.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch

import microscale as ms
from microscale import io as msio
from microscale.tensor import MXTensor


def _sample_tensors(scale: int = 1) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": ms.quantize(torch.randn(2 * scale, 40, generator=g), "mxfp4"),
        "m": ms.quantize(torch.randn(20, 3 * scale, generator=g), "mx6", axis=0),
        "n": ms.quantize(torch.randn(scale, 33, generator=g), "nvfp4"),
        "b": torch.randn(5 * scale, generator=g),
        "i": torch.arange(3, dtype=torch.int64),
        "e": torch.zeros(0, 3),
    }


def _write(tmp_path, tensors, name="f.safetensors"):
    path = tmp_path / name
    ms.save_file(tensors, path, {"note": "fuzz"})
    return path, path.read_bytes()


def _owners(raw: bytes) -> list[tuple[int, int, str]]:
    """(start, end, logical tensor name) of every stored tensor's bytes in the file."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mx = json.loads(header["__metadata__"].get("microscale.mx", "{}"))
    out = []
    for stored, info in header.items():
        if stored == "__metadata__":
            continue
        owner = next((m for m in mx if stored.startswith(m + ".")), stored)
        a, b = info["data_offsets"]
        if b > a:
            out.append((8 + n + a, 8 + n + b, owner))
    return out


def _same(a, b) -> bool:
    if isinstance(a, MXTensor):
        return (isinstance(b, MXTensor) and (a.format, a.shape, a.axis) == (b.format, b.shape, b.axis)
                and all(_same(x, y) for x, y in zip(a.components().values(), b.components().values())))
    return (isinstance(b, torch.Tensor) and not isinstance(b, MXTensor) and a.dtype == b.dtype
            and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _load(path, raw: bytes):
    """Load the damaged file from memory (fast: no disk round trip); errors name ``path``."""
    return msio.load_bytes(raw, name=str(path))


def _data_flips(tmp_path, tensors, rounds: int, seed: int) -> int:
    path, raw = _write(tmp_path, tensors)
    owners = _owners(raw)
    positions = [(p, name) for a, b, name in owners for p in range(a, b)]
    rng = random.Random(seed)
    caught = 0
    for _ in range(rounds):
        pos, owner = rng.choice(positions)
        bad = bytearray(raw)
        bad[pos] ^= rng.randrange(1, 256)
        with pytest.raises(ValueError) as info:
            _load(path, bytes(bad))
        msg = str(info.value)
        assert f"tensor {owner!r}" in msg and "checksum mismatch" in msg and str(path) in msg, (pos, msg)
        caught += 1
    return caught


def _header_flips(tmp_path, tensors, rounds: int, seed: int) -> tuple[int, int]:
    path, raw = _write(tmp_path, tensors)
    want = ms.load_file(path)
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(seed)
    errors = same = 0
    for _ in range(rounds):
        pos = rng.randrange(0, 8 + n)
        bad = bytearray(raw)
        bad[pos] ^= rng.randrange(1, 256)
        try:
            got = _load(path, bytes(bad))
        except ValueError as e:
            assert str(path) in str(e), str(e)
            errors += 1
            continue
        # anything else (TypeError, RecursionError, KeyError, ...) fails the test by propagating
        assert list(got) == list(want) and all(_same(want[k], got[k]) for k in want), (pos, bad[pos])
        same += 1
    return errors, same


def _truncations(tmp_path, tensors, rounds: int, seed: int) -> int:
    path, raw = _write(tmp_path, tensors)
    rng = random.Random(seed)
    lengths = list(range(0, 80)) + [rng.randrange(0, len(raw)) for _ in range(rounds)] + [len(raw) - 1]
    for k in lengths:
        with pytest.raises(ValueError) as info:
            _load(path, raw[:k])
        assert str(path) in str(info.value)
    return len(lengths)


def test_data_byte_flips_are_all_caught(tmp_path):
    """2,000 seeded single-byte flips in the data section: 2,000 ValueErrors naming the tensor."""
    assert _data_flips(tmp_path, _sample_tensors(), rounds=2000, seed=12) == 2000


def test_header_byte_flips_give_value_errors_or_identical_tensors(tmp_path):
    errors, same = _header_flips(tmp_path, _sample_tensors(), rounds=1500, seed=7)
    assert errors + same == 1500 and errors > 1000


def test_truncations(tmp_path):
    assert _truncations(tmp_path, _sample_tensors(), rounds=150, seed=3) > 200


HOSTILE_SHAPES = [[-1], [2**63], [2**64], [2**63 - 1, 2], [0, 2**63], [2**62, 4, 0], [1.5], ["3"], [True],
                  [[2]], None, {}, "3", [2**200]]


@pytest.mark.parametrize("shape", HOSTILE_SHAPES, ids=[str(i) for i in range(len(HOSTILE_SHAPES))])
@pytest.mark.parametrize("where", ["plain", "mx"])
def test_hostile_shapes(tmp_path, shape, where):
    path, raw = _write(tmp_path, _sample_tensors())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].pop(msio.CHECKSUMS_KEY)
    if where == "plain":
        header["b"]["shape"] = shape
    else:
        mx = json.loads(header["__metadata__"]["microscale.mx"])
        mx["w"]["shape"] = shape
        header["__metadata__"]["microscale.mx"] = json.dumps(mx)
    h = json.dumps(header).encode()
    with pytest.raises(ValueError) as info:
        _load(path, struct.pack("<Q", len(h)) + h + raw[8 + n:])
    msg = str(info.value)
    assert str(path) in msg and ("'b'" if where == "plain" else "'w'") in msg, msg


@pytest.mark.parametrize("depth", [65, 1000, 100_000, 1_000_000])
@pytest.mark.parametrize("where", ["value", "key-level", "mx", "checksums"])
def test_nested_json(tmp_path, depth, where):
    path, raw = _write(tmp_path, _sample_tensors())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    deep = "[" * depth + "]" * depth
    if where == "value":
        text = json.dumps(header).replace('"note": "fuzz"', '"note": ' + deep)
    elif where == "key-level":
        text = json.dumps(header)[:-1] + ', "x": ' + "{\"a\":" * depth + "1" + "}" * depth + "}"
    else:
        key = "microscale.mx" if where == "mx" else msio.CHECKSUMS_KEY
        header["__metadata__"][key] = deep
        text = json.dumps(header)
    h = text.encode()
    with pytest.raises(ValueError) as info:
        _load(path, struct.pack("<Q", len(h)) + h + raw[8 + n:])
    assert str(path) in str(info.value)


def test_unbalanced_and_garbage_headers(tmp_path):
    path, raw = _write(tmp_path, _sample_tensors())
    rng = random.Random(5)
    for _ in range(200):
        k = rng.randrange(1, 300)
        body = bytes(rng.choice(b'{}[]":,0123456789eE.-+ntrufalsNI\\ \x00\xff') for _ in range(k))
        with pytest.raises(ValueError):
            _load(path, struct.pack("<Q", len(body)) + body)


@pytest.mark.slow
def test_fuzz_long(tmp_path):
    """Longer run: larger file, more seeds (FUZZ_SEED, FUZZ_ROUNDS)."""
    seed = int(os.environ.get("FUZZ_SEED", "2026"))
    rounds = int(os.environ.get("FUZZ_ROUNDS", "20000"))
    tensors = _sample_tensors(scale=8)
    assert _data_flips(tmp_path, tensors, rounds, seed) == rounds
    errors, same = _header_flips(tmp_path, tensors, rounds, seed + 1)
    assert errors + same == rounds
    _truncations(tmp_path, tensors, rounds // 10, seed + 2)
    rng = random.Random(seed + 3)
    path, raw = _write(tmp_path, tensors)
    want = ms.load_file(path)
    for _ in range(rounds // 4):  # several flips at once anywhere in the file
        bad = bytearray(raw)
        for _ in range(rng.randrange(2, 9)):
            bad[rng.randrange(0, len(bad))] ^= rng.randrange(1, 256)
        try:
            got = _load(path, bytes(bad))
        except ValueError:
            continue
        if not (list(got) == list(want) and all(_same(want[k], got[k]) for k in want)):
            # only possible when one flip took the checksums entry out of the microscale namespace (the
            # file then reads as one without checksums, which must load) and another changed the data
            assert msio.SafetensorsReader.from_bytes(bytes(bad)).header.checksums is None

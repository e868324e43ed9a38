"""Issue 12 (reliability): a memory-safe C boundary, hostile files that only ever raise ValueError,
integrity checks, strict MX metadata, clean saves, bounded-memory inspect, empty and meta tensors.

Each numbered finding of the issue has its regression tests here (the section headers give the number).
The fuzz tests live in test_io_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import safetensors.torch as st
import torch

import microscale as ms
from microscale import cli
from microscale import io as msio
from microscale import kernels
from microscale.packing import pack_codes, unpack_codes
from microscale.tensor import MXTensor

QUANTIZING = [n for n in ms.list_formats() if ms.get_format(n).element is not None]
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path, header, data: bytes, text: str | None = None):
    h = (text if text is not None else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _expect(path, *patterns, loader=None):
    with pytest.raises(ValueError) as info:
        (loader or ms.load_file)(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert p in msg, msg
    return msg


def _strip_checksums(header: dict) -> dict:
    header["__metadata__"].pop(msio.CHECKSUMS_KEY, None)
    return header


# ---- 1. segfaults from misuse: now Python exceptions ----------------------------------------------
_MISUSE = r"""
import dataclasses, torch, microscale as ms
from microscale import kernels
from microscale.tensor import MXTensor

x = torch.randn(64, 4096)
tiny = torch.zeros(1, dtype=torch.uint8)

def fresh():
    return ms.quantize(x, "mxfp4")

def replace_codes():
    fresh().codes = tiny

def replace_scales():
    fresh().scales = tiny

def bypass_freeze_codes():
    q = fresh(); object.__setattr__(q, "codes", tiny); q.dequantize()

def bypass_freeze_scales():
    q = fresh(); object.__setattr__(q, "scales", tiny); q.dequantize()

def resize_codes_in_place():
    q = fresh(); q.codes.resize_(1); q.dequantize()

def kernel_guard_codes():  # skip every Python check above the C boundary: the guard still holds
    q = fresh(); object.__setattr__(q, "codes", tiny); kernels.dequantize(q, torch.float32)

def kernel_guard_out():
    q = fresh(); kernels.dequantize(q, torch.float32, torch.empty(1))

def out_on_meta_dequantize():
    fresh().dequantize(out=torch.empty(64, 4096, device="meta"))

def out_on_meta_fake_quantize():
    ms.fake_quantize(x, "mxfp4", out=torch.empty(64, 4096, device="meta"))

def scales_on_meta():
    q = fresh(); MXTensor(q.codes, q.scales.to("meta"), q.shape, q.axis, q.format)

def scales_on_meta_bypass():
    q = fresh(); object.__setattr__(q, "scales", q.scales.to("meta")); q.dequantize()

def guard_refuses_non_cpu():  # a non-CPU buffer (meta stands in for CUDA here) never reaches C
    kernels.checked_pointers("dequantize", [("scales", torch.empty(4, dtype=torch.uint8, device="meta"),
                                             torch.uint8, 4)])

def guard_refuses_null():
    kernels.checked_pointers("dequantize", [("codes", None, torch.uint8, 16)])

def guard_refuses_geometry():
    t = torch.zeros(8)
    kernels.checked_pointers("quantize", [("x", t, torch.float32, 32)], (2, 8, 1))

for case in [replace_codes, replace_scales, bypass_freeze_codes, bypass_freeze_scales, resize_codes_in_place,
             kernel_guard_codes, kernel_guard_out, out_on_meta_dequantize, out_on_meta_fake_quantize,
             scales_on_meta, scales_on_meta_bypass, guard_refuses_non_cpu, guard_refuses_null,
             guard_refuses_geometry]:
    try:
        case()
        print(case.__name__, "NO-ERROR", flush=True)
    except Exception as e:
        print(case.__name__, type(e).__name__, str(e).splitlines()[0][:200], flush=True)
"""


def test_misuse_raises_python_exceptions_in_a_subprocess():
    """Old code: dequantize() read 16 MiB past a replaced 1-byte buffer, and meta out=/scales passed a
    NULL pointer to C (SIGSEGV). Now every case is a Python exception and the process exits normally."""
    r = _python(_MISUSE)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # a signal would give a negative code
    got = {line.split()[0]: line.split(maxsplit=2)[1:] for line in r.stdout.splitlines()}
    frozen = {"replace_codes", "replace_scales"}
    for case, (exc, *msg) in got.items():
        want = "FrozenInstanceError" if case in frozen else "ValueError"
        assert exc == want, (case, exc, msg)
    assert len(got) == 14
    assert "expected exactly 1048576 bytes, got 4" in got["kernel_guard_out"][1]
    assert "CPU tensors only" in got["guard_refuses_non_cpu"][1]
    assert "was a component replaced" in got["kernel_guard_codes"][1]


def test_mxtensor_is_frozen_and_validate_changes_nothing():
    q = ms.quantize(torch.randn(4, 64), "mxfp6", axis=-1)
    assert q.axis == 1  # normalized at construction
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.axis = 0
    before = (q.codes, q.scales, q.shape, q.axis)
    q.validate()
    assert (q.codes, q.scales, q.shape, q.axis) == before


def test_non_cpu_tensors_are_not_covered_by_the_c_kernels():
    """Non-CPU inputs make the kernel entry points answer "not covered" (None) so the caller falls back."""
    m = torch.empty(4, 64, device="meta")
    assert kernels.fake_quantize(m, "mxfp4", -1, "even", "floor", None, None) is None
    assert kernels.quantize(m, "mxfp4", -1, "even", "floor", None, None) is None
    assert kernels.fake_quantize(torch.randn(4, 64), "mxfp4", -1, "even", "floor", None, None,
                                 out=torch.empty(4, 64, device="meta")) is None


# ---- 2. hostile headers ---------------------------------------------------------------------------
def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["header", "metadata value", "mx record"])
def test_deeply_nested_json_is_a_value_error(tmp_path, good_file, where, capsys):
    """Old code: RecursionError (and a traceback from `microscale inspect`)."""
    header, data = _split(good_file)
    if where == "header":
        text = json.dumps(header)[:-1] + ', "deep": ' + _deep(100_000) + "}"
    elif where == "metadata value":
        header["__metadata__"]["x"] = 1
        text = json.dumps(header).replace('"x": 1', '"x": ' + _deep(100_000))
    else:
        header["__metadata__"]["microscale.mx"] = _deep(100_000)
        text = None
    _join(good_file, header, data, text)
    _expect(good_file, "deep")
    rc = cli.main(["inspect", str(good_file)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and str(good_file) in err


@pytest.mark.parametrize("shape", [[0, 2**63], [2**62, 4, 0], [2**64, 0, 32], [0, 2**64], [2**32, 2**32, 0]])
def test_huge_dimensions_of_empty_plain_tensors(good_file, shape):
    """Old code: TypeError / RuntimeError deep in torch. Every dimension and the product of the
    non-zero ones are bounded to int64."""
    header, data = _split(good_file)
    header["e"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data)]}
    _join(good_file, _strip_checksums(header), data)
    _expect(good_file, "'e'", "2^63")


def test_huge_dimension_of_an_empty_mx_tensor(tmp_path):
    """Old code: an MX tensor of shape [2^64, 0, 32] loaded and failed on use."""
    q = ms.quantize(torch.empty(4, 0, 32), "mxfp4")
    path = tmp_path / "e.safetensors"
    ms.save_file({"w": q}, path)
    header, data = _split(path)
    mx = json.loads(header["__metadata__"]["microscale.mx"])
    mx["w"]["shape"] = [2**64, 0, 32]
    header["__metadata__"]["microscale.mx"] = json.dumps(mx)
    _join(path, _strip_checksums(header), data)
    _expect(path, "'w'", "2^63")


def test_shape_bounds_in_the_api():
    with pytest.raises(ValueError, match="2\\^63"):
        msio.SafetensorsWriter("x", {"a": msio.PlainSpec(torch.float32, (2**64, 0))})
    with pytest.raises(ValueError, match="2\\^63"):
        ms.tensor.check_shape([2**62, 4, 0])
    assert ms.tensor.check_shape([np.int64(3), 0]) == (3, 0)


# ---- 3. integrity ---------------------------------------------------------------------------------
def test_data_byte_flip_is_caught_and_names_the_tensor(good_file, capsys):
    """Old code: 2,000 of 2,000 data-byte flips loaded silently."""
    header, data = _split(good_file)
    raw = bytearray(good_file.read_bytes())
    start = len(raw) - len(data)
    s0, _ = header["w.scales"]["data_offsets"]
    raw[start + s0] ^= 0x01  # one scale byte: a whole block off by a factor of two
    good_file.write_bytes(bytes(raw))
    msg = _expect(good_file, "tensor 'w'", "component 'w.scales'", "checksum mismatch")
    assert "crc32c" in msg
    loaded = ms.load_file(good_file, verify=False)  # the escape hatch
    assert set(loaded) == {"w", "b"}
    rc = cli.main(["verify", str(good_file)])
    err = capsys.readouterr().err
    assert rc == 1 and "'w'" in err and "checksum mismatch" in err
    rc = cli.main(["inspect", str(good_file)])
    assert rc == 1 and "checksum mismatch" in capsys.readouterr().err


def test_header_checksum_catches_a_consistent_header_edit(good_file):
    """A dtype change that keeps every size (F32 -> I32) passes every structural check; the header
    checksum catches it."""
    header, data = _split(good_file)
    header["b"]["dtype"] = "I32"
    _join(good_file, header, data)
    _expect(good_file, "header checksum mismatch")
    assert ms.load_file(good_file, verify=False)["b"].dtype == torch.int32


def test_checksums_are_crc32c_of_the_data(good_file):
    crc32c = pytest.importorskip("crc32c")
    header, data = _split(good_file)
    sums = json.loads(header["__metadata__"][msio.CHECKSUMS_KEY])
    assert sums["algorithm"] == "crc32c"
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    for name, info in header.items():
        if name != "__metadata__":
            a, b = info["data_offsets"]
            assert sums["tensors"][name] == f"{crc32c.crc32c(data[a:b]):08x}", name


def test_files_without_checksums_still_load(tmp_path, good_file, capsys):
    header, data = _split(good_file)
    _join(good_file, _strip_checksums(header), data)  # as written by microscale before checksums
    assert set(ms.load_file(good_file)) == {"w", "b"}
    assert cli.main(["verify", str(good_file)]) == 0
    assert "no checksums" in capsys.readouterr().out
    foreign = tmp_path / "hf.safetensors"
    st.save_file({"a": torch.ones(3)}, foreign)
    assert torch.equal(ms.load_file(foreign)["a"], torch.ones(3))


def test_zlib_crc32_fallback_and_a_missing_crc32c_package(tmp_path, monkeypatch):
    """Without the crc32c package, files get zlib's CRC-32 (still verified); a CRC-32C file then says
    what to install."""
    path = tmp_path / "z.safetensors"
    monkeypatch.setattr(msio, "CHECKSUM_ALGORITHM", "crc32")
    ms.save_file({"b": torch.arange(4.0)}, path)
    header, data = _split(path)
    sums = json.loads(header["__metadata__"][msio.CHECKSUMS_KEY])
    import zlib
    assert sums["algorithm"] == "crc32" and sums["tensors"]["b"] == f"{zlib.crc32(data):08x}"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))
    _expect(path, "tensor 'b'", "checksum mismatch", "crc32")
    monkeypatch.undo()
    if "crc32c" in msio.CHECKSUMS:
        ms.save_file({"b": torch.arange(4.0)}, path)
        monkeypatch.setattr(msio, "CHECKSUMS", {"crc32": zlib.crc32})
        _expect(path, "pip install crc32c")
        assert torch.equal(ms.load_file(path, verify=False)["b"], torch.arange(4.0))


def test_verify_command_ok(good_file, capsys):
    assert cli.main(["verify", str(good_file)]) == 0
    out = capsys.readouterr().out
    assert "OK, 3 stored tensors" in out and "crc32c" in out


# ---- 4. strict MX metadata ------------------------------------------------------------------------
def _records(path):
    header, data = _split(path)
    return header, data, json.loads(header["__metadata__"]["microscale.mx"])


def test_relabelled_format_without_spec_is_refused(tmp_path):
    """Old code: dropping `spec` and relabelling an mxint8 tensor as mxfp8_e4m3 decoded to wrong numbers."""
    path = tmp_path / "m.safetensors"
    ms.save_file({"w": ms.quantize(torch.randn(2, 64), "mxint8")}, path)
    header, data, mx = _records(path)
    del mx["w"]["spec"]
    mx["w"]["format"] = "mxfp8_e4m3"
    header["__metadata__"]["microscale.mx"] = json.dumps(mx)
    _join(path, _strip_checksums(header), data)
    _expect(path, "'w'", "spec")
    mx["w"]["spec"] = json.loads(json.dumps(msio.format_spec(ms.get_format("mxint8")), default=str))
    header["__metadata__"]["microscale.mx"] = json.dumps(mx)
    _join(path, header, data)
    _expect(path, "'w'", "differs from the registered one")


def test_spec_with_a_missing_or_extra_field_is_refused(good_file):
    header, data, mx = _records(good_file)
    del mx["w"]["spec"]["element"]["mbits"]
    header["__metadata__"]["microscale.mx"] = json.dumps(mx)
    _join(good_file, _strip_checksums(header), data)
    _expect(good_file, "'w'", "element.mbits: missing in the file")


@pytest.mark.parametrize("dup", ["record", "top", "spec"])
def test_duplicate_keys_inside_the_mx_string(good_file, dup):
    """Old code: duplicate keys inside the microscale.mx string were accepted (the last one won)."""
    header, data, mx = _records(good_file)
    text = json.dumps(mx)
    if dup == "record":
        text = text.replace('"axis": 1', '"axis": 0, "axis": 1')
    elif dup == "top":
        text = text[:-1] + ', "w": ' + json.dumps(mx["w"]) + "}"
    else:
        text = text.replace('"mbits": 1', '"mbits": 1, "mbits": 1')
    header["__metadata__"]["microscale.mx"] = text
    _join(good_file, _strip_checksums(header), data)
    _expect(good_file, "appears twice")


def test_unknown_keys_in_the_microscale_namespace_are_refused(good_file):
    """A checksums entry renamed by corruption must not turn verification off silently."""
    header, data = _split(good_file)
    meta = header["__metadata__"]
    meta["microscale.checksumz"] = meta.pop(msio.CHECKSUMS_KEY)
    _join(good_file, header, data)
    _expect(good_file, "unknown microscale metadata key 'microscale.checksumz'")


@pytest.mark.parametrize("meta", [[], "x", 0, None, [["a", "b"]]])
def test_metadata_of_the_wrong_type(good_file, meta):
    """Old code: a __metadata__ of the wrong type (falsy ones especially) was read as empty."""
    header, data = _split(good_file)
    header["__metadata__"] = meta
    _join(good_file, header, data)
    _expect(good_file, "__metadata__ must be an object")


def _ragged_with_dirty_padding(tmp_path, fmt="mxfp4"):
    """A saved file whose (checksum-free) codes hold a nonzero code past the end of a ragged vector."""
    q = ms.quantize(torch.randn(2, 70), fmt)
    lay = q.layout
    codes = unpack_codes(q.codes, q.format.element.bits, lay.n_elements_padded).reshape(lay.n_blocks, -1)
    codes[lay.blocks_per_vector - 1, 70 - 64] = 1  # vector 0, last block, first padding slot
    dirty = MXTensor(pack_codes(codes, q.format.element.bits), q.scales, q.shape, q.axis, q.format)
    path = tmp_path / "p.safetensors"
    ms.save_file({"w": q}, path)
    header, data = _split(path)
    a, b = header["w.codes"]["data_offsets"]
    data = data[:a] + dirty.codes.numpy().tobytes() + data[b:]
    _join(path, _strip_checksums(header), data)
    return path, dirty


def test_nonzero_padding_codes_are_refused(tmp_path):
    path, dirty = _ragged_with_dirty_padding(tmp_path)
    _expect(path, "'w'", "padding codes must be zero")
    with pytest.raises(ValueError, match="padding codes must be zero"):
        ms.save_file({"w": dirty}, tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()


def test_nonzero_pad_bits_of_the_last_byte_are_refused(tmp_path):
    fmt = ms.formats.bdr_format(2, 5, name="bdr_m2_k5_test")  # 3-bit codes, 5 per block: 15 bits
    q = ms.quantize(torch.randn(1, 5), fmt, axis=-1)
    assert q.codes.numel() == 2
    codes = q.codes.clone()
    codes[-1] |= 0x80  # the 16th bit: no code's
    dirty = MXTensor(codes, q.scales, q.shape, q.axis, q.format)
    with pytest.raises(ValueError, match="unused high bits of the last byte of codes"):
        ms.save_file({"w": dirty}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


# ---- 5. saves -------------------------------------------------------------------------------------
def test_temp_file_removed_on_keyboard_interrupt(tmp_path, monkeypatch):
    real = msio.SafetensorsWriter.write

    def interrupted(self, name, value):
        real(self, name, value)
        raise KeyboardInterrupt

    monkeypatch.setattr(msio.SafetensorsWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ms.save_file({"a": torch.ones(10)}, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_stale_temp_files_are_swept_on_the_next_save(tmp_path):
    """Old code: the hidden *.tmp files of killed saves stayed forever."""
    target = tmp_path / "m.safetensors"
    dead = tmp_path / ".m.safetensors.999999999-0123456789abcdef.tmp"      # no such pid
    alive = tmp_path / f".m.safetensors.{os.getpid()}-0123456789abcdef.tmp"  # a save in progress
    legacy_old = tmp_path / ".m.safetensors.abcd_123.tmp"                   # old mkstemp name, 2 h old
    legacy_new = tmp_path / ".m.safetensors.zz_99zzz.tmp"                   # old name, just written
    other = tmp_path / ".n.safetensors.999999999-0123456789abcdef.tmp"      # another target's
    for p in (dead, alive, legacy_old, legacy_new, other):
        p.write_bytes(b"x" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(legacy_old, (two_hours_ago, two_hours_ago))
    ms.save_file({"a": torch.ones(2)}, target)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([target.name, alive.name, legacy_new.name, other.name])


def test_killed_save_leaves_a_temp_file_that_the_next_save_sweeps(tmp_path):
    target = tmp_path / "m.safetensors"
    code = f"""
        import os, signal, torch, microscale as ms
        from microscale import io as msio
        real = msio.SafetensorsWriter.write
        def write_then_die(self, name, value):
            real(self, name, value)
            os.kill(os.getpid(), signal.SIGKILL)
        msio.SafetensorsWriter.write = write_then_die
        ms.save_file({{"a": torch.ones(1000)}}, {str(target)!r})
    """
    r = _python(code)
    assert r.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.safetensors.") and leftovers[0].endswith(".tmp")
    ms.save_file({"b": torch.zeros(3)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_symlink_at_the_destination_is_written_through(tmp_path):
    """Old code: a symlink at the destination was replaced by a regular file."""
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    real = real_dir / "model.safetensors"
    ms.save_file({"old": torch.ones(1)}, real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    ms.save_file({"new": torch.zeros(2)}, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert set(ms.load_file(real)) == {"new"}
    assert sorted(p.name for p in real_dir.iterdir()) == ["model.safetensors"]


def test_missing_output_directory_names_the_users_path(tmp_path):
    """Old code: the error named the temporary file."""
    path = tmp_path / "no" / "such" / "m.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        ms.save_file({"a": torch.ones(1)}, path)
    assert str(path) in str(info.value) and ".tmp" not in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_hanging(tmp_path, capsys):
    """Old code: `microscale inspect` on a FIFO hung forever (open() waits for a writer)."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung on a FIFO")))
    signal.alarm(20)
    try:
        _expect(fifo, "FIFO", "regular file")
        with pytest.raises(ValueError, match="FIFO"):
            msio.read_header(fifo)
        assert cli.main(["inspect", str(fifo)]) == 1
        assert "FIFO" in capsys.readouterr().err
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    with pytest.raises((ValueError, IsADirectoryError)):
        ms.load_file(tmp_path)


# ---- 6. inspect in bounded memory -----------------------------------------------------------------
def _reference_code_stats(q: MXTensor) -> dict:
    """Per-element statement of code_stats (the pre-streaming implementation's rules), small inputs only."""
    fmt, elem, lay = q.format, q.format.element, q.layout
    blocks = q.to_blocks()
    valid = ms.layout.to_blocks(torch.ones(q.shape, dtype=torch.uint8), lay).bool()
    values = torch.tensor(elem.code_values)[blocks.codes.to(torch.int64)]
    scale = fmt.scale
    if scale is None:
        sv = torch.ones(lay.n_blocks, dtype=torch.float64)
    elif scale.kind == "e8m0":
        sv = torch.tensor(scale.code_values)[blocks.scales.to(torch.int64)]
    elif scale.kind == "fp":
        sv = torch.tensor(scale.element.code_values)[blocks.scales.to(torch.int64)]
    else:
        sv = blocks.scales.to(torch.float64)
    nan = torch.isnan(sv)
    smallest = (blocks.scales == 0) if scale is not None and scale.kind == "e8m0" else (sv == 0)
    live = (~nan & ~smallest)[:, None]
    sat = torch.isfinite(values) & (values.abs() >= elem.max_normal) & valid & ~nan[:, None]
    counts = None
    if scale is not None and scale.kind == "e8m0":
        e = (blocks.scales[~nan].to(torch.int64) - scale.bias).tolist()
        counts = {v: e.count(v) for v in set(e)}
    return {"saturated": int(sat.sum()), "zeros": int(((values == 0) & valid & live).sum()),
            "nan_blocks": int(nan.sum()), "n_blocks": lay.n_blocks, "scale_exponent_counts": counts,
            "scale_values": None if counts is not None else sv[~nan].to(torch.float32)}


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2", "mx6", "nvfp4", "int8_channel", "msfp12", "vsq_int4"])
@pytest.mark.parametrize("chunk", [1, 100, 1 << 20])
def test_streaming_code_stats_match_the_per_element_statement(tmp_path, fmt, chunk):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 70, generator=g) * 10.0 ** torch.randint(-30, 30, (37, 1), generator=g)
    x[3, 5] = float("nan")
    x[4] = 0
    q = ms.quantize(x, fmt, axis=-1)
    want = _reference_code_stats(q)
    path = tmp_path / "s.safetensors"
    ms.save_file({"w": q}, path)
    with msio.SafetensorsReader(path) as r:
        from_file = cli._file_code_stats(r, r.header.mx["w"], chunk)
    for got in (cli.code_stats(q, chunk), from_file):
        sv = got.pop("scale_values")
        wsv = want["scale_values"]
        assert {k: v for k, v in want.items() if k != "scale_values"} == got
        assert (sv is None) == (wsv is None) and (sv is None or torch.equal(sv, wsv))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc")
def test_inspect_memory_is_bounded_by_the_chunk_not_the_file(tmp_path):
    """Old code: ~20-38x the file size (per-element int64/float64 arrays: +510 MiB for this file). Now the
    peak anonymous RSS growth of inspecting a 25 MiB file, sampled every millisecond, stays under a
    quarter of the file with 2^16-element chunks (a few MiB)."""
    fmt = ms.get_format("mxfp8")
    shape = (3072, 8192)  # 24 MiB of codes
    g = torch.Generator().manual_seed(0)
    specs = msio.component_specs(shape, 1, fmt)
    codes = torch.randint(0, 256, specs["codes"][1], dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes (E4M3's 0x7f / 0xff)
    scales = torch.randint(100, 150, specs["scales"][1], dtype=torch.uint8, generator=g)
    path = tmp_path / "big.safetensors"
    ms.save_file({"w": MXTensor(codes, scales, shape, 1, fmt)}, path)
    size = path.stat().st_size
    del codes, scales
    warm = tmp_path / "warm.safetensors"
    ms.save_file({"w": ms.quantize(torch.randn(64, 4096), fmt)}, warm)
    code = f"""
        import threading, time, torch
        from microscale import cli
        cli.STATS_CHUNK_ELEMENTS = 1 << 16
        torch.set_num_threads(1)
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        cli.main(["inspect", {str(warm)!r}])   # warm up: lazy imports, allocator pools
        base = anon(); peak = [base]; done = [False]
        def poll():
            while not done[0]:
                peak[0] = max(peak[0], anon()); time.sleep(0.001)
        t = threading.Thread(target=poll); t.start()
        rc = cli.main(["inspect", {str(path)!r}])
        done[0] = True; t.join()
        print("RSS", rc, max(peak[0], anon()) - base)
    """
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RSS"))
    _, rc, grew = line.split()
    assert rc == "0"
    assert int(grew) < size / 4, f"inspect grew RSS by {int(grew) / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"


# ---- 7. empty and meta tensors --------------------------------------------------------------------
@pytest.mark.parametrize("fmt", QUANTIZING)
def test_empty_tensors_in_every_format(tmp_path, fmt):
    """Old code: nvfp4 / int8_tensor / fp8_*_tensor raised "group_size None must divide the number of
    blocks 0"; vsq_int4 raised ZeroDivisionError."""
    saved = {}
    for i, (shape, axis) in enumerate([((0, 64), -1), ((2, 0, 48), -1), ((5, 0), 0)]):
        x = torch.empty(shape)
        q = ms.quantize(x, fmt, axis=axis)
        assert q.shape == shape
        for dtype in (torch.float32, torch.bfloat16):
            assert q.dequantize(dtype).shape == shape
            y = ms.fake_quantize(x.to(dtype), fmt, axis=axis)
            assert y.shape == shape and y.dtype == dtype
        saved[f"e{i}"] = q
    path = tmp_path / "e.safetensors"
    ms.save_file(saved, path)
    back = ms.load_file(path)
    for k, q in saved.items():
        assert back[k].shape == q.shape and back[k].format == q.format
        for c, t in q.components().items():
            assert torch.equal(t, back[k].components()[c]), (k, c)


@pytest.mark.parametrize("fmt", QUANTIZING)
def test_meta_tensors_give_shapes(fmt):
    x = torch.empty(3, 5, 64, device="meta")
    y = ms.fake_quantize(x, fmt, axis=-1)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
    yb = ms.fake_quantize(x.bfloat16(), fmt, axis=1)
    assert yb.device.type == "meta" and yb.dtype == torch.bfloat16
    q = ms.quantize(x, fmt, axis=-1)
    real = ms.quantize(torch.zeros(3, 5, 64), fmt, axis=-1)
    assert q.device.type == "meta" and q.nbytes == real.nbytes
    for c, t in real.components().items():
        assert q.components()[c].shape == t.shape and q.components()[c].dtype == t.dtype
    d = q.dequantize(torch.float16)
    assert d.device.type == "meta" and d.shape == x.shape and d.dtype == torch.float16
    with pytest.raises(ValueError, match="meta device"):
        ms.save_file({"w": q}, "/nonexistent-dir/never-written.safetensors")


def test_meta_with_autograd():
    x = torch.empty(4, 64, device="meta", requires_grad=True)
    y = ms.fake_quantize(x, "mxfp4")
    assert y.device.type == "meta" and y.requires_grad


# ---- 8. integer-like axes; F8_E8M0 and F4 ---------------------------------------------------------
@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-1), np.uint8(1), torch.tensor(1)])
def test_integer_like_axes(axis):
    """Old code: np.int64 axes were rejected."""
    x = torch.randn(4, 64)
    want = ms.quantize(x, "mxfp4", axis=1)
    q = ms.quantize(x, "mxfp4", axis=axis)
    assert q.axis == 1 and type(q.axis) is int and torch.equal(q.codes, want.codes)
    assert torch.equal(ms.fake_quantize(x, "mxfp4", axis=axis), want.dequantize())
    assert MXTensor(q.codes, q.scales, q.shape, axis, q.format).axis == 1


@pytest.mark.parametrize("axis", [True, 1.0, "1", None])
def test_non_integer_axes_are_type_errors(axis):
    with pytest.raises(TypeError, match="axis must be an integer"):
        ms.quantize(torch.randn(4, 64), "mxfp4", axis=axis)


def test_e8m0_and_f4_plain_tensors_round_trip(tmp_path):
    """Old code: F8_E8M0 / F4 (written by safetensors 0.8) could not be loaded or saved, so
    q.scales_as_e8m0() could not be saved."""
    q = ms.quantize(torch.randn(4, 64), "mxfp4")
    e8 = q.scales_as_e8m0()
    f4 = q.codes_as_torch()
    path = tmp_path / "p.safetensors"
    ms.save_file({"e8": e8, "f4": f4}, path)
    back = ms.load_file(path)
    assert back["e8"].dtype == torch.float8_e8m0fnu and torch.equal(back["e8"].view(torch.uint8), q.scales)
    assert back["f4"].dtype == torch.float4_e2m1fn_x2 and back["f4"].shape == f4.shape
    assert torch.equal(back["f4"].view(torch.uint8), f4.view(torch.uint8))
    header, _ = _split(path)
    assert header["f4"]["dtype"] == "F4" and header["f4"]["shape"] == [f4.shape[0], 2 * f4.shape[1]]
    assert header["e8"]["dtype"] == "F8_E8M0"
    theirs = st.load_file(path)  # the safetensors library reads what we wrote...
    assert torch.equal(theirs["f4"].view(torch.uint8), f4.view(torch.uint8))
    st.save_file({"e8": e8, "f4": f4}, tmp_path / "theirs.safetensors")  # ...and we read what it wrote
    back = ms.load_file(tmp_path / "theirs.safetensors")
    assert torch.equal(back["f4"].view(torch.uint8), f4.view(torch.uint8))
    assert torch.equal(back["e8"].view(torch.uint8), q.scales)


def test_f4_with_an_odd_last_dimension_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    st.save_file({"f": torch.zeros(3, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, path)
    header, data = _split(path)
    header["f"]["shape"] = [2, 3]  # 6 four-bit elements = 3 bytes, but not whole bytes per row
    _join(path, header, data)
    _expect(path, "'f'", "even last dimension")


def test_atomic_path_writes_through_symlinks_sweeps_and_cleans_up(tmp_path):
    """io.atomic_path (used by writers that open their own file, e.g. GGUF) follows SafetensorsWriter's
    rules: the link stays a link, the temporary file is gone after success and after an exception, and
    an error names the user's path."""
    import os
    from microscale.io import atomic_path
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(real) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("writer failed")
    assert real.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "real.bin"]
    with pytest.raises(OSError, match="missing"):
        with atomic_path(tmp_path / "missing" / "x.bin"):
            pass

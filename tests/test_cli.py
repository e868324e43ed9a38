"""The `microscale` console script: formats / quantize / inspect / demo, exit codes, the subcommand hook,
no `report` (experiments run with python -m experiments.all)."""

from __future__ import annotations

import re

import pytest
import safetensors.torch as st
import torch

import microscale as ms
from microscale import cli
from microscale import io as msio
from microscale.tensor import MXTensor


@pytest.fixture
def checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layer.0.weight": torch.randn(48, 100, generator=g),                 # ragged: 100 = 3*32 + 4
        "layer.0.bias": torch.randn(48, generator=g),                         # 1-D: kept
        "layer.1.weight": torch.randn(40, 64, generator=g).bfloat16(),        # bf16 matrix
        "emb.weight": torch.randn(30, 64, generator=g),                       # skipped by regex in tests
        "tiny.weight": torch.randn(4, 4, generator=g),                        # under --min-numel
        "conv.weight": torch.randn(8, 3, 3, 5, generator=g),                  # 4-D: converted
        "position_ids": torch.arange(16).reshape(1, 16),                      # integer: kept
    }
    path = tmp_path / "in.safetensors"
    st.save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_formats_lists_every_registered_format(capsys):
    rc, out, _ = _run(capsys, "formats")
    assert rc == 0
    names = {line.split()[0] for line in out.splitlines()[2:]}
    assert names == set(ms.list_formats())
    row = next(line for line in out.splitlines() if line.startswith("mxfp4_e2m1 "))
    for fact in ("mxfp4", "FP4 E2M1", "32", "e8m0", "4.25", " 2 ", "1.02085e+39"):
        assert fact in row, (fact, row)


def test_quantize_converts_weight_matrices_streaming(tmp_path, capsys, checkpoint, monkeypatch):
    src, tensors = checkpoint
    out_path = tmp_path / "out.safetensors"
    monkeypatch.setattr(msio, "load_file", None)  # streaming: the whole-file loader must not be used
    rc, out, err = _run(capsys, "quantize", src, out_path, "--format", "mxfp4", "--skip", r"^emb\.",
                        "--min-numel", "20")
    monkeypatch.undo()
    assert rc == 0, err
    loaded = ms.load_file(out_path)
    assert list(loaded) == list(st.load_file(src))  # same tensors, same order
    converted = {"layer.0.weight", "layer.1.weight", "conv.weight"}
    for name, x in tensors.items():
        if name in converted:
            want = ms.quantize(x, "mxfp4", axis=-1)
            got = loaded[name]
            assert isinstance(got, MXTensor) and got.format.name == "mxfp4_e2m1"
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
            assert torch.equal(got.dequantize(), want.dequantize())
        else:
            assert torch.equal(loaded[name], x) and loaded[name].dtype == x.dtype, name
    assert msio.read_header(out_path).user_metadata == {"format": "pt"}

    # summary: bytes before/after and QSNR per tensor
    after = sum(t.nbytes if isinstance(t, MXTensor) else t.numel() * t.element_size() for t in loaded.values())
    before = sum(t.numel() * t.element_size() for t in tensors.values())
    m = re.search(r"3 of 7 tensors converted to mxfp4_e2m1; tensor bytes (\d+) -> (\d+)", out)
    assert m and (int(m[1]), int(m[2])) == (before, after), out
    x = tensors["layer.0.weight"]
    q = loaded["layer.0.weight"]
    qsnr = -10 * torch.log10(((x - q.dequantize()) ** 2).sum() / (x ** 2).sum()).item()
    row = next(line for line in out.splitlines() if line.startswith("layer.0.weight "))
    assert f"{qsnr:.2f}" in row and str(x.numel() * 4) in row and str(q.nbytes) in row
    assert 16 < qsnr < 20  # MXFP4 on Gaussian data


def test_quantize_options_axis_rounding_and_existing_mx(tmp_path, capsys, checkpoint):
    src, tensors = checkpoint
    a = tmp_path / "a.safetensors"
    rc, _, err = _run(capsys, "quantize", src, a, "-f", "mxfp8_e5m2", "--axis", "0", "--rounding", "away",
                      "--skip", "conv", "--skip", "layer\\.1")
    assert rc == 0, err
    got = ms.load_file(a)
    want = ms.quantize(tensors["layer.0.weight"], "mxfp8_e5m2", axis=0, rounding="away")
    assert got["layer.0.weight"].axis == 0 and torch.equal(got["layer.0.weight"].codes, want.codes)
    assert not isinstance(got["conv.weight"], MXTensor) and not isinstance(got["layer.1.weight"], MXTensor)
    # quantizing a file that already holds MX tensors keeps them as they are
    b = tmp_path / "b.safetensors"
    rc, out, err = _run(capsys, "quantize", a, b, "-f", "mxfp4")
    assert rc == 0, err
    again = ms.load_file(b)
    assert again["layer.0.weight"].format.name == "mxfp8_e5m2"
    assert torch.equal(again["layer.0.weight"].codes, want.codes)
    assert again["conv.weight"].format.name == "mxfp4_e2m1"
    assert "mx (kept)" in out


@pytest.mark.parametrize("fmt", ["nvfp4", "int8_channel", "mx6"])
def test_quantize_formats_with_more_components(tmp_path, capsys, checkpoint, fmt):
    """FP32 tensor/channel scales and microexponents stream into the right places too."""
    if fmt not in ms.list_formats():
        pytest.skip(f"{fmt} is not registered")
    src, tensors = checkpoint
    out_path = tmp_path / "o.safetensors"
    rc, _, err = _run(capsys, "quantize", src, out_path, "-f", fmt)
    assert rc == 0, err
    got = ms.load_file(out_path)["layer.0.weight"]
    want = ms.quantize(tensors["layer.0.weight"], fmt)
    assert torch.equal(got.dequantize(), want.dequantize())
    st.load_file(out_path)  # aligned for the plain library


def test_inspect_reports_code_statistics(tmp_path, capsys):
    x = torch.zeros(3, 32)
    x[0, :3] = torch.tensor([6.0, 0.01, 1.0])  # scale 2^0: 6 saturates (max of E2M1), 0.01 underflows
    x[1, 5] = float("nan")                     # NaN block
    q = ms.quantize(x, "mxfp4", axis=-1)       # row 2: all-zero block, smallest scale: not counted
    stats = cli.code_stats(q)
    assert (stats["saturated"], stats["zeros"], stats["nan_blocks"], stats["n_blocks"]) == (1, 30, 1, 3)
    assert stats["scale_exponent_counts"] == {-127: 1, 0: 1}

    path = tmp_path / "m.safetensors"
    ms.save_file({"w": q, "b": torch.ones(5, dtype=torch.float16)}, path, metadata={"note": "hi"})
    rc, out, err = _run(capsys, "inspect", path)
    assert rc == 0, err
    w = next(line for line in out.splitlines() if line.startswith("w "))
    assert re.search(r"\bmx\s+mxfp4_e2m1\s+\[3, 32\]\s+packed/1\s+51\s+4\.250\s+1\s+30\s+1/3\s+2\^\[-127,0\]", w), w
    b = next(line for line in out.splitlines() if line.startswith("b "))
    assert re.search(r"\bplain\s+-\s+\[5\]\s+float16\s+10\b", b), b
    assert "2 tensors (1 MX), 61 bytes of tensor data" in out and "'note': 'hi'" in out


def test_demo_runs_and_round_trips(capsys):
    rc, out, err = _run(capsys, "demo", "--formats", "mxfp4", "mxint8")
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith(("mxfp4_e2m1 ", "mxint8 "))]
    assert len(rows) == 6
    for line in rows:
        bits, nbytes, ratio, qsnr = line.split()[-6:-2]
        assert float(bits) == (4.25 if line.startswith("mxfp4") else 8.25), line
        assert float(ratio.rstrip("x")) == pytest.approx(32 / float(bits), abs=0.01)
        assert (16 < float(qsnr) < 20) if line.startswith("mxfp4") else (38 < float(qsnr) < 48), line
    assert "bit-exact: yes" in out
    # the model part: a transformers Llama packed weight-only, saved, loaded through from_pretrained
    pytest.importorskip("transformers")
    model_rows = {line.split()[0]: line.split() for line in out.splitlines()
                  if line.startswith(("mxfp8-w ", "mxfp4-w "))}
    assert set(model_rows) == {"mxfp8-w", "mxfp4-w"}, out
    for recipe, cols in model_rows.items():
        assert cols[1] == "15/15" and cols[-1] == "yes", cols          # every Linear packed; bit-equal reload
        assert float(cols[3].rstrip("x")) > (3.0 if recipe == "mxfp4-w" else 2.0), cols   # resident bytes fall
    assert "mxfp4_e2m1" in out.split("weight bytes are large")[1]


def test_demo_no_model_skips_the_model_part(capsys):
    rc, out, err = _run(capsys, "demo", "--formats", "mxint8", "--no-model")
    assert rc == 0, err
    assert "LlamaForCausalLM" not in out and "bit-exact: yes" in out


@pytest.mark.parametrize("argv", [
    [],
    ["nosuch"],
    ["quantize", "a.safetensors"],
    ["quantize", "a", "b", "--format", "mxfp3"],
    ["quantize", "a", "b", "--format", "none"],
    ["quantize", "a", "b", "--format", "mxfp4", "--skip", "("],
    ["quantize", "a", "b", "--format", "mxfp4", "--rounding", "up"],
    ["demo", "--formats", "bogus"],
])
def test_bad_arguments_exit_2(capsys, argv):
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "usage:" in err and "Traceback" not in err


def test_missing_or_broken_files_exit_1(tmp_path, capsys, checkpoint):
    src, _ = checkpoint
    rc, _, err = _run(capsys, "inspect", tmp_path / "nope.safetensors")
    assert rc == 1 and "No such file" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(src.read_bytes()[:100])
    for argv in (["inspect", broken], ["quantize", broken, tmp_path / "o.safetensors", "-f", "mxfp4"]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 1 and "truncated" in err and str(broken) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()
    # an axis no weight has: a clean error, and no output file
    rc, _, err = _run(capsys, "quantize", src, tmp_path / "o.safetensors", "-f", "mxfp4", "--axis", "3")
    assert rc == 1 and "out of range" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "in.safetensors"]


def test_subcommand_hook(capsys, monkeypatch):
    seen = {}

    def add(p):
        p.add_argument("--n", type=int, default=1)

    def run(args):
        seen["n"] = args.n
        print("hello")
        return 3

    monkeypatch.setitem(cli.COMMANDS, "hello", cli.Command("say hello", add, run))
    rc, out, _ = _run(capsys, "hello", "--n", "5")
    assert (rc, out, seen) == (3, "hello\n", {"n": 5})
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and "say hello" in out


def test_no_report_subcommand(capsys):
    # the experiments are scripts of the source checkout (python -m experiments.all), not installed commands
    assert "report" not in cli.COMMANDS
    rc, out, _ = _run(capsys, "--help")
    listed = re.findall(r"^    (\w+)\s", out, flags=re.M)
    assert rc == 0 and listed == list(cli.COMMANDS) and "report" not in listed
    rc, _, err = _run(capsys, "report")
    assert rc == 2 and "invalid choice: 'report'" in err

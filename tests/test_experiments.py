"""Tests of the experiments pipeline (experiments/): data, error diffusion, and (slow) the whole --quick run.

The numbers of the published run are not tested here, only that the pipeline is deterministic, correct
where it can be checked exactly, and writes parseable outputs.
"""

import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import data  # noqa: E402
from experiments.common import markdown_table, parse_markdown_table  # noqa: E402


# ---- data ------------------------------------------------------------------------------------------
def test_corpus_file_list_is_deterministic_and_scoped():
    a, b = data.corpus_files(), data.corpus_files()
    assert a == b == sorted(a) and len(a) > 20
    assert all(f.endswith(".py") and f.split("/")[0] in data.CORPUS_PACKAGES for f in a)
    assert not any("__pycache__" in f for f in a)


def test_corpus_checksum_stable_and_split_sizes():
    c1, c2 = data.load_corpus(), data.load_corpus()
    assert c1.sha256 == c2.sha256 and len(c1.sha256) == 64
    assert torch.equal(c1.train, c2.train) and torch.equal(c1.val, c2.val)
    n = len(c1.files)
    assert len(c1.val_files) == n // data.VAL_EVERY
    assert list(c1.val_files) == [f for i, f in enumerate(c1.files) if i % data.VAL_EVERY == data.VAL_EVERY - 1]
    # the streams hold every byte of their files plus one separator between consecutive files
    import os
    sizes = {f: os.path.getsize(os.path.join(c1.stdlib, f)) for f in c1.files}
    n_val = len(c1.val_files)
    assert c1.val.numel() == sum(sizes[f] for f in c1.val_files) + n_val - 1
    assert c1.train.numel() == sum(sizes.values()) - sum(sizes[f] for f in c1.val_files) + (n - n_val) - 1


def test_corpus_checksum_matches_published_results():
    published = ROOT / "results" / "train_lm.json"
    if not published.exists():
        pytest.skip("no published results/train_lm.json")
    rec = json.loads(published.read_text())["corpus"]
    c = data.load_corpus()
    if rec["python"] != c.python:
        pytest.skip(f"published corpus is from Python {rec['python']}, this is {c.python}")
    assert rec["sha256"] == c.sha256 and rec["files"] == list(c.files)


def test_digits_split():
    d = data.load_digits_split()
    assert (d.y_train.numel(), d.y_test.numel()) == (1347, 450)
    assert d.x_train.shape[1] == 64 and float(d.x_train.max()) == 1.0
    assert torch.bincount(d.y_test, minlength=10).min() >= 40  # stratified: ~45 of each class


def test_batches_are_fixed_by_seed():
    s = torch.arange(1000, dtype=torch.uint8)
    assert torch.equal(data.train_starts(s, 16, 4, 3, seed=5), data.train_starts(s, 16, 4, 3, seed=5))
    x, y = data.batch_windows(s, torch.tensor([0, 10]), 16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x[1, 0]) == 10


def test_markdown_table_round_trip():
    text = markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert parse_markdown_table(text) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}]


# ---- the whole pipeline ----------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    from experiments import all as run_all
    run_all.main(["--quick", "--out", str(tmp_path)])
    for name in ("train_digits.json", "train_lm.json", "direct_cast.json", "ptq.json", "all.json",
                 "train_lm.md", "direct_cast.md", "ptq.md", "direct_cast.png", "ptq.png", "results.md",
                 "train_scale.json", "train_scale_gap.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    train = parse_markdown_table((tmp_path / "train_lm.md").read_text())
    assert {r["recipe"] for r in train} >= {"fp32", "mxfp6", "mxfp4-w+mxfp6"}
    ptq = parse_markdown_table((tmp_path / "ptq.md").read_text())
    assert {r["format"] for r in ptq} == {"mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1"}
    dc = json.loads((tmp_path / "direct_cast.json").read_text())
    assert {"fp32", "mxint8", "mxfp4_e2m1"} <= set(dc["formats"])
    page = (tmp_path / "results.md").read_text()
    assert "## Acceptance" in page and "direct cast" in page and "## 4. Does the training gap shrink" in page
    for table in page.split("\n\n"):
        if table.startswith("|"):
            rows = parse_markdown_table(table)
            assert rows and all(len(r) == len(rows[0]) for r in rows)

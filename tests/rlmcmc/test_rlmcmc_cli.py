"""The ``rlmcmc`` console script on tiny problems."""

import json

import pytest

from rlmcmc.cli import main


def test_forward_writes_timing_and_error_rows(tmp_path):
    main(["forward", "--n-fine", "16", "--n-coarse", "4", "--dim", "4", "--samples", "2", "--basis", "1", "3",
          "--out", str(tmp_path)])
    report = json.loads((tmp_path / "forward.json").read_text())
    rows = report["rows"]
    assert [(r["kind"], r["n_basis"]) for r in rows] == [("steady", 1), ("steady", 3), ("transient", 1),
                                                         ("transient", 3)]
    for kind in ("steady", "transient"):
        e1, e3 = (r["rel_l2_error_mean"] for r in rows if r["kind"] == kind)
        assert e3 < e1


def test_train_then_sample_with_checkpoint(tmp_path):
    common = ["--n-fine", "16", "--n-coarse", "4", "--dim", "4", "--noise", "0.05", "--chains", "2",
              "--pilot-steps", "300", "--out", str(tmp_path)]
    main(["train", *common, "--iters", "5"])
    assert (tmp_path / "policy.pt").exists()
    train = json.loads((tmp_path / "train.json").read_text())
    assert len(train["history"]["reward"]) == 5
    main(["sample", *common, "--proposal", "rl", "--levels", "2", "--samples", "60", "--burn", "20",
          "--policy", str(tmp_path / "policy.pt")])
    out = json.loads((tmp_path / "sample_rl-2.json").read_text())["results"]["rl-2"]
    assert out["n_chains"] == 2 and out["n_draws"] == 60
    assert out["coarse_solves"] == 120 and 0 <= out["fine_solves"] <= 120
    assert (tmp_path / "sample_rl-2.png").stat().st_size > 10_000


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        main(["sample", "--proposal", "hmc"])
    with pytest.raises(SystemExit):
        main([])

import pathlib

import pytest
import torch

import microscale as ms

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture
def golden_dir():
    return DATA



@pytest.fixture
def good_file(tmp_path):
    """A small valid microscale file (an MXFP4 tensor with a ragged last block, and a plain tensor), for the
    io and reliability tests that corrupt it."""
    path = tmp_path / "m.safetensors"
    q = ms.quantize(torch.randn(3, 70), "mxfp4", axis=-1)
    ms.save_file({"w": q, "b": torch.arange(4.0)}, path)
    return path

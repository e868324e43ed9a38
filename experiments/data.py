"""Offline datasets: a byte-level corpus of CPython standard-library sources, and scikit-learn's digits.

Nothing is downloaded. The corpus is the sorted list of ``*.py`` files (recursively) under a few named
packages of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``); every
tenth file (sorted index % 10 == 9) is held out for validation, so no file is split across train and
validation. Its SHA-256 (over relative paths and bytes, in order) is recorded in results so a reader
can check they trained on the same text; it depends on the Python version (3.11.7 here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from microscale.bdr.tensors import CORPUS_PACKAGES, HOLDOUT_EVERY as VAL_EVERY
from microscale.bdr.tensors import corpus_files as _corpus_files
from microscale.bdr.tensors import read_corpus


def corpus_files(stdlib: str | None = None, packages=CORPUS_PACKAGES) -> list[str]:
    """Sorted relative paths (POSIX style, relative to the stdlib root) of the corpus files."""
    return _corpus_files(tuple(packages), stdlib)


@dataclass(frozen=True)
class ByteCorpus:
    """Train and validation byte streams (uint8 tensors) and the facts that identify them."""

    train: torch.Tensor
    val: torch.Tensor
    files: tuple[str, ...]
    val_files: tuple[str, ...]
    sha256: str
    stdlib: str
    python: str

    def summary(self) -> dict:
        return {"stdlib": self.stdlib, "python": self.python, "packages": list(CORPUS_PACKAGES),
                "n_files": len(self.files), "n_val_files": len(self.val_files),
                "train_bytes": int(self.train.numel()), "val_bytes": int(self.val.numel()),
                "sha256": self.sha256, "split": f"sorted index % {VAL_EVERY} == {VAL_EVERY - 1} -> validation",
                "files": list(self.files), "val_files": list(self.val_files)}


def load_corpus(stdlib: str | None = None) -> ByteCorpus:
    """Read the corpus files and split them by file into train / validation byte streams (the library's
    :func:`microscale.bdr.tensors.read_corpus`: the same text and split its real-tensor capture uses)."""
    import platform
    c = read_corpus(CORPUS_PACKAGES, stdlib)
    return ByteCorpus(c.train, c.holdout, c.files, c.holdout_files, c.sha256, c.root, platform.python_version())


def batch_windows(stream: torch.Tensor, starts: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets (int64, [len(starts), ctx]) of windows starting at ``starts``."""
    idx = starts[:, None] + torch.arange(ctx + 1)[None, :]
    w = stream[idx].to(torch.int64)
    return w[:, :-1], w[:, 1:]


def val_starts(stream: torch.Tensor, ctx: int, n_windows: int) -> torch.Tensor:
    """Evenly spaced, fixed window starts over the validation stream (the same for every model)."""
    last = stream.numel() - ctx - 1
    return torch.linspace(0, last, n_windows).to(torch.int64)


def train_starts(stream: torch.Tensor, ctx: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """Random window starts [steps, batch], fixed by ``seed`` (shared by every format: paired runs)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, stream.numel() - ctx - 1, (steps, batch), generator=g)


@dataclass(frozen=True)
class Digits:
    """scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1], stratified fixed split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def summary(self) -> dict:
        return {"source": "sklearn.datasets.load_digits (bundled, 1797 8x8 images)",
                "n_train": int(self.y_train.numel()), "n_test": int(self.y_test.numel()),
                "split": "train_test_split(test_size=0.25, stratify=y, random_state=0)"}


def load_digits_split() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=0)
    return Digits(torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte),
                  torch.from_numpy(yte).long())

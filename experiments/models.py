"""Small models trained here besides the GPT: an MLP for the 8x8 digits, and a parameter count.

The byte-level GPTs are the library's :class:`microscale.nn.models.TinyGPT` (built by :mod:`.lm` and
:mod:`.train_scale`): every matrix multiply with weights is an ``nn.Linear`` and attention lives in a
``CausalSelfAttention`` module, so ``microscale.nn.quantize_model`` quantizes every matmul, as in the MX
paper; embeddings, LayerNorms, softmax and GELU stay FP32, as in the paper's emulation.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU (every width a multiple of the MX block size 32)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

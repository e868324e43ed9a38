"""The one small GPT of the project: tests, benchmarks, :mod:`microscale.bdr.tensors` and the experiments
all build :class:`TinyGPT`.

A decoder-only transformer in plain PyTorch (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", GPT-2's pre-LayerNorm block, as in nanoGPT): token + position embeddings, ``n_layer``
blocks (LayerNorm, causal self-attention, residual; LayerNorm, 4x GELU MLP, residual), a final LayerNorm
and an untied LM head. Every product with weights is an ``nn.Linear`` (QKV, attention output, both MLP
layers, LM head) and attention lives in a module named ``*Attention`` that calls
``F.scaled_dot_product_attention`` (causal), so :func:`~microscale.nn.quantize_model` swaps every GEMM
and its attention scope covers the two activation x activation products (QKᵀ, AV). Embeddings,
LayerNorms, softmax and GELU stay in the input precision. Nothing here is MX-specific.

The initialisation is an option of the config (:data:`GPT_INITS`), because results cached by the
experiments were trained from each of them and must reproduce bit for bit (see :class:`GPTConfig`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPT_INITS", "GPTConfig", "TinyGPT", "CausalSelfAttention", "Block"]

#: Weight initialisations of :class:`TinyGPT` (``GPTConfig.init``):
#:
#: - ``"torch"``: PyTorch's module defaults (Linear: Kaiming-uniform weights and uniform biases;
#:   Embedding: N(0, 1); LayerNorm: ones and zeros).
#: - ``"gpt2"``: GPT-2's (Radford et al. 2019; nanoGPT's ``_init_weights``): every weight matrix and
#:   embedding N(0, 0.02), biases zero, the residual output projections (``attn.c_proj``, ``mlp.2``)
#:   N(0, 0.02 / sqrt(2 n_layer)); one draw per matrix, in parameter order.
#: - ``"gpt2-two-pass"``: the same distribution drawn in two passes: every weight matrix and embedding
#:   N(0, 0.02) in module order, then each block's residual output projections drawn again at the
#:   scaled std. Same law as ``"gpt2"``, another stream of draws: the order the experiments' LM runs
#:   (``experiments.train_lm``, and the direct-cast and PTQ results computed from its checkpoints) used.
#:
#: Both GPT-2 variants draw after the module defaults were drawn (the module constructors consume the
#: generator exactly as under ``"torch"``), so a seed gives the same stream offsets in all three.
GPT_INITS = ("torch", "gpt2", "gpt2-two-pass")
#: Parameter-name endings of the residual output projections (GPT-2's scaled initialisation).
RESIDUAL_PROJECTIONS = ("attn.c_proj.weight", "mlp.2.weight")


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`TinyGPT`: vocabulary, context length (``block_size``, the position table),
    layers, heads, width, whether Linear layers have biases, and the initialisation (:data:`GPT_INITS`)."""

    vocab_size: int = 64
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    bias: bool = True
    init: str = "torch"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.init not in GPT_INITS:
            raise ValueError(f"GPTConfig.init must be one of {GPT_INITS}, got {self.init!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one QKV projection, ``F.scaled_dot_product_attention``
    (``is_causal=True``), an output projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (GELU, 4x width)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, ``n_layer`` pre-norm blocks, final LayerNorm, untied LM head.

    ``model(idx)`` returns the logits ``[batch, t, vocab_size]``; ``model(idx, targets)`` returns
    ``(logits, loss)``, the loss being the mean next-token cross entropy (nats)."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"TinyGPT expects a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.init == "gpt2":
            self._init_gpt2()
        elif cfg.init == "gpt2-two-pass":
            self._init_gpt2_two_pass()

    def _residual_std(self) -> float:
        return 0.02 / math.sqrt(2 * self.cfg.n_layer)

    @torch.no_grad()
    def _init_gpt2(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=self._residual_std() if name.endswith(RESIDUAL_PROJECTIONS) else 0.02)

    @torch.no_grad()
    def _init_gpt2_two_pass(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # residual projections again, block by block
            for lin in (blk.attn.c_proj, blk.mlp[2]):
                nn.init.normal_(lin.weight, std=self._residual_std())

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

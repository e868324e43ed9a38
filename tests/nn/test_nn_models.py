"""The one GPT (microscale.nn.models.TinyGPT) reproduces, bit for bit, the two GPT definitions it replaced,
so results cached with either stay valid:

- the experiments' ``GPT`` (experiments/models.py before the merge; train_lm, and the direct-cast and PTQ
  results keyed by the SHA-256 of its checkpoints) is ``TinyGPT(init="gpt2-two-pass")`` with its
  checkpoint files' names (``experiments.lm.CHECKPOINT_NAMES``);
- the library's previous ``TinyGPT`` is ``init="torch"``, and that class followed by
  ``experiments.train_scale.gpt2_init`` (results/train_scale.json) is ``init="gpt2"``.

Frozen copies of the old classes live in this file only, as the independent implementation: same
parameter values and RNG consumption at construction, same logits, same losses and weights after a few
quantized training steps. Then the experiments' own training code reruns the first steps of cached units
and must give the recorded losses exactly.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import microscale.nn as mnn
from microscale.nn.models import GPT_INITS, GPTConfig, TinyGPT

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ---- frozen copy: the experiments' GPT (experiments/models.py at ad75a4d) ---------------------------
@dataclass(frozen=True)
class OldExperimentsConfig:
    vocab: int = 256
    ctx: int = 128
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4


class OldExperimentsAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class OldExperimentsBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = OldExperimentsAttention(cfg)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class OldExperimentsGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(OldExperimentsBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init)
        for blk in self.blocks:
            for lin in (blk.attn.proj, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / (2 * cfg.n_layers) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    def loss(self, idx, targets):
        logits = self.forward(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---- frozen copy: the library's TinyGPT (src/microscale/nn/models.py at ad75a4d) + train_scale's init --
class OldLibAttention(nn.Module):
    def __init__(self, cfg):
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


class OldLibBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = OldLibAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OldTinyGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(OldLibBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def old_gpt2_init(model):
    n_layer = len(model.blocks)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    return model


# ---- the pairs ---------------------------------------------------------------------------------------
EXPERIMENTS_NAMES = (("wte", "tok"), ("wpe", "pos"), ("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.c_attn", "attn.qkv"),
                     ("attn.c_proj", "attn.proj"), ("mlp.0", "fc1"), ("mlp.2", "fc2"), ("lm_head", "head"))


def old_key(new_key: str) -> str:
    """The experiments' parameter name of a TinyGPT parameter, written out here independently of experiments.lm."""
    joined = "." + new_key + "."
    for new, old in EXPERIMENTS_NAMES:
        joined = joined.replace("." + new + ".", "." + old + ".")
    return joined[1:-1]


def build_pair(kind: str, seed: int):
    """(old model, new model, old model's name of each new parameter), each built after ``manual_seed(seed)``,
    plus the RNG states after each construction."""
    if kind == "experiments":
        torch.manual_seed(seed)
        old = OldExperimentsGPT(OldExperimentsConfig(vocab=48, ctx=16, d_model=32, n_layers=2, n_heads=2))
        s_old = torch.get_rng_state()
        torch.manual_seed(seed)
        new = TinyGPT(GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=32, init="gpt2-two-pass"))
        return old, new, old_key, s_old, torch.get_rng_state()
    cfg = GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=32,
                    init="torch" if kind == "torch" else "gpt2")
    torch.manual_seed(seed)
    old = OldTinyGPT(cfg)
    if kind == "gpt2":
        old_gpt2_init(old)
    s_old = torch.get_rng_state()
    torch.manual_seed(seed)
    new = TinyGPT(cfg)
    return old, new, (lambda k: k), s_old, torch.get_rng_state()


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("kind", ["experiments", "torch", "gpt2"])
@pytest.mark.parametrize("seed", [0, 3])
def test_construction_matches_old_class(kind, seed):
    old, new, name, s_old, s_new = build_pair(kind, seed)
    assert torch.equal(s_old, s_new)  # the same number of draws from the global generator
    old_state, new_state = old.state_dict(), new.state_dict()
    assert [name(k) for k in new_state] == list(old_state)  # same parameters, same creation order
    for k, v in new_state.items():
        assert bitwise_equal(v, old_state[name(k)]), k


def test_inits_differ_from_each_other():
    # the three options are three different draws from the same seed (so each option is really needed)
    weights = []
    for init in GPT_INITS:
        torch.manual_seed(0)
        weights.append(TinyGPT(GPTConfig(n_embd=32, init=init)).blocks[0].attn.c_proj.weight)
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert weights[0].abs().max() > 0.1 > 0.05 > weights[1].abs().max()  # Kaiming-uniform vs N(0, 0.01)


def _train(model, forward_loss, recipe, steps=3):
    """A few AdamW steps on fixed random bytes under ``recipe`` (None: FP32); returns losses and logits."""
    if recipe is not None:
        model = mnn.quantize_model(model, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 48, (4, 17), generator=g)
        loss = forward_loss(model, idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(torch.arange(16)[None] % 48)
    return losses, logits if isinstance(logits, torch.Tensor) else logits[0], model


@pytest.mark.parametrize("kind", ["experiments", "gpt2"])
@pytest.mark.parametrize("recipe", [None, "mxfp6", "mxfp4-w+mxfp6"])
def test_training_matches_old_class(kind, recipe):
    old, new, name, _, _ = build_pair(kind, 1)
    old_loss = (lambda m, x, y: m.loss(x, y)) if kind == "experiments" else (lambda m, x, y: m(x, y)[1])
    l_old, y_old, old = _train(old, old_loss, recipe)
    l_new, y_new, new = _train(new, lambda m, x, y: m(x, y)[1], recipe)
    assert l_old == l_new
    assert bitwise_equal(y_old, y_new)
    old_params = dict(old.named_parameters())
    for k, p in new.named_parameters():
        assert bitwise_equal(p.detach(), old_params[name(k)].detach()), k


def test_config_checks():
    with pytest.raises(ValueError, match="init must be one of"):
        GPTConfig(init="xavier")
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(TypeError, match="expects a GPTConfig"):
        TinyGPT({"n_layer": 2})


# ---- the experiments' code against their cached units ---------------------------------------------------
@pytest.fixture(scope="module")
def experiments_corpus():
    import sys
    sys.path.insert(0, str(ROOT))
    from experiments import data
    corpus = data.load_corpus()
    published = ROOT / "results" / "train_lm.json"
    if not published.exists():
        pytest.skip("no published results/train_lm.json")
    if json.loads(published.read_text())["corpus"]["sha256"] != corpus.sha256:
        pytest.skip("this Python's standard library is not the corpus the cached results were trained on")
    return corpus


def test_experiments_checkpoint_names_round_trip():
    import sys
    sys.path.insert(0, str(ROOT))
    from experiments import lm
    model = lm.build_gpt({"d_model": 32, "n_layers": 2, "n_heads": 2, "ctx": 16}, 0)
    state = model.state_dict()
    on_file = lm.checkpoint_names(state)
    assert list(on_file) == [old_key(k) for k in state]
    assert list(lm.model_names(on_file)) == list(state)
    with pytest.raises(ValueError, match="unknown"):
        lm.gpt_config({"d_model": 32, "n_layers": 2, "n_heads": 2, "ctx": 16, "vocab_size": 3})


def test_train_lm_reproduces_cached_unit(experiments_corpus):
    """The first steps of results/runs/gpt-0.2M_fp32_s0.json, rerun by train_lm's own loop (warm-up learning
    rates do not depend on the run length, nor do the first batches). Only the first steps: from step 10 on
    this environment departs from that record in the last bit of the loss with the old class as well
    (both classes give the same full run, checkpoint included; the record predates this environment)."""
    from experiments import common, train_lm
    cached = json.loads((ROOT / "results" / "runs" / "gpt-0.2M_fp32_s0.json").read_text())
    preset = replace(common.PRESETS["full"], val_windows=2)
    assert cached["key"]["config"] == preset.gpt_sizes["gpt-0.2M"]
    threads = torch.get_num_threads()
    torch.set_num_threads(cached["environment"]["threads"])
    try:
        rec, _ = train_lm.train_one(preset, preset.gpt_sizes["gpt-0.2M"], 3, "fp32", 0, experiments_corpus)
    finally:
        torch.set_num_threads(threads)
    assert rec["train_loss"] == cached["train_loss"][:3]


def test_train_scale_reproduces_cached_unit(experiments_corpus, tmp_path):
    """The first 4 steps (the train-loss chunks recorded by then) of the cached 32x1 MXFP6 seed-0 unit in
    results/runs/, rerun by train_scale's own unit code (stopped after 4 steps; its checkpoint holds the
    record so far)."""
    from experiments import train_scale as ts
    (path,) = sorted((ROOT / "results" / "runs").glob("scale_32x1_mxfp6_s0_*steps.json"))
    cached = json.loads(path.read_text())
    plan = ts.Plan()
    key = cached["key"]
    assert key == ts.unit_key(plan, "32x1", "mxfp6", 0, key["lr"], key["steps"])
    threads = torch.get_num_threads()
    try:
        out = ts.train_unit({"plan": plan.to_json(), "out": str(tmp_path), "kind": "main", "size": "32x1",
                             "recipe": "mxfp6", "seed": 0, "lr": key["lr"], "steps": key["steps"], "threads": 1,
                             "stop_after": 4})
    finally:
        torch.set_num_threads(threads)
    assert out == {"stopped_at": 4}
    name = ts.unit_name("main", "32x1", "mxfp6", 0, key["lr"], key["steps"])
    assert path.name == f"{name}.json"
    state = torch.load(tmp_path / "checkpoints" / f"{name}.pt", weights_only=False)
    recorded = [chunk for chunk in cached["train_loss"] if chunk[0] <= 4]  # [step, mean loss] chunks
    assert recorded and state["rec"]["train_loss"] == recorded

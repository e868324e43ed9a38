"""QSNR on real tensors: weights, activations and gradients captured from a model, yours or one trained here.

The BDR paper (Rouhani et al., ISCA 2023, §4) compares block formats on Gaussian vectors *and* on real
weight / activation / gradient tensors of trained models, because real tensors have outliers and
channel structure that i.i.d. samples lack (and that penalize large blocks). This module produces such
tensors from any model, and by default from one trained offline, deterministically, in seconds:

* :func:`capture_linear_tensors` records every ``nn.Linear``'s weight, input activation and output gradient
  over batches the caller gives, on a model the caller gives (any ``nn.Module``: a transformers Llama, an
  ``nn.Sequential``...; transformers' GPT-2 computes with ``Conv1D``, so only its ``lm_head`` is an
  ``nn.Linear``), with the model's own loss or a ``loss`` function; no training involved.
* :func:`capture_tensors` is the default capture: it trains :class:`~microscale.nn.models.TinyGPT` (plain
  FP32 AdamW, next-byte prediction) on a byte corpus made of the running interpreter's standard-library
  sources (the sorted ``*.py`` files of :data:`CORPUS_PACKAGES` under ``sysconfig.get_paths()["stdlib"]``;
  every tenth file is held out), then runs :func:`capture_linear_tensors` on one held-out batch, which
  records, for every ``nn.Linear``: its weight ``[out, in]``, its input activation ``[tokens, in]`` and
  the gradient of the (mean cross-entropy) loss with respect to its output ``[tokens, out]``. In each the
  last axis is the one a matmul reduces over when the tensor is an operand (``in`` for the forward pass
  and for the weight, ``out`` for the backward pass's ``dY @ W``), i.e. the axis MX blocks run along.
* The default capture is cached (a safetensors file written atomically by :func:`microscale.io.save_file`)
  under ``$MICROSCALE_CACHE`` or ``~/.cache/microscale``; see :func:`cache_path`.
* :func:`tensor_vectors` cuts the captured tensors into ``[n, length]`` rows along that axis, the input of
  :func:`~microscale.bdr.qsnr.vectors_qsnr` (``captured=`` takes your own capture, else the default one);
  ``sample_vectors("activations", n=..., length=...)`` and ``"weights"``, ``"gradients"``, ``"tensors"``
  (all three) reach it by name.

Gradients of a mean loss over ~10^3 tokens are small (default capture: median |g| 2.5e-6, max 1e-3);
QSNR does not depend on scale for power-of-two block scales within their range, but unscaled formats
(``fp8_e4m3``) underflow on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..io import load_file, read_header, save_file

__all__ = ["CORPUS_PACKAGES", "HOLDOUT_EVERY", "KINDS", "SEPARATOR", "CapturedTensors", "StdlibCorpus",
           "corpus_files", "read_corpus", "capture_tensors", "capture_linear_tensors", "cache_dir",
           "cache_path", "corpus_bytes", "tensor_rows", "tensor_vectors"]

#: Standard-library packages whose ``*.py`` sources (recursively, sorted) form the training corpus.
CORPUS_PACKAGES = ("asyncio", "collections", "concurrent", "email", "http", "json", "logging", "urllib")
#: The captured tensor kinds, in order.
KINDS = ("weight", "activation", "gradient")
#: Files with sorted index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 are held out (capture batch, validation).
HOLDOUT_EVERY = 10
#: Byte 0 separates files in the streams (it does not occur in the sources).
SEPARATOR = b"\x00"
#: Bump when the capture procedure changes, so old cache files are not reused.
_CAPTURE_VERSION = 1


@dataclass(frozen=True)
class CapturedTensors:
    """``tensors[kind][layer]``: float32 CPU tensors, kind in :data:`KINDS`, layer = the ``nn.Linear``'s name
    in ``model.named_modules()`` (module order); ``meta``: facts of the capture (for
    :func:`capture_linear_tensors` the layers and per-batch losses; for :func:`capture_tensors` also the
    training settings, losses, corpus facts and cache key)."""

    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)


# ---- corpus ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StdlibCorpus:
    """The byte corpus: sorted ``files`` (POSIX paths relative to ``root``), the held-out ones, the
    ``train`` / ``holdout`` uint8 streams (files joined by byte 0) and the SHA-256 identifying them."""

    root: str
    files: tuple[str, ...]
    holdout_files: tuple[str, ...]
    train: torch.Tensor
    holdout: torch.Tensor
    sha256: str


def corpus_files(packages: tuple[str, ...] = CORPUS_PACKAGES, stdlib: str | None = None) -> list[str]:
    """Sorted relative paths (POSIX style, relative to the stdlib root) of the ``*.py`` files under
    ``<stdlib>/<package>`` (recursively) for each of ``packages``."""
    if isinstance(packages, str) or not all(isinstance(p, str) for p in packages):
        raise TypeError(f"packages must be a tuple of package names, got {packages!r}")
    root = stdlib or sysconfig.get_paths()["stdlib"]
    files = []
    for pkg in packages:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                      for f in filenames if f.endswith(".py")]
    return sorted(files)


def read_corpus(packages: tuple[str, ...] = CORPUS_PACKAGES, stdlib: str | None = None) -> StdlibCorpus:
    """Read :func:`corpus_files`; file index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 goes to ``holdout``, so
    no file is split. ``sha256`` covers every relative path and its bytes, in order (it depends on the
    Python version), so it identifies the text a model was trained on."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    files = corpus_files(packages, root)
    if len(files) < HOLDOUT_EVERY:
        raise FileNotFoundError(f"need at least {HOLDOUT_EVERY} *.py files under packages {list(packages)} "
                                f"of the standard library {root!r}, found {len(files)}")
    h = hashlib.sha256()
    train, holdout, holdout_files = [], [], []
    for i, rel in enumerate(files):
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        h.update(rel.encode() + SEPARATOR + data + SEPARATOR)
        if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
            holdout.append(data)
            holdout_files.append(rel)
        else:
            train.append(data)

    def stream(parts):
        return torch.from_numpy(np.frombuffer(SEPARATOR.join(parts), dtype=np.uint8).copy())

    return StdlibCorpus(root, tuple(files), tuple(holdout_files), stream(train), stream(holdout), h.hexdigest())


def corpus_bytes(packages: tuple[str, ...] = CORPUS_PACKAGES, stdlib: str | None = None):
    """``(train, holdout, sha256, n_files)`` of :func:`read_corpus`."""
    c = read_corpus(packages, stdlib)
    return c.train, c.holdout, c.sha256, len(c.files)


def _windows(stream: torch.Tensor, batch: int, ctx: int, g: torch.Generator):
    starts = torch.randint(0, stream.numel() - ctx - 1, (batch,), generator=g)
    w = stream[starts[:, None] + torch.arange(ctx + 1)[None, :]].to(torch.int64)
    return w[:, :-1], w[:, 1:]


# ---- capture --------------------------------------------------------------------------------------
def _settings(steps, seed, n_layer, n_head, n_embd, block_size, batch_size, capture_batch, lr,
              weight_decay, packages) -> dict:
    for name, v in (("steps", steps), ("seed", seed), ("n_layer", n_layer), ("n_head", n_head),
                    ("n_embd", n_embd), ("block_size", block_size), ("batch_size", batch_size),
                    ("capture_batch", capture_batch)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if v < (0 if name in ("steps", "seed") else 1):
            raise ValueError(f"{name} must be {'>= 0' if name in ('steps', 'seed') else '>= 1'}, got {v}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    if not lr > 0 or not weight_decay >= 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr!r}, weight_decay={weight_decay!r}")
    return {"config": {"vocab_size": 256, "block_size": block_size, "n_layer": n_layer, "n_head": n_head,
                       "n_embd": n_embd, "bias": True},
            "steps": steps, "seed": seed, "batch_size": batch_size, "capture_batch": capture_batch,
            "lr": float(lr), "weight_decay": float(weight_decay), "packages": list(packages)}


def _cache_key(settings: dict, corpus_sha256: str) -> str:
    ident = {"version": _CAPTURE_VERSION, "torch": torch.__version__, "corpus_sha256": corpus_sha256,
             **settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cache_dir() -> str:
    """``$MICROSCALE_CACHE`` if set and non-empty, else ``~/.cache/microscale``."""
    return os.environ.get("MICROSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "microscale")


def cache_path(key: str) -> str:
    """``<cache_dir()>/bdr_tensors/capture-<key>.safetensors`` for a capture's settings key."""
    return os.path.join(cache_dir(), "bdr_tensors", f"capture-{key}.safetensors")


def _save(path: str, captured: CapturedTensors) -> None:
    """Write ``captured`` to ``path`` with :func:`microscale.io.save_file` (atomic: a reader sees the old
    file or the whole new one): tensors named ``<kind>/<layer>``, ``meta`` as JSON in the metadata."""
    flat = {f"{kind}/{layer}": t.contiguous() for kind, d in captured.tensors.items() for layer, t in d.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(flat, path, metadata={"meta": json.dumps(captured.meta, sort_keys=True)})


def _load(path: str, key: str) -> CapturedTensors | None:
    """The cached capture, or None when the file is missing, unreadable, or not this key's.

    Read with :mod:`microscale.io` (header validated before any data); files of the same layout written
    by earlier versions with ``safetensors.torch.save_file`` read the same way."""
    if not os.path.exists(path):
        return None
    try:
        meta = json.loads(read_header(path).user_metadata["meta"])
        flat = load_file(path)
        tensors = {kind: {layer: flat[f"{kind}/{layer}"] for layer in meta["layers"]} for kind in KINDS}
        if meta.get("cache_key") != key or not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32
                                                   for d in tensors.values() for t in d.values()):
            raise ValueError("cache key or dtype mismatch")
    except Exception as e:  # any corruption (truncated, garbage, wrong content): recapture, never crash
        warnings.warn(f"ignoring unreadable tensor cache {path!r} ({type(e).__name__}: {e}); recapturing",
                      RuntimeWarning, stacklevel=3)
        return None
    return CapturedTensors(tensors, meta)


def capture_tensors(steps: int = 300, seed: int = 0, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 128,
                    block_size: int = 64, batch_size: int = 32, capture_batch: int = 16, lr: float = 2e-3,
                    weight_decay: float = 0.01, packages: tuple[str, ...] = CORPUS_PACKAGES,
                    cache: bool = True) -> CapturedTensors:
    """The default capture: train a byte-level TinyGPT here, then :func:`capture_linear_tensors` on it.

    The real-tensor setting of the BDR paper (Rouhani et al., ISCA 2023, §4: QSNR on weights, activations
    and gradients of trained models), scaled down to train on CPU: ``steps`` AdamW steps (FP32, constant
    ``lr``, gradient norm clipped to 1) of next-byte prediction on :func:`corpus_bytes`' training stream,
    ``batch_size`` windows of ``block_size`` bytes per step, initialization fixed by
    ``torch.manual_seed(seed)`` and batches by a ``torch.Generator`` seeded with ``seed``. Then one forward
    and backward pass on ``capture_batch`` held-out windows records (:func:`capture_linear_tensors`), for
    each ``nn.Linear`` in module order, with tokens = ``capture_batch * block_size``:

    * ``"weight"``: ``W`` ``[out, in]``;
    * ``"activation"``: its input ``[tokens, in]`` (forward hook);
    * ``"gradient"``: dloss/d(its output) ``[tokens, out]``, loss = the mean next-byte cross-entropy
      over the capture batch.

    To capture your own model instead, call :func:`capture_linear_tensors` with it and your batches.
    The model and optimizer state are not kept. With ``cache`` (default) the result is read from / written
    to :func:`cache_path` with :mod:`microscale.io` (key: every setting above, the torch version and the
    corpus SHA-256); an unreadable cache file is recaptured with a RuntimeWarning. ``meta`` holds the
    settings, ``losses`` (train loss per step), ``initial_loss``, ``final_loss`` (mean of the last 10
    steps), ``capture_loss``, ``corpus_sha256``, ``corpus_files``, ``layers``, ``cache_key`` and ``torch``.
    """
    packages = tuple(packages) if not isinstance(packages, str) else packages
    settings = _settings(steps, seed, n_layer, n_head, n_embd, block_size, batch_size, capture_batch, lr,
                         weight_decay, packages)
    train, holdout, sha, n_files = corpus_bytes(packages)
    key = _cache_key(settings, sha)
    path = cache_path(key)
    if cache:
        hit = _load(path, key)
        if hit is not None:
            return hit

    g = torch.Generator().manual_seed(seed)
    model, losses = _train_tinygpt(settings, train, g)
    x, y = _windows(holdout, capture_batch, block_size, g)
    capture = capture_linear_tensors(model, [(x, y)])
    capture_loss = capture.meta["losses"][0]
    tail = losses[-10:]
    meta = {**settings, "losses": losses, "initial_loss": losses[0] if losses else capture_loss,
            "final_loss": sum(tail) / len(tail) if tail else capture_loss, "capture_loss": capture_loss,
            "corpus_sha256": sha, "corpus_files": n_files, "layers": capture.meta["layers"], "cache_key": key,
            "torch": torch.__version__}
    captured = CapturedTensors(capture.tensors, meta)
    if cache:
        try:
            _save(path, captured)
        except OSError as e:  # a read-only or full cache directory must not stop the analysis
            warnings.warn(f"could not write tensor cache {path!r}: {e}", RuntimeWarning, stacklevel=2)
    return captured


def _train_tinygpt(settings: dict, train: torch.Tensor, g: torch.Generator):
    """``(model, losses)``: the default capture's TinyGPT after ``settings["steps"]`` AdamW steps on windows
    of ``train`` drawn with ``g`` (see :func:`capture_tensors`)."""
    from ..nn.models import GPTConfig, TinyGPT

    torch.manual_seed(settings["seed"])
    model = TinyGPT(GPTConfig(**settings["config"]))
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    block_size = settings["config"]["block_size"]
    losses = []
    model.train()
    for _ in range(settings["steps"]):
        x, y = _windows(train, settings["batch_size"], block_size, g)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return model, losses


def _model_loss(output) -> torch.Tensor:
    """The loss a model returned: ``output`` itself when a 0-dim tensor, ``output.loss`` (transformers'
    ModelOutput, given labels), or the one 0-dim floating tensor of a tuple / list output."""
    if torch.is_tensor(output) and output.dim() == 0:
        return output
    if torch.is_tensor(getattr(output, "loss", None)):
        return output.loss
    if isinstance(output, (tuple, list)):
        found = [t for t in output if torch.is_tensor(t) and t.dim() == 0 and t.is_floating_point()]
        if len(found) == 1:
            return found[0]
    raise TypeError(f"cannot find the loss in the model's output ({_describe(output)}): expected a scalar "
                    f"tensor, an object with a tensor .loss (transformers models given labels), or a tuple "
                    f"holding one scalar tensor (TinyGPT's (logits, loss)); pass "
                    f"loss=lambda output, batch: ... to compute it")


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _call(model: torch.nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def capture_linear_tensors(model: torch.nn.Module, batches: Iterable, loss=None) -> CapturedTensors:
    """Every ``nn.Linear``'s weight, input activation and output gradient over batches the caller gives.

    The tensors the BDR paper (Rouhani et al., ISCA 2023, §4) measures QSNR on, from any model (a
    transformers model, an ``nn.Sequential``, a TinyGPT...): nothing is trained, and the parameters, their
    ``.grad`` and the train/eval mode are left as they are.

    ``batches``: an iterable of batches (a list, a DataLoader...). Each is given to the model as
    ``model(**batch)`` when a mapping, ``model(*batch)`` when a tuple or list, else ``model(batch)``; one
    batch is ``[x]`` (a bare tensor is refused, since iterating it would split it into rows).
    ``loss``: ``loss(output, batch) -> scalar tensor``; by default the model's own loss, found in its
    output: the output itself when it is a 0-dim tensor, ``output.loss`` (transformers models given ``labels``),
    or the one scalar floating tensor of a tuple output (TinyGPT's ``(logits, loss)``).

    Per batch, one forward pass with hooks on every ``nn.Linear`` and ``torch.autograd.grad`` of that
    batch's loss with respect to the layers' outputs. ``tensors[kind][name]``, for every ``nn.Linear`` in
    ``model.named_modules()`` order, float32 copies on the CPU:

    * ``"weight"``: ``W`` ``[out, in]``;
    * ``"activation"``: its input flattened to ``[tokens, in]``, batches concatenated in order;
    * ``"gradient"``: d(the batch's loss)/d(its output) ``[tokens, out]``, batches concatenated.

    A layer the loss does not depend on gets zero gradients; a layer called twice in one forward pass keeps
    its last call; a layer that does not run, or whose output cannot carry a gradient (frozen parameters
    and input), is a ValueError. ``meta``: ``layers`` (names), ``losses`` (one float per batch),
    ``batches`` and ``tokens`` (rows of each activation).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if torch.is_tensor(batches) or isinstance(batches, (Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, e.g. [x], [(idx, targets)] or a DataLoader; "
                        f"got {type(batches).__name__} (wrap one batch in a list)")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be None or a callable loss(output, batch) -> scalar tensor, "
                        f"got {type(loss).__name__}")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to capture")
    layers = [name for name, _ in linears]
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    losses: list[float] = []
    for batch in batches:
        batch_acts, batch_grads, batch_loss = _capture_batch(model, linears, batch, loss, len(losses))
        for n in layers:
            acts[n].append(batch_acts[n])
            grads[n].append(batch_grads[n])
        losses.append(batch_loss)
    if not losses:
        raise ValueError("batches is empty: give at least one batch to capture")
    tensors = {"weight": {n: m.weight.detach().to("cpu", torch.float32, copy=True) for n, m in linears},
               "activation": {n: torch.cat(acts[n]) for n in layers},
               "gradient": {n: torch.cat(grads[n]) for n in layers}}
    meta = {"layers": layers, "losses": losses, "batches": len(losses),
            "tokens": tensors["activation"][layers[0]].shape[0]}
    return CapturedTensors(tensors, meta)


def _capture_batch(model, linears, batch, loss_fn, index: int):
    """``(activations, gradients, loss)`` of one batch for :func:`capture_linear_tensors`."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def forward_hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            inputs[name] = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32, copy=True)
            outputs[name] = output
        return forward_hook

    handles = [m.register_forward_hook(hook(name), with_kwargs=True) for name, m in linears]
    try:
        with torch.enable_grad():
            output = _call(model, batch)
            value = _model_loss(output) if loss_fn is None else loss_fn(output, batch)
    finally:
        for hd in handles:
            hd.remove()
    if not (torch.is_tensor(value) and value.dim() == 0 and value.is_floating_point()):
        got = f"shape {tuple(value.shape)} {value.dtype}" if torch.is_tensor(value) else type(value).__name__
        raise TypeError(f"batch {index}: the loss must be a scalar floating tensor, got {got}")
    layers = [name for name, _ in linears]
    missing = [n for n in layers if n not in outputs]
    if missing:
        raise ValueError(f"batch {index}: nn.Linear layers {missing} did not run in the forward pass; "
                         f"cannot capture them")
    frozen = [n for n in layers if not outputs[n].requires_grad]
    if frozen or not value.requires_grad:
        raise ValueError(f"batch {index}: no gradient can flow to the output of nn.Linear layers "
                         f"{frozen or layers} (their parameters and inputs do not require grad); enable "
                         f"requires_grad on the parameters to capture gradients")
    got = torch.autograd.grad(value, [outputs[n] for n in layers], allow_unused=True)
    gradients = {n: (torch.zeros_like(outputs[n]) if g is None else g).detach()
                 .reshape(-1, outputs[n].shape[-1]).to("cpu", torch.float32, copy=True)
                 for n, g in zip(layers, got)}
    return inputs, gradients, value.item()


# ---- rows along the reduction axis ----------------------------------------------------------------
def tensor_rows(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[r, length]`` rows of ``length`` consecutive elements along ``t``'s last (reduction) axis.

    Last dim d >= length: each reduction row is cut into d // length pieces (the remainder of each row is
    dropped). d < length: whole reduction rows are concatenated in order (``t.reshape(-1)`` cut into
    ``length`` pieces, the remainder dropped); when d divides ``length`` a row is exactly length // d whole
    reduction rows, so blocks of any size dividing d line up with the tensor's own. Rows never mix tensors.
    """
    if t.dim() < 1 or t.numel() == 0:
        raise ValueError(f"need a non-empty tensor, got shape {tuple(t.shape)}")
    d = t.shape[-1]
    if d >= length:
        return t.reshape(-1, d)[:, :d - d % length].reshape(-1, length)
    flat = t.reshape(-1)
    return flat[:flat.numel() - flat.numel() % length].reshape(-1, length)


def _kind_rows(captured: CapturedTensors, kind: str, length: int) -> torch.Tensor:
    rows = torch.cat([tensor_rows(t, length) for t in captured.tensors[kind].values()]).float()
    return rows[rows.ne(0).any(dim=1)]     # QSNR is undefined on an all-zero row


def tensor_vectors(kind: str = "all", n: int | None = None, length: int = 1024, seed: int = 0,
                   captured: CapturedTensors | None = None, **capture_kwargs) -> torch.Tensor:
    """``[n, length]`` float32 rows of captured real tensors (BDR, Rouhani et al., ISCA 2023, §4).

    ``kind``: "weight", "activation", "gradient" or "all". Rows come from :func:`tensor_rows` of every
    captured tensor of that kind (layers in module order), all-zero rows dropped. ``n=None``: all rows (for
    "all": every row of every kind, weights first). Otherwise ``n`` rows drawn without replacement by a
    ``torch.Generator`` seeded with ``seed`` (kept in their original order); "all" takes n // 3 of each
    kind, the remainder from weights. ``captured``: the tensors to cut (e.g. from
    :func:`capture_linear_tensors` on your model); None (default) takes the default capture, with
    ``capture_kwargs`` going to :func:`capture_tensors` (``steps``, ``seed`` is the capture's as
    ``capture_seed``, ``n_embd``, ``cache``...).
    """
    if kind != "all" and kind not in KINDS:
        raise ValueError(f"kind must be one of {['all', *KINDS]}, got {kind!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None or an int >= 0, got {n!r}")
    if captured is not None:
        if not isinstance(captured, CapturedTensors):
            raise TypeError(f"captured must be a CapturedTensors, got {type(captured).__name__}")
        if capture_kwargs:
            raise TypeError(f"capture settings {sorted(capture_kwargs)} apply to the default capture only, "
                            f"not to a given captured=")
    else:
        if "capture_seed" in capture_kwargs:
            capture_kwargs["seed"] = capture_kwargs.pop("capture_seed")
        captured = capture_tensors(**capture_kwargs)
    kinds = list(KINDS) if kind == "all" else [kind]
    if n is None:
        return torch.cat([_kind_rows(captured, k, length) for k in kinds])
    counts = [n // len(kinds)] * len(kinds)
    counts[0] += n - sum(counts)
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, c in zip(kinds, counts):
        rows = _kind_rows(captured, k, length)
        if c > rows.shape[0]:
            raise ValueError(f"asked for {c} {k} rows of length {length} but the capture has only "
                             f"{rows.shape[0]} nonzero ones; ask for fewer, use a shorter length, or "
                             f"capture a larger model / batch (capture_batch, n_layer, n_embd)")
        pick = torch.randperm(rows.shape[0], generator=g)[:c].sort().values
        out.append(rows[pick])
    return torch.cat(out)

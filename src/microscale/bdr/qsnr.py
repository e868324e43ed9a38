"""Quantization signal-to-noise ratio (QSNR) and the sample distributions used to compare formats.

    QSNR(x, Q) = -10 log10(||x - Q(x)||^2 / ||x||^2)   dB        (Rouhani et al., ISCA 2023, §4)

The paper compares formats on many independent vectors drawn from a Gaussian whose variance varies from
vector to vector. :func:`gaussian_vectors` draws n vectors x_v ~ N(0, sigma_v^2 I) with log2(sigma_v)
uniform on ``log2_sigma`` (default [-4, 4]); :func:`vectors_qsnr` quantizes every vector on its own
(per-tensor scales become per-vector scales) and averages the per-vector QSNR in dB, so a vector's
variance does not weight its vote. Laplace and Student-t vectors are drawn the same way. The paper's
other setting, real weights / activations / gradients, is :mod:`microscale.bdr.tensors`, reachable here by
name (``sample_vectors("activations", n=64, length=1024)``).
"""

from __future__ import annotations

import math

import torch

from ..formats import BlockFormat, get_format
from ..layout import from_blocks, make_layout, to_blocks
from ..quantize import fake_quantize
from ..options import check_rounding, draw_seed, element_uniforms
from ..reference import dequantize_blocks, quantize_blocks

__all__ = ["qsnr", "qsnr_of", "gaussian_vectors", "laplace_vectors", "student_t_vectors", "sample_vectors",
           "fake_quantize_vectors", "vectors_qsnr", "DISTRIBUTIONS"]


def qsnr_of(x: torch.Tensor, y: torch.Tensor) -> float:
    """-10 log10(||x - y||^2 / ||x||^2) in dB (inf when y == x, nan when x == 0 or y has NaN)."""
    x = x.detach().to(torch.float64).reshape(-1)
    y = y.detach().to(torch.float64).reshape(-1)
    noise = float((x - y).square().sum())
    signal = float(x.square().sum())
    if math.isnan(noise) or signal == 0.0:
        return math.nan
    return math.inf if noise == 0.0 else -10.0 * math.log10(noise / signal)


def qsnr(x: torch.Tensor, fmt: str | BlockFormat, axis: int = -1, **quantize_kwargs) -> float:
    """QSNR in dB of ``fake_quantize(x, fmt, axis, **quantize_kwargs)`` against ``x`` (whole tensor)."""
    return qsnr_of(x, fake_quantize(x, fmt, axis=axis, **quantize_kwargs))


# ---- sample vectors -------------------------------------------------------------------------------
def _sigmas(n: int, log2_sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    lo, hi = log2_sigma
    return torch.exp2(lo + (hi - lo) * torch.rand(n, 1, generator=g, dtype=torch.float64))


def gaussian_vectors(n: int = 1024, length: int = 1024, log2_sigma: tuple[float, float] = (-4.0, 4.0),
                     seed: int = 0) -> torch.Tensor:
    """``[n, length]`` float32: row v ~ N(0, sigma_v^2), log2(sigma_v) ~ U(log2_sigma) (the BDR setting)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, length, generator=g, dtype=torch.float64) * _sigmas(n, log2_sigma, g)).float()


def laplace_vectors(n: int = 1024, length: int = 1024, log2_sigma: tuple[float, float] = (-4.0, 4.0),
                    seed: int = 0) -> torch.Tensor:
    """Laplace rows with standard deviation sigma_v (scale sigma_v / sqrt 2), sigma_v as above."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, length, generator=g, dtype=torch.float64) - 0.5
    lap = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)
    return (lap * _sigmas(n, log2_sigma, g)).float()


def student_t_vectors(n: int = 1024, length: int = 1024, df: float = 3.0,
                      log2_sigma: tuple[float, float] = (-4.0, 4.0), seed: int = 0) -> torch.Tensor:
    """Student-t rows (``df`` degrees of freedom: heavy tails, outliers) times sigma_v as above."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, length, generator=g, dtype=torch.float64)
    chi2 = torch.distributions.Chi2(torch.tensor(float(df), dtype=torch.float64))
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))  # Chi2 sampling uses the global RNG
    w = chi2.sample((n, length))
    return (z / torch.sqrt(w / df) * _sigmas(n, log2_sigma, g)).float()


def _real_tensor_vectors(kind: str):
    """A sampler with the synthetic ones' keywords for rows of captured real tensors of ``kind``
    (:func:`microscale.bdr.tensors.tensor_vectors`; BDR §4). ``n=None`` (default) gives every row;
    ``log2_sigma`` is accepted and ignored (real tensors bring their own scales); ``captured=`` takes a
    capture of your own model (:func:`~microscale.bdr.tensors.capture_linear_tensors`), other keywords go
    to the default :func:`~microscale.bdr.tensors.capture_tensors`."""
    def sample(n: int | None = None, length: int = 1024, log2_sigma: tuple[float, float] | None = None,
               seed: int = 0, **capture_kwargs) -> torch.Tensor:
        from .tensors import tensor_vectors  # lazy: tensors.py trains a model, qsnr.py must stay light
        return tensor_vectors(kind, n=n, length=length, seed=seed, **capture_kwargs)
    sample.__name__ = sample.__qualname__ = f"{kind}_tensor_vectors"
    return sample


#: name -> sampler(n=..., length=..., log2_sigma=..., seed=...) -> [n, length] float32. "weights",
#: "activations", "gradients" and "tensors" (all three kinds) are rows of real tensors captured from a
#: TinyGPT trained here (:mod:`microscale.bdr.tensors`; the first call trains it, later calls hit a cache).
DISTRIBUTIONS = {"gaussian": gaussian_vectors, "laplace": laplace_vectors, "student_t": student_t_vectors,
                 "weights": _real_tensor_vectors("weight"), "activations": _real_tensor_vectors("activation"),
                 "gradients": _real_tensor_vectors("gradient"), "tensors": _real_tensor_vectors("all")}


def sample_vectors(distribution: str = "gaussian", **kwargs) -> torch.Tensor:
    """Vectors from one of :data:`DISTRIBUTIONS` by name (synthetic, or rows of real captured tensors)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {sorted(DISTRIBUTIONS)}, got {distribution!r}")
    return DISTRIBUTIONS[distribution](**kwargs)


# ---- independent vectors --------------------------------------------------------------------------
def fake_quantize_vectors(x: torch.Tensor, fmt: str | BlockFormat, rounding: str = "even",
                          scale_mode: str | None = None, seed: int | None = None) -> torch.Tensor:
    """Quantize-dequantize every row of ``[n, L]`` x as its own tensor (float64 result).

    Same numbers as ``fake_quantize(x[v], fmt)`` row by row, but in one batched call: formats with a
    per-tensor scale get one scale per row.
    """
    fmt = get_format(fmt)
    if x.dim() != 2:
        raise ValueError(f"expected [n_vectors, length], got shape {tuple(x.shape)}")
    if fmt.element is None:
        return x.to(torch.float64)
    rounding = check_rounding(rounding)
    layout = make_layout(x.shape, -1, fmt.block_size)
    u = None
    if rounding == "stochastic":
        u = element_uniforms(x.shape, layout, draw_seed(None) if seed is None else seed)
    group = layout.blocks_per_vector if fmt.tensor_scale is not None else None
    q = quantize_blocks(to_blocks(x.to(torch.float64), layout), fmt, rounding, scale_mode, u, None, group)
    return from_blocks(dequantize_blocks(q, fmt), layout)


def vectors_qsnr(x: torch.Tensor, fmt: str | BlockFormat, reduce: str = "mean", **kwargs) -> float | torch.Tensor:
    """Per-row QSNR (dB) of :func:`fake_quantize_vectors`; ``reduce`` "mean" (default), "median" or "none"."""
    x64 = x.to(torch.float64)
    y = fake_quantize_vectors(x, fmt, **kwargs)
    noise = (x64 - y).square().sum(dim=1)
    per = -10.0 * torch.log10(noise / x64.square().sum(dim=1))
    if reduce == "none":
        return per
    if reduce == "median":
        return float(per.median())
    if reduce == "mean":
        return float(per.mean())
    raise ValueError(f"reduce must be 'mean', 'median' or 'none', got {reduce!r}")

"""Error-diffusion post-training quantization of Linear weights to MX formats (GPTQ-style).

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(ICLR 2023), Algorithm 1, adapted to block formats. The MX paper (Rouhani et al. 2023, §6.2,
"error diffusion") uses the same Hessian-based scheme for its PTQ results.

For a Linear y = x Wᵀ with calibration inputs X [n, in], the layer's output error for a weight error
ΔW is tr(ΔW H ΔWᵀ) with H = XᵀX (up to a constant). Columns of W (input features) are quantized in
order; each column's rounding error e_j is spread over the not-yet-quantized columns with the Cholesky
factor U of H⁻¹ (upper): W[:, j+1:] -= (e_j / U[j, j]) ⊗ U[j, j+1:], which is the OBS update.

MX blocks run along in_features (32 consecutive columns of one row share an E8M0 scale). A block's scale
needs all 32 of its values, so when the sweep reaches a block it first computes every row's scale from
the block's *current* (already error-updated) values, exactly as direct cast would (OCP MX §6.3), and
then rounds the block's columns one at a time with that scale fixed, diffusing each column's error into
the rest of the block and beyond. Within a block the updates are applied eagerly; the block's accumulated
error reaches the later blocks in one matrix product ("lazy batch" updates of GPTQ §4 with batch = the
MX block size). With H = I nothing diffuses and the result is bit-for-bit the direct cast.

Single-level power-of-two formats (OCP MX) only; two-level BDR formats (shared microexponents) would need
the sub-block exponents fixed the same way, and are not handled.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..formats import get_format
from ..options import check_scale_mode
from ..quantize import fake_quantize
from ..reference import round_to_element, shared_exponent

__all__ = ["error_diffusion_quantize", "error_diffusion_model", "layer_error"]


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = H⁻¹), λ = damp · mean(diag H); GPTQ's damping."""
    h = hessian.to(torch.float64).clone()
    n = h.shape[0]
    h[torch.arange(n), torch.arange(n)] += damp * torch.diagonal(h).mean().clamp_min(1e-12)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def error_diffusion_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt, damp: float = 0.01,
                             rounding: str = "even", scale_mode: str | None = None) -> torch.Tensor:
    """Quantize ``weight`` [out, in] to ``fmt`` (blocks along in), minimizing tr(ΔW H ΔWᵀ) greedily.

    ``hessian``: [in, in], XᵀX of the layer's calibration inputs (any positive scale). Inputs that are
    always zero (zero diagonal) get a unit diagonal so H stays invertible, as in GPTQ. Returns the
    dequantized weight (on the format's grid, same dtype as ``weight``).
    """
    fmt = get_format(fmt)
    if not fmt.is_mx:
        raise ValueError(f"error diffusion handles single-level MX formats; {fmt.name!r} is not one")
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"expected weight [out, in] and hessian [in, in], got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}")
    elem, scale = fmt.element, fmt.scale
    scale_mode = check_scale_mode(scale_mode or "floor")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    u = _inverse_hessian_factor(h, damp)
    q = torch.zeros_like(w)
    cols, k = w.shape[1], fmt.block_size
    for b0 in range(0, cols, k):
        b1 = min(b0 + k, cols)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        x = shared_exponent(wb.abs().amax(dim=1), elem, scale, scale_mode)  # from the current block
        s = torch.exp2(x.to(torch.float64))
        for j in range(b1 - b0):
            col = wb[:, j]
            qc = round_to_element(col / s, elem, rounding) * s
            q[:, b0 + j] = qc
            e = (col - qc) / u[b0 + j, b0 + j]
            wb[:, j:] -= e[:, None] * u[b0 + j, b0 + j:b1][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q.to(weight.dtype)


def layer_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Proxy output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of a quantized weight."""
    d = (quantized - weight).to(torch.float64)
    w = weight.to(torch.float64)
    h = hessian.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", w, h, w))


@torch.no_grad()
def error_diffusion_model(model: nn.Module, calibration: list, fmt: str, damp: float = 0.01
                          ) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` whose Linear weights are error-diffusion quantized to ``fmt``, layer by layer
    in module order; each layer's Hessian XᵀX comes from its inputs on ``calibration`` with the earlier
    layers already quantized (GPTQ's sequential scheme). Returns the model and per-layer proxy errors."""
    model = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    stats = []
    for name, lin in layers:
        h = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)

        def hook(mod, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            h.add_(x.T @ x)

        handle = lin.register_forward_hook(hook)
        for batch in calibration:
            model(batch)
        handle.remove()
        w = lin.weight.detach().clone()
        q = error_diffusion_quantize(w, h, fmt, damp=damp)
        direct = fake_quantize(w, fmt, axis=-1)
        stats.append({"layer": name, "proxy_error_direct": layer_error(w, direct, h),
                      "proxy_error_ed": layer_error(w, q, h),
                      "requantize_changes": int((fake_quantize(q, fmt, axis=-1) != q).sum())})
        lin.weight.copy_(q)
    return model, stats

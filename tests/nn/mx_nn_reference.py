"""Hand-written references for the quantized ops: every GEMM operand goes through ms.fake_quantize along
the axis the issue states, then plain torch ops. Used by the tests in this folder."""

import torch
import torch.nn.functional as F

import microscale as ms


def fq(t, spec, axis):
    if spec.is_none:
        return t
    return ms.fake_quantize(t.detach(), spec.format, axis=axis, rounding=spec.rounding,
                            scale_mode=spec.scale_mode)


def linear_ref(x, w, b, gy, r):
    """Forward and all gradients of Y = X Wᵀ + b, written out."""
    n_out, n_in = w.shape
    y = F.linear(fq(x, r.fwd_input, -1), fq(w, r.fwd_weight, 1), b)
    gx = torch.matmul(fq(gy, r.dgrad_grad_output, -1), fq(w, r.dgrad_weight, 0))
    gy2, x2 = gy.reshape(-1, n_out), x.reshape(-1, n_in)
    gw = torch.matmul(fq(gy2, r.wgrad_grad_output, 0).t(), fq(x2, r.wgrad_input, 0))
    gb = gy2.sum(0) if b is not None else None
    return y, gx, gw, gb


class RefLinear(torch.autograd.Function):
    """linear_ref as an autograd function (for composing references of convs and attention)."""

    @staticmethod
    def forward(ctx, x, w, b, r):
        ctx.save_for_backward(x, w, b)
        ctx.r = r
        return F.linear(fq(x, r.fwd_input, -1), fq(w, r.fwd_weight, 1), b)

    @staticmethod
    def backward(ctx, gy):
        x, w, b = ctx.saved_tensors
        _, gx, gw, gb = linear_ref(x, w, b, gy, ctx.r)
        return gx, gw, gb, None


class RefMatmul(torch.autograd.Function):
    """Y = A·B of activations: forward q(A,-1)·q(B,-2) in fwd_input; dA = q(dY,-1)·q(B,-1)ᵀ;
    dB = q(A,-2)ᵀ·q(dY,-2) (see microscale.nn.recipe)."""

    @staticmethod
    def forward(ctx, a, b, r):
        ctx.save_for_backward(a, b)
        ctx.r = r
        return torch.matmul(fq(a, r.fwd_input, -1), fq(b, r.fwd_input, -2))

    @staticmethod
    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        r = ctx.r
        ga = torch.matmul(fq(gy, r.dgrad_grad_output, -1), fq(b, r.wgrad_input, -1).transpose(-1, -2))
        gb = torch.matmul(fq(a, r.wgrad_input, -2).transpose(-1, -2), fq(gy, r.wgrad_grad_output, -2))
        return ga.sum_to_size(a.shape), gb.sum_to_size(b.shape), None


def conv2d_ref(x, weight, bias, r, stride=1, padding=0, dilation=1):
    """im2col + RefLinear: reduction C_in·kh·kw in weight.reshape(out, -1) order (groups=1)."""
    n = x.shape[0]
    k = weight.shape[-2:]
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
    y = RefLinear.apply(cols.transpose(1, 2), weight.reshape(weight.shape[0], -1), bias, r)  # [N, L, O]
    ho = (x.shape[2] + 2 * padding - dilation * (k[0] - 1) - 1) // stride + 1
    return y.transpose(1, 2).reshape(n, weight.shape[0], ho, -1)


def sdpa_causal_ref(q, k, v, r):
    """softmax(q·kᵀ·scale, causal) · v with RefMatmul GEMMs and plain torch softmax/masking."""
    L, S = q.shape[-2], k.shape[-2]
    s = RefMatmul.apply(q, k.transpose(-2, -1), r) * (1.0 / q.shape[-1] ** 0.5)
    s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    return RefMatmul.apply(torch.softmax(s, dim=-1), v, r)

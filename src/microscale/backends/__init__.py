"""Quantization backends behind one interface, in a registry ordered by preference.

    c          compiled CPU kernels (microscale.kernels)
    torch      pure tensor ops on the fp32 bit pattern: any device (CUDA, MPS, XPU, meta), torch.compile
    triton     hand-written Triton kernels (optional extra: ``pip install triton``; GPU, or CPU under
               TRITON_INTERPRET=1); only used when selected by name
    reference  the float64 oracle (reference.py): every format and option

Selection, for each call of quantize / fake_quantize / dequantize:
1. ``with microscale.use_backend(name):`` (innermost wins), else
2. the ``MICROSCALE_BACKEND`` environment variable (c | torch | triton | reference | auto), else
3. automatic: the first available backend in the order above (triton excluded) whose ``covers`` is
   true, so CPU tensors go to ``c``, other devices to ``torch``, and what neither covers to
   ``reference``.
A backend chosen by name (1 or 2) must cover the request: if it does not, a ValueError names the
backend, the format and the reason; nothing falls back silently.

``use_backend`` keeps its choice in a :class:`contextvars.ContextVar`: it is thread-safe and
async-safe, and it applies to the thread (or task) that entered it only; threads started inside it do not
inherit it (set ``MICROSCALE_BACKEND`` for a process-wide choice).

``microscale.backends`` is this module and is also callable: ``ms.backends()`` is :func:`backends`.

Inside ``torch.compile`` the verbs always run the ``torch`` backend, the only one made of traceable tensor
ops (a request it does not cover raises); the selection rules above apply to eager calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import types

import torch

from .base import COVERED, Backend, Coverage, Packed, QuantSpec, not_covered
from .c_kernels import CBackend
from .oracle import ReferenceBackend
from .torch_native import TorchBackend
from .triton_kernels import TritonBackend

__all__ = ["Backend", "Coverage", "COVERED", "not_covered", "Packed", "QuantSpec", "BACKEND_ENV",
           "register_backend", "get_backend", "backend_names", "backends", "use_backend", "selected_backend",
           "select", "select_dequantize", "packed_linear", "c_selected", "grouped_conv",
           "grouped_conv_wgrad"]

#: Environment variable naming the backend for every call (c | torch | triton | reference | auto).
BACKEND_ENV = "MICROSCALE_BACKEND"

_REGISTRY: dict[str, Backend] = {}
#: Backends the automatic choice never picks (they run only when selected by name).
_EXPLICIT_ONLY = {"triton"}
_CHOICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("microscale_backend", default=None)


def register_backend(backend: Backend, *, explicit_only: bool = False) -> Backend:
    """Add ``backend`` at the end of the preference order (its ``name`` must be new)."""
    if not backend.name or backend.name in _REGISTRY or backend.name == "auto":
        raise ValueError(f"backend name must be new and not 'auto', got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    if explicit_only:
        _EXPLICIT_ONLY.add(backend.name)
    return backend


for _b in (CBackend(), TorchBackend(), TritonBackend(), ReferenceBackend()):
    register_backend(_b)


def backend_names() -> list[str]:
    """Registered backend names in preference order."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError listing the names for an unknown one."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)} (or 'auto')")
    return _REGISTRY[name]


def backends() -> list[dict]:
    """Each backend in preference order: {"name", "available", "reason" (why not, or ""), "description"}."""
    rows = []
    for b in _REGISTRY.values():
        reason = b.unavailable_reason()
        rows.append({"name": b.name, "available": reason is None, "reason": reason or "",
                     "description": b.description})
    return rows


def _check_name(name: str | None, source: str) -> str | None:
    if name is None or name == "auto":
        return None
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"{source}: unknown backend {name!r}; known backends: {', '.join(_REGISTRY)} (or 'auto')")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the enclosed quantize / fake_quantize / dequantize calls on backend ``name`` ("auto" or None:
    automatic choice). Nests; thread- and async-safe (a ContextVar; see the module docstring)."""
    token = _CHOICE.set(_check_name(name, "use_backend") or "auto")
    try:
        yield get_backend(name) if name not in (None, "auto") else None
    finally:
        _CHOICE.reset(token)


def selected_backend() -> tuple[str | None, str]:
    """(name chosen by use_backend or MICROSCALE_BACKEND, or None for automatic; where it came from)."""
    choice = _CHOICE.get()
    if choice is not None:
        return (None if choice == "auto" else choice), "use_backend"
    env = os.environ.get(BACKEND_ENV)
    if env:
        return _check_name(env.strip().lower(), BACKEND_ENV), BACKEND_ENV
    return None, "automatic"


def _pick(test, what: str) -> Backend:
    if torch.compiler.is_compiling():
        # only the torch backend is made of traceable tensor ops (c and triton call compiled code on raw
        # pointers, reference moves data to the CPU), so a traced call runs it whatever was selected
        b = _REGISTRY["torch"]
        cov = test(b)
        if not cov:
            raise ValueError(f"under torch.compile only the torch backend runs, and it does not cover {what}: "
                             f"{cov.reason}")
        return b
    name, source = selected_backend()
    if name is not None:
        b = get_backend(name)
        reason = b.unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend {name!r} (selected by {source}) is not available: {reason}")
        cov = test(b)
        if not cov:
            raise ValueError(f"backend {name!r} (selected by {source}) does not cover {what}: {cov.reason}")
        return b
    reasons = []
    for b in _REGISTRY.values():
        if b.name in _EXPLICIT_ONLY:
            continue
        reason = b.unavailable_reason()
        if reason is None:
            cov = test(b)
            if cov:
                return b
            reason = cov.reason
        reasons.append(f"{b.name}: {reason}")
    raise ValueError(f"no backend covers {what}: " + "; ".join(reasons))


def select(spec: QuantSpec, x: torch.Tensor) -> Backend:
    """The backend that runs quantize / fake_quantize of ``x`` with ``spec`` (see the module docstring)."""
    return _pick(lambda b: b.covers(spec, x),
                 f"{spec.describe()} of a {x.dtype} {x.device.type} tensor")


def select_dequantize(q, dtype: torch.dtype) -> Backend:
    """The backend that decodes MXTensor ``q`` to ``dtype``."""
    return _pick(lambda b: b.covers_dequantize(q, dtype),
                 f"dequantizing {q.format.name} on {q.codes.device.type} to {dtype}")


def c_selected() -> bool:
    """Whether an eager call on CPU tensors runs the ``c`` backend now: not under torch.compile, and the
    choice is automatic (c comes first for CPU tensors) or names ``c``. Cheap (no coverage test): for
    callers that hold an already checked kernel plan (``nn.packed.PackedWeight``)."""
    if torch.compiler.is_compiling():
        return False
    choice = _CHOICE.get()
    if choice is None:
        choice = os.environ.get(BACKEND_ENV)
        choice = choice.strip().lower() if choice else "auto"
    return choice in ("auto", "c")


def packed_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """A fused x · dequantize(weight)ᵀ + bias from the backend that would dequantize ``weight``, or None
    when it has no fused kernel for the request (the caller then dequantizes and runs F.linear)."""
    return select_dequantize(weight, x.dtype).packed_linear(x, weight, bias)


def grouped_conv(x: torch.Tensor, wq: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int, spec: QuantSpec, return_windows: bool = False):
    """A fused MX grouped convolution from the backend that would quantize ``x`` with ``spec`` (for ``c``:
    :func:`microscale.kernels.conv.conv_forward`), or None when it has no fused kernel for the request
    (the caller then runs im2col + the quantized batched GEMM)."""
    return select(spec, x).grouped_conv(x, wq, bias, stride, padding, dilation, groups, spec, return_windows)


def grouped_conv_wgrad(x: torch.Tensor, gyq: torch.Tensor, weight_shape, stride, padding, dilation, groups: int,
                       spec: QuantSpec, return_columns: bool = False):
    """The weight gradient of that grouped convolution from the backend that would quantize ``x`` with
    ``spec`` (for ``c``: :func:`microscale.kernels.conv.conv_wgrad`), or None when it has none."""
    return select(spec, x).grouped_conv_wgrad(x, gyq, weight_shape, stride, padding, dilation, groups, spec,
                                              return_columns)


class _CallableModule(types.ModuleType):
    """This module, callable: ``microscale.backends()`` lists the backends (see :func:`backends`)."""

    def __call__(self) -> list[dict]:
        return backends()


sys.modules[__name__].__class__ = _CallableModule

"""Post-training quantization: error diffusion (GPTQ-style) for MX formats, with calibration by forward
hooks. Direct cast is :func:`microscale.nn.quantize_model` with ``inference=True``."""

from .error_diffusion import error_diffusion_model, error_diffusion_quantize, layer_error  # noqa: F401

"""microscale: exact, fast, packed Microscaling (MX) and block number formats for PyTorch.

    import microscale as ms
    q = ms.quantize(x, "mxfp4")          # packed MXTensor (4.25 bits/element)
    y = ms.fake_quantize(x, "mxfp6_e2m3")
"""

from .formats import (BlockFormat, ElementFormat, ScaleFormat, get_format, list_formats,  # noqa: F401
                      register_format)
from .quantize import dequantize, fake_quantize, packed_linear, quantize  # noqa: F401
from . import backends  # noqa: F401  (callable: ms.backends() lists the quantization backends)
from .backends import use_backend  # noqa: F401
from .tensor import MXTensor  # noqa: F401
from .io import load_file, save_file  # noqa: F401
from . import layout  # noqa: F401
from . import interop  # noqa: F401  (gpt-oss / GGUF / torchao MX exchange, bit for bit)
from . import nn  # noqa: F401  (microscale.nn: quantized training/inference)
from . import bdr, ptq  # noqa: F401  (block-format analysis; post-training quantization)

__version__ = "0.1.0"

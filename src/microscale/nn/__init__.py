"""PyTorch integration: MX-quantized training and inference as a drop-in module swap.

    import microscale as ms
    model = ms.nn.quantize_model(model, "mxfp6")              # or a Recipe with per-operand formats
    model = ms.nn.quantize_model(model, "mxfp4-w", inference=True) # packed weights, still model.x.weight
    ms.nn.save_quantized(model, "m.safetensors"); ms.nn.load_quantized(fresh_model, "m.safetensors")
    ms.nn.dequantize_model(model)                             # plain modules again
    print(ms.nn.coverage(model, example_input))              # swapped modules, MX share of GEMM FLOPs

See :mod:`microscale.nn.recipe` for what each operand slot means and :mod:`microscale.nn.modules` for
how each op is covered; :mod:`microscale.nn.ddp` has the MX-compressed DDP communication hook.
"""

from .convert import (DEFAULT_ATTENTION_TYPES, dequantize_model, from_pretrained, load_quantized,  # noqa: F401
                      packing_plan, quantize_model, quantized_state, resident_bytes, restore,
                      save_quantized)
from .functional import (QuantState, mx_addmm, mx_baddbmm, mx_bmm, mx_grouped_conv2d, mx_grouped_gemm,  # noqa: F401
                         mx_linear, mx_matmul, mx_scaled_dot_product_attention, packed_mx_linear,
                         quantize_operand)
from .modules import MXConv1d, MXConv2d, MXLinear, MXMatmulMode  # noqa: F401
from .packed import PackedWeight, is_packed  # noqa: F401
from .recipe import (ELEMENTWISE_MODES, OPERANDS, OperandSpec, Recipe, get_recipe, list_recipes,  # noqa: F401
                     register_recipe)
from .ddp import MXCommState, mx_allreduce_hook  # noqa: F401
from .coverage import CoverageReport, coverage  # noqa: F401

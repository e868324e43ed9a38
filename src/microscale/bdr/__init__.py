"""Block data representations (Rouhani et al., ISCA 2023): QSNR, a worst-case QSNR bound, a hardware-cost
model and a Pareto design-space explorer (docs/bdr.md).

    ms.bdr.qsnr(x, "mx6"); ms.bdr.vectors_qsnr(ms.bdr.gaussian_vectors(), "mx6")
    ms.bdr.vectors_qsnr(ms.bdr.tensor_vectors("activation", n=64), "mx6")   # real tensors (trains once)
    ms.bdr.tensor_vectors("weight", captured=ms.bdr.capture_linear_tensors(model, batches))  # your model
    ms.bdr.qsnr_lower_bound("mx6"); ms.bdr.cost("mx6"); ms.bdr.explore(quick=True)
    fmt = ms.bdr.bdr_format(3, 32, 8, k2=4, d2=1)   # any BDR format: quantize, train, pack, save unregistered
"""

from ..formats import bdr_format, bfp_format  # noqa: F401  (format constructors; no registration needed)
from .bound import qsnr_lower_bound, worst_case_block  # noqa: F401
from .cost import (DEFAULT_MODEL, PAPER_RELATIONS, STRUCTURAL_MODEL, CostModel, area, area_breakdown,  # noqa: F401
                   baseline_area, baseline_breakdown, calibrate, cost, multiplier_area, relations, tree_area)
from .explore import Point, design_space, explore, frontier_gap, pareto_front, write_report  # noqa: F401
from .qsnr import (fake_quantize_vectors, gaussian_vectors, laplace_vectors, qsnr, qsnr_of,  # noqa: F401
                   sample_vectors, student_t_vectors, vectors_qsnr)
from .tensors import CapturedTensors, capture_linear_tensors, capture_tensors, tensor_rows, tensor_vectors  # noqa: F401

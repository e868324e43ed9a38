"""Design-space sweep of block formats: QSNR (paper's Gaussian setting) against the cost model, and the
Pareto frontier (docs/bdr.md).

The sweep crosses element type (sign + m magnitude bits, or a small float), k1, d1 and an optional second
level (k2, d2), and adds the named formats of the registry that the cost model covers (FP8 scaled and
unscaled, INT8 per tensor/channel, NVFP4, VSQ, MSFP, OCP MX). A point is on the frontier when no other
point is at most as costly and at least as accurate (one of the two strictly).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..formats import E2M1, E2M3, E3M2, E4M3, E5M2, BlockFormat, bdr_format, get_format
from .cost import DEFAULT_MODEL, CostModel, area, cost, relations
from .qsnr import sample_vectors, vectors_qsnr

__all__ = ["Point", "design_space", "FULL_SPACE", "QUICK_SPACE", "explore", "pareto_front", "frontier_gap", "write_report",
           "NAMED_FORMATS", "PAPER_FORMATS"]

#: Registered formats added to every sweep (labelled in the plot).
NAMED_FORMATS = ("mx9", "mx6", "mx4", "msfp16", "msfp12", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_tensor",
                 "int8_tensor", "int8_channel", "nvfp4", "vsq_int4", "mxfp8_e4m3", "mxfp6_e2m3",
                 "mxfp4_e2m1", "mxint8")
PAPER_FORMATS = ("mx9", "mx6", "mx4")
_FP_ELEMENTS = {"e2m1": E2M1, "e2m3": E2M3, "e3m2": E3M2, "e4m3": E4M3, "e5m2": E5M2}


@dataclass
class Point:
    name: str
    element: str
    k1: int | None
    d1: int | None
    k2: int | None
    d2: int
    scale: str
    bits: float
    area: float
    cost: float
    qsnr: float
    named: bool = False
    on_frontier: bool = False
    gap_db: float = 0.0          # frontier QSNR at this cost minus this point's QSNR


#: The full sweep's ranges (``design_space(quick=False)``) and the quick subset's.
FULL_SPACE = {"m": (2, 3, 4, 5, 6, 7), "k1": (8, 16, 32, 64), "d1": (6, 8), "k2": (1, 2, 4, 8), "d2": (1, 2),
              "fp": tuple(_FP_ELEMENTS)}
QUICK_SPACE = {"m": (2, 3, 4, 7), "k1": (16, 32), "d1": (8,), "k2": (2, 8), "d2": (1,), "fp": ("e2m1", "e4m3")}


def design_space(quick: bool = False, **ranges) -> list[BlockFormat]:
    """The swept (unregistered) BDR formats: sign + m magnitude elements with every (k1, d1) and every
    second level (k2 < k1, d2), and small-float elements (``fp``) with every (k1, d1), single level and
    (full sweep) k2 = 2, d2 = 1. ``quick`` is a small subset that keeps MX9/MX6/MX4's rows. Keyword
    ``m``, ``k1``, ``d1``, ``k2``, ``d2``, ``fp`` (sequences) replace that range of :data:`FULL_SPACE`
    (or :data:`QUICK_SPACE`)."""
    space = dict(QUICK_SPACE if quick else FULL_SPACE)
    for key, values in ranges.items():
        if key not in space:
            raise ValueError(f"unknown design-space range {key!r}; expected one of {sorted(space)}")
        if values is None:
            continue
        values = tuple(values)
        if key == "fp":
            bad = [v for v in values if v not in _FP_ELEMENTS]
            if bad:
                raise ValueError(f"fp elements must be among {sorted(_FP_ELEMENTS)}, got {bad}")
        elif not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"range {key!r} must be positive ints, got {values!r}")
        space[key] = values
    ms_, k1s, d1s, k2s, d2s, fps = (space[k] for k in ("m", "k1", "d1", "k2", "d2", "fp"))
    out = []
    for k1 in k1s:
        for d1 in d1s:
            for m in ms_:
                out.append(bdr_format(m, k1, d1))
                out += [bdr_format(m, k1, d1, k2, d2) for k2 in k2s if k2 < k1 for d2 in d2s]
            for e in fps:
                out.append(bdr_format(_FP_ELEMENTS[e], k1, d1))
                if not quick:
                    out.append(bdr_format(_FP_ELEMENTS[e], k1, d1, 2, 1))
    return out


def _point(fmt: BlockFormat, q: float, model: CostModel, named: bool) -> Point:
    s = fmt.scale
    scale = "none" if s is None else s.name
    if fmt.tensor_scale is not None:
        scale += f"+fp32/{fmt.tensor_scale_granularity}"
    return Point(fmt.name, fmt.element.name, fmt.block_size, s.bits if s is not None else None,
                 fmt.subblock_size, fmt.micro_bits, scale, fmt.bits_per_element, area(fmt, model),
                 cost(fmt, model), q, named)


def pareto_front(points: list[Point]) -> list[Point]:
    """Mark and return the points no other point dominates (lower-or-equal cost, higher-or-equal QSNR),
    sorted by cost; also sets every point's ``gap_db`` to the frontier."""
    pts = sorted(points, key=lambda p: (p.cost, -p.qsnr))
    front, best = [], -math.inf
    for p in pts:
        p.on_frontier = p.qsnr > best
        if p.on_frontier:
            front.append(p)
            best = p.qsnr
    for p in points:
        p.gap_db = frontier_gap(front, p.cost, p.qsnr)
        # a twin of a frontier point (same cost and QSNR, e.g. a named format also swept) is on it too
        p.on_frontier = p.on_frontier or any(f.cost == p.cost and f.qsnr == p.qsnr for f in front)
    return sorted((p for p in points if p.on_frontier), key=lambda p: (p.cost, -p.qsnr))


def frontier_gap(front: list[Point], c: float, q: float) -> float:
    """How far (dB) QSNR ``q`` at cost ``c`` lies below the best frontier QSNR at cost <= c (>= 0)."""
    best = max((p.qsnr for p in front if p.cost <= c + 1e-12), default=-math.inf)
    return max(0.0, best - q)


_DATA_DESCRIPTION = {"gaussian": "Gaussian vectors, log2(sigma) ~ U(-4, 4) per vector (the BDR paper's setting)",
                     "laplace": "Laplace vectors, log2(sigma) ~ U(-4, 4) per vector",
                     "student_t": "Student-t (3 dof) vectors, log2(sigma) ~ U(-4, 4) per vector"}


def explore(quick: bool = False, n_vectors: int | None = None, length: int = 1024, seed: int = 0,
            model: CostModel = DEFAULT_MODEL, formats: list | None = None, progress: bool = True,
            data: str = "gaussian", ranges: dict | None = None) -> dict:
    """Sweep the design space, compute QSNR (mean per-vector dB on ``n_vectors`` rows of ``length`` drawn
    by ``sample_vectors(data)``: the paper's Gaussian setting by default) and cost, and return
    {"points", "frontier", "settings"} (points as :class:`Point`). ``ranges`` overrides ranges of the
    design space (see :func:`design_space`); ``formats`` replaces it."""
    from tqdm import tqdm

    if n_vectors is not None and (not isinstance(n_vectors, int) or n_vectors < 1):
        raise ValueError(f"n_vectors must be a positive int, got {n_vectors!r}")
    n_vectors = n_vectors or (32 if quick else 256)
    x = sample_vectors(data, n=n_vectors, length=length, seed=seed)
    swept = formats if formats is not None else design_space(quick, **(ranges or {}))
    fmts = [(f, False) for f in swept]
    fmts += [(get_format(n), True) for n in NAMED_FORMATS]
    points, t0 = [], time.perf_counter()
    for fmt, named in tqdm(fmts, desc="explore", unit="format", disable=not progress):
        points.append(_point(fmt, vectors_qsnr(x, fmt), model, named))
    front = pareto_front(points)
    settings = {"quick": quick, "n_vectors": n_vectors, "length": length, "seed": seed, "data": data,
                "distribution": _DATA_DESCRIPTION.get(data, f"{data} (captured model tensors)"),
                "ranges": {k: list(v) for k, v in (ranges or {}).items() if v is not None},
                "cost_model": asdict(model) | {
                    "baseline": [e.name for e in model.baseline]},
                "seconds": round(time.perf_counter() - t0, 2)}
    if data in ("weights", "activations", "gradients", "tensors"):
        from .tensors import capture_tensors  # cached: the capture that produced x
        meta = capture_tensors().meta
        settings["capture"] = {k: meta.get(k) for k in ("steps", "initial_loss", "final_loss", "capture_loss",
                                                        "corpus_sha256", "corpus_files", "cache_key", "torch")}
    return {"points": points, "frontier": front, "settings": settings, "relations": relations(model)}


def _markdown(result: dict) -> str:
    pts = result["points"]
    rows = ["| format | element | k1 | d1 | k2 | d2 | scale | bits/elem | area | cost | QSNR dB | frontier | gap dB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    show = sorted({id(p): p for p in pts if p.on_frontier or p.named}.values(), key=lambda p: p.cost)
    for p in show:
        rows.append(f"| {p.name}{' *' if p.named else ''} | {p.element} | {p.k1 if p.k1 else 'axis'} | "
                    f"{p.d1 or '-'} | {p.k2 or '-'} | {p.d2 if p.k2 else '-'} | {p.scale} | {p.bits:g} | "
                    f"{p.area:.1f} | {p.cost:.3f} | {p.qsnr:.2f} | {'yes' if p.on_frontier else ''} | "
                    f"{p.gap_db:.2f} |")
    s = result["settings"]
    head = (f"# BDR design-space sweep\n\n{len(pts)} formats, QSNR = mean per-vector dB on {s['n_vectors']} "
            f"vectors of {s['length']} ({s['distribution']}); cost = area x bits, FP8 unit = 1 "
            f"(calibrated lane overhead {s['cost_model']['lane_overhead']:g} FA). "
            f"Rows: the Pareto frontier and the named formats (*).\n\n")
    return head + "\n".join(rows) + "\n" + relations_markdown(result.get("relations", []))


def relations_markdown(rows: list[dict]) -> str:
    """The cost model against the BDR paper's relations (:func:`~microscale.bdr.cost.relations`), as markdown."""
    if not rows:
        return ""
    out = ["\n## The cost model against the paper's relations\n",
           "Area x memory, sign + m elements (MX9 / MX6 / MX4: m = 7 / 4 / 2), k1 = 16, d1 = 8. 'ratio' = "
           "the cost ratio within +-25 % of the paper's; 'increment' = the relative increase within +-25 % "
           "of the paper's.\n",
           "| relation | format | paper | model | ratio +-25 % | increment +-25 % |", "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["paper"]
        paper = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
        out.append(f"| {r['relation']} | {r['format']} | {paper} | {r['model']:.3f} | "
                   f"{'yes' if r['ratio_ok'] else 'no'} | {'yes' if r['increment_ok'] else 'no'} |")
    return "\n".join(out) + "\n"


_LABEL_OFFSETS = [(5, 3), (5, -11), (-5, 3), (-5, -11), (5, 13), (5, -21), (-5, 13), (-5, -21), (5, 23),
                  (5, -31), (-5, 23), (-5, -31)]


def _label_points(fig, ax, points: list[Point], avoid: list[Point] = ()) -> None:
    """Name every point, moving a label among candidate offsets until it overlaps no earlier label and no
    marker of ``points`` or ``avoid`` (greedy; paper formats placed first, in bold)."""
    ordered = sorted(points, key=lambda p: (p.name not in PAPER_FORMATS, p.cost))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = []
    for q in list(points) + list(avoid):  # markers, ~5 px radius
        x, y = ax.transData.transform((q.cost, q.qsnr))
        taken.append((x - 5, y - 5, x + 5, y + 5))
    for p in ordered:
        bold = p.name in PAPER_FORMATS
        for dx, dy in _LABEL_OFFSETS:
            ann = ax.annotate(p.name, (p.cost, p.qsnr), textcoords="offset points", xytext=(dx, dy),
                              ha="left" if dx > 0 else "right", fontsize=9 if bold else 7.5,
                              fontweight="bold" if bold else "normal",
                              bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
            b = ann.get_window_extent(renderer)
            box = (b.x0 - 1, b.y0 - 1, b.x1 + 1, b.y1 + 1)
            if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
                break
            if (dx, dy) != _LABEL_OFFSETS[-1]:
                ann.remove()
        taken.append(box)


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    swept = [p for p in pts if not p.named]
    ax.scatter([p.cost for p in swept], [p.qsnr for p in swept], s=12, c="0.7", label="swept BDR formats")
    named = [p for p in pts if p.named]
    ax.scatter([p.cost for p in named], [p.qsnr for p in named], s=30, c="tab:blue", label="named formats",
               zorder=3)
    front = result["frontier"]
    xs, ys = [], []
    for i, p in enumerate(front):  # staircase: best QSNR reachable at each cost
        xs += [p.cost] if i == 0 else [p.cost, p.cost]
        ys += [p.qsnr] if i == 0 else [front[i - 1].qsnr, p.qsnr]
    ax.plot(xs, ys, c="tab:red", lw=1.2, label="Pareto frontier", zorder=2)
    ax.scatter([p.cost for p in front], [p.qsnr for p in front], s=14, c="tab:red", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("normalised area x memory cost (FP8 E4M3+E5M2 dot-product unit = 1, log scale)")
    ax.set_ylabel(f"QSNR (dB), {result['settings'].get('data', 'gaussian')} vectors")
    ax.set_title("Block data representations: QSNR vs hardware cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    ax.set_xlim(ax.get_xlim())  # freeze the limits so label placement sees the final transform
    ax.set_ylim(ax.get_ylim())
    _label_points(fig, ax, named, avoid=front)
    fig.savefig(path)
    plt.close(fig)


def write_report(result: dict, out: str | Path) -> dict[str, Path]:
    """Write explore.json, explore.md and explore.png into directory ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "explore.json", "md": out / "explore.md", "png": out / "explore.png"}
    data = {"settings": result["settings"], "points": [asdict(p) for p in result["points"]],
            "frontier": [p.name for p in result["frontier"]], "relations": result.get("relations", [])}
    paths["json"].write_text(json.dumps(data, indent=1))
    paths["md"].write_text(_markdown(result))
    _plot(result, paths["png"])
    return paths

"""Typed training/inference recipes: which block format quantizes which GEMM operand in which pass.

Every quantized op is a GEMM (or a sum of GEMMs), and each GEMM has two operands in each of three passes:

    forward  Y  = X  · Wᵀ    fwd_input          (X  blocked along the reduction K = in_features)
                             fwd_weight         (W  blocked along K)
    dgrad    dX = dY · W     dgrad_grad_output  (dY blocked along out_features)
                             dgrad_weight       (W  blocked along out_features; quantized apart from the
                                                 forward copy because its blocks run the other way)
    wgrad    dW = dYᵀ · X    wgrad_grad_output  (dY blocked along the token axis: all leading dims)
                             wgrad_input        (X  blocked along the token axis)

Weight-only recipes ("mxfp8-w", "mxfp6-w" (E2M3), "mxfp4-w", "mxint8-w"; :meth:`Recipe.weight_only`)
quantize only the two weight slots; "mxfp4-w+mxfp6" and "mxfp4-w+mxfp8" are weight MXFP4 *plus*
activations and gradients in MXFP6 / MXFP8.

For activation x activation matmuls (attention: Y = A · B, both operands activations) the same slots
are used with A in the role of X and B in the role of W, except that B is an activation, so it takes the
*activation* specs: forward q(A, fwd_input)·q(B, fwd_input); dA = q(dY, dgrad_grad_output)·q(B,
wgrad_input)ᵀ; dB = q(A, wgrad_input)ᵀ·q(dY, wgrad_grad_output). A weight-only format (e.g. MXFP4 in
"mxfp4-w+mxfp6") therefore never touches attention activations.

Defaults: every operand rounds half to even (OCP MX v1.0 §6.3), so a recipe is deterministic unless it
asks for ``rounding="stochastic"`` (e.g. ``Recipe.from_formats(..., grad_rounding="stochastic")``).
Stochastic seeds come from one generator per quantized model, seeded by ``Recipe.seed`` (or, when that
is None, drawn from torch's global RNG when the model is quantized), so a run is reproducible with
``torch.manual_seed`` or a fixed ``Recipe.seed``.

``elementwise``: "fp32" leaves the outputs of quantized modules as they are; "bf16" rounds them (and the
gradients they pass back to their inputs) to bfloat16 values, like microxcaling's ``bfloat=16``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as _dc_replace

from ..formats import BlockFormat, QuantSpec, Rounding, ScaleMode, format_key, get_format, list_formats

__all__ = ["OperandSpec", "Recipe", "OPERANDS", "ELEMENTWISE_MODES", "register_recipe", "get_recipe",
           "list_recipes"]

#: The six operand slots of a recipe, in pass order.
OPERANDS = ("fwd_input", "fwd_weight", "dgrad_grad_output", "dgrad_weight", "wgrad_grad_output",
            "wgrad_input")
#: What happens to non-GEMM results (see module docstring).
ELEMENTWISE_MODES = ("fp32", "bf16")


@dataclass(frozen=True, init=False)
class OperandSpec:
    """How one GEMM operand is quantized: a resolved :class:`~microscale.formats.QuantSpec` (``quant``).

    Built from a format (a registered name, or any BlockFormat object, registered or not, e.g. from
    ``microscale.bdr_format``), an element rounding and a scale rule (strings or the enums), or from a
    QuantSpec. ``scale_mode=None`` means "floor" (OCP MX v1.0 §6.3). Resolved once here; the quantized
    ops use ``quant`` as is.
    """

    quant: QuantSpec

    def __init__(self, format: "str | BlockFormat | QuantSpec" = "none", rounding: "str | Rounding" = "even",
                 scale_mode: "str | ScaleMode | None" = None, *, quant: QuantSpec | None = None):
        if quant is not None:  # the field itself (dataclasses.replace(spec, quant=...))
            if not isinstance(quant, QuantSpec) or (format, rounding, scale_mode) != ("none", "even", None):
                raise TypeError("quant= takes a QuantSpec, alone")
            format = quant
        if isinstance(format, QuantSpec):
            if (rounding, scale_mode) != ("even", None):
                raise ValueError("give the options inside the QuantSpec, not next to it")
            quant = format
        else:
            quant = QuantSpec.resolve(format, rounding, scale_mode)  # ValueError lists names / choices
        if quant.compat is not None:
            raise ValueError(f"recipes quantize with this library's numerics; compat={quant.compat!r} "
                             f"is for the verbs (microscale.quantize)")
        object.__setattr__(self, "quant", quant)

    @property
    def block_format(self) -> BlockFormat:
        return self.quant.format

    @property
    def format(self) -> str:
        """The format as a string :func:`~microscale.get_format` resolves: its registered name, or the
        interned key of an unregistered format (:func:`~microscale.formats.format_key`)."""
        return format_key(self.quant.format)

    @property
    def rounding(self) -> Rounding:
        return self.quant.rounding

    @property
    def scale_mode(self) -> ScaleMode:
        return self.quant.scale_mode

    def __repr__(self) -> str:
        return f"OperandSpec({self.block_format.name!r}, {self.rounding.value!r}, {self.scale_mode.value!r})"

    @property
    def is_none(self) -> bool:
        return self.block_format.element is None

    @property
    def is_stochastic(self) -> bool:
        return not self.is_none and self.rounding == "stochastic"

    def __str__(self) -> str:
        if self.is_none:
            return "none"
        s = self.block_format.name
        if self.rounding != Rounding.EVEN:
            s += f"/{self.rounding}"
        if self.scale_mode != ScaleMode.FLOOR:
            s += f"/scale={self.scale_mode}"
        return s


NONE = OperandSpec("none")


def _spec(x) -> OperandSpec:
    if isinstance(x, OperandSpec):
        return x
    if isinstance(x, (str, BlockFormat, QuantSpec)):
        return OperandSpec(x)
    raise TypeError(f"an operand spec must be an OperandSpec, a QuantSpec, a format name or a BlockFormat, "
                    f"got {type(x).__name__}")


@dataclass(frozen=True)
class Recipe:
    """Per-operand, per-pass formats for quantized training and inference (see module docstring).

    Fields may be given as format names, BlockFormat objects (registered or not) or QuantSpecs; they are
    turned into :class:`OperandSpec` (default rounding for names and formats). Build common shapes with :meth:`uniform` and :meth:`from_formats`.
    """

    fwd_input: OperandSpec = NONE
    fwd_weight: OperandSpec = NONE
    dgrad_grad_output: OperandSpec = NONE
    dgrad_weight: OperandSpec = NONE
    wgrad_grad_output: OperandSpec = NONE
    wgrad_input: OperandSpec = NONE
    elementwise: str = "fp32"
    seed: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        for op in OPERANDS:
            object.__setattr__(self, op, _spec(getattr(self, op)))
        if self.elementwise not in ELEMENTWISE_MODES:
            raise ValueError(f"elementwise must be one of {ELEMENTWISE_MODES}, got {self.elementwise!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def uniform(cls, fmt: str | BlockFormat, rounding: str = "even", scale_mode: str | None = None,
                grad_rounding: str | None = None, elementwise: str = "fp32", seed: int | None = None,
                name: str | None = None) -> "Recipe":
        """The same format for every operand; ``grad_rounding`` (default: ``rounding``) for dY."""
        return cls.from_formats(fmt, fmt, fmt, rounding=rounding, scale_mode=scale_mode,
                                grad_rounding=grad_rounding, elementwise=elementwise, seed=seed,
                                name=name or get_format(fmt).name)

    @classmethod
    def from_formats(cls, weight: str | BlockFormat, activation: str | BlockFormat, grad: str | BlockFormat,
                     rounding: str = "even",
                     scale_mode: str | None = None, grad_rounding: str | None = None,
                     elementwise: str = "fp32", seed: int | None = None, name: str = "custom") -> "Recipe":
        """Weights (both passes) in ``weight``, activations (both passes) in ``activation``, output
        gradients (dgrad and wgrad) in ``grad`` rounded with ``grad_rounding`` (default: ``rounding``)."""
        w = OperandSpec(weight, rounding, scale_mode)
        a = OperandSpec(activation, rounding, scale_mode)
        g = OperandSpec(grad, grad_rounding or rounding, scale_mode)
        return cls(fwd_input=a, fwd_weight=w, dgrad_grad_output=g, dgrad_weight=w, wgrad_grad_output=g,
                   wgrad_input=a, elementwise=elementwise, seed=seed, name=name)

    @classmethod
    def weight_only(cls, weight: str | BlockFormat, rounding: str = "even", scale_mode: str | None = None,
                    elementwise: str = "fp32", name: str | None = None) -> "Recipe":
        """Weights in ``weight`` (fwd_weight and dgrad_weight); every activation and gradient operand
        "none", so activations keep their dtype (BF16 included) and attention matmuls are untouched."""
        w = OperandSpec(weight, rounding, scale_mode)
        return cls(fwd_weight=w, dgrad_weight=w, elementwise=elementwise,
                   name=name or f"{get_format(weight).name}-w")

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed (operand fields accept format names)."""
        return _dc_replace(self, **changes)

    # ---- facts ----------------------------------------------------------------------------------
    def operands(self) -> dict[str, OperandSpec]:
        return {op: getattr(self, op) for op in OPERANDS}

    @property
    def is_identity(self) -> bool:
        """True when nothing is quantized or rounded: the model computes exactly as before."""
        return self.elementwise == "fp32" and all(s.is_none for s in self.operands().values())

    def describe(self) -> str:
        """Compact text for module reprs: ``fwd=X:W dgrad=dY:W wgrad=dY:X`` (``all=F`` when uniform)."""
        o = self.operands()
        if len(set(o.values())) == 1:
            s = f"all={o['fwd_input']}"
        else:
            s = (f"fwd={o['fwd_input']}:{o['fwd_weight']} dgrad={o['dgrad_grad_output']}:{o['dgrad_weight']} "
                 f"wgrad={o['wgrad_grad_output']}:{o['wgrad_input']}")
        if self.elementwise != "fp32":
            s += f" elementwise={self.elementwise}"
        return s

    def __str__(self) -> str:
        return f"Recipe({self.name}: {self.describe()})"


# ---- named recipes ---------------------------------------------------------------------------------
_RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, recipe: Recipe, replace: bool = False) -> Recipe:
    """Add a named recipe (case-insensitive). Names win over format names of the same spelling."""
    key = name.lower()
    if key in _RECIPES and not replace:
        raise ValueError(f"recipe name {name!r} is already registered")
    recipe = _dc_replace(recipe, name=name)
    _RECIPES[key] = recipe
    return recipe


def list_recipes() -> list[str]:
    """Registered recipe names (any registered format name also works, see :func:`get_recipe`)."""
    return sorted(_RECIPES)


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A Recipe by name, or the Recipe itself.

    Resolution: a registered recipe name; else any registered format name means "that format for
    every operand" (so formats added later, e.g. BDR's "mx9", work as recipes at once).
    """
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name or a Recipe, got {type(recipe).__name__}")
    key = recipe.lower()
    if key in _RECIPES:
        return _RECIPES[key]
    try:
        fmt = get_format(recipe)
    except ValueError:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {', '.join(list_recipes())}; or any "
                         f"format name for that format everywhere: {', '.join(list_formats())}") from None
    return Recipe.uniform(fmt.name, name=recipe)


register_recipe("none", Recipe())
register_recipe("fp32", Recipe())
# E4M3 for weights and activations, E5M2 (more range) for output gradients: the usual FP8 split.
register_recipe("mxfp8", Recipe.from_formats("mxfp8_e4m3", "mxfp8_e4m3", "mxfp8_e5m2"))
register_recipe("mxfp6", Recipe.uniform("mxfp6_e3m2"))
register_recipe("mxfp4-w+mxfp6", Recipe.from_formats("mxfp4_e2m1", "mxfp6_e3m2", "mxfp6_e3m2"))
register_recipe("mxfp4-w+mxfp8", Recipe.from_formats("mxfp4_e2m1", "mxfp8_e4m3", "mxfp8_e5m2"))
register_recipe("mxint8", Recipe.uniform("mxint8"))
# Weight-only: weights in MX (both passes), activations and gradients left in the input's own dtype
# (float32 / bfloat16 / float16), as MX weights are deployed by gpt-oss, llama.cpp and vLLM.
register_recipe("mxfp8-w", Recipe.weight_only("mxfp8_e4m3"))
register_recipe("mxfp6-w", Recipe.weight_only("mxfp6_e2m3"))
register_recipe("mxfp4-w", Recipe.weight_only("mxfp4_e2m1"))
register_recipe("mxint8-w", Recipe.weight_only("mxint8"))

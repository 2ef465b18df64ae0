""":class:`LambdaMaxResult`: the one result type of every λmax measurement.

The layer entry point (:func:`mat_kernels.estimate_lambda_max`), the model level (:func:`mat_kernels.model_lambda_max`),
the in-step capture (``capture_lambda_max(...).lambda_max()``) and :meth:`mat_kernels.MAT.measure` all return it:
``names`` (one per module), ``values`` (fp32 ``[M]``, the λmax of each, in ``names`` order) and ``.as_dict()``. It
also reads like a read-only mapping from module name to λmax (``res[name]``, ``name in res``, ``list(res)``,
``res.items()``, ``dict(res)``); ``values`` is the tensor, not the mapping method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LambdaMaxResult"]

_LEVELS = ("layer", "model", "capture", "mat")


@dataclass(frozen=True, eq=False)
class LambdaMaxResult:
    """λmax of M modules, and how it was measured.

    Attributes:
        names: the modules' names, ``[M]``. Model level: the :class:`mat_kernels.ModuleSpec` names. Layer level:
            ``"rows<k>"`` / ``"cols<k>"`` per row / column module (row modules first), ``"weight"`` for the whole
            weight.
        values: fp32 ``[M]`` λmax, on the Grams' device.
        grams: fp32 ``[M, n, n]`` Grams when asked for (``return_grams=True``; always for the capture and MAT),
            else None. :meth:`gram` picks one by name.
        n: number of samples.
        level: ``"layer"``, ``"model"``, ``"capture"`` or ``"mat"`` (who measured).
        backend: implementation of the Gram kernels (``"triton"``, ``"triton-interpreter"``, ``"torch"``).
        solver: eigen-solver used (layer level; ``None`` elsewhere: ``eigvalsh`` or subspace iteration by n).
        routes: the Gram implementation that ran per layout (layer level): a name of
            :data:`mat_kernels.ops.gram_dispatch.KERNELS` (``"triton-fused"``, ``"torch-psg"``, ...), or
            ``"sketch+<kernel>"``.
        blocks: the resolved :class:`mat_kernels.WeightBlocks` (layer level).
        specs: the measured :class:`mat_kernels.ModuleSpec` (model level, capture, MAT).
        unclaimed: parameters no module owns, with the reason (model level, from discovery).
        output: the NTK output used (model level; ``"loss"`` for the capture).
        peak_held_bytes: the most output-gradient bytes the capture held at once (model level, capture).
        scores: float64 ``[M]`` the scores MAT thresholds (:meth:`mat_kernels.MAT.measure` only).
    """

    names: tuple[str, ...]
    values: torch.Tensor
    grams: torch.Tensor | None = None
    n: int | None = None
    level: str = "layer"
    backend: str | None = None
    solver: str | None = None
    routes: tuple[str, ...] = ()
    blocks: tuple = ()
    specs: tuple = ()
    unclaimed: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    peak_held_bytes: int = 0
    scores: torch.Tensor | None = None

    def __post_init__(self):
        names = tuple(self.names)
        if not all(isinstance(nm, str) for nm in names) or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct strings, got {names!r}")
        if not isinstance(self.values, torch.Tensor) or self.values.shape != (len(names),):
            raise ValueError(f"values must be a tensor of shape [{len(names)}] (one per name), got "
                             f"{getattr(self.values, 'shape', type(self.values).__name__)}")
        if self.grams is not None and (self.grams.dim() != 3 or self.grams.shape[0] != len(names)):
            raise ValueError(f"grams must be [M={len(names)}, n, n], got {tuple(self.grams.shape)}")
        if self.level not in _LEVELS:
            raise ValueError(f"level must be one of {_LEVELS}, got {self.level!r}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "specs", tuple(self.specs))
        object.__setattr__(self, "_index", {nm: i for i, nm in enumerate(names)})

    # ----------------------------------------------------------------------------------------- reading it
    def as_dict(self) -> dict[str, float]:
        """``{name: λmax}`` as Python floats, in ``names`` order (one device-to-host copy)."""
        return dict(zip(self.names, self.values.tolist()))

    def index(self, name: str) -> int:
        """Position of module ``name`` in ``names``; ``KeyError`` listing a few known names if unknown."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no module named {name!r}; known: {list(self.names[:6])}"
                           f"{' ...' if len(self.names) > 6 else ''}") from None

    def gram(self, name: str) -> torch.Tensor:
        """The ``[n, n]`` Gram of module ``name`` (needs ``grams``: ``return_grams=True``)."""
        if self.grams is None:
            raise ValueError("this result holds no Grams: measure with return_grams=True")
        return self.grams[self.index(name)]

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.index(name)])

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def keys(self) -> tuple[str, ...]:
        return self.names

    def items(self) -> list[tuple[str, float]]:
        return list(self.as_dict().items())

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}: {v:.4g}" for k, v in list(self.as_dict().items())[:4])
        more = f", ... ({len(self)} modules)" if len(self) > 4 else ""
        return f"LambdaMaxResult(level={self.level!r}, n={self.n}, {{{shown}{more}}})"


def layer_names(blocks) -> tuple[str, ...]:
    """Names of a layer's modules in result order: ``rows<k>``, ``cols<k>``, or ``weight``."""
    names = []
    for b in blocks:
        if b.axis == "all" or b.name == "weight":  # layer_blocks' whole weight: one row block named "weight"
            names.append("weight")
        else:
            names += [f"{b.axis}{k}" for k in range(len(b.modules))]
    return tuple(names)

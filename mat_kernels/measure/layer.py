"""Public entry points: per-module mNTK Grams and λmax of one linear layer from its stored input and output gradient.

For a linear layer ``y_t = W x_t + b`` applied to every token t of sample i, sample i's parameter gradient is
``G_i = Σ_t δ_it x_itᵀ`` (δ = the stored output gradient ``dy``). A module owns some rows (or columns) of W; its
mNTK on the n samples is ``Θ[i, j] = ⟨G_i[module], G_j[module]⟩`` and the MAT signal is ``λmax(Θ)``.

Routes (all exact but ``sketch``), chosen with ``method``:

==========  =====================================================  ============================================
route       computes                                               cost in multiply-adds (n samples, T tokens)
==========  =====================================================  ============================================
``psg``     per-sample gradients per column chunk, then ``G Gᵀ``   ``n·T·D·A + n(n+1)/2·D·A``
``ghost``   ``Σ_{t,s} (a_it·a_js)(b_it[R]·b_js[R])``, token-pair   ``n(n+1)/2·T²·(A + D)``
            products shared by all modules of the layer
``sketch``  ``psg`` on the shared side projected to k random        ``n·T·(A − bias)·k + n·T·D·k + n(n+1)/2·D·k``
            orthonormal directions (unbiased Gram, approximate
            λmax, biased upwards by a few %: see the docs)
==========  =====================================================  ============================================

``A`` is the shared side's width (``d_in`` for row blocks, ``d_out`` for column blocks, +1 with a bias) and ``D``
the total width of all module ranges on the other side. Each layout's Grams are computed by one implementation
(``kernel``) that the Gram dispatcher (:mod:`mat_kernels.ops.gram_dispatch`) picks: the cheapest route by this
model for ``method="auto"`` (alias ``"gram"``: ``ghost`` when ``T`` is short, ``T = 1`` for 2-D inputs, ``psg``
otherwise), then a Triton kernel where Triton runs, then the fastest predicted Triton psg variant; ``kernel=``
forces one (``"triton-fused"``, ``"triton-local"``, ``"triton-psg"``, ``"triton-ghost"``, ``"torch-psg"``,
``"torch-ghost"``). ``routes`` of the result names what ran per layout; the sketch's is ``"sketch+<kernel>"``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from mat_kernels import backend as _backend
from mat_kernels.blocks import BlockSpec, WeightBlocks, layer_blocks
from mat_kernels.measure.result import LambdaMaxResult, layer_names
from mat_kernels.measure.solvers import lambda_max as _solve
from mat_kernels.ops import gram_dispatch, segment_grams
from mat_kernels.ops.gram_dispatch import GramInputs

__all__ = [
    "estimate_lambda_max",
    "layer_grams",
    "GramOptions",
    "LambdaMaxResult",
    "GramResult",
    "DEFAULT_SKETCH_SIZE",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# k = 128: on the BERT-base QKV layer (n=32, T=128) median λmax error 3.9% (Gaussian data) / 1.2% (low-rank data)
# at 4.6x fewer multiply-adds than the exact route; docs/sketch_accuracy.md has the whole curve.
DEFAULT_SKETCH_SIZE = 128
_METHODS = tuple(gram_dispatch.METHOD_ROUTES)


@dataclass(frozen=True, eq=False)
class GramResult:
    """Grams of one layer's modules. ``grams``: fp32 ``[M, n, n]``; ``routes``: per layout (rows, cols), the
    implementation that ran (a :data:`mat_kernels.ops.gram_dispatch.KERNELS` name, ``"sketch+<kernel>"`` for the
    sketch); ``backend``: ``"triton"``, ``"triton-interpreter"`` or ``"torch"``; ``blocks``: the resolved module
    layouts."""

    grams: torch.Tensor
    routes: tuple[str, ...]
    backend: str
    blocks: tuple[WeightBlocks, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The modules' names in ``grams`` order, as in :class:`mat_kernels.LambdaMaxResult`."""
        return layer_names(self.blocks)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")


def _validate(x, dy) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor(x, "x")
    _check_tensor(dy, "dy")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [n, T, d_in] or [n, d_in], got shape {tuple(x.shape)}")
    if dy.dim() != x.dim():
        raise ValueError(
            f"dy must have the same rank as x ([n, T, d_out] or [n, d_out]); x is {tuple(x.shape)}, "
            f"dy is {tuple(dy.shape)}"
        )
    if x.dtype != dy.dtype:
        raise TypeError(f"x and dy must have the same dtype, got x: {x.dtype}, dy: {dy.dtype}")
    if x.device != dy.device:
        raise ValueError(f"x and dy must be on the same device, got x: {x.device}, dy: {dy.device}")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x and dy disagree on the number of samples n: {x.shape[0]} vs {dy.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: x and dy have n = 0 samples")
    if x.dim() == 3 and x.shape[1] != dy.shape[1]:
        raise ValueError(f"x and dy disagree on the number of tokens T: {x.shape[1]} vs {dy.shape[1]}")
    if x.dim() == 3 and x.shape[1] == 0:
        raise ValueError("x and dy have T = 0 tokens")
    if x.shape[-1] == 0 or dy.shape[-1] == 0:
        raise ValueError(f"feature dimensions must be positive, got d_in={x.shape[-1]}, d_out={dy.shape[-1]}")
    if x.dim() == 2:
        x, dy = x.unsqueeze(1), dy.unsqueeze(1)
    return x.detach(), dy.detach()


@functools.lru_cache(maxsize=16)
def _sketch_matrix(width: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """``[width, k]`` random orthonormal columns scaled by √(width/k), so that ``E[S Sᵀ] = I``.

    Orthogonal rather than i.i.d. Gaussian columns: on the BERT-base QKV layer (n=32, T=128, 6 seeds × 12 heads)
    the median λmax error at k = 128 drops from 4.49% to 3.92% (Gaussian data) and 1.48% to 1.19% (low-rank
    data); at k = 192 from 3.14% to 2.59% and 1.87% to 1.57% (benchmarks/sketch_directions.py, NOTES.md).
    Cached: the QR runs once per (width, k, seed, device).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g = torch.randn(width, k, generator=gen, dtype=torch.float64)
    q = torch.linalg.qr(g).Q * math.sqrt(width / k)
    return q.to(device=device, dtype=torch.float32)


def _sketch(a: torch.Tensor, k: int, add_one: bool, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Project the shared side ``[a, 1]`` onto k random orthonormal directions (see :func:`_sketch_matrix`)."""
    s = _sketch_matrix(a.shape[-1] + int(add_one), k, seed, a.device)
    out = a.float() @ s[: a.shape[-1]]
    if add_one:
        out += s[-1]
    return out.to(dtype)


@dataclass(frozen=True)
class GramOptions:
    """How the Grams of a layer are computed: the one options object that the model level, the capture and
    :class:`mat_kernels.MAT` pass down to :func:`layer_grams` (validated once, where it is built). Fields as the
    keywords of :func:`estimate_lambda_max`: ``method``, ``allow_tf32``, ``sketch_size``, ``seed``, ``backend``,
    ``check_finite``, ``scratch_bytes``, ``kernel``. A ``kernel`` that ``method`` or ``backend`` rules out is
    refused here (``ValueError`` with the reasons); one the inputs rule out, when the Grams are computed."""

    method: str = "auto"
    allow_tf32: bool = False
    sketch_size: int = DEFAULT_SKETCH_SIZE
    seed: int = 0
    backend: str = "auto"
    check_finite: bool = True
    scratch_bytes: int = 48 << 20
    kernel: str = "auto"

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.backend not in gram_dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {gram_dispatch.BACKENDS}, got {self.backend!r}")
        gram_dispatch.check_kernel_name(self.kernel)
        if self.kernel != "auto":
            reasons = gram_dispatch.static_reasons(self.kernel, method=self.method, backend=self.backend)
            if reasons:
                raise ValueError(f"kernel={self.kernel!r} cannot run: {'; '.join(reasons)}")
        for name in ("sketch_size", "scratch_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("allow_tf32", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, options: "GramOptions | None" = None, /, **settings) -> "GramOptions":
        """``options`` with ``settings`` replaced, or a new object from ``settings``; unknown names raise
        ``TypeError`` naming them."""
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown Gram option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        if options is None:
            return cls(**settings)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a GramOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **settings) if settings else options


def layer_grams(
    x: torch.Tensor,
    dy: torch.Tensor,
    *,
    row_blocks: BlockSpec = None,
    col_blocks: BlockSpec = None,
    bias: bool = False,
    method: str = "auto",
    allow_tf32: bool = False,
    sketch_size: int = DEFAULT_SKETCH_SIZE,
    seed: int = 0,
    backend: str = "auto",
    check_finite: bool = True,
    scratch_bytes: int = 48 << 20,
    kernel: str = "auto",
    options: GramOptions | None = None,
) -> GramResult:
    """Per-module mNTK Grams ``Θ_m[i, j] = ⟨G_i[m], G_j[m]⟩`` of one linear layer.

    Use this to add Grams of modules that span several layers (an FFN block = its two linears), then call
    :func:`mat_kernels.lambda_max`. Arguments are those of :func:`estimate_lambda_max`; ``options`` (a
    :class:`GramOptions`), when given, replaces the setting keywords, which must then be left at their defaults.

    Returns:
        :class:`GramResult` with fp32 ``grams [M, n, n]``: row modules first, then column modules.
    """
    opts = _resolve(options, method=method, allow_tf32=allow_tf32, sketch_size=sketch_size, seed=seed,
                    backend=backend, check_finite=check_finite, scratch_bytes=scratch_bytes, kernel=kernel)
    x, dy = _validate(x, dy)
    n, T, d_in = x.shape
    d_out = dy.shape[-1]
    layouts = layer_blocks(row_blocks, col_blocks, bias, d_in, d_out)
    # the Grams accumulate in fp32 by design: an enclosing autocast (a measurement inside a mixed-precision step)
    # must not run their GEMMs in 16 bits
    with torch.autocast(x.device.type, enabled=False):
        result = _layer_grams(x, dy, layouts, opts)
    if opts.check_finite:
        _check_finite_grams(result.grams, x, dy)
    return result


_DEFAULT_OPTIONS = GramOptions()


def _resolve(options: GramOptions | None, **keywords) -> GramOptions:
    """The entry points' keywords as a GramOptions, or ``options`` (keywords then left at their defaults)."""
    if options is None:
        return GramOptions(**keywords)
    changed = [k for k, v in keywords.items() if v != getattr(_DEFAULT_OPTIONS, k)]
    if changed:
        raise ValueError(f"give options= or the setting keywords, not both (also given: {changed})")
    return GramOptions.of(options)


def _check_finite_grams(grams: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
    """Any NaN/Inf of x or dy that a module's Gram reads reaches that Gram (0·Inf is NaN too), so the small
    ``[M, n, n]`` Grams are checked (one host sync); the inputs are scanned only to name the culprit."""
    if math.isfinite(float(grams.sum())):  # one reduction kernel and one sync (NaN/Inf anywhere reach the sum)
        return
    if bool(torch.isfinite(grams).all()):
        return  # only the sum overflowed
    for t, name in ((x, "x"), (dy, "dy")):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    raise ValueError("the Grams contain NaN or Inf although x and dy are finite (overflow: rescale the inputs or "
                     "use float32)")


def _layer_grams(x, dy, layouts, opts: GramOptions) -> GramResult:
    """Each layout's Grams by the implementation the dispatcher picks (``opts.kernel`` forced, or the cheapest)."""
    grams, routes, backends = [], [], []
    for lb in layouts:
        a, b = (x, dy) if lb.axis == "rows" else (dy, x)
        add_one = lb.bias
        starts, sizes, owner = lb.segments()
        width = a.shape[-1] + int(add_one)
        prefix = ""
        if opts.method == "sketch" and opts.sketch_size >= width:
            _backend.warn_once(
                f"sketch-wide:{opts.sketch_size}:{width}",
                f"mat_kernels: sketch_size={opts.sketch_size} is not smaller than the shared width {width}; "
                "computing the exact Gram instead (route 'psg')",
            )
        elif opts.method == "sketch":
            a = _sketch(a, opts.sketch_size, add_one, opts.seed, b.dtype)
            add_one = False
            prefix = "sketch+"
        choice = gram_dispatch.choose(GramInputs.of(a, sizes, add_one, opts.scratch_bytes), kernel=opts.kernel,
                                      backend=opts.backend, method=opts.method)
        grams.append(segment_grams(a, b, list(starts), list(sizes), list(owner), add_one, choice.kernel,
                                   opts.allow_tf32, opts.scratch_bytes))
        routes.append(prefix + choice.kernel)
        backends.append(choice.backend)
    backend = ",".join(dict.fromkeys(backends))  # one name unless the layouts ran on different backends
    return GramResult(torch.cat(grams) if len(grams) > 1 else grams[0], tuple(routes), backend, tuple(layouts))


def estimate_lambda_max(
    x: torch.Tensor,
    dy: torch.Tensor,
    *,
    row_blocks: BlockSpec = None,
    col_blocks: BlockSpec = None,
    bias: bool = False,
    method: str = "auto",
    allow_tf32: bool = False,
    sketch_size: int = DEFAULT_SKETCH_SIZE,
    seed: int = 0,
    solver: str = "auto",
    solver_tol: float = 1e-4,
    return_grams: bool = False,
    backend: str = "auto",
    check_finite: bool = True,
    scratch_bytes: int = 48 << 20,
    kernel: str = "auto",
    options: GramOptions | None = None,
) -> LambdaMaxResult:
    """λmax of the mNTK of every module of one linear layer, from its stored input and output gradient.

    ``Θ_m[i, j] = ⟨G_i[m], G_j[m]⟩`` with ``G_i = Σ_t dy_it x_itᵀ`` (+ ``Σ_t dy_it`` for the bias); no per-sample
    backward pass is run.

    Args:
        x: ``[n, T, d_in]`` (or ``[n, d_in]``) layer input, float32/bfloat16/float16, any strides.
        dy: ``[n, T, d_out]`` (or ``[n, d_out]``) gradient of the per-sample outputs w.r.t. the layer output.
        row_blocks: modules made of rows of W (heads' Q/K/V rows): ``int h`` for h equal blocks, a list of
            ``(start, size)`` ranges (one module each), or a list of lists of ranges (one module each, e.g.
            :func:`mat_kernels.fused_qkv_heads` for heads inside a fused QKV weight).
        col_blocks: modules made of columns of W (a head's slice of an output projection), same forms.
            With neither, the whole weight is one module.
        bias: row modules (or the whole weight) include their bias entries. Not defined for column blocks.
        method: ``"auto"``/``"gram"`` (exact, cheaper route by the cost model), ``"psg"``, ``"ghost"`` (exact),
            or ``"sketch"`` (approximate, see ``sketch_size``).
        allow_tf32: let fp32 dots use TF32 tensor cores (faster on GPU, ~1e-3 relative error).
        sketch_size: k, the number of random directions of the sketch. The sketched Gram is unbiased, its λmax
            is biased upwards (the maximum of a noisy matrix): a few % at the default k = 128 on BERT-base
            shapes, see docs/sketch_accuracy.md for error vs k. Larger k: more accurate, slower.
        seed: seed of the sketch's projection.
        solver: eigen-solver, see :func:`mat_kernels.lambda_max` (``"auto"``: ``eigvalsh`` below n = 256,
            subspace iteration above).
        solver_tol: relative residual tolerance of subspace iteration.
        return_grams: also return the fp32 Grams ``[M, n, n]``.
        backend: ``"auto"`` (Triton where it can run, else PyTorch with a one-time warning), ``"triton"``,
            ``"torch"``: the kernels the dispatcher may choose from.
        check_finite: reject NaN/Inf in x or dy. The small ``[M, n, n]`` Grams are checked (any NaN/Inf of the
            entries a module reads reaches its Gram), with one host sync; x and dy are scanned only when the check
            fails, to name the culprit. Off: NaN propagates into the result.
        scratch_bytes: bound on the temporary memory of the per-sample-gradient route.
        kernel: ``"auto"`` (the dispatcher's choice, see the module docstring) or the implementation to run:
            ``"triton-fused"``, ``"triton-local"``, ``"triton-psg"``, ``"triton-ghost"``, ``"torch-psg"``,
            ``"torch-ghost"`` (:data:`mat_kernels.ops.gram_dispatch.KERNELS`). One that cannot run raises
            ``ValueError`` with every reason.
        options: the settings above as one :class:`GramOptions` (then leave their keywords at the defaults).

    Returns:
        :class:`mat_kernels.LambdaMaxResult`: ``values`` fp32 ``[M]`` (row modules ``rows<k>``, then column
        modules ``cols<k>``; ``weight`` for the whole weight), ``grams`` or None, ``routes`` (the implementation
        that ran per layout), ``backend`` and ``solver`` used, the resolved ``blocks``.

    Raises:
        TypeError: non-tensor input or unsupported/mismatched dtype.
        ValueError: bad ranks or shapes, n = 0 or T = 0, device mismatch, NaN/Inf, bad blocks or options, a
            kernel (forced, or the only ones ``backend`` allows) that cannot run here, with every reason.

    Example:
        >>> res = estimate_lambda_max(x, dy, row_blocks=fused_qkv_heads(12, 64), bias=True)
        >>> res.values  # one value per head; res.as_dict() -> {"rows0": ..., ...}
    """
    opts = _resolve(options, method=method, allow_tf32=allow_tf32, sketch_size=sketch_size, seed=seed,
                    backend=backend, check_finite=check_finite, scratch_bytes=scratch_bytes, kernel=kernel)
    gr = layer_grams(x, dy, row_blocks=row_blocks, col_blocks=col_blocks, bias=bias, options=opts)
    n = gr.grams.shape[-1]
    solver_used = solver if solver != "auto" else ("eigvalsh" if n < 256 else "subspace")
    lam = _solve(gr.grams, solver=solver, tol=solver_tol, check_finite=False)  # the Grams were checked
    return LambdaMaxResult(layer_names(gr.blocks), lam, gr.grams if return_grams else None, n, "layer", gr.backend,
                           solver_used, gr.routes, gr.blocks)

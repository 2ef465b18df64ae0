"""The one Gram dispatcher: which implementation of ``mat_kernels::segment_grams`` computes a layout's Grams.

The pattern of xformers' attention operators: every implementation is a small class that declares the devices,
dtypes and sample counts it supports, :meth:`GramKernel.not_supported_reasons` (every reason it cannot take given
inputs), its :meth:`GramKernel.cost` (multiply-adds) and :meth:`GramKernel.apply`; :func:`choose` picks one.

=================  =======  =====  ==============================================================================
kernel             backend  route  what runs
=================  =======  =====  ==============================================================================
``triton-fused``   Triton   psg    per-sample gradient tiles in registers, Gram in the same launch (n ≤ 32)
``triton-local``   Triton   psg    persistent programs, one sample's tile at a time in a small slot (n ≤ 64)
``triton-psg``     Triton   psg    two kernels: fp32 per-sample gradients to a chunked scratch, then the Gram
``triton-ghost``   Triton   ghost  token-pair products shared by every segment of the layer
``torch-psg``      PyTorch  psg    ``bmm`` per column chunk, Gram in pieces (any device)
``torch-ghost``    PyTorch  ghost  ``einsum`` over blocks of samples (any device)
=================  =======  =====  ==============================================================================

Triton runs natively on CUDA tensors, or on any tensors in the CPU interpreter (``TRITON_INTERPRET=1``).

The sketch is a *method*, not a kernel: ``method="sketch"`` projects the shared side onto k random directions (one
GEMM, outside the op) and the psg kernel chosen here runs on the projection; its route is named
``sketch+<kernel>`` (``mat_kernels.measure.layer``).

**Choice** (``kernel="auto"``): among the implementations with no reason against them (the inputs, ``backend=``
and the method's route included), the fewest multiply-adds (:func:`route_costs`: this picks the route), then a
Triton kernel before a PyTorch one, then the shortest predicted time (the byte model of the Triton psg kernels,
:func:`mat_kernels.kernels.triton_segment_grams_fused.psg_seconds`). A named kernel is forced: it runs or
:func:`choose` raises ``ValueError`` with every reason. :class:`GramChoice` keeps every candidate's cost and
reasons, so a choice (and a fallback to PyTorch, which also warns once) can always be inspected.

The same cost gives the op's FLOP formula (2 × multiply-adds, :func:`flops`), registered for
``torch.utils.flop_counter`` in :mod:`mat_kernels.ops.segment_grams`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mat_kernels import backend as _backend
from mat_kernels.kernels import torch_segment_grams as torch_impl

__all__ = ["GramInputs", "GramKernel", "GramChoice", "KERNELS", "KERNEL_CHOICES", "METHOD_ROUTES", "BACKENDS",
           "route_costs", "choose", "require", "static_reasons", "check_kernel_name", "flops", "route_of"]

# the route each method asks for (the sketch feeds the psg route); None: the cheaper exact route
METHOD_ROUTES = {"auto": None, "gram": None, "psg": "psg", "ghost": "ghost", "sketch": "psg"}
BACKENDS = ("auto", "triton", "torch")  # backend=: any, or only that family


def route_costs(n: int, T: int, shared: int, segmented: int, sketch_size: int | None = None, *,
                bias: bool = False) -> dict[str, int]:
    """Multiply-adds of each route for n samples, T tokens, ``shared`` the shared side's width (its bias' +1
    included), ``segmented`` the summed width of the module ranges on the other side:

    * ``psg``: ``n·T·D·A + n(n+1)/2·D·A`` (per-sample gradients, then the symmetric half of ``G Gᵀ``);
    * ``ghost``: ``n(n+1)/2·T²·(A + D)`` (token-pair products of both sides);
    * ``sketch`` (with ``sketch_size`` k): the projection ``n·T·(A − bias)·k`` (one GEMM over the data columns;
      the bias direction is added, not multiplied) plus ``psg`` at width k.

    The cost model behind ``method="auto"`` and the FLOP formula of ``mat_kernels::segment_grams``."""
    pairs = n * (n + 1) // 2
    costs = {
        "psg": n * T * segmented * shared + pairs * segmented * shared,
        "ghost": pairs * T * T * (shared + segmented),
    }
    if sketch_size is not None:
        k = sketch_size
        costs["sketch"] = n * T * (shared - int(bias)) * k + n * T * segmented * k + pairs * segmented * k
    return costs


@dataclass(frozen=True)
class GramInputs:
    """What the dispatcher decides on: one ``segment_grams`` call's shapes, dtype, device and scratch budget.

    ``shared``: the shared side's width without the bias column; ``add_one``: the bias column is appended;
    ``segmented``: the summed width of the segments."""

    n: int
    T: int
    shared: int
    segmented: int
    add_one: bool
    dtype: torch.dtype
    device: torch.device
    scratch_bytes: int = 48 << 20

    @property
    def width(self) -> int:
        """The shared width with the bias column (A in :func:`route_costs`)."""
        return self.shared + int(self.add_one)

    @classmethod
    def of(cls, a: torch.Tensor, seg_sizes, add_one: bool, scratch_bytes: int = 48 << 20) -> "GramInputs":
        """The inputs of ``segment_grams(a, b, starts, seg_sizes, ...)`` (``a``: the shared side ``[n, T, DA]``)."""
        n, T, DA = a.shape
        return cls(n, T, DA, sum(seg_sizes), bool(add_one), a.dtype, a.device, scratch_bytes)


class GramKernel:
    """One implementation of the Grams of a layout. Subclasses set the class attributes and :meth:`apply`."""

    NAME: str = ""
    BACKEND: str = ""  # "triton" or "torch"
    ROUTE: str = ""  # "psg" or "ghost"
    SUPPORTED_DEVICES: tuple[str, ...] | None = None  # None: every device PyTorch runs on
    SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    MAX_N: int | None = None  # the most samples it serves (None: any)

    @classmethod
    def device_reason(cls, device: torch.device) -> str | None:
        """Why it cannot run on tensors of ``device`` (None: it can)."""
        if cls.SUPPORTED_DEVICES is not None and device.type not in cls.SUPPORTED_DEVICES:
            return f"device {device.type} is not one of {cls.SUPPORTED_DEVICES}"
        return None

    @classmethod
    def not_supported_reasons(cls, inp: GramInputs) -> list[str]:
        """Every reason this implementation cannot compute ``inp`` (empty: it can)."""
        reasons = []
        why = cls.device_reason(inp.device)
        if why is not None:
            reasons.append(why)
        if inp.dtype not in cls.SUPPORTED_DTYPES:
            reasons.append(f"dtype {inp.dtype} is not one of {cls.SUPPORTED_DTYPES}")
        if cls.MAX_N is not None and inp.n > cls.MAX_N:
            reasons.append(f"n = {inp.n} samples > {cls.MAX_N}, the most it serves")
        return reasons

    @classmethod
    def cost(cls, inp: GramInputs) -> int:
        """Multiply-adds of its route on ``inp`` (:func:`route_costs`; the FLOP formula is twice this)."""
        return route_costs(inp.n, inp.T, inp.width, inp.segmented)[cls.ROUTE]

    @classmethod
    def predicted_seconds(cls, inp: GramInputs) -> float | None:
        """Predicted time on a GPU where a model exists (ranks kernels of equal cost; None: no model)."""
        return None

    @classmethod
    def backend_name(cls) -> str:
        """What a result reports as its backend: ``"torch"``, ``"triton"`` or ``"triton-interpreter"``."""
        return cls.BACKEND

    @classmethod
    def apply(cls, a, b, starts: tuple, sizes: tuple, owners: tuple, *, add_one: bool, allow_tf32: bool,
              scratch_bytes: int) -> torch.Tensor:
        """Module Grams ``[1 + max(owners), n, n]`` (fp32): segment s of ``b`` against ``a``, into its owner (every
        kernel of :data:`KERNELS` defines it; tests/test_gram_dispatch.py runs each against the oracle)."""
        raise NotImplementedError(f"{cls.__name__} defines no apply(): it is not a runnable Gram kernel")


class _TritonKernel(GramKernel):
    BACKEND = "triton"
    SUPPORTED_DEVICES = ("cuda",)  # and any device in the CPU interpreter

    @classmethod
    def device_reason(cls, device):
        why = _backend.triton_unusable(device)
        return None if why is None else f"Triton cannot run here: {why}"

    @classmethod
    def backend_name(cls):
        return "triton-interpreter" if _backend.interpreter_enabled() else "triton"

    @classmethod
    def apply(cls, a, b, starts, sizes, owners, *, add_one, allow_tf32, scratch_bytes):
        if _backend.interpreter_enabled() and a.dtype != torch.float32:
            _backend.warn_once(
                "interp-lowp",
                "mat_kernels: the Triton interpreter computes bf16/fp16 dots wrongly; inputs are upcast to fp32 "
                "(test low-precision paths on a GPU)",
            )
            a, b = a.float(), b.float()
        return cls.launch(a, b, starts, sizes, owners, add_one=add_one, allow_tf32=allow_tf32,
                          scratch_bytes=scratch_bytes)

    @classmethod
    def launch(cls, a, b, starts, sizes, owners, *, add_one, allow_tf32, scratch_bytes):
        """The Triton launch of a concrete kernel (inputs already cast for the interpreter)."""
        raise NotImplementedError(f"{cls.__name__} defines no launch(): it is not a runnable Triton kernel")


class _TritonPsgVariant(_TritonKernel):
    ROUTE = "psg"
    VARIANT = ""  # the key of psg_seconds

    @classmethod
    def predicted_seconds(cls, inp):
        from mat_kernels.kernels import triton_segment_grams_fused as tf

        return tf.psg_seconds(inp.n, inp.T, inp.width, inp.segmented, inp.dtype.itemsize,
                              inp.scratch_bytes)[cls.VARIANT]


class TritonFused(_TritonPsgVariant):
    """The fused per-sample-gradient + Gram kernel: one launch, nothing per sample leaves the SM (n ≤ 32)."""

    NAME, VARIANT, MAX_N = "triton-fused", "fused", 32  # = triton_segment_grams_fused.FUSED_MAX_N

    @classmethod
    def launch(cls, a, b, starts, sizes, owners, *, add_one, allow_tf32, scratch_bytes):
        from mat_kernels.kernels import triton_segment_grams_fused as tf

        return tf.fused_segment_grams(a, b, starts, sizes, owners, add_one=add_one, allow_tf32=allow_tf32)


class TritonLocal(_TritonPsgVariant):
    """The tile-local per-sample-gradient + Gram kernel: one launch, a bounded scratch of per-program slots
    (n ≤ 64)."""

    NAME, VARIANT, MAX_N = "triton-local", "local", 64  # = triton_segment_grams_fused.LOCAL_MAX_N

    @classmethod
    def launch(cls, a, b, starts, sizes, owners, *, add_one, allow_tf32, scratch_bytes):
        from mat_kernels.kernels import triton_segment_grams_fused as tf

        return tf.local_segment_grams(a, b, starts, sizes, owners, add_one=add_one, allow_tf32=allow_tf32,
                                      scratch_bytes=scratch_bytes)


class TritonPsg(_TritonPsgVariant):
    """The two-kernel psg route: fp32 per-sample gradients to a scratch of at most ``scratch_bytes`` (in column
    chunks), then the Gram kernel (any n)."""

    NAME, VARIANT = "triton-psg", "two-kernel"

    @classmethod
    def launch(cls, a, b, starts, sizes, owners, *, add_one, allow_tf32, scratch_bytes):
        from mat_kernels.kernels import triton_segment_grams as tg

        return tg.psg_segment_grams(a, b, starts, sizes, add_one=add_one, allow_tf32=allow_tf32,
                                    scratch_bytes=scratch_bytes, seg_owners=owners)


class TritonGhost(_TritonKernel):
    """The ghost kernel: token-pair tiles of the shared side, reused by every segment (any n)."""

    NAME, ROUTE = "triton-ghost", "ghost"

    @classmethod
    def launch(cls, a, b, starts, sizes, owners, *, add_one, allow_tf32, scratch_bytes):
        from mat_kernels.kernels import triton_segment_grams as tg

        return tg.ghost_segment_grams(a, b, starts, sizes, add_one=add_one, allow_tf32=allow_tf32,
                                      seg_owners=owners)


class _TorchKernel(GramKernel):
    BACKEND = "torch"
    FN = None

    @classmethod
    def apply(cls, a, b, starts, sizes, owners, *, add_one, allow_tf32, scratch_bytes):
        seg = cls.FN(a, b, starts, sizes, add_one=add_one, allow_tf32=allow_tf32, scratch_bytes=scratch_bytes)
        if tuple(owners) == tuple(range(len(owners))):
            return seg
        idx = _backend.device_ints(tuple(owners), seg.device)  # cached: no host copy per call
        out = seg.new_zeros((1 + max(owners),) + tuple(seg.shape[1:]))
        return out.index_add_(0, idx, seg)  # segment Grams into their modules


class TorchPsg(_TorchKernel):
    """PyTorch per-sample gradients (``bmm`` per column chunk) and their Gram in pieces (any device)."""

    NAME, ROUTE, FN = "torch-psg", "psg", staticmethod(torch_impl.psg_segment_grams_torch)


class TorchGhost(_TorchKernel):
    """PyTorch ghost route (``einsum`` over blocks of samples, any device)."""

    NAME, ROUTE, FN = "torch-ghost", "ghost", staticmethod(torch_impl.ghost_segment_grams_torch)


# The implementation table, in the order a tie in cost would be broken.
KERNELS: dict[str, type[GramKernel]] = {k.NAME: k for k in (TritonFused, TritonLocal, TritonPsg, TritonGhost,
                                                             TorchPsg, TorchGhost)}
KERNEL_CHOICES = ("auto",) + tuple(KERNELS)


def check_kernel_name(kernel: str) -> None:
    """Raise ``ValueError`` naming the choices if ``kernel`` is not ``"auto"`` or an implementation's name."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")


def static_reasons(kernel: str, *, method: str = "auto", backend: str = "auto") -> list[str]:
    """The reasons implementation ``kernel`` is ruled out by the settings alone (``method``'s route,
    ``backend``), whatever the inputs."""
    impl = KERNELS[kernel]
    reasons = []
    route = METHOD_ROUTES[method]
    if route is not None and impl.ROUTE != route:
        reasons.append(f"method={method!r} computes the {route} route; {kernel} is a {impl.ROUTE} kernel")
    if backend != "auto" and impl.BACKEND != backend:
        reasons.append(f"backend={backend!r} rules out {impl.BACKEND} kernels")
    return reasons


@dataclass(frozen=True)
class GramChoice:
    """What :func:`choose` picked and why. ``kernel``: the implementation's name; ``route``: its route;
    ``backend``: what a result reports (``"triton"``, ``"triton-interpreter"``, ``"torch"``); ``cost``: its
    multiply-adds; ``candidates``: ``(name, multiply-adds or None, predicted seconds or None, reasons)`` for
    every implementation considered (reasons empty for the supported ones)."""

    kernel: str
    route: str
    backend: str
    cost: int
    candidates: tuple[tuple[str, int | None, float | None, tuple[str, ...]], ...]

    @property
    def reason(self) -> str:
        """One line: the supported candidates by cost, and why the others were ruled out."""
        ok = [f"{k} {c:,} multiply-adds" + (f" ~{s * 1e6:.0f} us" if s is not None else "")
              for k, c, s, r in self.candidates if not r]
        out = [f"{k}: {'; '.join(r)}" for k, _, _, r in self.candidates if r]
        return f"chose {self.kernel} among [{', '.join(ok)}]" + (f"; ruled out {' | '.join(out)}" if out else "")


def choose(inp: GramInputs, *, kernel: str = "auto", backend: str = "auto", method: str = "auto") -> GramChoice:
    """The implementation that computes ``inp``: ``kernel`` forced, or with ``"auto"`` the cheapest supported one
    (see the module docstring). ``backend`` (``"auto"``, ``"triton"``, ``"torch"``) and ``method`` (its route)
    restrict the candidates.

    Raises:
        ValueError: unknown ``kernel``/``backend``/``method`` (naming the choices), or no candidate can run (every
            candidate with every reason).
    """
    check_kernel_name(kernel)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if method not in METHOD_ROUTES:
        raise ValueError(f"method must be one of {tuple(METHOD_ROUTES)}, got {method!r}")
    names = tuple(KERNELS) if kernel == "auto" else (kernel,)
    candidates, ranked = [], []
    for rank, name in enumerate(names):
        impl = KERNELS[name]
        reasons = static_reasons(name, method=method, backend=backend) + impl.not_supported_reasons(inp)
        if reasons:
            candidates.append((name, None, None, tuple(reasons)))
            continue
        cost, seconds = impl.cost(inp), impl.predicted_seconds(inp)
        candidates.append((name, cost, seconds, ()))
        ranked.append(((cost, impl.BACKEND != "triton", seconds or 0.0, rank), name))
    if not ranked:
        raise _cannot_run(kernel, inp, candidates, f" (backend={backend!r}, method={method!r})")
    (cost, *_), name = min(ranked)
    impl = KERNELS[name]
    if kernel == "auto" and backend == "auto" and impl.BACKEND == "torch":
        why = _backend.triton_unusable(inp.device)
        if why is not None:
            _backend.warn_once(f"fallback:{why}",
                               f"mat_kernels: Triton kernels unavailable ({why}); using the PyTorch implementation. "
                               "The result's `backend` field says which ran.")
    return GramChoice(name, impl.ROUTE, impl.backend_name(), cost, tuple(candidates))


def require(kernel: str, inp: GramInputs) -> type[GramKernel]:
    """The implementation named ``kernel``, if it can compute ``inp`` (what the op checks before it runs it);
    else ``ValueError`` with every reason (an unknown name: the choices)."""
    check_kernel_name(kernel)
    if kernel == "auto":
        raise ValueError("segment_grams runs a named kernel; gram_dispatch.choose picks one for 'auto'")
    reasons = KERNELS[kernel].not_supported_reasons(inp)
    if reasons:
        raise _cannot_run(kernel, inp, [(kernel, None, None, tuple(reasons))])
    return KERNELS[kernel]


def _cannot_run(kernel: str, inp: GramInputs, candidates, settings: str = "") -> ValueError:
    what = f"kernel={kernel!r} cannot run" if kernel != "auto" else "no Gram kernel can run"
    lines = "\n".join(f"  {k}: {'; '.join(r)}" for k, _, _, r in candidates)
    return ValueError(f"{what} on n={inp.n}, T={inp.T}, shared width {inp.width}, segmented width {inp.segmented}, "
                      f"{inp.dtype} on {inp.device.type}{settings}:\n{lines}")


def flops(kernel: str, inp: GramInputs) -> int:
    """FLOPs of implementation ``kernel`` on ``inp``: 2 × its multiply-adds (the convention of
    ``torch.utils.flop_counter``)."""
    return 2 * KERNELS[kernel].cost(inp)


def route_of(name: str) -> str:
    """The route (``"psg"``, ``"ghost"`` or ``"sketch"``) of a name in ``GramResult.routes`` (a kernel name, or
    ``"sketch+<kernel>"``)."""
    if name.startswith("sketch+"):
        return "sketch"
    return KERNELS[name].ROUTE

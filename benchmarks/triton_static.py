"""Static figures of the Triton kernels as the launch code launches them, on a machine without a GPU.

Triton compiles ahead of time for a GPU target on any machine: a stand-in driver whose current target is
``GPUTarget("cuda", <arch>, 32)`` turns every ``kernel[grid](...)`` of the launch code into
``kernel.warmup(..., grid=grid)`` (compile, no launch), so the tiles, warps and stages are the real ones. For each
launch: registers, spill (stack) bytes, shared memory (``cuobjdump -res-usage``), tensor-core instructions
(HGMMA/HMMA in ``cuobjdump -sass``); for a whole call: the number of kernel launches (Triton launches plus the
PyTorch ops that would launch a kernel, counted by a dispatch mode on the second, steady-state call), host copies,
and floors from the FLOPs and bytes the kernels actually execute and move.

    python benchmarks/triton_static.py                      # BERT-base layer, n = 32, T = 128, sm_90
    python benchmarks/triton_static.py --arch 80 --json out.json
    python benchmarks/triton_static.py --workload sparse     # the sparse-update backward + optimizer, T = 4096

Used by tests/test_triton_aot.py (no spills, tensor cores for TF32/bf16, at most 12 launches per layer).
Must run without TRITON_INTERPRET (it re-executes itself without it if set).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the kernels must be real JITFunctions
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as _jit  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mat_kernels as mk  # noqa: E402

# Ceilings for the floors: H100 SXM. bf16 dense and HBM measured on this workplace's H100 (.library/device/
# KINDS.md); TF32 and fp32 datasheet; L2 bandwidth an assumed ~5.5 TB/s (published microbenchmarks, not measured
# here).
CEILINGS = {"bf16": 790e12, "tf32": 400e12, "fp32": 60e12, "hbm": 3.0e12, "l2": 5.5e12}
# live tile-local slots beyond this are counted in HBM too (the library's byte model uses the same figure)
from mat_kernels.kernels.triton_segment_grams_fused import L2_RESIDENT_BYTES  # noqa: E402

DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}


class _StandInDriver:
    """The active driver Triton's launch path asks for device, stream and target: a GPU target, no GPU."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        # one "device" per target: Triton keeps its compiled kernels per device, so two archs in one process would
        # otherwise share the first arch's binaries
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


_LAUNCHES: list[dict] = []
_ORIG_RUN = _jit.JITFunction.run


class _TensorStub:
    """What the figures need of a launch's tensor argument, without holding the tensor: a held reference would
    change what the caller does (autograd copies a gradient it cannot steal)."""

    def __init__(self, t: torch.Tensor):
        self._size, self._numel = t.element_size(), t.numel()
        self._sum = int(t.sum()) if t.numel() <= 4096 and not t.is_floating_point() else None

    def element_size(self) -> int:
        return self._size

    def numel(self) -> int:
        return self._numel

    def sum(self):
        return self._sum


def _warmup_run(self, *args, grid, warmup, **kwargs):
    from torch.utils._python_dispatch import _disable_current_modes

    kernel = _ORIG_RUN(self, *args, grid=grid, warmup=True, **kwargs)
    with _disable_current_modes():  # reading the arguments is the harness's work, not the launch code's
        bound = {k: _TensorStub(v) if isinstance(v, torch.Tensor) else v for k, v in zip(self.arg_names, args)}
    _LAUNCHES.append({"fn": self, "name": self.fn.__name__, "grid": tuple(grid), "kernel": kernel,
                      "args": bound, "kwargs": kwargs})
    return kernel


_NO_KERNEL = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "transpose", "t", "permute", "expand",
              "as_strided", "slice", "select", "detach", "alias", "empty", "empty_strided", "new_empty", "narrow",
              "split", "unbind", "_reshape_alias", "lift_fresh", "sym_size", "sym_stride", "is_same_size",
              "_local_scalar_dense", "item", "split_with_sizes", "_record_function_enter_new",
              "_record_function_exit"}


class _CountOps(TorchDispatchMode):
    """PyTorch ops that launch a kernel on a GPU (views and allocations excluded), and host-to-device copies."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.host_copies = 0
        self.syncs = 0  # device-to-host reads (.item(), float(t)): a host sync each, not capturable in a CUDA graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "segment_grams":  # a custom op is opaque to the mode: count what its implementation runs
            from mat_kernels.ops.segment_grams import segment_grams as op

            with self:
                return op._init_fn(*args, **(kwargs or {}))
        if name == "lift_fresh":  # torch.tensor(list, ...): a host copy on a GPU
            self.host_copies += 1
        elif name == "_local_scalar_dense":
            self.syncs += 1
        elif name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _resources(cubin: bytes) -> dict:
    from mat_kernels.kernels.triton_autotune import static_resources  # the one cuobjdump reader (the autotuner's too)

    return static_resources(cubin)


def bert_layer(n: int, T: int, d: int = 768, heads: int = 12, ffn: int = 3072):
    """The four linears of one BERT-base encoder layer: (name, x width, dy width, layer_grams kwargs)."""
    return [
        ("qkv", d, 3 * d, {"row_blocks": mk.fused_qkv_heads(heads, d // heads), "bias": True}),
        ("out_proj", d, d, {"col_blocks": heads}),
        ("ffn_in", d, ffn, {"bias": True}),
        ("ffn_out", ffn, d, {"bias": True}),
    ]


def _work(launch: dict) -> tuple[float, float, float]:
    """(tensor/FMA FLOPs, HBM compulsory bytes share, L2 bytes) of one launch, from its grid and constexprs."""
    name, a = launch["name"], launch["args"]
    kw = launch["kwargs"]
    programs = 1
    for g in launch["grid"]:
        programs *= g
    if name == "_psg_gram_fused_kernel":
        NP, BR, BC, BT = kw["NP"], kw["BR"], kw["BC"], kw["BT"]
        T = triton.cdiv(a["T"], BT) * BT
        esize = a["a_ptr"].element_size()
        flops = programs * (2 * NP * BR * BC * T + 2 * NP * NP * BR * BC)
        l2 = programs * (NP * BR * T + NP * T * BC) * esize
        return flops, 0.0, l2
    if name == "_psg_gram_local_kernel":  # per work item: n per-sample tiles, written to the slot and read back
        NP, BR, BC, BT = kw["NP"], kw["BR"], kw["BC"], kw["BT"]
        n, T, work = a["n"], triton.cdiv(a["T"], BT) * BT, a["n_work"]
        esize, wsize = a["a_ptr"].element_size(), a["work_ptr"].element_size()
        flops = work * (2 * n * BR * BC * T + 2 * NP * NP * BR * BC)
        slots = 2 * work * n * BR * BC * wsize
        live = programs * NP * BR * BC * wsize  # slots held at once: beyond half the L2, counted in HBM too
        return flops, (slots if live > L2_RESIDENT_BYTES else 0.0), work * n * T * (BR + BC) * esize + slots
    if name == "_psg_fwd_kernel":  # per-sample gradient tiles to the fp32 scratch (written to HBM)
        BR, BC, BT = kw["BR"], kw["BC"], kw["BT"]
        T = triton.cdiv(a["T"], BT) * BT
        esize = a["a_ptr"].element_size()
        return programs * 2 * BR * BC * T, programs * BR * BC * 4, programs * (BR + BC) * T * esize
    if name == "_segment_gram_fwd_kernel":  # reads the scratch back
        BN = kw["BN"]
        k = a["g_ptr"].numel() // a["n"]  # this chunk's scratch columns per sample (upper bound of the reads)
        blocks = triton.cdiv(a["n"], BN)
        return 2 * blocks * blocks * BN * BN * k, a["g_ptr"].numel() * 4, blocks * a["g_ptr"].numel() * 4
    if name == "_ghost_gram_fwd_kernel":  # token-pair tiles of the shared side, then every segment's
        BT, BS = kw["BT"], kw["BS"]
        width = a["DA"] + int(a["seg_size_ptr"].sum())
        esize = a["a_ptr"].element_size()
        return programs * 2 * BT * BS * width, 0.0, programs * (BT + BS) * width * esize
    return 0.0, 0.0, 0.0


def analyse(arch: int, dtype_name: str, n: int, T: int, method: str = "auto", psg: str = "auto") -> dict:
    """Compile one BERT-base layer's λ kernels for ``arch`` as launched; figures per kernel and per layer.
    ``psg`` other than ``"auto"`` forces that psg kernel (``"two-kernel"``, ``"local"``, ``"fused"``) through the
    Gram dispatcher (``kernel=``) in place of its choice."""
    dtype, tf32 = DTYPES[dtype_name]
    from mat_kernels import backend as _backend

    kernel = {"auto": "auto", "two-kernel": "triton-psg", "local": "triton-local", "fused": "triton-fused"}[psg]
    prev_driver, prev_unusable = getattr(triton.runtime.driver, "_active", None), _backend.triton_unusable
    triton.runtime.driver.set_active(_StandInDriver(arch))
    _jit.JITFunction.run = _warmup_run
    _backend.triton_unusable = lambda device: None  # the dispatcher's Triton kernels run on the stand-in driver
    try:
        g = torch.Generator().manual_seed(0)
        calls = []
        for name, d_in, d_out, kw in bert_layer(n, T):
            x = torch.randn(n, T, d_in, generator=g).to(dtype)
            dy = torch.randn(n, T, d_out, generator=g).to(dtype)
            calls.append((name, x, dy, kw))

        def layer(check_finite=True):
            for _, x, dy, kw in calls:
                mk.layer_grams(x, dy, method=method, allow_tf32=tf32, backend="triton", check_finite=check_finite,
                               kernel=kernel, **kw)

        layer()  # first call: compiles, fills the caches
        unchecked = _CountOps()
        with unchecked:
            layer(check_finite=False)  # what a CUDA-graph capture would see: no host sync may remain
        _LAUNCHES.clear()
        counter = _CountOps()
        with counter:
            layer()  # steady state: what every later call launches
    finally:
        _jit.JITFunction.run = _ORIG_RUN
        _backend.triton_unusable = prev_unusable
        triton.runtime.driver._active = prev_driver
    kernels, seen = [], {}
    flops = l2 = scratch = 0.0
    for launch in _LAUNCHES:
        k = launch["kernel"]
        key = (launch["name"], k.hash)
        if key not in seen:
            seen[key] = _resources(k.asm["cubin"])
            kernels.append({"name": launch["name"], "grid": launch["grid"], "num_warps": k.metadata.num_warps,
                            "num_stages": k.metadata.num_stages, "shared": k.metadata.shared, **seen[key],
                            "constexprs": {c: launch["kwargs"][c] for c in ("NP", "BR", "BC", "BT", "BN", "BK", "BS")
                                           if c in launch["kwargs"]}})
        f, h, b = _work(launch)
        flops += f
        scratch += h
        l2 += b
    esize = torch.empty((), dtype=dtype).element_size()
    hbm = sum((x.numel() + dy.numel()) * esize for _, x, dy, _ in calls) + scratch  # x, dy once + scratch
    peak = CEILINGS["bf16" if dtype_name == "bf16" else ("tf32" if tf32 else "fp32")]
    torch_launches = sum(counter.ops.values())
    return {
        "arch": arch, "dtype": dtype_name, "n": n, "T": T, "method": method, "psg": psg,
        "triton_launches": len(_LAUNCHES), "torch_launches": torch_launches,
        "launches": len(_LAUNCHES) + torch_launches, "torch_ops": dict(counter.ops),
        "host_copies": counter.host_copies, "syncs": counter.syncs, "syncs_unchecked": unchecked.syncs,
        "host_copies_unchecked": unchecked.host_copies, "kernels": kernels,
        "flops": flops, "hbm_bytes": hbm, "l2_bytes": l2,
        "floor_ms": {"compute": 1e3 * flops / peak, "hbm": 1e3 * hbm / CEILINGS["hbm"],
                     "l2": 1e3 * l2 / CEILINGS["l2"]},
    }


SPARSE_MASKS = {  # BERT-base: 12 modules per layer
    "interleaved_quarter": [h % 4 == 0 for h in range(12)],
    "interleaved_half": [h % 2 == 0 for h in range(12)],
    "contiguous_half": [h < 6 for h in range(12)],
    "one": [h == 5 for h in range(12)],
    "all_but_one": [h != 5 for h in range(12)],
    "all": [True] * 12,
}


def sparse_layers(d: int = 768, heads: int = 12):
    """The sparse layers of one BERT-base block the launch count covers: (name, d_in, d_out, layer kwargs)."""
    return [("qkv", d, 3 * d, {"row_blocks": mk.fused_qkv_heads(heads, d // heads)}),
            ("out_proj", d, d, {"col_blocks": heads})]


def analyse_sparse(arch: int, dtype_name: str, T: int) -> dict:
    """Compile the sparse-update backward's kernels for ``arch`` as the sparse layers launch them (BERT-base QKV
    rows and output-projection columns, ``T`` tokens, every mask of SPARSE_MASKS, ``dw`` and ``detach``) and count
    the launches of one backward + frozen-slice optimizer step (torch's fused AdamW) in steady state."""
    dtype, tf32 = DTYPES[dtype_name]
    from mat_kernels.nn import sparse_function as sl
    from mat_kernels.train.optim import FrozenSliceOptimizer

    prev_driver = getattr(triton.runtime.driver, "_active", None)
    from mat_kernels import backend as _backend
    from mat_kernels.train import optim

    prev = (sl.TRITON_DEVICES, optim.TRITON_DEVICES, _backend.KERNEL_MODE, torch.backends.cuda.matmul.allow_tf32)
    triton.runtime.driver.set_active(_StandInDriver(arch))
    _jit.JITFunction.run = _warmup_run
    # CPU tensors stand in for CUDA ones: route them to the kernels as CUDA tensors are (compiled, not launched)
    sl.TRITON_DEVICES = optim.TRITON_DEVICES = {"cpu"}
    _backend.KERNEL_MODE = ("stand-in", f"stand-in driver for sm_{arch}")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    steps, seen, kernels = [], {}, []
    try:
        g = torch.Generator().manual_seed(0)
        for name, d_in, d_out, kw in sparse_layers():
            for mode in ("dw", "detach"):
                lin = mk.SparseUpdateLinear(d_in, d_out, frozen_backward=mode, **kw).to(dtype)
                blocks = {lin.weight: lin.layout}
                if lin.layout.dim == 0:
                    blocks[lin.bias] = mk.WeightBlocks.build(d_out, d_in, bias=True, **kw).for_bias()
                opt = FrozenSliceOptimizer(torch.optim.AdamW(lin.parameters(), lr=1e-4, fused=True), blocks,
                                           num_modules=lin.num_modules)
                x = torch.randn(T, d_in, generator=g).to(dtype).requires_grad_(True)
                dy = torch.randn(T, d_out, generator=g).to(dtype)
                for mask_name, m in SPARSE_MASKS.items():
                    active = torch.tensor(m)
                    lin.set_active(active)

                    def step():
                        lin(x).backward(dy)
                        opt.step(active)
                        opt.zero_grad(set_to_none=True)
                        x.grad = None

                    step()  # first call with this mask: plans, device masks, compiles
                    _LAUNCHES.clear()
                    counter = _CountOps()
                    with counter:
                        y = lin(x)
                    forward = sum(counter.ops.values())
                    counter = _CountOps()
                    with counter:
                        y.backward(dy)
                        opt.step(active)
                        opt.zero_grad(set_to_none=True)
                        x.grad = None
                    for launch in _LAUNCHES:
                        key = (launch["name"], launch["kernel"].hash)
                        if key not in seen:
                            k = launch["kernel"]
                            seen[key] = _resources(k.asm["cubin"])
                            kernels.append({"name": launch["name"], "grid": launch["grid"],
                                            "num_warps": k.metadata.num_warps, "num_stages": k.metadata.num_stages,
                                            "shared": k.metadata.shared, **seen[key],
                                            "constexprs": {c: launch["kwargs"][c] for c in ("BM", "BN", "BK", "BT")
                                                           if c in launch["kwargs"]}})
                    work = _tile_work(lin, dtype, mode)
                    steps.append({"layer": name, "mode": mode, "mask": mask_name, "forward_launches": forward, **work,
                                  "triton_launches": len(_LAUNCHES), "torch_launches": sum(counter.ops.values()),
                                  "launches": len(_LAUNCHES) + sum(counter.ops.values()),
                                  "torch_ops": dict(counter.ops), "host_copies": counter.host_copies,
                                  "syncs": counter.syncs})
    finally:
        _jit.JITFunction.run = _ORIG_RUN
        sl.TRITON_DEVICES, optim.TRITON_DEVICES, _backend.KERNEL_MODE, torch.backends.cuda.matmul.allow_tf32 = prev
        triton.runtime.driver._active = prev_driver
    return {"arch": arch, "dtype": dtype_name, "T": T, "workload": "sparse", "steps": steps, "kernels": kernels,
            "launches": max(s["launches"] for s in steps), "host_copies": sum(s["host_copies"] for s in steps),
            "syncs": sum(s["syncs"] for s in steps)}


def _tile_work(lin, dtype: torch.dtype, mode: str) -> dict:
    """The share of the MMA tiles the kernels compute for the layer's current mask (a tile runs its loop when any
    row / column it covers is active), next to the active share of the weight's entries: dW tiles of
    ``_masked_weight_grad_kernel``; for ``detach``, the contraction tiles (row blocks) or output tiles (column blocks)
    of ``_masked_input_grad_kernel`` (1 when the layer is all active: cuBLAS runs the dense dX)."""
    from mat_kernels.kernels.triton_sparse_grad import tile_config

    N, K = lin.weight.shape
    axis, active = lin.layout.dim, lin.active
    blocked = torch.zeros(N if axis == 0 else K, dtype=torch.bool)
    for i, ranges in lin.layout.entries():
        for start, size in ranges:
            blocked[start:start + size] = bool(active[i])
    rm = blocked if axis == 0 else torch.ones(N, dtype=torch.bool)
    cm = blocked if axis == 1 else torch.ones(K, dtype=torch.bool)

    def tiles(v: torch.Tensor, b: int) -> torch.Tensor:  # per tile of b entries: any active
        return torch.nn.functional.pad(v, (0, (-v.numel()) % b)).view(-1, b).any(1)

    cw = tile_config(dtype, axis, "weight")
    rt, ct = tiles(rm, cw["BM"]), tiles(cm, cw["BN"])
    dw = float(rt.sum() * ct.sum()) / (rt.numel() * ct.numel())
    ci = tile_config(dtype, axis, "input")
    if mode != "detach" or bool(rm.all() and cm.all()):
        dx = 1.0
    elif axis == 0:
        dx = float(tiles(rm, ci["BK"]).float().mean())
    else:
        dx = float(tiles(cm, ci["BN"]).float().mean())
    active = float(rm.sum() * cm.sum()) / (rm.numel() * cm.numel())
    return {"active_share": round(active, 4), "dw_tile_share": round(dw, 4), "dx_tile_share": round(dx, 4)}


def _sparse_table(r: dict) -> str:
    lines = [f"sm_{r['arch']} {r['dtype']} T={r['T']} sparse backward + optimizer step: at most {r['launches']} "
             f"launches, {r['host_copies']} host copies, {r['syncs']} host syncs",
             "| layer | mode | mask | launches (Triton + PyTorch) | active share | dW tiles run | detach dX tiles run "
             "| PyTorch ops |", "|---|---|---|---:|---:|---:|---:|---|"]
    for st in r["steps"]:
        lines.append(f"| {st['layer']} | {st['mode']} | {st['mask']} | {st['launches']} ({st['triton_launches']} + "
                     f"{st['torch_launches']}) | {st['active_share']:.3f} | {st['dw_tile_share']:.3f} | "
                     f"{st['dx_tile_share']:.3f} | {st['torch_ops']} |")
    lines += ["| kernel | grid | warps | stages | regs | spill bytes | shared KB | HGMMA | HMMA | FFMA |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in r["kernels"]:
        lines.append(f"| {k['name']} {k['constexprs']} | {k['grid']} | {k['num_warps']} | {k['num_stages']} | "
                     f"{k['regs']} | {k['stack']} | {k['shared'] / 1024:.0f} | {k['hgmma']} | {k['hmma']} | "
                     f"{k['ffma']} |")
    return "\n".join(lines)


def _table(r: dict) -> str:
    lines = [f"sm_{r['arch']} {r['dtype']} n={r['n']} T={r['T']} method={r['method']} psg={r['psg']}: "
             f"{r['launches']} launches ({r['triton_launches']} Triton + {r['torch_launches']} PyTorch "
             f"{r['torch_ops']}), {r['host_copies']} host copies, {r['syncs']} host syncs "
             f"({r['syncs_unchecked']} with check_finite=False)",
             "| kernel | grid | warps | stages | regs | spill bytes | shared KB | HGMMA | HMMA | FFMA |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in r["kernels"]:
        lines.append(f"| {k['name']} {k['constexprs']} | {k['grid']} | {k['num_warps']} | {k['num_stages']} | "
                     f"{k['regs']} | {k['stack']} | {k['shared'] / 1024:.0f} | {k['hgmma']} | {k['hmma']} | "
                     f"{k['ffma']} |")
    fl = r["floor_ms"]
    lines.append(f"GFLOP {r['flops'] / 1e9:.1f}, HBM {r['hbm_bytes'] / 1e6:.0f} MB, L2 {r['l2_bytes'] / 1e9:.2f} GB; "
                 f"floors ms: compute {fl['compute']:.3f}, HBM {fl['hbm']:.3f}, L2 {fl['l2']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90])
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--method", default="auto")
    p.add_argument("--psg", default="auto", choices=["auto", "two-kernel", "local", "fused"])
    p.add_argument("--workload", default="lambda", choices=["lambda", "sparse"],
                   help="lambda: the Gram kernels of one layer; sparse: the sparse-update backward + optimizer step "
                        "(T = --tokens)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    out = []
    for arch in args.arch:
        for dt in args.dtype:
            if args.workload == "sparse":
                r = analyse_sparse(arch, dt, args.tokens)
                print(_sparse_table(r), end="\n\n", flush=True)
            else:
                r = analyse(arch, dt, args.n, args.T, args.method, args.psg)
                print(_table(r), end="\n\n", flush=True)
            out.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()

"""Autotuning of the Gram kernels: candidate tiles, warps and stages per kernel, keyed on shapes and dtype, with
configurations that spill registers pruned before they are timed.

Not ``triton.autotune``: its benchmark reruns the launch on the real output, and these kernels accumulate with
atomic adds, so each candidate is timed here on a scratch output; and a candidate is dropped when its compiled
code spills (read from the loaded binary, or from ``cuobjdump`` where the driver does not say), which
``triton.autotune`` does not check.

Tuning runs only on a GPU (never in the interpreter or ahead-of-time analysis, which use the first candidate, the
default) and once per key; ``MAT_KERNELS_AUTOTUNE=0`` turns it off (the default candidate then always runs).
:func:`tuned` shows what was chosen and what was pruned.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from typing import Callable, NamedTuple

import torch

from mat_kernels.backend import interpreter_enabled


class Config(NamedTuple):
    """Tiles and launch parameters of one candidate: ``tiles`` as the kernel's constexpr names."""

    tiles: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return {**dict(self.tiles), "num_warps": self.num_warps, "num_stages": self.num_stages}


def config(num_warps: int, num_stages: int, **tiles: int) -> Config:
    return Config(tuple(sorted(tiles.items())), num_warps, num_stages)


_CHOSEN: dict[tuple, Config] = {}
_PRUNED: dict[tuple, list[tuple[Config, str]]] = collections.defaultdict(list)


def enabled(device: torch.device) -> bool:
    """Whether candidates are timed for ``device`` (a CUDA device, no interpreter, not switched off)."""
    return device.type == "cuda" and not interpreter_enabled() and os.environ.get("MAT_KERNELS_AUTOTUNE", "1") != "0"


def spill_bytes(compiled) -> int:
    """Bytes spilled to local memory per thread by a compiled Triton kernel (0 = none)."""
    try:
        compiled._init_handles()  # loads the binary: the driver reports its spills
        return int(compiled.n_spills)
    except Exception:
        return static_resources(compiled.asm["cubin"])["stack"]


def static_resources(cubin: bytes) -> dict:
    """Registers, stack (spill) bytes, local memory and tensor-core / FMA / local-load-store instruction counts of a
    cubin, read with the ``cuobjdump`` that ships in the triton wheel (no GPU needed)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|FFMA|LDL|STL)\b", sass))
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(4)),
            "hgmma": ops["HGMMA"], "hmma": ops["HMMA"], "ffma": ops["FFMA"], "spill_ld_st": ops["LDL"] + ops["STL"]}


def pick(name: str, key: tuple, candidates: list[Config], launch: Callable[[Config, bool], object],
         device: torch.device) -> Config:
    """The candidate to run for ``key``: the first one without tuning; else the fastest non-spilling candidate,
    timed once per key. ``launch(cfg, warmup)`` compiles (``warmup=True``, returns the compiled kernel) or runs
    the kernel on a scratch output."""
    if not enabled(device):
        return candidates[0]
    full = (name,) + key
    if full in _CHOSEN:
        return _CHOSEN[full]
    import triton
    import triton.testing

    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            compiled = launch(cfg, True)
            spills = spill_bytes(compiled)
        except triton.runtime.errors.OutOfResources as e:
            _PRUNED[full].append((cfg, f"out of resources: {e}"))
            continue
        if spills:
            _PRUNED[full].append((cfg, f"spills {spills} bytes"))
            continue
        ms = triton.testing.do_bench(lambda: launch(cfg, False), warmup=5, rep=25)
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:  # every candidate spilled: run the default, and say so
        from mat_kernels.backend import warn_once

        warn_once(f"autotune-none:{full}", f"mat_kernels: every {name} configuration spills for {key}; running the "
                                           "default one (see mat_kernels.kernels.triton_autotune.tuned())")
        best = candidates[0]
    _CHOSEN[full] = best
    return best


def tuned() -> dict:
    """``{(kernel, key...): {"chosen": Config, "pruned": [(Config, why), ...]}}`` of this process."""
    return {k: {"chosen": v, "pruned": list(_PRUNED.get(k, []))} for k, v in _CHOSEN.items()}

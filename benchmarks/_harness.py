"""The one benchmark harness: timing quantiles, peak memory, the environment row, CSV upsert.

Each ``bench_<op>.py`` holds only its setup and providers and calls these (the pattern of Liger-Kernel's
``benchmark/scripts/utils.py``):

* :func:`time_ms`: median, 20% and 80% quantiles in ms (``triton.testing.do_bench`` on CUDA, a ``perf_counter``
  loop on CPU) and the timer's name; :func:`interleaved_ms` / :func:`interleaved_times`: several providers side by
  side in rounds (CPU comparisons, so a change in the machine's load hits every provider alike), summarised or raw;
  :func:`bootstrap_ci`: a percentile bootstrap interval over rounds;
* :func:`peak_extra_mib`: peak device memory of one call above what was allocated before it (CUDA; None on CPU);
* :func:`env_row`: date (UTC), device, commit (``-dirty`` with uncommitted changes), torch, triton, mat_kernels;
* :func:`upsert_csv`: write rows into a CSV, replacing earlier rows with the same key (op, provider, shape, dtype,
  device by default), keeping the others: rerunning a benchmark updates its rows instead of piling up copies.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import os
import platform
import subprocess
import time
from typing import Callable, Iterable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANTILES = (0.5, 0.2, 0.8)


def _quantiles(times: list[float]) -> list[float]:
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return q.tolist()


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False, min_reps: int | None = None,
            budget_s: float | None = None) -> tuple[list[float], str]:
    """``([median, p20, p80] ms, timer)`` of ``fn()``: ``do_bench`` on CUDA (warm-up and repetitions by wall time),
    else a ``perf_counter`` loop after one warm-up call, at least ``min_reps`` calls and up to ``budget_s`` s."""
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (10, 50) if quick else (25, 300)
        q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        return [float(v) for v in q], "triton.testing.do_bench"
    min_reps = min_reps if min_reps is not None else (3 if quick else 10)
    budget_s = budget_s if budget_s is not None else (1.0 if quick else 5.0)
    fn()  # warm-up
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - t_start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times), "perf_counter"


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, *, rotate: bool = False
                      ) -> dict[str, list[float]]:
    """CPU: one call of every provider per round, ``rounds`` rounds after a warm-up round; ``{name: [ms per round]}``
    (round ``r`` of every provider ran side by side: paired ratios). ``rotate``: each round starts one provider
    later (no provider always runs first)."""
    for f in fns.values():
        f()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if rotate else names
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int, *, rotate: bool = False
                   ) -> dict[str, list[float]]:
    """:func:`interleaved_times` summarised: ``{name: [median, p20, p80] ms}``."""
    return {k: _quantiles(v) for k, v in interleaved_times(fns, rounds, rotate=rotate).items()}


def bootstrap_ci(values, stat: Callable, *, reps: int = 2000, level: float = 0.9, seed: int = 0
                 ) -> tuple[float, float, float]:
    """``(stat(values), low, high)``: a percentile bootstrap interval of ``stat`` over resamples of ``values`` (a
    list of per-round records, resampled whole so paired quantities stay paired)."""
    import random

    rng = random.Random(seed)
    n = len(values)
    boots = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(reps))
    lo, hi = boots[int((1 - level) / 2 * reps)], boots[min(reps - 1, int((1 + level) / 2 * reps))]
    return stat(values), lo, hi


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory of one call of ``fn`` above what was allocated before it, in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if sha and dirty else "")
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def env_row(device: torch.device) -> dict:
    """The environment columns every benchmark row starts with."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "unavailable"
    import mat_kernels

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name(device),
            "git_commit": git_commit(), "torch": torch.__version__, "triton": triton_version,
            "mat_kernels": mat_kernels.__version__}


DEFAULT_KEY = ("op", "provider", "shape", "dtype", "device")


def upsert_csv(path: str, rows: Iterable[dict], *, key: tuple[str, ...] = DEFAULT_KEY,
               fields: list[str] | None = None) -> int:
    """Write ``rows`` into the CSV at ``path``: earlier rows with the same values of ``key`` (the columns both have)
    are replaced, the others kept; columns are the union, ``fields`` (or the first row's) first. Returns the number
    of rows written from ``rows``."""
    rows = [dict(r) for r in rows]
    old: list[dict] = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))

    def k(r: dict) -> tuple:
        return tuple(str(r.get(c, "")) for c in key)

    new_keys = {k(r) for r in rows}
    kept = [r for r in old if k(r) not in new_keys]
    columns = list(fields or (rows[0].keys() if rows else []))
    for r in kept + rows:
        columns += [c for c in r if c not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(kept + rows)
    return len(rows)

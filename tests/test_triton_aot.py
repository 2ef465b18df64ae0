"""Ahead-of-time compile checks of every Triton kernel, on a machine without a GPU (issue 11).

``benchmarks/triton_static.py`` compiles each kernel for sm_90 and sm_80 exactly as the launch code launches it
(a stand-in driver turns ``kernel[grid](...)`` into ``kernel.warmup``) on one BERT-base layer, and reads registers,
spills and tensor-core instructions from the cubin (cuobjdump ships in the triton wheel), and the launches and host
copies of a steady-state call. A change that makes a kernel spill, drops tensor cores for TF32/bf16, copies from
the host per call or adds launches fails here.

Workloads (n samples, T tokens of one BERT-base layer: fused QKV with bias, output projection columns, FFN):
* ``default``: n = 32, T = 128, ``method="auto"``: the Gram dispatcher's choice, the tile-local kernel for bf16
  and the two-kernel route for fp32 and TF32 (predicted faster there despite its launches);
* ``local``: the same layer with the tile-local kernel forced (``kernel="triton-local"``) for every dtype;
* ``fused``: n = 32, T = 32, ``method="psg"``, the fused per-sample-gradient + Gram kernel forced
  (``kernel="triton-fused"``; the dispatcher takes it for fp32/TF32 there; for bf16 it predicts the tile-local
  kernel about as fast);
* ``ghost``: n = 8, T = 32, ``method="ghost"``: the ghost kernel with its segments spread over the grid.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "triton_static.py")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
pytestmark = pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="no cuobjdump in the triton wheel")

WORKLOADS = {
    "default": ["--arch", "90", "80", "--n", "32", "--T", "128"],
    "local": ["--arch", "90", "80", "--n", "32", "--T", "128", "--psg", "local"],
    "fused": ["--arch", "90", "80", "--n", "32", "--T", "32", "--method", "psg", "--psg", "fused"],
    "ghost": ["--arch", "90", "--n", "8", "--T", "32", "--method", "ghost"],
}
TWO_KERNEL = {"_psg_fwd_kernel", "_segment_gram_fwd_kernel"}
KERNELS = {
    "default": {"fp32": TWO_KERNEL, "tf32": TWO_KERNEL, "bf16": {"_psg_gram_local_kernel"}},
    "local": {"_psg_gram_local_kernel"},
    "fused": {"_psg_gram_fused_kernel"},
    "ghost": {"_ghost_gram_fwd_kernel"},
}


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = {}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for name, args in WORKLOADS.items():
        path = tmp_path_factory.mktemp("aot") / f"{name}.json"
        r = subprocess.run([sys.executable, SCRIPT, *args, "--json", str(path)], env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_no_kernel_spills(figures, workload):
    for r in figures[workload]:
        for k in r["kernels"]:
            assert k["stack"] == 0 and k["local"] == 0 and k["spill_ld_st"] == 0, (r["arch"], r["dtype"], k)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_tensor_cores_for_tf32_and_bf16(figures, workload):
    for r in figures[workload]:
        for k in r["kernels"]:
            tensor = k["hgmma"] + k["hmma"]
            if r["dtype"] in ("tf32", "bf16"):
                assert tensor > 0, (r["arch"], r["dtype"], k)
            else:  # IEEE fp32 stays off the tensor cores (the exact default)
                assert tensor == 0, (r["arch"], r["dtype"], k)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_launch_code_takes_the_planned_kernels(figures, workload):
    for r in figures[workload]:
        want = KERNELS[workload]
        want = want[r["dtype"]] if isinstance(want, dict) else want
        assert {k["name"] for k in r["kernels"]} == want, r["kernels"]


def test_tile_local_kernel_runs_wgmma_on_sm90(figures):
    """The tile-local kernel's per-sample dot (64 x 64 tiles) lowers to wgmma (HGMMA) on sm_90 for TF32 and bf16;
    its small [n, n] Gram dot stays HMMA."""
    for r in figures["local"]:
        if r["arch"] == 90 and r["dtype"] in ("tf32", "bf16"):
            assert all(k["hgmma"] > 0 and k["hmma"] > 0 for k in r["kernels"]), r["kernels"]


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_no_host_copies_and_few_launches(figures, workload):
    """Steady state: index tensors are cached per (layout, device); per linear one zero-fill and one finiteness
    reduction besides the Triton kernels. The fused, tile-local and ghost kernels are one launch per linear: 12 per
    layer (the two-kernel route launches two kernels per scratch chunk)."""
    for r in figures[workload]:
        assert r["host_copies"] == 0 and r["host_copies_unchecked"] == 0, r["torch_ops"]
        assert r["torch_launches"] <= 8, r["torch_ops"]
        if workload in ("local", "fused", "ghost") or r["dtype"] == "bf16":
            assert r["triton_launches"] == 4 and r["launches"] <= 12, r


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_host_syncs(figures, workload):
    """With check_finite=False a layer call reads nothing back to the host (no .item(), no float(t)): the
    precondition for capturing it in a CUDA graph (the capture itself needs a GPU: benchmarks/gpu_check.sh). The
    default check_finite=True costs one sync per linear (the sum of its Grams)."""
    for r in figures[workload]:
        assert r["syncs_unchecked"] == 0, r
        assert r["syncs"] == 4, r


def test_floors_are_reported(figures):
    """The figures behind NOTES.md §7: FLOPs and bytes the kernels move, floors at H100 ceilings."""
    r = next(r for r in figures["default"] if r["arch"] == 90 and r["dtype"] == "bf16")
    assert r["flops"] > 2 * 32 * 128 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)  # at least the psg work
    assert r["hbm_bytes"] > 0 and min(r["floor_ms"].values()) > 0


# ---------------------------------------------------------------------------------------------------------------
# the sparse-update backward (mat_kernels/kernels/triton_sparse_grad.py) and the frozen-slice optimizer step
# ---------------------------------------------------------------------------------------------------------------
SPARSE_KERNELS = {"_masked_weight_grad_kernel", "_masked_input_grad_kernel"}
OPTIMIZER_KERNELS = {"_masked_adam_kernel"}  # elementwise: no dots, so no tensor cores to ask of it
MAX_LAUNCHES = 4  # one sparse linear's backward + optimizer step, whatever the mask


@pytest.fixture(scope="module")
def sparse_figures(tmp_path_factory):
    """BERT-base QKV (row blocks) and output projection (column blocks), every mask of SPARSE_MASKS, dw and detach,
    fp32/TF32/bf16, sm_90 and sm_80. T = 256 tokens: the launches do not depend on T, and the kernels are the same
    binaries at T = 4096 (both multiples of 16)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path_factory.mktemp("aot") / "sparse.json"
    r = subprocess.run([sys.executable, SCRIPT, "--workload", "sparse", "--arch", "90", "80", "--tokens", "256",
                        "--json", str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(path.read_text())


def test_sparse_kernels_no_spills_and_tensor_cores(sparse_figures):
    for r in sparse_figures:
        assert {k["name"] for k in r["kernels"]} == SPARSE_KERNELS | OPTIMIZER_KERNELS, r["kernels"]
        for k in r["kernels"]:
            assert k["stack"] == 0 and k["local"] == 0 and k["spill_ld_st"] == 0, (r["arch"], r["dtype"], k)
            if k["name"] in OPTIMIZER_KERNELS:
                assert k["hgmma"] + k["hmma"] == 0, k
            elif r["dtype"] in ("tf32", "bf16"):
                assert (k["hgmma"] if r["arch"] == 90 else k["hmma"]) > 0, (r["arch"], r["dtype"], k)
            else:
                assert k["hgmma"] + k["hmma"] == 0, (r["arch"], r["dtype"], k)


def test_sparse_step_reads_and_copies_nothing_from_the_host(sparse_figures):
    for r in sparse_figures:
        assert r["host_copies"] == 0 and r["syncs"] == 0, r


def test_row_block_layer_backward_and_optimizer_take_at_most_four_launches(sparse_figures):
    """Fused QKV (row blocks, bias owned by its heads): dX (cuBLAS, or the Triton kernel under detach), dW and db
    (one Triton launch), the step counts (one multi-tensor add) and torch's fused AdamW over the active segments."""
    for r in sparse_figures:
        for st in r["steps"]:
            if st["layer"] == "qkv":
                assert st["launches"] <= MAX_LAUNCHES, (r["arch"], r["dtype"], st)


def test_column_block_layer_backward_and_optimizer_take_at_most_four_launches(sparse_figures):
    """Output projection (column blocks, shared bias): dX (cuBLAS, or the Triton kernel under detach), dW and db (one
    Triton launch), the step counts (one multi-tensor add, the weight's per-run counts advanced by their activity)
    and the masked AdamW kernel over the whole weight with the bias as its companion: its active segments are
    strided column ranges, which torch's fused AdamW would take only as copies (9-33 launches before)."""
    for r in sparse_figures:
        for st in r["steps"]:
            if st["layer"] == "out_proj":
                assert st["launches"] <= MAX_LAUNCHES, (r["arch"], r["dtype"], st)


def test_sparse_kernels_compute_only_the_active_heads_tiles(sparse_figures):
    """A tile runs its MMA loop when any row (column) it covers is active, so along the blocked axis the tiles are
    one 64-wide head: for BERT-base masks (heads aligned to 64) the share of dW tiles computed, and under detach of
    the dX tiles, equals the active share exactly, interleaved masks included (with 128-wide tiles an interleaved
    half mask computed every dW tile)."""
    for r in sparse_figures:
        for st in r["steps"]:
            assert st["dw_tile_share"] == st["active_share"], (r["arch"], r["dtype"], st)
            if st["mode"] == "detach":
                assert st["dx_tile_share"] == st["active_share"], (r["arch"], r["dtype"], st)

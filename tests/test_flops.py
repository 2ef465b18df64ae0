"""FLOPs accounting: torch.utils.flop_counter against hand counts on the dense path, and the sparse weight-gradient
ops counted as executed (active blocks only)."""
import torch
import torch.nn as nn

import mat_kernels as mk
from mat_kernels.train.flops import FlopsLedger, StepFlops, count_flops, linear_step_flops


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 30), nn.Tanh(), nn.Linear(30, 9), nn.Tanh(), nn.Linear(9, 5))


def _step(model, x):
    model(x).square().sum().backward()


def test_dense_step_matches_hand_count():
    model = _mlp()
    x = torch.randn(7, 3, 12, requires_grad=True)  # 21 tokens; dX of the first layer is computed too
    flops, _ = count_flops(_step, model, x)
    tokens = 21
    want = sum(linear_step_flops(tokens, lin.in_features, lin.out_features)
               for lin in model if isinstance(lin, nn.Linear))
    assert flops == want


def test_sparse_step_counts_only_executed_weight_gradients():
    model = _mlp()
    x = torch.randn(7, 3, 12, requires_grad=True)
    dense, _ = count_flops(_step, model, x)
    model[0] = mk.SparseUpdateLinear.from_linear(model[0], row_blocks=[(0, 10), (10, 10), (20, 10)])
    model[2] = mk.SparseUpdateLinear.from_linear(model[2], col_blocks=3)
    model[0].set_active([True, False, False])       # 1/3 of the rows: dW 2·21·10·12
    model[2].set_active([False, False, False])      # wholly frozen: no dW GEMM
    sparse, _ = count_flops(_step, model, x)
    skipped = 2 * 21 * 20 * 12 + 2 * 21 * 30 * 9
    assert sparse == dense - skipped
    model[0].set_active([True, True, True])
    model[2].set_active([True, True, True])
    assert count_flops(_step, model, x)[0] == dense


def test_step_flops_cache_and_ledger():
    model = _mlp()
    counter = StepFlops()
    x = torch.randn(4, 12, requires_grad=True)
    f1, _ = counter(("shape", 0), _step, model, x)
    f2, _ = counter(("shape", 0), _step, model, x)
    assert f1 == f2 and counter.counted_steps == 1
    ledger = FlopsLedger()
    for _ in range(3):
        ledger.add_step(f1)
    ledger.add_measurement(1, 100)
    assert ledger.total() == 3 * f1 + 100 and ledger.total(upto_step=1) == f1
    assert 0 < ledger.measurement_share() < 0.01 + 100 / (3 * f1)


def test_sparse_formulas_count_without_a_manual_call():
    """A fresh process: FlopCounterMode on a step with a frozen block in each sparse layer counts the dense step's
    FLOPs less exactly the frozen blocks' dW GEMMs (the formulas register when the ops load, with no call). Each
    layer keeps a block frozen: an all-active layer runs as a plain linear and would not reach the formulas."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import copy, torch, torch.nn as nn
        from torch.utils.flop_counter import FlopCounterMode
        import mat_kernels as mk
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(12, 30), nn.Tanh(), nn.Linear(30, 9))
        sparse = copy.deepcopy(dense)
        sparse[0] = mk.SparseUpdateLinear.from_linear(sparse[0], row_blocks=3)
        sparse[2] = mk.SparseUpdateLinear.from_linear(sparse[2], col_blocks=3)
        sparse[0].set_active([True, False, True])  # rows 10-19 of 30 frozen
        sparse[2].set_active([True, True, False])  # columns 20-29 of 30 frozen
        x = torch.randn(5, 4, 12, requires_grad=True)
        counts = []
        for model in (dense, sparse):
            with FlopCounterMode(display=False) as mode:
                model(x).square().sum().backward()
            counts.append(mode.get_total_flops())
        print(counts[0], counts[1])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    frozen_dw = 2 * 20 * 10 * 12 + 2 * 20 * 9 * 10  # 20 tokens; layer 0: 10 rows x 12; layer 2: 9 x 10 columns
    assert int(out[0]) > 0 and int(out[1]) == int(out[0]) - frozen_dw

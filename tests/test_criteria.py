"""Criteria that separate agreement from magnitude (mat_kernels.train.policy.module_scores), the held-out alignment
from the cross block, the per-layer shuffle control and the score plot (mat_kernels.plot), against explicit
per-sample gradients in float64."""
import pytest
import torch

import mat_kernels as mk
from mat_kernels import plot
from mat_kernels.train.policy import CRITERIA, criterion_flops, module_scores, shuffle_within, threshold_mask

RTOL = 1e-12  # float64 end to end: only summation order differs


def _grads(M=3, n=7, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(M, n, p, generator=g, dtype=torch.float64)
    G[1] += 2.0  # a module whose samples agree (a shared component)
    G[2] *= 10.0  # a module with large gradients that do not agree
    return G, G @ G.transpose(1, 2)


def _close(a, b):
    assert torch.allclose(a, b, rtol=RTOL, atol=0), (a, b)


@pytest.mark.parametrize("n", [2, 7])
def test_normalised_criteria_match_their_formulas_on_per_sample_gradients(n):
    G, theta = _grads(n=n)
    total = G.sum(1).pow(2).sum(-1)  # ‖Σ_i g_i‖²
    sq = G.pow(2).sum((1, 2))  # Σ_i ‖g_i‖²
    _close(module_scores(theta, "coherence"), total / (n * sq))
    _close(module_scores(theta, "offdiag_coherence"), (total - sq) / ((n - 1) * sq))
    lam = torch.linalg.eigvalsh(theta)[:, -1]
    _close(module_scores(theta, "lambda_ratio", lam=lam), lam / sq)
    assert torch.allclose(module_scores(theta, "lambda"), lam, rtol=1e-5)
    # magnitude does not move the normalised criteria; it moves λ and the trace
    scaled = theta.clone()
    scaled[0] *= 100.0
    for c in ("coherence", "offdiag_coherence", "lambda_ratio"):
        assert torch.allclose(module_scores(scaled, c)[0], module_scores(theta, c)[0], rtol=1e-5)
    assert torch.allclose(module_scores(scaled, "trace")[0], 100 * module_scores(theta, "trace")[0], rtol=RTOL)


def test_agreement_ranks_above_magnitude():
    _, theta = _grads(n=16)
    coh, lam = module_scores(theta, "coherence"), module_scores(theta, "lambda")
    assert coh.argmax() == 1 and lam.argmax() == 2  # λ picks the large module, coherence the agreeing one


def test_heldout_alignment_is_the_inner_product_of_mean_gradients():
    G, _ = _grads(n=9)
    n_tr = 5
    theta = G @ G.transpose(1, 2)  # the Gram over the training probe (5) then the held-out probe (4)
    want = (G[:, :n_tr].mean(1) * G[:, n_tr:].mean(1)).sum(-1)
    _close(module_scores(theta, "heldout", n_train=n_tr), want)
    # with a held-out probe the other criteria read the training block only
    _close(module_scores(theta, "trace", n_train=n_tr), G[:, :n_tr].pow(2).sum((1, 2)))
    active, tau = threshold_mask(module_scores(theta, "heldout", n_train=n_tr), "positive")
    assert tau == 0.0 and torch.equal(active, want > 0)


def test_zero_gradient_modules_score_zero():
    theta = torch.zeros(2, 4, 4, dtype=torch.float64)
    theta[1] = torch.eye(4)
    for c in ("coherence", "offdiag_coherence", "lambda_ratio"):
        assert module_scores(theta, c)[0] == 0


def test_bad_criterion_input():
    _, theta = _grads()
    with pytest.raises(ValueError, match="criterion must be one of"):
        module_scores(theta, "nope")
    with pytest.raises(ValueError, match="needs the Gram over a training and a held-out probe"):
        module_scores(theta, "heldout")
    with pytest.raises(ValueError, match="n_train must be"):
        module_scores(theta, "heldout", n_train=7)
    with pytest.raises(ValueError, match="grams must be"):
        module_scores(theta[0], "trace")
    assert criterion_flops("coherence", 3, 4) == 3 * 16 and criterion_flops("lambda", 1, 2) == 4 + 10
    assert criterion_flops("coherence", 3, 4, with_lambda=True) == 3 * 16 + 256
    # λ from the training probe's block only (a held-out probe follows it in the Gram): the solve is that block's
    assert criterion_flops("heldout", 3, 4, with_lambda=True, n_lambda=2) == 3 * 16 + (3 * 4 * 8) // 3
    with pytest.raises(ValueError, match="n_lambda"):
        criterion_flops("lambda", 1, 4, n_lambda=5)
    assert set(CRITERIA) >= {"coherence", "offdiag_coherence", "lambda_ratio", "heldout"}


def test_shuffle_keeps_the_count_of_each_layer_and_kind():
    active = torch.tensor([True, False, False, True, True, False, False])
    groups = [[0, 1, 2], [3, 4], [5, 6]]
    seen = set()
    for seed in range(20):
        out = shuffle_within(active, groups, torch.Generator().manual_seed(seed))
        assert [int(out[g].sum()) for g in groups] == [1, 2, 0]
        seen.add(tuple(out.tolist()))
    assert len(seen) == 3  # the one active module of the first group moves
    with pytest.raises(ValueError, match="cover every module"):
        shuffle_within(active, [[0, 1]])
    with pytest.raises(ValueError, match="share"):
        shuffle_within(active, [[0, 1], [1, 2, 3, 4, 5, 6]])


def test_score_plot_from_a_log(tmp_path):
    names = ["l0.head0", "l0.head1", "l0.ffn", "l1.head0", "l1.head1", "l1.ffn"]
    kinds = ["head", "head", "ffn", "head", "head", "ffn"]
    log = [{"step": 10 * t, "score": [1.0 + t + m for m in range(6)], "active": [m % 2 == t % 2 for m in range(6)]}
           for t in range(4)]
    order, steps, score, active = plot.score_table(log, names, kinds)
    assert [names[m] for m in order] == ["l0.ffn", "l0.head0", "l0.head1", "l1.ffn", "l1.head0", "l1.head1"]
    assert steps == [0, 10, 20, 30] and score.shape == (4, 6)
    assert active[0].tolist() == [True, True, False, False, False, True]
    assert plot.layer_of("model.layers.3.self_attn.group0") == "model.layers.3.self_attn"
    assert plot.layer_of("l1.head1.out") == "l1" and plot.layer_of("conv") == "conv"
    out = plot.scores(log, str(tmp_path / "s.png"), names=names, kinds=kinds)
    assert (tmp_path / "s.png").stat().st_size > 1000 and out.endswith("s.png")
    with pytest.raises(ValueError, match="names= and kinds="):
        plot.scores(log, str(tmp_path / "t.png"))
    with pytest.raises(ValueError, match="non-empty"):
        plot.score_table([], names, kinds)
    with pytest.raises(ValueError, match="6 scores, but 7 module names"):
        plot.score_table(log, names[:5] + ["x", "y"], kinds + ["z"])


def test_score_plot_of_a_mat_run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 3),
                                torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2, 3))
    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1, probe=(x, y),
                 lambda_kwargs={"backend": "torch"})
    for _ in range(3):
        mat.backward(torch.nn.functional.cross_entropy(model(x), y))
        mat.step()
        mat.zero_grad()
    plot.scores(mat, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000
    mat.close()


# --------------------------------------------------------------------------------------------------------------
# MAT: held-out alignment, the shuffle and fixed controls
# --------------------------------------------------------------------------------------------------------------
def _cnn():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 3),
                               torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 2 * 2, 3))


def _xy(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(mat, model, steps=4):
    for s in range(steps):
        x, y = _xy(6, 100 + s)
        mat.backward(torch.nn.functional.cross_entropy(model(x), y))
        mat.step()
        mat.zero_grad()


def test_mat_heldout_alignment_matches_the_oracle_and_decides_by_sign():
    model = _cnn()
    probe, heldout = _xy(5, 1), _xy(3, 2)
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1, gate_after=1,
                 probe=probe, heldout=heldout, output="loss", criterion="heldout", temporal_rule=False,
                 lambda_kwargs={"backend": "torch"})
    assert mat.policy["policy"] == "positive"
    res = mat.measure()
    x = torch.cat([probe[0], heldout[0]])
    y = torch.cat([probe[1], heldout[1]])
    ref = mk.model_lambda_max(model.eval(), x, labels=y, output="loss", specs=mat.specs, return_grams=True,
                              backend="torch")
    model.train()
    want = module_scores(ref.grams.double(), "heldout", n_train=5)
    assert torch.allclose(res.scores, want, rtol=1e-4, atol=1e-9)
    lam_train = torch.linalg.eigvalsh(ref.grams.double()[:, :5, :5])[:, -1]
    assert torch.allclose(res.values.double(), lam_train, rtol=1e-4)  # λ (the logs) over the training probe
    _train(mat, model, 1)
    assert mat.log[-1]["active"] == (torch.tensor(mat.log[-1]["score"]) > 0).tolist()
    mat.close()


def test_mat_heldout_bad_input():
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = _xy(4, 0)
    with pytest.raises(ValueError, match="needs a held-out probe: pass heldout="):
        mk.MAT(model, opt, probe=probe, output="loss", criterion="heldout")
    with pytest.raises(ValueError, match="pass probe="):
        mk.MAT(model, opt, heldout=probe, output="loss", criterion="heldout")
    with pytest.raises(ValueError, match="output='loss'"):
        mk.MAT(model, opt, probe=probe, heldout=probe, criterion="heldout")
    with pytest.raises(TypeError, match="heldout must be"):
        mk.MAT(model, opt, probe=probe, heldout=3, output="loss", criterion="heldout")
    with pytest.raises(ValueError, match="policy must be one of"):
        mk.MAT(model, opt, policy="nope")


def _lm_run(policy, steps=5):
    from models import TinyLM

    torch.manual_seed(2)
    model = TinyLM()
    ids = lambda seed: torch.randint(0, 23, (4, 5), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    probe = ids(99)
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1, gate_after=1,
                 probe=(probe, probe), policy=policy, temporal_rule=False, seed=3, lambda_kwargs={"backend": "torch"})
    for s in range(steps):
        x = ids(s)
        logits = model(x)
        mat.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)))
        mat.step()
        mat.zero_grad()
    out = [torch.tensor(e["active"]) for e in mat.log], mat._layer_kind
    mat.close()
    return out


def test_mat_shuffle_keeps_the_count_of_each_layer_and_kind_and_moves_the_modules():
    """Same initial weights and batches: at the first decision (same weights, same scores) the shuffle control
    has the mean rule's active count in every layer and kind, and over the run it picks other modules."""
    mean, groups = _lm_run("mean")
    shuffled, _ = _lm_run("shuffle")
    assert any(len(g) > 1 for g in groups)  # heads: several modules per layer and kind
    assert [int(shuffled[0][g].sum()) for g in groups] == [int(mean[0][g].sum()) for g in groups]
    assert any(not torch.equal(a, b) for a, b in zip(mean, shuffled))


def test_mat_fixed_keeps_the_first_decision():
    model = _cnn()
    mat = mk.MAT(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, interval=1, gate_after=1,
                 probe=_xy(5, 1), policy="fixed", temporal_rule=False, lambda_kwargs={"backend": "torch"})
    _train(mat, model, 4)
    first = mat.log[0]["active"]
    assert all(e["active"] == first for e in mat.log) and mat.state_dict()["fixed"].tolist() == first
    mat.close()

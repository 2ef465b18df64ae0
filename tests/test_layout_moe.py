"""Layout ``moe_experts`` (mat_kernels/layouts/moe.py): dense-dispatch experts are modules; token-routed ones are
refused with the reason. Measured with the shared oracle runner (tests/oracle.py)."""
import pytest
import torch
import torch.nn as nn
from oracle import _gen, run_and_check

import mat_kernels as mk


class SoftMoE(nn.Module):
    """Every expert sees every token (dense dispatch), outputs mixed by a softmax gate."""

    def __init__(self, d=6, experts=3):
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, d))
                                     for _ in range(experts))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        w = torch.softmax(self.gate(x), -1)
        return self.head(sum(w[..., e:e + 1] * ex(x) for e, ex in enumerate(self.experts)))


def test_moe_experts_dense_dispatch():
    torch.manual_seed(8)
    model = SoftMoE().eval()
    res = run_and_check(model, torch.randn(4, 5, 6, generator=_gen(12)), torch.randint(0, 4, (4, 5)))
    assert list(res.names) == ["experts.0", "experts.1", "experts.2"]
    assert all(s.kind == "expert" for s in res.specs)


class RoutedMoE(SoftMoE):
    def forward(self, x):  # top-1 routing with tokens gathered across samples: the sample axis is lost
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, ex in enumerate(self.experts):
            idx = (choice == e).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_add(0, idx, ex(flat[idx]))
        return self.head(out.view_as(x))


def test_token_routed_moe_is_refused_with_reason():
    model = RoutedMoE().eval()
    with pytest.raises(ValueError, match="sample axis is lost"):
        mk.model_lambda_max(model, torch.randn(4, 5, 6), labels=torch.randint(0, 4, (4, 5)), backend="torch")

"""Layout ``ffn`` (mat_kernels/layouts/ffn.py): a feed-forward block's linears are one module, whatever the naming
(pairs and gated triples), measured with the shared oracle runner (tests/oracle.py)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import _gen, run_and_check


class Block(nn.Module):
    """A residual FFN block named like one of the families: ``names`` = (in, out) or (up, down, gate)."""

    def __init__(self, names, d=6, hidden=10):
        super().__init__()
        self.names = names
        for i, n in enumerate(names):
            parent = self
            *path, leaf = n.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            shape = (hidden, d) if i != 1 else (d, hidden)
            parent.add_module(leaf, nn.Linear(shape[1], shape[0]))

    def _get(self, n):
        m = self
        for part in n.split("."):
            m = getattr(m, part)
        return m

    def forward(self, x):
        up = self._get(self.names[0])(x)
        if len(self.names) == 3:
            up = F.silu(self._get(self.names[2])(x)) * up
        return x + self._get(self.names[1])(torch.tanh(up))


class Net(nn.Module):
    def __init__(self, names, d=6, classes=4):
        super().__init__()
        self.block, self.head = Block(names, d), nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.block(x)).mean(1)


@pytest.mark.parametrize("names", [("intermediate.dense", "output.dense"), ("fc1", "fc2"), ("linear1", "linear2"),
                                   ("up_proj", "down_proj", "gate_proj"), ("w1", "w2", "w3"),
                                   ("dense_h_to_4h", "dense_4h_to_h")])
def test_ffn_block_is_one_module(names):
    torch.manual_seed(2)
    model = Net(names)
    res = run_and_check(model, torch.randn(3, 5, 6, generator=_gen(3)), torch.tensor([0, 3, 1]))
    assert list(res.names) == ["block.ffn"]
    spec = res.specs[0]
    assert sorted(sl.weight for sl in spec.slices) == sorted(f"block.{n}.weight" for n in names)

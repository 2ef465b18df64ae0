"""Layer type ``conv2d`` (mat_kernels/layers/conv2d.py, discovered by the ``layer_types`` layout): every
``nn.Conv2d`` (stride, groups, dilation, string padding, padding modes, eval-mode BatchNorm between), measured with
the shared oracle runner (tests/oracle.py)."""
import pytest
import torch
import torch.nn as nn
from models import small_cnn
from oracle import _gen, run_and_check


def test_cnn_conv_layers_with_eval_batchnorm_stride_groups():
    torch.manual_seed(5)
    model = small_cnn()
    res = run_and_check(model, torch.randn(5, 2, 7, 7, generator=_gen(9)), torch.randint(0, 4, (5,)))
    assert list(res.names) == ["0", "3"]
    assert "unrecognised layout" in res.unclaimed["6.weight"]


@pytest.mark.parametrize("padding,mode", [("same", "zeros"), ("valid", "zeros"), (1, "reflect"), ("same", "circular")])
def test_cnn_string_padding_and_padding_modes(padding, mode):
    """VGG-style convs with string padding (even kernel: 'same' pads one more on the right) and non-zero modes."""
    torch.manual_seed(15)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=padding, padding_mode=mode), nn.ReLU(),
        nn.Conv2d(4, 4, (2, 3), padding=padding, padding_mode=mode, dilation=(1, 2) if padding != "same" else 1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    ).eval()
    res = run_and_check(model, torch.randn(4, 2, 7, 8, generator=_gen(10)), torch.tensor([0, 2, 1, 1]))
    assert list(res.names) == ["0", "2"]

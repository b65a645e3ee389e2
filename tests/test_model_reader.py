"""The one model reader: cells, structure and the layer-wise calibration read a model through the
graph reader, so they agree on the layers and their forward order."""

from __future__ import annotations

import torch
from torch import nn

from optbrain.cells import cells
from optbrain.curvature.calibration import calibration_hessians, supported_layers


class Reordered(nn.Module):
    """Modules declared in another order than the forward calls them; one never called."""

    def __init__(self):
        super().__init__()
        self.second = nn.Linear(6, 2)
        self.unused = nn.Linear(2, 2)
        self.first = nn.Linear(4, 6)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_supported_layers_follow_the_forward_then_the_module_tree():
    model = Reordered()
    assert list(supported_layers(model)) == ["first", "second", "unused"]
    units = [c.layer for c in cells(model) if c.kind != "input"]
    assert units == ["first"] * 6  # cells agree: 'first' feeds 'second'
    hs = calibration_hessians(model, [torch.randn(5, 4)], ["first", "second"])
    assert [h.H.shape[-1] for h in hs.values()] == [4, 6]


def test_untraceable_models_keep_module_order():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(3, 3)
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else self.a(x)

    assert list(supported_layers(Branch())) == ["b", "a"]

"""Options that do not apply, unsafe files and what the quantisers' errors name."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from optbrain import cli
from optbrain.errors import CalibrationError, UnsafeFileError
from optbrain.quantize import GPTQ, OBQ, RTN, Joint, QuantizationError, load_quantized

FIXTURE = Path(__file__).with_name("fixtures_task.py")


def _net():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


# ------------------------------------------------------------------------- act_order
@pytest.mark.parametrize(
    "make",
    [lambda: RTN(4, act_order=True), lambda: OBQ(4, act_order=True),
     lambda: Joint(4, quantizer="obq", act_order=True)],
    ids=["rtn", "obq", "joint-obq"],
)  # fmt: skip
def test_act_order_where_it_does_not_apply_is_refused(make):
    with pytest.raises(ValueError, match="act_order"):
        make()


def test_act_order_still_works_where_it_applies():
    assert GPTQ(4, act_order=True).spec.act_order
    assert Joint(4, act_order=True).spec.act_order  # GPTQ after pruning


@pytest.mark.parametrize("method", ["rtn", "obq"])
def test_cli_act_order_with_rtn_or_obq_is_a_clear_error(method, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", "--task", f"{FIXTURE}:task", "--method", method, "--act-order"]
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "act_order" in err and method.upper() in err and "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------- files
class _RunsCode:
    """Unpickling this runs ``os.system`` (what a malicious file does)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_load_quantized_refuses_pickled_code_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "q.pt"
    torch.save({"format": "optbrain-quantized", "state": _RunsCode()}, path)
    with pytest.raises(UnsafeFileError, match="pickled objects or code"):
        load_quantized(_net(), path)
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------- what errors name
class _TiedOnly(nn.Module):
    """One Linear registered under two names: its weight is tied to itself."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_no_layer_to_quantise_says_why_each_was_skipped():
    with pytest.raises(QuantizationError, match=r"no layer to quantise.*a \(weight tied to b"):
        GPTQ(4).apply(_TiedOnly(), torch.randn(8, 4))


def test_nan_calibration_inputs_name_the_layer():
    model = _net()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 4)
    with torch.no_grad():  # finite for the first layer, NaN after it: only layer '2' sees NaN
        model[0].bias[0] = float("nan")
    with pytest.raises(CalibrationError, match=r"layer '2' \(Linear\) received NaN"):
        GPTQ(4, sequential="none").apply(model, x)
    assert all(torch.equal(v, before[k]) or k == "0.bias" for k, v in model.state_dict().items())

import nncf
import pytest
import torch

import nncf_calibtip as nc
from nncf_calibtip.calibration.data import batch_size_of, item_devices


def test_item_devices_reads_nested_items():
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert item_devices({"x": (cpu, [meta]), "flag": 3}) == {torch.device("cpu"), torch.device("meta")}
    assert item_devices(7) == set()


def test_inputs_on_another_device_than_the_model_fail_with_the_fix(tiny_model, calib_data):
    """(A CUDA model with CPU inputs fails the same way; "meta" stands in for the other device.)"""
    elsewhere = nncf.Dataset([calib_data[:32].to("meta")])
    with pytest.raises(ValueError, match="transform_fn put inputs on the model's device"):
        nc.quantize(tiny_model, elsewhere)
    rtn = nc.quantize(tiny_model, nncf.Dataset([calib_data[:32]]))
    with pytest.raises(ValueError, match="but the model is on cpu"):
        nc.refine(rtn, elsewhere, nc.BiasTuningConfig())


def test_batch_size_is_read_from_nested_items():
    x = torch.zeros(5, 3)
    assert batch_size_of(({"image": x, "flag": 1},)) == 5
    assert batch_size_of([7, (torch.tensor(1.0), x)]) == 5
    assert batch_size_of(torch.tensor(1.0)) == 1
    with pytest.raises(TypeError, match="holds no tensor with a batch dimension"):
        batch_size_of({"n": 3})


class _TakesOneDict(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(inputs["image"])).mean((2, 3)))


def test_a_model_taking_one_dict_gets_the_fix_and_then_works():
    torch.manual_seed(0)
    items = [{"image": t} for t in torch.randn(64, 3, 12, 12).split(16)]
    config = nc.QuantizationConfig(
        precision=nc.PrecisionConfig(4, 4), algorithms=(nc.AdaQuantConfig(iters=5, batch_size=8),)
    )
    model = _TakesOneDict()
    # NNCF passes a dict item as keyword arguments, which this forward does not take.
    with pytest.raises(TypeError, match=r"transform_fn return it wrapped in a tuple: \(item,\)"):
        nc.quantize(model, nncf.Dataset(items), config)
    q = nc.quantize(model, nncf.Dataset(items, lambda d: (d,)), config)
    assert [r["name"] for r in nc.get_result(q).reports["adaquant"]] == ["conv/conv2d/0", "fc/linear/0"]

import nncf
import pytest
import torch

import nncf_calibtip as nc
from nncf_calibtip.calibration.data import item_devices


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

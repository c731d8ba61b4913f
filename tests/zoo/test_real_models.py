"""Real-model checks (slow: they need data/ and minutes of CPU). Run with ``pytest -m slow``."""

import numpy as np
import pytest
import torch

import nncf_calibtip as nc
from nncf_calibtip.evaluation import ir_accuracy
from nncf_calibtip.zoo import experiment, fashion_mnist, resnet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def resnet_task():
    try:
        fashion_mnist.load()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not resnet.checkpoint_path().is_file():
        pytest.skip("trained ResNet-20 not cached: run `python -m nncf_calibtip.zoo.resnet`")
    return resnet.task()


def test_resnet_w4a8_adaquant_ir_close_to_fp32(resnet_task, tmp_path):
    task = resnet_task
    calib = experiment.calibration_dataset(task.calibration_pool, 512)
    q = nc.quantize(task.model, calib, nc.AdaQuantConfig(iters=100), precision=nc.PrecisionConfig(4, 8))
    example = torch.from_numpy(task.x_test[:1])
    fp = experiment.export_fp32(task.model, example, tmp_path / "fp.xml")
    res = nc.export_openvino(q, example, tmp_path / "q.xml", input_shape=[(-1, 1, 28, 28)])
    assert nc.check_ir_against_plan(res, nc.get_plan(q)) == []
    x, y = task.x_test[:3000], task.y_test[:3000]
    acc_fp, acc_q = ir_accuracy(fp, x, y), ir_accuracy(res.xml, x, y)
    assert acc_q >= acc_fp - 0.005
    assert np.isfinite(acc_q)

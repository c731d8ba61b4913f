import json

import nncf
import numpy as np
import pytest
import torch

import nncf_calibtip as nc
from nncf_calibtip.evaluation import compile_ir


def test_quantization_config_json_round_trip(tmp_path):
    cfg = nc.QuantizationConfig(
        precision=nc.PrecisionConfig(4, 4, layers={"a/conv2d/0": nc.LayerPrecision(8, 8)}),
        algorithms=(
            nc.AdaQuantConfig(mode="parallel", iters=10),
            nc.BNTuningConfig(target="batchnorm"),
            nc.BiasTuningConfig(loss="cosine", steps=5),
        ),
        subset_size=512,
    )
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert nc.QuantizationConfig.from_json(path) == cfg
    types = [a["type"] for a in json.loads(path.read_text())["algorithms"]]
    assert types == ["adaquant", "bn_tuning", "bias_tuning"]


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="'precison' was unexpected"):
        nc.QuantizationConfig.from_dict({"precison": {}})
    with pytest.raises(ValueError, match="type 'adaround' is not one of"):
        nc.QuantizationConfig.from_dict({"algorithms": [{"type": "adaround"}]})
    with pytest.raises(ValueError, match="subset_size"):
        nc.QuantizationConfig(subset_size=0)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))
    assert configs
    for path in configs:
        nc.QuantizationConfig.from_json(path)


def test_refine_adds_algorithms_to_a_quantized_model(tiny_model, calib_dataset, test_data):
    precision = nc.PrecisionConfig(4, 4, keep_first_last_8bit=False)
    q = nc.quantize(tiny_model, calib_dataset, nc.AdaQuantConfig(iters=10), precision=precision)
    with torch.no_grad():
        before = q(test_data)
    r = nc.refine(q, calib_dataset, nc.BNTuningConfig(), nc.BiasTuningConfig(steps=10))
    assert list(nc.get_result(r).reports) == ["adaquant", "bn_tuning", "bias_tuning"]
    with torch.no_grad():
        torch.testing.assert_close(q(test_data), before, rtol=0, atol=0)  # the input model is unchanged
    with pytest.raises(ValueError, match="not produced by nncf_calibtip.quantize"):
        nc.refine(tiny_model, calib_dataset, nc.BNTuningConfig())


def test_a_top_level_sequential_is_quantized_and_exported(calib_dataset, test_data, tmp_path):
    # NNCF 3.4 alone fails on a top-level nn.Sequential (it calls NNCF's hook storage as a layer).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 7 * 7, 10),
    ).eval()
    precision = nc.PrecisionConfig(4, 4, keep_first_last_8bit=False)
    q = nc.quantize(model, calib_dataset, nc.AdaQuantConfig(iters=20), precision=precision)
    assert type(model) is torch.nn.Sequential and len(model) == 7  # the caller's model is untouched
    assert isinstance(q, torch.nn.Sequential)
    assert sorted(nc.get_plan(q)) == ["0/conv2d/0", "3/conv2d/0", "6/linear/0"]
    rtn = nc.quantize(model, calib_dataset, precision=precision)
    with torch.no_grad():
        fp, out = model(test_data), q(test_data)
        assert (out - fp).pow(2).mean() < (rtn(test_data) - fp).pow(2).mean()
    res = nc.export_openvino(q, test_data[:1], tmp_path / "seq.xml", input_shape=[(-1, 3, 16, 16)])
    assert nc.check_ir_against_plan(res, nc.get_plan(q)) == []
    ov_out = compile_ir(res.xml)(test_data.numpy())[0]
    assert np.median(np.abs(ov_out - out.numpy())) <= 1e-4 * np.abs(out.numpy()).max()


class _Conv1dNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 16, 5, padding=2)
        self.bn = torch.nn.BatchNorm1d(16)
        self.c2 = torch.nn.Conv1d(16, 8, 1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean(-1))


class _TokenMLP(torch.nn.Module):
    """Linear layers on [batch, tokens, features] with LayerNorm, GELU and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.fc1 = torch.nn.Linear(16, 64)
        self.fc2 = torch.nn.Linear(64, 16)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))
        return self.head(x.mean(1))


class _Conv3dDeconvNet(torch.nn.Module):
    """A Conv3d with BatchNorm, and a ConvTranspose2d that AdaQuant does not fit (NNCF's 8 bits)."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = torch.nn.Conv3d(2, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm3d(8)
        self.up = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.out = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.c3(x))).mean(2)
        return self.out(torch.relu(self.up(y)))


@pytest.mark.parametrize(
    ("cls", "shape", "layers"),
    [
        (_Conv1dNet, (4, 4, 32), 3),
        (_TokenMLP, (4, 10, 16), 3),
        (_Conv3dDeconvNet, (2, 2, 4, 8, 8), 2),
    ],
)
def test_other_layer_kinds_are_fitted_and_exported(cls, shape, layers, tmp_path):
    torch.manual_seed(0)
    model = cls().eval()
    gen = torch.Generator().manual_seed(1)
    data = nncf.Dataset([torch.randn(shape, generator=gen) for _ in range(32)])
    x = torch.randn(shape, generator=gen)
    precision = nc.PrecisionConfig(4, 4, keep_first_last_8bit=False)
    q = nc.quantize(model, data, nc.AdaQuantConfig(iters=30, batch_size=8), precision=precision)
    rtn = nc.quantize(model, data, precision=precision)
    assert len(nc.get_plan(q)) == layers
    with torch.no_grad():
        fp = model(x)
        assert (q(x) - fp).pow(2).mean() < (rtn(x) - fp).pow(2).mean()
    res = nc.export_openvino(q, x[:1], tmp_path / "m.xml")
    assert nc.check_ir_against_plan(res, nc.get_plan(q)) == []

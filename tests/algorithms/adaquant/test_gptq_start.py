import copy

import nncf
import pytest
import torch
from torch import nn

import nncf_calibtip as nc
from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.config import AdaQuantConfig
from nncf_calibtip.algorithms.adaquant.gptq_start import gptq_start
from nncf_calibtip.algorithms.adaquant.layer_problem import LayerProblem
from nncf_calibtip.placement import PrecisionConfig, min_max_algorithm
from nncf_calibtip.quantized_layers import call_op, find_quantized_layers

W4A4 = PrecisionConfig(4, 4, keep_first_last_8bit=False)
# No gradient steps: the model is the start the steps would begin from.
START_ONLY = {"iters": 1, "lr_weight": 0.0, "lr_bias": 0.0, "lr_weight_scale": 0.0, "lr_activation_range": 0.0}


class Layers(nn.Module):
    """A dense 3x3 conv, a grouped conv, a depthwise conv, a linear layer and a conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=4, bias=False)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.fc = nn.Linear(24, 12)
        self.c1d = nn.Conv1d(12, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.grouped(torch.relu(self.conv(x))))
        z = self.fc(y.flatten(2).transpose(1, 2))  # [N, positions, 12]
        return self.c1d(z.transpose(1, 2))


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=8, mode="bilinear")


def _quantized_layers(model: nn.Module):
    data = nncf.Dataset([_images(8, i) for i in range(4)])
    wrapped = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(model)), next(iter(data.get_inference_data())))
    q = compat.Pipeline([[min_max_algorithm(W4A4, 8)]]).run(wrapped, data)
    qm = compat.unwrap(q)
    tensors = {**dict(qm.named_parameters()), **dict(qm.named_buffers())}
    return {layer.name.split("/")[0]: layer for layer in find_quantized_layers(qm, compat.build_graph(q))}, tensors


def _fp_inputs(model: Layers, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        a = torch.relu(model.conv(x))
        b = model.grouped(a)
        c = model.dw(b)
        return {"conv": x, "grouped": a, "dw": b, "fc": c.flatten(2).transpose(1, 2)}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Layers().eval()
    layers, tensors = _quantized_layers(model)
    return model, layers, tensors


def _pre_activation_error(problem: LayerProblem, x: torch.Tensor) -> float:
    """``||layer(Q(x); Q(W)) - layer(x; W)||^2``: what the start minimises."""
    with torch.no_grad():
        fp = call_op(problem.layer.node, {0: x, 1: problem.fp.weight, 2: problem.fp.bias})
        xq, wq = problem.quantize_input(x), problem.quantized_weight()
        q = call_op(problem.layer.node, {0: xq, 1: wq, 2: problem.fp.bias})
        return float((q - fp).pow(2).sum())


@pytest.mark.parametrize("name", ["conv", "grouped", "dw", "fc"])
def test_start_beats_round_to_nearest_on_unseen_inputs(setup, name):
    model, layers, tensors = setup
    problem = LayerProblem(layers[name], tensors, AdaQuantConfig(), train_input_range=True, output_rms=1.0)
    train, unseen = _fp_inputs(model, _images(512, 1))[name], _fp_inputs(model, _images(128, 2))[name]
    weight = problem.fp.weight.detach().clone()
    rtn = _pre_activation_error(problem, unseen)
    assert gptq_start(problem, train, train)
    # Most of the error left is the 4-bit input's own rounding, which no weight undoes
    # (measured: 0.92-0.96 of round-to-nearest's error for the conv and depthwise layers).
    assert _pre_activation_error(problem, unseen) < 0.98 * rtn
    # The FP weight itself is untouched until the changes are written back.
    assert torch.equal(problem.fp.weight, weight)
    problem.reset()
    assert _pre_activation_error(problem, unseen) == pytest.approx(rtn, rel=1e-6)


def test_unsupported_layer_keeps_the_nearest_start(setup):
    model, layers, tensors = setup
    problem = LayerProblem(layers["c1d"], tensors, AdaQuantConfig(), train_input_range=True, output_rms=1.0)
    base = problem.base_weight.clone()
    with torch.no_grad():
        x = model.fc(_fp_inputs(model, _images(64, 1))["fc"]).transpose(1, 2)
    assert not gptq_start(problem, x, x)
    assert torch.equal(problem.base_weight, base)


def test_few_samples_per_weight_do_not_overfit(setup):
    # 40 rows for a linear layer of 24 inputs (30 to fit, 10 to choose the damping on):
    # plain least squares would fit the noise; the chosen damping keeps the start no worse
    # than rounding to nearest on unseen inputs.
    model, layers, tensors = setup
    problem = LayerProblem(layers["fc"], tensors, AdaQuantConfig(), train_input_range=True, output_rms=1.0)
    x = _fp_inputs(model, _images(40, 1))["fc"][:, :1]  # 40 samples of one row
    unseen = _fp_inputs(model, _images(64, 2))["fc"]
    rtn = _pre_activation_error(problem, unseen)
    assert gptq_start(problem, x, x)
    assert _pre_activation_error(problem, unseen) <= 1.02 * rtn


def test_start_alone_brings_the_model_closer_to_fp(tiny_model, calib_dataset, test_data):
    def mse(q):
        with torch.no_grad():
            return (q(test_data) - tiny_model(test_data)).pow(2).mean().item()

    nearest = nc.quantize(tiny_model, calib_dataset, nc.AdaQuantConfig(**START_ONLY), precision=W4A4)
    gptq = nc.quantize(tiny_model, calib_dataset, nc.AdaQuantConfig(weight_start="gptq", **START_ONLY), precision=W4A4)
    assert mse(gptq) < 0.9 * mse(nearest)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_gptq_start_then_steps_beat_round_to_nearest_and_repeat(tiny_model, calib_dataset, test_data, mode):
    cfg = nc.AdaQuantConfig(mode=mode, weight_start="gptq", iters=100, holdout_fraction=0.25)
    q = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    for r in nc.get_result(q).reports["adaquant"]:
        assert r["error_after"] < r["error_before"], r
    again = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    with torch.no_grad():
        torch.testing.assert_close(q(test_data), again(test_data), rtol=0, atol=0)


def test_weight_start_validated():
    with pytest.raises(ValueError, match="weight_start"):
        nc.AdaQuantConfig(weight_start="hessian")


def test_weights_of_an_input_that_is_always_zero_keep_their_value(setup):
    # The calibration inputs say nothing about such a weight; unseen inputs may still use it.
    model, layers, tensors = setup
    problem = LayerProblem(layers["fc"], tensors, AdaQuantConfig(), train_input_range=True, output_rms=1.0)
    x = _fp_inputs(model, _images(256, 1))["fc"].clone()
    x[..., 5] = 0.0
    assert gptq_start(problem, x, x)
    torch.testing.assert_close(problem.base_weight[:, 5], problem.fp.weight[:, 5])
    assert not torch.equal(problem.base_weight, problem.fp.weight)

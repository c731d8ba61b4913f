import copy
import dataclasses

import nncf
import numpy as np
import pytest
import torch
from torch import nn

import nncf_calibtip as nc
from nncf_calibtip import compat
from nncf_calibtip.calibration.fitted_layers import fitted_layers
from nncf_calibtip.evaluation import compile_ir
from nncf_calibtip.quantized_layers import find_quantized_layers
from tests.conftest import TinyNet, make_images
from tests.ir_weights import ir_integer_weights

W4A4 = nc.PrecisionConfig(4, 4, keep_first_last_8bit=False)


def _graph(model: nn.Module) -> compat.NNCFGraph:
    return compat.GraphModelWrapper(model, torch.zeros(1, 3, 16, 16)).build_graph()


def _integer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each layer's weights on its integer grid."""
    graph = _graph(model)
    tensors = dict(model.named_parameters())
    out = {}
    with torch.no_grad():
        for layer in find_quantized_layers(model, graph):
            wq = layer.weight_quantizer
            origin, step = compat.quantizer_grid(wq)
            out[layer.name] = (wq(tensors[layer.weight_name]) - origin) / step
    return out


def _tune(model: nn.Module, dataset: nncf.Dataset, config: nc.BNTuningConfig) -> tuple[nn.Module, nc.BNTuning]:
    tuned = copy.deepcopy(model)
    algorithm = nc.BNTuning(config, dataset)
    algorithm.apply(tuned, _graph(tuned))
    return tuned, algorithm


def test_channel_statistics_reach_the_target_and_integers_stay(tiny_model, calib_dataset):
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    tuned, algorithm = _tune(rtn, calib_dataset, nc.BNTuningConfig())
    assert len(algorithm.reports) == 4  # the four convolutions; the classifier is left to bias tuning
    for r in algorithm.reports:
        assert r.mean_error_after < 0.25 * r.mean_error_before + 1e-6, r
        assert r.std_error_after < 0.25 * r.std_error_before + 1e-6, r
        assert r.mean_error_after < 0.03 and r.std_error_after < 0.03, r
        assert r.rescaled == r.channels
    before, after = _integer_weights(rtn), _integer_weights(tuned)
    for name, ints in before.items():
        assert torch.equal(ints.round(), after[name].round()), name
        assert torch.allclose(ints, ints.round(), atol=1e-4), name
    # The scales did move.
    moved = [
        not torch.equal(_range(a.weight_quantizer), _range(b.weight_quantizer))
        for a, b in zip(
            find_quantized_layers(rtn, _graph(rtn)), find_quantized_layers(tuned, _graph(tuned)), strict=True
        )
    ]
    assert sum(moved) == 4


def _range(wq: compat.BaseQuantizer) -> torch.Tensor:
    return (wq.input_range if isinstance(wq, compat.AsymmetricQuantizer) else wq.scale).detach().clone()


def _scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {layer.name: _range(layer.weight_quantizer) for layer in find_quantized_layers(model, _graph(model))}


def _expected_treatment(rescale: str, mode: str, fitted: bool) -> str:
    if rescale == "always":
        return "full"
    if rescale == "never":
        return "means"
    if not fitted:
        return "full"
    return "skip" if mode == "sequential" else "means"


@pytest.mark.parametrize("rescale", ["auto", "always", "never"])
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_layers_adaquant_fitted_are_left_or_only_recentred_by_default(tiny_model, calib_dataset, rescale, mode):
    aq = nc.quantize(tiny_model, calib_dataset, nc.AdaQuantConfig(iters=30, mode=mode), precision=W4A4)
    fitted = {r["name"] for r in nc.get_result(aq).reports["adaquant"] if r["kept"]}
    tunable = {r.name for r in _tune(aq, calib_dataset, nc.BNTuningConfig(rescale="always"))[1].reports}
    assert tunable & fitted
    tuned, algorithm = _tune(aq, calib_dataset, nc.BNTuningConfig(rescale=rescale))
    reports = {r.name: r for r in algorithm.reports}
    before, after = _scales(aq), _scales(tuned)
    for name in tunable:
        treatment = _expected_treatment(rescale, mode, name in fitted)
        if treatment == "skip":
            assert name not in reports
            assert torch.equal(before[name], after[name]), name
            continue
        assert torch.equal(before[name], after[name]) == (treatment == "means"), name
        assert (reports[name].rescaled > 0) == (treatment == "full"), name
        # The means are corrected either way.
        assert reports[name].mean_error_after < 0.5 * reports[name].mean_error_before + 1e-6, name
    if rescale == "auto" and mode == "sequential" and tunable <= fitted:
        # Nothing to tune: the model comes back exactly as AdaQuant left it.
        assert not algorithm.reports
        for (k, v_aq), v_tuned in zip(aq.state_dict().items(), tuned.state_dict().values(), strict=True):
            assert torch.equal(v_aq, v_tuned), k


def test_layers_sequential_adaquant_left_at_round_to_nearest_are_left_too(tiny_model, calib_dataset):
    # A diverging weight learning rate makes AdaQuant reject some layers (held-out error rose).
    cfg = nc.AdaQuantConfig(iters=10, lr_weight=1e3, range_search=False)
    aq = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    reports = nc.get_result(aq).reports["adaquant"]
    rejected = {r["name"] for r in reports if not r["kept"]}
    assert rejected
    # Later layers were fitted on the rejected layers' outputs: BN tuning must not move them.
    assert set(fitted_layers(aq)) == {r["name"] for r in reports}
    tuned, algorithm = _tune(aq, calib_dataset, nc.BNTuningConfig())
    assert not algorithm.reports
    for (k, v_aq), v_tuned in zip(aq.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.equal(v_aq, v_tuned), k
    # In parallel mode a rejected layer is plain round-to-nearest, and BN tuning tunes it fully.
    par = nc.quantize(tiny_model, calib_dataset, dataclasses.replace(cfg, mode="parallel"), precision=W4A4)
    kept = {r["name"] for r in nc.get_result(par).reports["adaquant"] if r["kept"]}
    assert set(fitted_layers(par)) == kept


def test_brings_the_model_closer_to_fp_without_batchnorm_modules(calib_dataset, test_data):
    """BN folded into the convolutions before quantization: the FP outputs are the target."""
    model = TinyNet().eval()
    folded = copy.deepcopy(model)
    for conv, bn in (("stem", "bn0"), ("dw", "bn1"), ("pw", "bn2")):
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(getattr(folded, conv), getattr(folded, bn))
        setattr(folded, conv, fused)
        setattr(folded, bn, nn.Identity())
    with torch.no_grad():
        torch.testing.assert_close(folded(test_data), model(test_data), atol=1e-5, rtol=1e-4)
    rtn = nc.quantize(folded, calib_dataset, precision=W4A4)
    tuned = nc.quantize(folded, calib_dataset, nc.BNTuningConfig(), precision=W4A4)
    reports = nc.get_result(tuned).reports["bn_tuning"]
    assert len(reports) == 4
    assert all(r["mean_error_after"] < r["mean_error_before"] for r in reports)
    with torch.no_grad():
        err_rtn = (rtn(test_data) - folded(test_data)).pow(2).mean()
        err_bn = (tuned(test_data) - folded(test_data)).pow(2).mean()
    assert err_bn < 0.8 * err_rtn


class NoBiasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_layer_without_bias_or_batchnorm_gets_a_bias(calib_dataset, test_data, tmp_path):
    torch.manual_seed(0)
    model = NoBiasNet().eval()
    tuned = nc.quantize(model, calib_dataset, nc.BNTuningConfig(), precision=W4A4)
    assert isinstance(tuned.conv2.bias, nn.Parameter) and model.conv2.bias is None
    res = nc.export_openvino(tuned, test_data[:1], tmp_path / "m.xml", input_shape=[(-1, 3, 16, 16)])
    with torch.no_grad():
        want = tuned(test_data).numpy()
    got = compile_ir(res.xml)(test_data.numpy())[0]
    # Eight pooled features at A4 feed the classifier: a float-order difference that moves one of
    # them across a rounding boundary shows as one step, so compare on average.
    assert np.abs(got - want).mean() < 0.02 * np.abs(want).mean()


def test_ir_has_the_same_integer_weights_and_matches_torch(tiny_model, calib_dataset, test_data, tmp_path):
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    tuned, _ = _tune(rtn, calib_dataset, nc.BNTuningConfig())
    shape = [(-1, 3, 16, 16)]
    before = nc.export_openvino(rtn, test_data[:1], tmp_path / "rtn.xml", input_shape=shape)
    after = nc.export_openvino(tuned, test_data[:1], tmp_path / "bn.xml", input_shape=shape)
    ints_before, ints_after = ir_integer_weights(before.xml), ir_integer_weights(after.xml)
    assert len(ints_before) == 5
    for a, b in zip(ints_before, ints_after, strict=True):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        want = tuned(test_data).numpy()
    got = compile_ir(after.xml)(test_data.numpy())[0]
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())


def test_batchnorm_target_tunes_only_layers_with_batchnorm(tiny_model, calib_dataset):
    q = nc.quantize(tiny_model, calib_dataset, nc.BNTuningConfig(target="batchnorm"), precision=W4A4)
    reports = nc.get_result(q).reports["bn_tuning"]
    assert [r["name"] for r in reports] == ["stem/conv2d/0", "dw/conv2d/0", "pw/conv2d/0"]
    assert all(r["mean_error_after"] < 0.05 for r in reports)


def test_callers_model_untouched_and_repeatable(tiny_model, calib_dataset, test_data):
    state = copy.deepcopy(tiny_model.state_dict())
    a = nc.quantize(tiny_model, calib_dataset, nc.BNTuningConfig(), precision=W4A4)
    b = nc.quantize(tiny_model, calib_dataset, nc.BNTuningConfig(), precision=W4A4)
    with torch.no_grad():
        torch.testing.assert_close(a(test_data), b(test_data), rtol=0, atol=0)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bad_input_is_named(tiny_model, calib_dataset):
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    with pytest.raises(ValueError, match="needs the calibration dataset"):
        nc.BNTuning(nc.BNTuningConfig()).apply(rtn, _graph(rtn))
    one = nncf.Dataset([make_images(1, seed=3)])
    with pytest.raises(ValueError, match="at least 2"):
        nc.BNTuning(nc.BNTuningConfig(), one).apply(rtn, _graph(rtn))
    with pytest.raises(ValueError, match="target="):
        nc.BNTuningConfig(target="running")
    with pytest.raises(ValueError, match="rescale="):
        nc.BNTuningConfig(rescale="sometimes")
    with pytest.raises(ValueError, match="Unknown BN tuning settings"):
        nc.BNTuningConfig.from_dict({"momentum": 0.1})


def test_nothing_to_tune_says_why_and_what_to_set():
    """A model of only fully-connected layers (an MLP) has nothing BN tuning tunes by default:
    the error names ``include_linear``, and with it set the layers are tuned."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    data = nncf.Dataset(list(torch.randn(128, 20).split(32)))
    with pytest.raises(ValueError, match=r"only fully-connected .* include_linear=True"):
        nc.quantize(mlp, data, nc.BNTuningConfig(), precision=W4A4)
    tuned = nc.quantize(mlp, data, nc.BNTuningConfig(include_linear=True), precision=W4A4)
    assert len(nc.get_result(tuned).reports["bn_tuning"]) == 3
    with pytest.raises(ValueError, match="target='fp_statistics'"):
        nc.quantize(mlp, data, nc.BNTuningConfig(target="batchnorm", include_linear=True), precision=W4A4)

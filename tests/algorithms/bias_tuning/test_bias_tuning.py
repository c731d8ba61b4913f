import copy

import nncf
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nncf_calibtip as nc
from nncf_calibtip import compat
from nncf_calibtip.algorithms.bias_tuning import torch_backend as bias_tuning_backend
from nncf_calibtip.algorithms.bias_tuning.put_back import held_out_change, keep_tuned
from tests.conftest import TinyNet, make_images

W4A4 = nc.PrecisionConfig(4, 4, keep_first_last_8bit=False)


def _kl_to_fp(fp: nn.Module, q: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return F.kl_div(F.log_softmax(q(x), -1), F.softmax(fp(x), -1), reduction="batchmean").item()


def test_bias_tuning_lowers_kl_on_held_out_data_and_leaves_weights(tiny_model, calib_dataset, test_data):
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    tuned = nc.quantize(tiny_model, calib_dataset, nc.BiasTuningConfig(steps=150), precision=W4A4)
    report = nc.get_result(tuned).reports["bias_tuning"][0]
    assert report["kept"] and report["loss_after"] < report["loss_before"]
    assert report["tensors"] == 5  # three BatchNorm shifts, the grouped conv's and the classifier's bias
    # test_data is not the calibration set.
    assert _kl_to_fp(tiny_model, tuned, test_data) < 0.7 * _kl_to_fp(tiny_model, rtn, test_data)
    a, b = dict(rtn.named_parameters()), dict(tuned.named_parameters())
    for name in ("stem.weight", "dw.weight", "pw.weight", "grouped.weight", "fc.weight", "bn0.weight"):
        assert torch.equal(a[name], b[name]), name


def test_put_back_rules_judge_the_held_out_change_against_its_noise():
    g = torch.Generator().manual_seed(0)
    before = torch.rand(100, generator=g)
    noise = 0.3 * torch.randn(100, generator=g)
    cases = {
        "slightly lower": before + noise - noise.mean() - 0.01,  # well within the noise
        "much lower": before + noise - noise.mean() - 0.2,  # ~7 standard errors
        "slightly higher": before + noise - noise.mean() + 0.01,
        "much higher": before + noise - noise.mean() + 0.2,
        "nan": before + torch.nan,
    }
    expected = {
        "unless_better": {"much lower"},
        "if_worse": {"slightly lower", "much lower", "slightly higher"},
        "never": {"slightly lower", "much lower", "slightly higher", "much higher"},
    }
    for rule, keeps in expected.items():
        kept = {name for name, after in cases.items() if keep_tuned(held_out_change(before, after), rule)}
        assert kept == keeps, rule


def test_most_samples_closer_counts_although_a_few_hide_it_in_the_mean():
    g = torch.Generator().manual_seed(1)
    before = torch.rand(100, generator=g).double() + 0.5
    after = before * 0.8  # every sample 20% closer ...
    after[:4] += 12.0  # ... but four far worse: the mean rises, though within its noise
    change = held_out_change(before, after)
    assert change.mean > 0 and not change.mean_higher and change.lower == 96 and change.p_lower < 1e-6
    assert keep_tuned(change, "unless_better")
    after[:10] += 100.0  # ten far worse: the mean rises beyond its noise, put back whatever the ranks say
    change = held_out_change(before, after)
    assert change.mean_higher and change.p_lower < 1e-6
    assert not keep_tuned(change, "unless_better") and not keep_tuned(change, "if_worse")
    # Nothing changed: not better.
    assert not keep_tuned(held_out_change(before, before), "unless_better")


def test_put_back_restores_the_biases_and_reports_both_losses(tiny_model, calib_dataset, monkeypatch):
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    cfg = nc.BiasTuningConfig(steps=2, lr=1e-4)
    # The decision itself is tested above; here the model and the report must follow it.
    monkeypatch.setattr(bias_tuning_backend, "keep_tuned", lambda change, rule: False)
    same = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    monkeypatch.undo()
    report = nc.get_result(same).reports["bias_tuning"][0]
    assert not report["kept"] and report["loss_after"] == report["loss_before"] != report["loss_tuned"]
    a = dict(rtn.named_parameters())
    for name, p in same.named_parameters():
        assert torch.equal(p, a[name]), name
    kept = nc.quantize(
        tiny_model, calib_dataset, nc.BiasTuningConfig(steps=2, lr=1e-4, put_back="if_worse"), precision=W4A4
    )
    assert nc.get_result(kept).reports["bias_tuning"][0]["kept"]


def test_diverging_tuning_is_put_back(tiny_model, calib_dataset):
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    cfg = nc.BiasTuningConfig(steps=20, lr=1e3, lr_schedule="constant")
    bad = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    report = nc.get_result(bad).reports["bias_tuning"][0]
    assert not report["kept"] and report["loss_after"] == report["loss_before"]
    assert not report["loss_tuned"] <= report["loss_before"] + 2 * report["change_stderr"]
    a = dict(rtn.named_parameters())
    for name, p in bad.named_parameters():
        assert torch.equal(p, a[name]), name


def test_last_input_range_is_trained_when_asked(tiny_model, calib_dataset):
    cfg = nc.BiasTuningConfig(steps=50, train_last_input_range=True)
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    tuned = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    report = nc.get_result(tuned).reports["bias_tuning"][0]
    assert report["kept"] and report["tensors"] == 7  # the five biases, the last input's low end and range
    before = dict(rtn.named_parameters())
    changed = {n for n, p in tuned.named_parameters() if p.is_floating_point() and not torch.equal(p, before[n])}
    ranges = {n for n in changed if not n.endswith(".bias")}
    # The quantizer after the global mean pool feeds the classifier: its low end and its range.
    assert len(ranges) == 2 and all("/mean/" in n for n in ranges), changed


class Embedder(nn.Module):
    """TinyNet without its classifier: outputs 32-d features, not class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = F.relu(n.bn0(n.stem(x)))
        x = F.max_pool2d(x, 2)
        x = x + n.bn2(n.pw(F.relu6(n.bn1(n.dw(x)))))
        return F.relu(n.grouped(F.pad(x, (1, 1, 1, 1)))).mean((2, 3))


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_embedding_losses_bring_outputs_closer(calib_dataset, test_data, loss):
    torch.manual_seed(0)
    model = Embedder().eval()
    cfg = nc.BiasTuningConfig(loss=loss, steps=150, optimizer="adam", lr=1e-2)
    rtn = nc.quantize(model, calib_dataset, precision=W4A4)
    tuned = nc.quantize(model, calib_dataset, cfg, precision=W4A4)
    with torch.no_grad():
        ref = model(test_data)
        assert (tuned(test_data) - ref).pow(2).mean() < (rtn(test_data) - ref).pow(2).mean()


class _Scaled(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


def test_mse_loss_learns_at_the_default_rate_whatever_the_output_scale(calib_dataset, test_data):
    torch.manual_seed(0)
    model = _Scaled(Embedder(), 1e-3).eval()  # outputs of about 1e-3, as normalised embeddings
    rtn = nc.quantize(model, calib_dataset, precision=W4A4)
    tuned = nc.quantize(model, calib_dataset, nc.BiasTuningConfig(loss="mse", steps=150), precision=W4A4)
    with torch.no_grad():
        ref = model(test_data)
        assert (tuned(test_data) - ref).pow(2).mean() < 0.8 * (rtn(test_data) - ref).pow(2).mean()


def test_inputs_only_dataset_and_no_labels_read(tiny_model, calib_data, test_data):
    """Items carry a label the transform drops; touching it would raise."""

    class Poisoned:
        def __getattribute__(self, name):
            raise AssertionError("a label was read")

    items = [{"image": calib_data[i : i + 32], "label": Poisoned()} for i in range(0, len(calib_data), 32)]
    dataset = nncf.Dataset(items, lambda item: item["image"])
    q = nc.quantize(tiny_model, dataset, nc.BiasTuningConfig(steps=20), precision=W4A4)
    assert nc.get_result(q).reports["bias_tuning"][0]["samples"] == 256


def test_same_seed_same_model_and_callers_model_untouched(tiny_model, calib_dataset, test_data):
    state = copy.deepcopy(tiny_model.state_dict())
    cfg = nc.BiasTuningConfig(steps=30, seed=5)
    a = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    b = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    with torch.no_grad():
        torch.testing.assert_close(a(test_data), b(test_data), rtol=0, atol=0)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_too_small_calibration_set_and_bad_settings_are_named(tiny_model):
    small = nncf.Dataset([make_images(40, seed=4)])
    with pytest.raises(ValueError, match="too few for 200 steps of batch_size=50"):
        nc.quantize(tiny_model, small, nc.BiasTuningConfig(), precision=W4A4)
    with pytest.raises(ValueError, match="loss="):
        nc.BiasTuningConfig(loss="ce")
    with pytest.raises(ValueError, match="Unknown bias tuning settings"):
        nc.BiasTuningConfig.from_dict({"epochs": 3})


def test_model_with_tuple_output_is_refused(calib_dataset):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.net(x)
            return y, y

    with pytest.raises(TypeError, match="returns one tensor"):
        nc.quantize(TwoHeads().eval(), calib_dataset, nc.BiasTuningConfig(steps=5), precision=W4A4)


def test_algorithms_run_in_nncfs_own_pipeline(tiny_model, calib_dataset, test_data):
    """After plain MinMax + PrecisionSetup, in NNCF's Pipeline, dataset given to the constructors."""
    from nncf_calibtip.placement import PrecisionSetup, min_max_algorithm

    steps = [
        [min_max_algorithm(W4A4, 256)],
        [PrecisionSetup(W4A4)],
        [nc.BNTuning(nc.BNTuningConfig(), calib_dataset)],
        [nc.BiasTuning(nc.BiasTuningConfig(steps=100), calib_dataset)],
    ]
    model = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(tiny_model)), test_data[:1])
    q = compat.Pipeline(steps).run(model, calib_dataset).model
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    assert _kl_to_fp(tiny_model, q, test_data) < 0.7 * _kl_to_fp(tiny_model, rtn, test_data)

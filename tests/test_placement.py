import logging

import nncf
import pytest
import torch

import nncf_calibtip as nc
from nncf_calibtip import compat
from nncf_calibtip.evaluation import compile_ir
from nncf_calibtip.placement import MIN_WEIGHT_SCALE, PrecisionConfig
from nncf_calibtip.plan import LayerPrecision
from nncf_calibtip.quantized_layers import find_quantized_layers
from tests.conftest import TinyNet


def _layers(q):
    graph = compat.GraphModelWrapper(q, torch.zeros(1, 3, 16, 16)).build_graph()
    return {layer.name.split("/")[0]: layer for layer in find_quantized_layers(q, graph)}


def test_plan_bits_reach_the_quantizers_first_last_kept_8bit(tiny_model, calib_dataset):
    q = nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(4, 4))
    layers = _layers(q)
    assert layers["stem"].weight_quantizer.num_bits == 8 and layers["stem"].input_quantizer.num_bits == 8
    assert layers["fc"].weight_quantizer.num_bits == 8 and layers["fc"].input_quantizer.num_bits == 8
    for name in ("dw", "pw", "grouped"):
        assert layers[name].weight_quantizer.num_bits == 4
        wq = layers[name].weight_quantizer
        assert isinstance(wq, compat.AsymmetricQuantizer) and (wq.level_low, wq.level_high) == (0, 15)
        assert layers[name].input_quantizer.num_bits == 4
    plan = nc.get_plan(q)
    assert plan["dw/conv2d/0"] == LayerPrecision(4, 4) and plan["stem/conv2d/0"] == LayerPrecision(8, 8)


def test_first_last_rule_can_be_switched_off_and_layers_overridden(tiny_model, calib_dataset):
    cfg = PrecisionConfig(4, 8, keep_first_last_8bit=False, layers={"pw/conv2d/0": LayerPrecision(2, 8)})
    plan = nc.get_plan(nc.quantize(tiny_model, calib_dataset, precision=cfg))
    assert plan["stem/conv2d/0"] == LayerPrecision(4, 8)
    assert plan["pw/conv2d/0"] == LayerPrecision(2, 8)


def test_unknown_layer_in_config_is_an_error(tiny_model, calib_dataset):
    cfg = PrecisionConfig(4, 8, layers={"nope/conv2d/0": LayerPrecision(4, 4)})
    with pytest.raises(ValueError, match="nope/conv2d/0"):
        nc.quantize(tiny_model, calib_dataset, precision=cfg)


def test_overflow_fix_uses_7bit_range_for_8bit_weights_only(tiny_model, calib_dataset):
    layers = _layers(nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(4, 8)))
    assert layers["stem"].weight_quantizer.is_half_range and not layers["dw"].weight_quantizer.is_half_range
    layers = _layers(nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(8, 8, overflow_fix="disable")))
    assert not layers["stem"].weight_quantizer.is_half_range


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_dead_channels_get_a_positive_scale(calib_dataset, test_data, scheme):
    model = TinyNet(zero_channel=True).eval()
    q = nc.quantize(model, calib_dataset, precision=PrecisionConfig(4, 4, low_bit_weights=scheme))
    wq = _layers(q)["dw"].weight_quantizer
    assert (wq.input_range if scheme == "asymmetric" else wq.scale).abs().min() >= MIN_WEIGHT_SCALE
    with torch.no_grad():
        assert torch.isfinite(q(test_data)).all()


def _weight_error(model, q) -> float:
    """Squared error of the quantized weights of ``q``'s layers below 8 bits against ``model``'s."""
    fp = dict(model.named_parameters())
    params = dict(q.named_parameters())
    total = 0.0
    with torch.no_grad():
        for layer in _layers(q).values():
            if layer.weight_quantizer.num_bits < 8:
                total += float((layer.weight_quantizer(params[layer.weight_name]) - fp[layer.weight_name]).pow(2).sum())
    return total


@pytest.mark.parametrize("bits", [4, 2])
def test_asymmetric_low_bit_weights_fit_the_weights_closer(tiny_model, calib_dataset, bits):
    sym = nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(bits, 8, low_bit_weights="symmetric"))
    asym = nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(bits, 8))
    sym_layers, asym_layers = _layers(sym), _layers(asym)
    for name in ("dw", "pw", "grouped"):
        assert isinstance(sym_layers[name].weight_quantizer, compat.SymmetricQuantizer)
        assert isinstance(asym_layers[name].weight_quantizer, compat.AsymmetricQuantizer)
        assert asym_layers[name].weight_quantizer.levels == 2**bits
    for name in ("stem", "fc"):  # 8-bit weights stay symmetric (NNCF's overflow fix needs it)
        assert isinstance(asym_layers[name].weight_quantizer, compat.SymmetricQuantizer)
    # The asymmetric grid's step is (max - min) / (2^b - 1) <= 2 * absmax / (2^b - 1), below the
    # symmetric grid's absmax / (2^(b-1) - 1): smaller rounding error, no clipping in either.
    assert _weight_error(tiny_model, asym) < 0.7 * _weight_error(tiny_model, sym)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_bits": 3},
        {"activation_bits": 2},
        {"overflow_fix": "always"},
        {"low_bit_weights": "signed"},
        {"model_type": "cnn"},
        {"smooth_quant_alpha": 1.5},
        {"smooth_quant_alpha": -1.0},
    ],
)
def test_precision_config_validation(kwargs):
    with pytest.raises(ValueError):
        PrecisionConfig(**kwargs)


def test_bad_inputs_are_clear_errors(tiny_model, calib_data):
    with pytest.raises(TypeError, match="nncf.Dataset"):
        nc.quantize(tiny_model, [calib_data])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nc.quantize("model", nncf.Dataset([calib_data]))


def _hook_bits(q) -> dict[str, int]:
    from nncf_calibtip import compat

    return {name: m.num_bits for name, m in q.named_modules() if isinstance(m, compat.BaseQuantizer)}


def test_low_bit_layer_gets_its_own_input_quantizer_the_residual_keeps_8bit(tiny_model, calib_dataset):
    # The stem's ReLU output reaches the depthwise conv and the residual add (past max-pooling).
    q = nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(4, 4))
    bits = _hook_bits(q)
    shared = "__nncf_hooks.post_hooks./relu/0__0.0"
    assert bits[shared] == 8
    dw = _layers(q)["dw"]
    assert dw.input_quantizer_key == "pre_hooks.dw/conv2d/0__0.0" and dw.input_quantizer.num_bits == 4
    # It starts from the shared quantizer's range (AdaQuant's range search moves it later).
    s = dict(q.named_modules())[shared]
    assert torch.equal(dw.input_quantizer.input_range.abs(), s.input_range.abs())
    # pw reads only the depthwise output: nothing to separate.
    assert _layers(q)["pw"].input_quantizer_key.startswith("post_hooks.")

    shared_4bit = nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(4, 4, separate_low_bit_inputs=False))
    assert _hook_bits(shared_4bit)[shared] == 4
    assert _layers(shared_4bit)["dw"].input_quantizer_key == "post_hooks./relu/0__0.0"


def test_no_quantizer_is_separated_when_every_reader_has_the_same_bits(tiny_model, calib_dataset):
    for cfg in (PrecisionConfig(8, 8), PrecisionConfig(4, 8)):
        q = nc.quantize(tiny_model, calib_dataset, precision=cfg)
        assert not any(name.startswith("__nncf_hooks.pre_hooks") and "__0." in name for name in _hook_bits(q))


class _SharedConv(torch.nn.Module):
    """One conv applied twice: its weight belongs to two operations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.relu(self.c(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


def test_a_weight_used_twice_is_an_error_that_gives_the_ignored_scope(calib_dataset):
    with pytest.raises(ValueError, match=r"IgnoredScope\(names=\['c/conv2d/0', 'c/conv2d/1'\]\)"):
        nc.quantize(_SharedConv().eval(), calib_dataset)
    scope = nncf.IgnoredScope(names=["c/conv2d/0", "c/conv2d/1"])
    plan = nc.get_plan(nc.quantize(_SharedConv().eval(), calib_dataset, ignored_scope=scope))
    assert set(plan) == {"stem/conv2d/0", "fc/linear/0"}


def test_a_model_without_conv_or_linear_layers_is_an_error_that_says_so(calib_dataset):
    with pytest.raises(ValueError, match="no weight quantizer on a Conv or Linear layer.*nncf.quantize"):
        nc.quantize(torch.nn.Sequential(torch.nn.ReLU()).eval(), calib_dataset)
    everything = nncf.IgnoredScope(names=["stem/conv2d/0", "c/conv2d/0", "c/conv2d/1", "fc/linear/0"])
    with pytest.raises(ValueError, match="ignored scope excludes them all"):
        nc.quantize(_SharedConv().eval(), calib_dataset, ignored_scope=everything)


class _Decoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.c1(torch.relu(self.c0(x)))))


def test_other_quantized_weights_keep_nncf_8bit_and_are_named(calib_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="nncf"):
        q = nc.quantize(_Decoder().eval(), calib_dataset, precision=PrecisionConfig(4, 4))
    assert "IgnoredScope(names=['up/conv_transpose2d/0'])" in caplog.text
    assert set(nc.get_plan(q)) == {"c0/conv2d/0", "c1/conv2d/0"}
    assert _hook_bits(q)["__nncf_hooks.pre_hooks.up/conv_transpose2d/0__1.0"] == 8
    caplog.clear()
    scope = nncf.IgnoredScope(names=["up/conv_transpose2d/0"])
    with caplog.at_level(logging.WARNING, logger="nncf"):
        q = nc.quantize(_Decoder().eval(), calib_dataset, precision=PrecisionConfig(4, 4), ignored_scope=scope)
    assert "not conv/linear" not in caplog.text
    assert not any("up/" in name for name in _hook_bits(q))


class _Encoder(torch.nn.Module):
    """A transformer encoder layer and a linear head: the additions and LayerNorms NNCF's
    transformer placement leaves in FP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 32)
        self.block = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


def test_transformer_model_type_quantizes_fewer_activations_and_keeps_the_plan():
    torch.manual_seed(0)
    x = torch.randn(32, 6, 8)
    model = _Encoder().eval()
    dataset = nncf.Dataset(list(x.split(8)))
    default = nc.quantize(model, dataset, precision=PrecisionConfig(8, 8))
    transformer = nc.quantize(model, dataset, precision=PrecisionConfig(8, 8, model_type="transformer"))
    assert len(_hook_bits(transformer)) < len(_hook_bits(default))
    assert nc.get_result(transformer).plan.keys() == nc.get_result(default).plan.keys()
    config = nc.QuantizationConfig(precision=PrecisionConfig(4, 8, model_type="transformer"))
    assert nc.QuantizationConfig.from_dict(config.to_dict()) == config


class _OutlierMLP(torch.nn.Module):
    """Linear layers whose middle input has a few channels 50x larger than the rest, as the
    activations of large transformers do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.fc3 = torch.nn.Linear(64, 4)
        self.register_buffer("gain", torch.ones(64))
        self.gain[:3] = 50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(self.fc1(x) * self.gain)))


def test_smooth_quant_moves_activation_outliers_into_the_weights(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    model = _OutlierMLP().eval()
    dataset = nncf.Dataset(list(x.split(32)))
    with torch.no_grad():
        fp = model(x)

    def quantized(alpha, algorithms=()):
        precision = PrecisionConfig(8, 8, keep_first_last_8bit=False, smooth_quant_alpha=alpha)
        config = nc.QuantizationConfig(precision=precision, algorithms=algorithms, subset_size=256)
        return nc.quantize(model, dataset, config)

    plain, smoothed = quantized(None), quantized(0.95)
    with torch.no_grad():
        error_plain = (plain(x) - fp).pow(2).mean()
        error_smoothed = (smoothed(x) - fp).pow(2).mean()
    assert error_smoothed < 0.5 * error_plain
    assert not torch.equal(compat.unwrap(smoothed).fc2.weight, model.fc2.weight)  # scaled, caller's model kept
    fitted = quantized(0.95, (nc.AdaQuantConfig(iters=20, batch_size=32),))
    reports = nc.get_result(fitted).reports["adaquant"]
    assert sum(r["error_after"] for r in reports) < sum(r["error_before"] for r in reports)
    exported = nc.export_openvino(fitted, x[:1], tmp_path / "m.xml", input_shape=[(-1, 16)])
    assert nc.check_ir_against_plan(exported, nc.get_result(fitted).plan) == []
    with torch.no_grad():
        torch_out = fitted(x[:64]).numpy()
    ov_out = compile_ir(exported.xml)(x[:64].numpy())[0]
    assert abs(ov_out - torch_out).max() < 1e-3 * abs(torch_out).max()

import numpy as np
import openvino as ov
import pytest
import torch

import nncf_calibtip as nc
from nncf_calibtip import compat
from nncf_calibtip.calibration.capture import quantizers_disabled
from nncf_calibtip.evaluation import compile_ir
from nncf_calibtip.export import _walk_to
from nncf_calibtip.placement import PrecisionConfig
from nncf_calibtip.plan import LayerPrecision
from nncf_calibtip.quantized_layers import find_quantized_layers
from tests.ir_weights import ir_integer_weights


@pytest.fixture
def quantized(tiny_model, calib_dataset):
    cfg = PrecisionConfig(4, 4, layers={"grouped/conv2d/0": LayerPrecision(8, 4), "pw/conv2d/0": LayerPrecision(4, 8)})
    return nc.quantize(tiny_model, calib_dataset, nc.AdaQuantConfig(iters=20), precision=cfg)


def test_ir_keeps_the_plan(quantized, test_data, tmp_path):
    res = nc.export_openvino(quantized, test_data[:1], tmp_path / "m.xml")
    plan = nc.get_plan(quantized)
    assert nc.check_ir_against_plan(res, plan) == []
    assert sorted(layer.weight_bits for layer in res.layers) == [4, 4, 8, 8, 8]
    # Activation FakeQuantize levels at the layers' inputs: 16 for A4, 256 for A8.
    levels = sorted(layer.activation_levels for layer in res.layers)
    assert levels == [16, 16, 256, 256, 256]
    assert nc.PrecisionPlan.from_json(res.plan_json) == plan
    # The residual add reads the stem's ReLU output at 8 bits; the 4-bit depthwise conv its own copy.
    model = ov.Core().read_model(res.xml)
    add = next(
        op for op in model.get_ops() if op.get_type_name() == "Add" and op.get_friendly_name().startswith("aten::add")
    )
    add_levels = [_walk_to(add.input_value(port).get_node(), {"FakeQuantize"}) for port in range(2)]
    add_levels = [fq.get_attributes()["levels"] for fq in add_levels if fq is not None]
    assert 256 in add_levels and 16 not in add_levels


def test_4bit_weights_are_stored_compressed(tiny_model, calib_dataset, test_data, tmp_path):
    sizes = {}
    for name, cfg in {
        "w8": PrecisionConfig(8, 8, keep_first_last_8bit=False),
        "w4": PrecisionConfig(4, 8, keep_first_last_8bit=False, low_bit_weights="symmetric"),
        "w4_asym": PrecisionConfig(4, 8, keep_first_last_8bit=False),
    }.items():
        res = nc.export_openvino(
            nc.quantize(tiny_model, calib_dataset, precision=cfg), test_data[:1], tmp_path / f"{name}.xml"
        )
        types = {
            op.get_element_type().get_type_name()
            for op in ov.Core().read_model(res.xml).get_ops()
            if op.get_type_name() == "Constant"
        }
        assert ("i4" in types) == (name != "w8"), name
        sizes[name] = res.weight_bytes
    weights = [p for n, p in tiny_model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert sizes["w8"] - sizes["w4"] >= 0.45 * sum(p.numel() for p in weights)
    # An asymmetric grid adds one zero point per output channel, stored as int4 too.
    channels = sum(p.shape[0] for p in weights)
    assert 0 < sizes["w4_asym"] - sizes["w4"] <= channels


def test_openvino_output_matches_torch(quantized, test_data, tmp_path):
    res = nc.export_openvino(quantized, test_data[:1], tmp_path / "m.xml", input_shape=[(-1, 3, 16, 16)])
    ov_out = compile_ir(res.xml)(test_data.numpy())[0]
    with torch.no_grad():
        torch_out = quantized(test_data).numpy()
    scale = np.abs(torch_out).max()
    # Integer kernels and fake quantization round the same values; a tie can land one step
    # apart in an early layer, so compare the bulk tightly and the worst element loosely.
    assert np.median(np.abs(ov_out - torch_out)) <= 1e-4 * scale
    assert np.abs(ov_out - torch_out).max() <= 0.05 * scale
    assert (ov_out.argmax(1) == torch_out.argmax(1)).mean() >= 0.97


def test_8bit_residual_differs_from_torch_by_one_skipped_rounding(tiny_model, calib_dataset, test_data, tmp_path):
    """OpenVINO runs an 8-bit conv on its int8 kernel and fuses the residual add after it, with
    the add's FakeQuantizes, into that kernel; the conv branch then reaches the add without
    being rounded to its 8-bit grid. That one rounding is the whole difference from torch:
    small in the bulk, and gone (to float error) with that quantizer off in torch. 4-bit
    layers run on decompressed weights and keep every rounding (the test above)."""
    q = nc.quantize(tiny_model, calib_dataset, precision=PrecisionConfig(8, 8))
    res = nc.export_openvino(q, test_data[:1], tmp_path / "m.xml", input_shape=[(-1, 3, 16, 16)])
    ov_out = compile_ir(res.xml)(test_data.numpy())[0]
    with torch.no_grad():
        torch_out = q(test_data).numpy()
    scale = np.abs(torch_out).max()
    gap = np.median(np.abs(ov_out - torch_out))
    assert gap <= 2e-3 * scale
    assert (ov_out.argmax(1) == torch_out.argmax(1)).mean() >= 0.97
    branch = [m for name, m in q.named_modules() if "bn2/batch_norm" in name and hasattr(m, "num_bits")]
    assert len(branch) == 1
    with quantizers_disabled(branch), torch.no_grad():
        unrounded = q(test_data).numpy()
    assert np.median(np.abs(ov_out - unrounded)) <= 1e-6 * scale < gap


def test_ir_stores_the_integers_torch_uses(quantized, test_data, tmp_path):
    """Export puts weights on their grid, so OpenVINO's int4/int8 constants are torch's integers
    (an asymmetric grid's 0..15 stored as int4 -8..7 with the zero point beside them)."""
    res = nc.export_openvino(quantized, test_data[:1], tmp_path / "m.xml", input_shape=[(-1, 3, 16, 16)])
    graph = compat.GraphModelWrapper(quantized, test_data[:1]).build_graph()
    tensors = dict(quantized.named_parameters())
    ir = ir_integer_weights(res.xml)
    layers = find_quantized_layers(quantized, graph)
    assert len(ir) == len(layers) == 5
    assert {type(layer.weight_quantizer) for layer in layers} == {compat.SymmetricQuantizer, compat.AsymmetricQuantizer}
    with torch.no_grad():
        for layer, ints in zip(layers, ir, strict=True):
            wq = layer.weight_quantizer
            origin, step = compat.quantizer_grid(wq)
            torch_ints = ((wq(tensors[layer.weight_name]) - origin) / step).round().to(torch.int64).numpy()
            offset = -8 if isinstance(wq, compat.AsymmetricQuantizer) else 0
            np.testing.assert_array_equal(ints.reshape(torch_ints.shape), torch_ints + offset, err_msg=layer.name)


def test_bad_path_is_an_error_and_writes_nothing(quantized, test_data, tmp_path):
    with pytest.raises(ValueError, match=".xml"):
        nc.export_openvino(quantized, test_data[:1], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []

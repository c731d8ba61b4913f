import copy

import nncf
import torch

from nncf_calibtip import compat
from nncf_calibtip.placement import PrecisionConfig, min_max_algorithm
from nncf_calibtip.quantized_layers import call_op, find_quantized_layers
from tests.conftest import ResNetBlocks


def _placed(model, dataset):
    example = next(iter(dataset.get_inference_data()))
    wrapped = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(model)), example)
    q = compat.Pipeline([[min_max_algorithm(PrecisionConfig(), 256)]]).run(wrapped, dataset)
    return q.model, compat.build_graph(q)


def test_layers_with_their_bn_activation_and_input_quantizer(tiny_model, calib_dataset):
    model, graph = _placed(tiny_model, calib_dataset)
    layers = {layer.name.split("/")[0]: layer for layer in find_quantized_layers(model, graph)}
    assert list(layers) == ["stem", "dw", "pw", "grouped", "fc"]
    # BatchNorm and activation come from the graph, whatever the functional spelling.
    assert layers["stem"].batch_norm is not None and layers["stem"].activation is not None
    assert layers["dw"].batch_norm is not None and layers["dw"].activation.node_type in ("relu6", "hardtanh")
    assert layers["pw"].batch_norm is not None and layers["pw"].activation is None  # residual add follows
    assert layers["grouped"].batch_norm is None and layers["grouped"].activation.node_type == "relu"
    assert layers["fc"].bias_name == "fc.bias"
    # Input quantizers are found through max-pool and padding; all layers have one.
    assert all(layer.input_quantizer is not None for layer in layers.values())
    assert [n for n, layer in layers.items() if layer.is_first] == ["stem"]
    assert [n for n, layer in layers.items() if layer.is_last] == ["fc"]


def test_call_op_replays_the_traced_call(tiny_model, calib_dataset):
    model, graph = _placed(tiny_model, calib_dataset)
    layer = next(layer for layer in find_quantized_layers(model, graph) if layer.name.startswith("grouped"))
    x = torch.randn(2, 16, 10, 10)
    out = call_op(layer.node, {0: x, 1: tiny_model.grouped.weight, 2: tiny_model.grouped.bias})
    torch.testing.assert_close(out, tiny_model.grouped(x))


def test_unquantized_layers_are_skipped(tiny_model, calib_dataset):
    example = next(iter(calib_dataset.get_inference_data()))
    wrapped = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(tiny_model)), example)
    algo = min_max_algorithm(PrecisionConfig(), 256, nncf.IgnoredScope(names=["dw/conv2d/0"]))
    q = compat.Pipeline([[algo]]).run(wrapped, calib_dataset)
    names = [layer.name for layer in find_quantized_layers(q.model, compat.build_graph(q))]
    assert "dw/conv2d/0" not in names and "pw/conv2d/0" in names


def test_residual_adds_whose_skip_is_ready_before_the_layer(tiny_model, calib_dataset):
    torch.manual_seed(0)
    model, graph = _placed(ResNetBlocks().eval(), calib_dataset)
    layers = {layer.name.split("/")[0]: layer for layer in find_quantized_layers(model, graph)}
    residual = {name: layer.residual for name, layer in layers.items() if layer.residual is not None}
    # Identity block: the skip (the block input) is ready; a ReLU follows the add.
    # Projection block: its shortcut conv runs after the main branch, so the main branch's
    # last conv has no skip yet, and the shortcut conv is fitted through the add instead.
    assert sorted(residual) == ["a2", "shortcut"]
    assert residual["a2"].activation.node_type == "relu"
    assert residual["a2"].source[0] == "/relu/0"  # the stem's ReLU: the block input
    assert residual["shortcut"].source[0] == "b2/1/batch_norm/0"
    assert residual["a2"].add.node_name != residual["shortcut"].add.node_name
    # An inverted-residual block: no activation after the add.
    model, graph = _placed(tiny_model, calib_dataset)
    pw = next(layer for layer in find_quantized_layers(model, graph) if layer.name.startswith("pw"))
    assert pw.residual is not None and pw.residual.activation is None

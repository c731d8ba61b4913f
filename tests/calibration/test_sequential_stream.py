import copy
import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nncf_calibtip as nc
from nncf_calibtip import compat
from nncf_calibtip.calibration.capture import capture_inputs
from nncf_calibtip.calibration.data import inference_items
from nncf_calibtip.calibration.fp_reference import fp_reference
from nncf_calibtip.calibration.sequential_stream import SequentialInputStream, StreamNotExact, plan_stream
from nncf_calibtip.placement import PrecisionConfig, min_max_algorithm
from nncf_calibtip.quantized_layers import find_quantized_layers
from tests.conftest import ResNetBlocks


def _placed(model, dataset):
    example = next(iter(dataset.get_inference_data()))
    wrapped = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(model)), example)
    q = compat.Pipeline([[min_max_algorithm(PrecisionConfig(4, 4), 256)]]).run(wrapped, dataset)
    return q.model, compat.build_graph(q)


def _sequential(model, dataset, how, bits=(4, 4)):
    cfg = nc.AdaQuantConfig(mode="sequential", iters=20, sequential_inputs=how)
    precision = nc.PrecisionConfig(*bits)
    return nc.quantize(model, dataset, nc.QuantizationConfig(precision=precision, algorithms=(cfg,)))


def _stream_threads():
    return [t for t in threading.enumerate() if t.name == "calibtip-sequential-batch"]


def _torch_threads_of_a_new_thread():
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_plan_quantizes_what_max_pooling_makes_of_a_deferred_input(tiny_model, calib_dataset):
    # relu -> quantizer -> max-pool -> {depthwise conv, residual add}: the add runs after the
    # conv that trains the quantizer, so the pooled values are quantized in place in time.
    model, graph = _placed(tiny_model, calib_dataset)
    plan = plan_stream(graph, find_quantized_layers(model, graph))
    assert [("/max_pool2d/0", 0)] in plan.values()


class PaddedDepthwise(nn.Module):
    """An inverted-residual block with explicit padding: NNCF quantizes the depthwise conv's
    input per channel, and the padded copy is what the stream must quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.project = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand(x))
        y = F.relu6(self.dw(F.pad(y, (1, 1, 1, 1))))
        return x + self.project(y)


def test_per_channel_input_quantizer_behind_padding_is_streamed(calib_dataset):
    model, graph = _placed(PaddedDepthwise().eval(), calib_dataset)
    layers = find_quantized_layers(model, graph)
    dw = next(layer for layer in layers if layer.name.startswith("dw"))
    q = dw.input_quantizer
    assert (q.input_low if isinstance(q, compat.AsymmetricQuantizer) else q.scale).numel() == 16
    assert [("/pad/0", 0)] in plan_stream(graph, layers).values()


@pytest.mark.parametrize(
    ("model_cls", "bits"),
    [(None, (4, 4)), (None, (8, 8)), (PaddedDepthwise, (4, 4)), (ResNetBlocks, (4, 4))],
    # tiny at W8A8: the depthwise conv's deferred input quantizer also feeds the residual add
    # (through max-pooling), so the skip operand of the add must be quantized on release.
    ids=["tiny", "tiny_w8a8", "padded_depthwise", "resnet_blocks"],
)
def test_streamed_inputs_give_the_recomputed_model(model_cls, bits, tiny_model, calib_dataset, test_data):
    model = tiny_model if model_cls is None else model_cls().eval()
    streamed = _sequential(model, calib_dataset, "stream", bits)
    recomputed = _sequential(model, calib_dataset, "recompute", bits)
    with torch.no_grad():
        torch.testing.assert_close(streamed(test_data), recomputed(test_data), rtol=0, atol=1e-6)
    # The stream's hooks and threads are gone: same model structure, no NNCF call wrappers left.
    assert streamed.state_dict().keys() == recomputed.state_dict().keys()
    assert not any("_call_impl" in m.__dict__ for m in streamed.modules())
    assert not _stream_threads()
    assert _torch_threads_of_a_new_thread() == torch.get_num_threads()  # the batches ran on one each


class EarlyUse(nn.Module):
    """The quantized ReLU output feeds a mean before the conv that trains its quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        m = a.mean((2, 3), keepdim=True)
        return self.c2(a) * m


def test_use_before_the_owner_falls_back_to_recomputing(calib_dataset, caplog):
    model = EarlyUse().eval()
    placed, graph = _placed(model, calib_dataset)
    with pytest.raises(StreamNotExact, match="mean.*before that layer runs"):
        plan_stream(graph, find_quantized_layers(placed, graph))
    with caplog.at_level(logging.INFO, logger="nncf"):
        q = _sequential(model, calib_dataset, "stream")
    assert "recomputes each layer's input" in caplog.text
    assert next(q.parameters()).isfinite().all()


class FailsOnBatchOfThree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        if y.shape[0] == 3:
            raise ValueError("a batch of three")
        return self.c2(y)


def test_a_failing_batch_raises_in_the_caller_and_leaves_nothing_behind(calib_dataset, calib_data):
    model, graph = _placed(FailsOnBatchOfThree().eval(), calib_dataset)
    layers = find_quantized_layers(model, graph)
    before = model.state_dict().keys()
    items = [*inference_items(calib_dataset, None)[:2], calib_data[:3]]
    stream = SequentialInputStream(model, layers, items, torch.device("cpu"), plan_stream(graph, layers))
    try:
        assert stream.inputs(layers[0]).shape[0] == 67
        with pytest.raises(ValueError, match="a batch of three"):
            stream.inputs(layers[1])  # the third batch fails on its way to the second layer
    finally:
        stream.close()
    assert not _stream_threads()
    assert model.state_dict().keys() == before
    assert not any("_call_impl" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert model(calib_data[:4]).shape == (4, 8, 16, 16)


def test_layers_must_come_in_execution_order(tiny_model, calib_dataset):
    model, graph = _placed(tiny_model, calib_dataset)
    layers = find_quantized_layers(model, graph)
    items = inference_items(calib_dataset, None)
    stream = SequentialInputStream(model, layers, items, torch.device("cpu"), plan_stream(graph, layers))
    try:
        assert stream.inputs(layers[0]).shape[0] == 256
        with pytest.raises(ValueError, match="execution order"):
            stream.inputs(layers[2])
    finally:
        stream.close()
    assert not _stream_threads()


def test_fp_stream_gives_every_layers_fp_input(tiny_model, calib_dataset):
    model, graph = _placed(tiny_model, calib_dataset)
    fp = fp_reference(model)
    layers = find_quantized_layers(model, graph)
    items = inference_items(calib_dataset, None)
    expected = capture_inputs(fp, [layer.name for layer in layers], items, torch.device("cpu"))
    stream = SequentialInputStream(fp, layers, items, torch.device("cpu"), {}, quantized=False)
    try:
        for layer in layers:
            torch.testing.assert_close(stream.inputs(layer), expected[layer.name], rtol=0, atol=0)
    finally:
        stream.close()
    assert not _stream_threads()
    with pytest.raises(ValueError, match="empty plan"):
        SequentialInputStream(fp, layers, items, torch.device("cpu"), plan_stream(graph, layers), quantized=False)

import copy

import torch

from nncf_calibtip import compat
from nncf_calibtip.calibration.capture import capture_input, capture_inputs
from nncf_calibtip.calibration.data import inference_items, rebatch
from nncf_calibtip.calibration.input_cache import FPInputCache, input_bytes_per_sample


def _wrapped(model, example):
    w = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(model)), example)
    return w.model, w.build_graph()


def test_captured_input_is_the_operations_input(tiny_model, calib_dataset, calib_data):
    model, _ = _wrapped(tiny_model, calib_data[:2])
    items = inference_items(calib_dataset, None)
    x = capture_input(model, "pw/conv2d/0", items, torch.device("cpu"))
    with torch.no_grad():
        y = torch.nn.functional.relu(tiny_model.bn0(tiny_model.stem(calib_data)))
        y = torch.nn.functional.max_pool2d(y, 2)
        expected = torch.nn.functional.relu6(tiny_model.bn1(tiny_model.dw(y)))
    torch.testing.assert_close(x, expected)


def test_several_inputs_in_one_pass_match_single_captures(tiny_model, calib_dataset, calib_data):
    model, _ = _wrapped(tiny_model, calib_data[:2])
    items = inference_items(calib_dataset, None)
    both = capture_inputs(model, ["dw/conv2d/0", "fc/linear/0"], items, torch.device("cpu"))
    torch.testing.assert_close(both["fc/linear/0"], capture_input(model, "fc/linear/0", items, torch.device("cpu")))
    assert both["dw/conv2d/0"].shape == (256, 16, 8, 8)


def test_fp_cache_respects_the_budget(tiny_model, calib_dataset, calib_data):
    model, graph = _wrapped(tiny_model, calib_data[:2])
    names = ["stem/conv2d/0", "dw/conv2d/0", "pw/conv2d/0", "grouped/conv2d/0", "fc/linear/0"]
    nodes = [graph.get_node_by_name(n) for n in names]
    sizes = [input_bytes_per_sample(n) for n in nodes]
    assert sizes[0] == 3 * 16 * 16 * 4
    items = inference_items(calib_dataset, None)
    strict = FPInputCache(model, names, sizes, items, torch.device("cpu"), budget_bytes=0)
    roomy = FPInputCache(model, names, sizes, items, torch.device("cpu"), budget_bytes=10**9)
    for name in names:
        torch.testing.assert_close(strict.pop(name), roomy.pop(name))
    assert strict.passes == len(names) and roomy.passes == 1


def test_rebatch_joins_tensor_items_only():
    items = [torch.zeros(32, 3), torch.zeros(32, 3), torch.zeros(16, 3)]
    assert [len(b) for b in rebatch(items, 64)] == [64, 16]
    mixed = [{"x": torch.zeros(2)}, {"x": torch.zeros(2)}]
    assert rebatch(mixed, 64) == mixed

import pytest
import torch
import torch.nn.functional as F

from nncf_calibtip.algorithms.adaquant.depthwise_matmul import MAX_POSITIONS, SmallMapDepthwise
from nncf_calibtip.quantized_layers import call_op, find_quantized_layers
from tests.test_quantized_layers import _placed


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "dilation"),
    [
        ((2, 2), 5, 1, 2, 1),
        ((4, 4), 3, 1, 1, 1),
        ((8, 8), 5, 2, 2, 1),
        ((7, 5), 3, 2, 0, 1),
        ((6, 6), 3, 1, 2, 2),
        ((4, 8), (3, 1), 1, (1, 0), 1),
    ],
)
def test_matches_the_convolution_forward_and_backward(size, kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(0)
    c = 12
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(5, c, *size, generator=g, requires_grad=True)
    w = torch.randn(c, 1, *k, generator=g, requires_grad=True)
    b = torch.randn(c, generator=g, requires_grad=True)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    op = SmallMapDepthwise(pair(stride), pair(padding), pair(dilation))
    y = op(x, w, b)
    y_ref = F.conv2d(x, w, b, stride, padding, dilation, c)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y_ref.shape, generator=g)
    grads = torch.autograd.grad(y, (x, w, b), gy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), gy)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_large_maps_use_the_convolution_itself():
    x = torch.randn(2, 4, 9, 9)  # 81 positions
    assert MAX_POSITIONS < 81
    w = torch.randn(4, 1, 3, 3)
    op = SmallMapDepthwise((1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(op(x, w, None), F.conv2d(x, w, None, 1, 1, 1, 4), rtol=0, atol=0)
    assert not op._taps


def test_only_depthwise_nodes_get_the_matrix_form(tiny_model, calib_dataset):
    model, graph = _placed(tiny_model, calib_dataset)
    layers = {layer.name.split("/")[0]: layer for layer in find_quantized_layers(model, graph)}
    assert {name for name, layer in layers.items() if SmallMapDepthwise.for_node(layer.node)} == {"dw"}
    dw = layers["dw"]
    op = SmallMapDepthwise.for_node(dw.node)
    x = torch.randn(3, 16, 8, 8)
    weight = dict(model.named_parameters())[dw.weight_name]
    torch.testing.assert_close(op(x, weight, None), call_op(dw.node, {0: x, 1: weight, 2: None}), rtol=1e-5, atol=1e-5)

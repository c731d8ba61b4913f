import copy

import nncf
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.config import AdaQuantConfig
from nncf_calibtip.algorithms.adaquant.layer_problem import LayerProblem, batch_norm_affine
from nncf_calibtip.placement import PrecisionConfig, min_max_algorithm
from nncf_calibtip.quantized_layers import find_quantized_layers


class BatchNormAfterLayers(nn.Module):
    """A BatchNorm after a conv (with and without bias), after a 2-D linear (affine=False) and
    after a linear on 3-D input, where the linear's channels are not the BatchNorm's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 6, 1)
        self.bn_b = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 36, 5)
        self.bn_fc = nn.BatchNorm1d(5, affine=False)
        self.seq = nn.Linear(6, 4)
        self.bn_seq = nn.BatchNorm1d(6)
        gen = torch.Generator().manual_seed(0)
        for bn in (self.bn, self.bn_b, self.bn_fc, self.bn_seq):
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.2, 2.0, generator=gen)
            if bn.affine:
                bn.weight.data.uniform_(0.5, 1.5, generator=gen)
                bn.bias.data.uniform_(-0.3, 0.3, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn(self.conv(x)))
        y = F.relu(self.bn_b(self.conv_b(y)))
        a = self.bn_fc(self.fc(y.flatten(1)))
        b = self.bn_seq(self.seq(y.flatten(2).transpose(1, 2)[:, :6]))  # [N, 6, 4]: BN over 6
        return a.sum(1) + b.sum((1, 2))


def _layers(model: nn.Module):
    data = nncf.Dataset([torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    wrapped = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(model)), next(iter(data.get_inference_data())))
    q = compat.Pipeline([[min_max_algorithm(PrecisionConfig(4, 4, keep_first_last_8bit=False), 8)]]).run(wrapped, data)
    model = compat.unwrap(q)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {layer.name.split("/")[0]: layer for layer in find_quantized_layers(model, compat.build_graph(q))}, tensors


@pytest.mark.parametrize("name", ["conv", "conv_b", "fc", "seq"])
def test_folded_batch_norm_is_the_same_function(name):
    model = BatchNormAfterLayers().eval()
    layers, tensors = _layers(model)
    layer = layers[name]
    assert layer.batch_norm is not None
    problem = LayerProblem(layer, tensors, AdaQuantConfig(), train_input_range=True, output_rms=0.7)
    assert batch_norm_affine(layer, problem.fp.bn) is not None
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero changes of every kind, as in the middle of a fit
        for t in (problem.delta_w, problem.delta_scale, problem.delta_b, problem.low_shift, problem.range_scale):
            t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    x = {"conv": (4, 3, 8, 8), "conv_b": (4, 8, 6, 6), "fc": (4, 216), "seq": (4, 6, 6)}[name]
    x = torch.randn(x, generator=gen).abs()
    folded = problem.quantized_output(x)
    problem._bn_fold = None  # the model's own BatchNorm call after the layer
    unfolded = problem.quantized_output(x)
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)


def test_training_mode_batch_norm_is_not_folded():
    model = BatchNormAfterLayers().eval()
    layers, tensors = _layers(model)
    layer = layers["conv"]
    attrs = layer.batch_norm.layer_attributes
    args = list(attrs.op_args)
    args[5] = True
    layer.batch_norm.layer_attributes = compat.PT2OpLayerAttributes(
        func=attrs.func, op_args=tuple(args), op_kwargs=attrs.op_kwargs, constant_port_ids=attrs.constant_port_ids
    )
    assert batch_norm_affine(layer, {p: tensors[n] for p, n in layer.batch_norm_params.items()}) is None


def test_chunks_are_bounded_by_bytes_and_give_the_same_result(monkeypatch):
    from nncf_calibtip.algorithms.adaquant import layer_problem, torch_backend

    # A 256-channel 56x56 map (ResNet-50 at 224 px): 3.2 MB per sample, 41 samples per chunk.
    big = torch.zeros(1, 256, 56, 56).expand(1000, -1, -1, -1)
    assert layer_problem.samples_per_chunk(big) == 41
    assert layer_problem.samples_per_chunk(torch.zeros(300, 16, 32, 32), None) == 256
    # The first chunk is sized by the input (12 samples of 32 bytes), the rest by the output
    # (3 samples of 128 bytes); the result equals one pass.
    monkeypatch.setattr(layer_problem, "CHUNK_BYTES", 3 * 128)
    x, seen = torch.randn(20, 8), []

    def widen(a: torch.Tensor) -> torch.Tensor:
        seen.append(len(a))
        return torch.cat([a, a * 2, a * 3, a * 4], 1)

    out = torch_backend._in_chunks(widen, x)
    torch.testing.assert_close(out, widen(x), rtol=0, atol=0)
    assert seen[:-1] == [12, 3, 3, 2]

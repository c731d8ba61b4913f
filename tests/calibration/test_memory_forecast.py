import copy
import logging

import nncf
import torch
import torch.nn.functional as F
from torch import nn

import nncf_calibtip as nc
from nncf_calibtip import compat
from nncf_calibtip.calibration import memory_forecast
from nncf_calibtip.calibration.memory_forecast import MemoryForecast, forecast_adaquant_memory, memory_warning
from nncf_calibtip.placement import PrecisionConfig, min_max_algorithm
from nncf_calibtip.quantized_layers import find_quantized_layers


class Chain(nn.Module):
    """Four convs at 16x16; with ``long_skip`` the stem's output is added to the last conv's
    output, so both models keep it alive while every later layer is fitted (a U-Net's skip)."""

    def __init__(self, long_skip: bool, wide: int = 8) -> None:
        super().__init__()
        self.long_skip = long_skip
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, wide, 3, padding=1)
        self.c2 = nn.Conv2d(wide, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        y = self.c3(F.relu(self.c2(F.relu(self.c1(s)))))
        if self.long_skip:
            y = y + s
        return self.fc(F.relu(y).mean((2, 3)))


def _dataset(n: int = 8) -> nncf.Dataset:
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return nncf.Dataset([x[i : i + 4] for i in range(0, n, 4)])


def _forecast(model: nn.Module, samples: int = 1000, streamed: bool = True) -> MemoryForecast:
    dataset = _dataset()
    example = next(iter(dataset.get_inference_data()))
    wrapped = compat.GraphModelWrapper(compat.wrap_model(copy.deepcopy(model)), example)
    q = compat.Pipeline([[min_max_algorithm(PrecisionConfig(4, 4), 8)]]).run(wrapped, dataset)
    graph = compat.build_graph(q)
    layers = find_quantized_layers(q.model, graph)
    return forecast_adaquant_memory(graph, layers, samples, streamed=streamed, fp_cache_bytes=2**20)


#: Bytes of one sample of an 8-channel 16x16 float map.
MAP = 8 * 16 * 16 * 4


def test_a_tensor_kept_for_later_counts_in_both_models():
    plain, skip = _forecast(Chain(long_skip=False)), _forecast(Chain(long_skip=True))
    # The stem's output stays alive in the quantized and in the FP model.
    assert skip.bytes_per_sample - plain.bytes_per_sample >= 2 * MAP
    # The layer's own data alone: its input twice (as captured, and quantized), its target,
    # and in a stream, its input in both paused models.
    assert plain.bytes_per_sample >= 5 * MAP
    assert plain.total_bytes == plain.bytes_per_sample * 1000


def test_the_peak_is_at_the_widest_layer_and_grows_with_it():
    narrow, wide = _forecast(Chain(long_skip=False)), _forecast(Chain(long_skip=False, wide=64))
    assert wide.peak_layer == "c2/conv2d/0"  # reads the 64-channel map
    assert wide.bytes_per_sample >= 4 * 8 * MAP > narrow.bytes_per_sample


def test_recomputed_inputs_hold_less_per_sample_and_the_cache_budget():
    streamed, recompute = _forecast(Chain(True)), _forecast(Chain(True), streamed=False)
    assert recompute.bytes_per_sample < streamed.bytes_per_sample
    assert recompute.fixed_bytes == 2**20 and streamed.fixed_bytes == 0


def test_warning_names_how_many_samples_fit():
    f = MemoryForecast(bytes_per_sample=10 * 2**20, samples=1024, peak_layer="layer1")
    assert memory_warning(f, f.total_bytes) is None
    message = memory_warning(f, 300 * 2**20)
    assert "subset_size to at most 30" in message and "layer1" in message
    assert "recompute" not in message
    small = MemoryForecast(bytes_per_sample=2**18, samples=1024, peak_layer="layer1", fixed_bytes=2**20)
    assert 'sequential_inputs="recompute"' in memory_warning(f, 300 * 2**20, recompute=small)


def test_adaquant_logs_the_forecast_and_warns_when_it_cannot_fit(monkeypatch, caplog):
    model = Chain(long_skip=True)
    config = nc.QuantizationConfig(precision=nc.PrecisionConfig(4, 4), algorithms=(nc.AdaQuantConfig(iters=2),))
    with caplog.at_level(logging.INFO, logger="nncf"):
        nc.quantize(model, _dataset(64), config)
    assert "AdaQuant's calibration data: at least" in caplog.text
    assert "will likely run out of memory" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(memory_forecast.psutil, "virtual_memory", lambda: type("M", (), {"available": 2**16})())
    with caplog.at_level(logging.INFO, logger="nncf"):
        nc.quantize(model, _dataset(64), config)  # a warning, not an error: the bound may be met
    assert "will likely run out of memory: lower subset_size to at most" in caplog.text

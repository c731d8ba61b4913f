"""A lower bound on the memory AdaQuant's calibration data takes, read off the NNCF graph
before any work, so that a run that cannot fit says so before its first layer.

Sequential AdaQuant streams every calibration batch through the quantized and the FP model at
once, each batch paused before the layer being fitted (see :mod:`.sequential_stream`). A paused
batch holds at least what its forward pass still needs at that point: every activation made
before the layer and used at or after it (a residual block's input, a U-Net's encoder outputs,
a DenseNet's concatenated features). The graph gives both: nodes are numbered in execution
order and every edge carries its traced shape. On top of that the layer being fitted caches
its inputs, a quantized copy of them, its targets and its residual add's other operand, for
all samples. All of it grows with the number of samples, so the forecast is per sample.

It is a lower bound: Python code may keep a tensor past its last use in the graph (a module's
argument lives until the module returns), and the allocator keeps freed memory. Measured
growth of the peak RSS per sample against the forecast (sequential W4A4): ResNet-50 at 224 px
up to ``layer2`` 21.4 MiB / 18.4 MiB, ResNet-18 at 224 px 8.9 / 6.9 MiB, EfficientNet-Lite0
at 64 px 3.2 / 1.7 MiB, ResNet-20 at 28 px 0.98 / 0.43 MiB: closer where the activations are
large, which is where memory runs out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil
import torch

from nncf_calibtip import compat
from nncf_calibtip.calibration.input_cache import input_bytes_per_sample
from nncf_calibtip.quantized_layers import QuantizedLayer

#: Bytes per element of the activations (NNCF's graph does not record the float width).
ELEMENT_BYTES = 4


@dataclass(frozen=True)
class MemoryForecast:
    """The calibration data AdaQuant holds at its peak.

    :param bytes_per_sample: Bytes per calibration sample at the peak.
    :param samples: Calibration samples.
    :param peak_layer: The layer being fitted at the peak.
    :param fixed_bytes: Bytes that do not grow with the samples (the FP input cache's budget).
    """

    bytes_per_sample: int
    samples: int
    peak_layer: str
    fixed_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_sample * self.samples + self.fixed_bytes

    def describe(self) -> str:
        mb = self.bytes_per_sample / 2**20
        return (
            f"at least {self.total_bytes / 2**30:.1f} GiB for {self.samples} samples "
            f"({mb:.2f} MiB per sample, peak at {self.peak_layer})"
        )

    def samples_within(self, available_bytes: int) -> int:
        """The most samples whose data fits in ``available_bytes``."""
        return max(0, (available_bytes - self.fixed_bytes) // max(self.bytes_per_sample, 1))


def _batch_size(graph: compat.NNCFGraph) -> int:
    """The traced batch size: the first dimension of the model's inputs (the largest, should
    one input not be batched, so that the forecast stays a lower bound)."""
    dims = [
        int(edge.tensor_shape[0])
        for node in graph.get_input_nodes()
        for edge in graph.get_output_edges(node)
        if edge.tensor_shape
    ]
    return max([*dims, 1])


def _activation_tensors(graph: compat.NNCFGraph) -> dict[tuple[int, int], tuple[int, int]]:
    """Every tensor that carries calibration data: ``(node id, output port) -> (bytes of
    the traced batch, id of its last consumer)``. Data tensors are those reachable from the
    model's inputs; weights and their quantizers are not."""
    data_nodes = set()
    stack = list(graph.get_input_nodes())
    while stack:
        node = stack.pop()
        if node.node_id in data_nodes:
            continue
        data_nodes.add(node.node_id)
        stack += [e.to_node for e in graph.get_output_edges(node)]
    tensors: dict[tuple[int, int], tuple[int, int]] = {}
    for nid in data_nodes:
        for edge in graph.get_output_edges(graph.get_node_by_id(nid)):
            key = (nid, edge.output_port_id)
            size = math.prod(int(d) for d in edge.tensor_shape) * ELEMENT_BYTES
            _, last = tensors.get(key, (size, nid))
            tensors[key] = (size, max(last, edge.to_node.node_id))
    return tensors


def _fp_view(graph: compat.NNCFGraph, tensors: dict) -> dict[tuple[int, int], tuple[int, int]]:
    """The tensors of the FP reference model: its quantizers are off and hand their input on
    unchanged, so a quantizer's output is its input, whose life extends to the quantizer's
    consumers."""
    out = dict(tensors)
    # Execution order: a chain of quantizers resolves front to back.
    for key in sorted(tensors):
        nid, _ = key
        node = graph.get_node_by_id(nid)
        if not compat.is_hook_node(node) or key not in out:
            continue
        size, last = out.pop(key)
        for edge in graph.get_input_edges(node):
            src = (edge.from_node.node_id, edge.output_port_id)
            if src in out:
                src_size, src_last = out[src]
                out[src] = (src_size, max(src_last, last))
    return out


def _live_bytes(tensors: dict[tuple[int, int], tuple[int, int]], before: int) -> int:
    """Bytes of the tensors made before node ``before`` and used at or after it."""
    return sum(size for (nid, _), (size, last) in tensors.items() if nid < before <= last)


def _output_bytes(graph: compat.NNCFGraph, node: compat.NNCFNode) -> int:
    edges = graph.get_output_edges(node)
    return math.prod(int(d) for d in edges[0].tensor_shape) * ELEMENT_BYTES if edges else 0


def forecast_adaquant_memory(
    graph: compat.NNCFGraph,
    layers: Sequence[QuantizedLayer],
    samples: int,
    *,
    streamed: bool,
    residual_layers: Iterable[str] = (),
    fp_cache_bytes: int = 0,
    quantized_input_copy: bool = True,
) -> MemoryForecast:
    """Forecast the calibration data AdaQuant holds, layer by layer, and return the peak.

    :param graph: The quantized model's NNCF graph.
    :param layers: The layers AdaQuant fits, in execution order.
    :param samples: Calibration samples.
    :param streamed: Sequential mode streaming both models (batches paused at each layer);
        False for parallel mode or recomputed inputs (one batch at a time, FP inputs cached
        under ``fp_cache_bytes``).
    :param residual_layers: Layers fitted through their residual add (they also cache the add's
        other operand).
    :param fp_cache_bytes: Budget of the FP input cache when not streamed.
    :param quantized_input_copy: Whether a layer with an input quantizer keeps a quantized copy
        of its inputs (once its input range stops training).
    """
    batch = _batch_size(graph)
    tensors = _activation_tensors(graph)
    fp_tensors = _fp_view(graph, tensors)
    residual = set(residual_layers)
    best = (-1, "")
    for layer in layers:
        nid = layer.node.node_id
        y = _output_bytes(graph, layer.node)
        # Inputs as captured, the same quantized once the range is fixed, the targets, and
        # for a residual add its other operand (recorded by the stream, then gathered).
        copies = 2 if quantized_input_copy and layer.input_quantizer is not None else 1
        traced = y + (2 * y if layer.name in residual else 0)
        if streamed:
            traced += _live_bytes(tensors, nid) + _live_bytes(fp_tensors, nid)
        per_sample = copies * input_bytes_per_sample(layer.node) + -(-traced // batch)
        best = max(best, (per_sample, layer.name))
    return MemoryForecast(best[0], samples, best[1], 0 if streamed else fp_cache_bytes)


def memory_warning(
    forecast: MemoryForecast, available_bytes: int, recompute: MemoryForecast | None = None
) -> str | None:
    """What to tell the user when the forecast exceeds the memory available (None if it fits).

    :param recompute: The forecast with ``sequential_inputs="recompute"``, offered when it fits.
    """
    if forecast.total_bytes <= available_bytes:
        return None
    fixes = [f"lower subset_size to at most {forecast.samples_within(available_bytes)}"]
    if recompute is not None and recompute.total_bytes <= available_bytes:
        fixes.append(
            'set sequential_inputs="recompute" (holds one layer\'s input; re-runs the model up to each layer, slower)'
        )
    return (
        f"AdaQuant's calibration data will take {forecast.describe()}, more than the "
        f"{available_bytes / 2**30:.1f} GiB available, and will likely run out of memory: " + ", or ".join(fixes) + "."
    )


def available_memory(device: torch.device) -> int:
    """Bytes free for the calibration data on ``device`` (host RAM for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)

"""Find the quantized conv/linear layers of a model NNCF has placed quantizers in.

Everything is read from the NNCF graph, not from module names or types: a layer is a
conv/linear operation whose weight comes from a model parameter; its weight quantizer is the
pre-hook on the weight port; its input quantizer is the activation quantizer that feeds its
data port, possibly through operations a quantizer commutes with (padding, max-pooling,
reshapes); the BatchNorm and the activation that follow it (when the graph shows them as its
only consumers) belong to its reconstruction target, and so does a residual add that takes
the output next (with the activation after the add).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nncf_calibtip import compat


@dataclass(frozen=True)
class ResidualAdd:
    """A residual add that takes a layer's output (after its BatchNorm) as one operand.

    :param add: The add node.
    :param skip_port: The add's input port of the other operand (the skip branch).
    :param source: The operation ``(name, output port)`` that computes the skip operand (past
        NNCF's hooks); it runs before the layer.
    :param activation: An element-wise activation that is the add's only consumer, or None.
    """

    add: compat.NNCFNode
    skip_port: int
    source: tuple[str, int]
    activation: compat.NNCFNode | None


@dataclass
class QuantizedLayer:
    """One weighted operation and the quantizers and follow-up operations around it.

    :param name: NNCF graph node name, e.g. ``"layers.0.conv1/conv2d/0"``; the key of the plan.
    :param node: The graph node of the operation.
    :param weight_name: Name of the weight parameter in the model.
    :param bias_name: Name of the bias parameter, or None when the operation has no bias.
    :param weight_quantizer: NNCF quantizer applied to the weight.
    :param weight_quantizer_key: Hook name of ``weight_quantizer``.
    :param input_quantizer: NNCF quantizer of the activation that feeds the layer, or None.
    :param input_quantizer_key: Hook name of ``input_quantizer`` (shared quantizers share it).
    :param batch_norm: A BatchNorm node that is the layer output's only consumer, or None.
    :param batch_norm_params: Names of the BatchNorm's tensors by port (weight 1, bias 2,
        running mean 3, running variance 4).
    :param activation: An element-wise activation node after the layer (or its BatchNorm).
    :param residual: The residual add the output goes into next (only when no activation
        comes first), or None.
    :param is_first: No other quantized layer lies between the model input and this layer.
    :param is_last: No other quantized layer lies between this layer and a model output.
    """

    name: str
    node: compat.NNCFNode
    weight_name: str
    bias_name: str | None
    weight_quantizer: compat.BaseQuantizer
    weight_quantizer_key: str
    input_quantizer: compat.BaseQuantizer | None
    input_quantizer_key: str | None
    batch_norm: compat.NNCFNode | None
    batch_norm_params: dict[int, str]
    activation: compat.NNCFNode | None
    residual: ResidualAdd | None = None
    is_first: bool = False
    is_last: bool = False

    @property
    def num_weights(self) -> int:
        """Number of weight elements (the weight shape is in the graph)."""
        shape = self.node.layer_attributes.op_args[1].shape
        n = 1
        for d in shape:
            n *= int(d)
        return n

    @property
    def is_linear(self) -> bool:
        return self.node.metatype is compat.LINEAR_METATYPE

    @property
    def output_channel_dim(self) -> int:
        """Channel axis of the layer output: last for linear layers, 1 for convolutions."""
        return -1 if self.is_linear else 1


def hooks_at(storage: nn.Module, kind: str, op_name: str, port: int) -> list[tuple[str, nn.Module]]:
    """Hooks registered on one port: ``[(hook name, module)]``."""
    key = f"{op_name.replace('.', ':')}__{port}"
    table = getattr(storage, kind)
    if key not in table:
        return []
    return [(f"{kind}.{key}.{i}", hook) for i, hook in table[key].items()]


def _quantizer_at(storage: nn.Module, kind: str, op_name: str, port: int) -> tuple[str, compat.BaseQuantizer] | None:
    for name, hook in hooks_at(storage, kind, op_name, port):
        if isinstance(hook, compat.BaseQuantizer):
            return name, hook
    return None


def _producer(graph: compat.NNCFGraph, node: compat.NNCFNode, port: int) -> tuple[compat.NNCFNode, int] | None:
    """The model operation (and its output port) feeding ``port`` of ``node``, past NNCF's hooks."""
    while True:
        edges = [e for e in graph.get_input_edges(node) if e.input_port_id == port]
        if len(edges) != 1:
            return None
        node, out_port = edges[0].from_node, edges[0].output_port_id
        if not compat.is_hook_node(node):
            return node, out_port
        port = 0


def _single_consumer(graph: compat.NNCFGraph, node: compat.NNCFNode) -> compat.NNCFNode | None:
    edges = graph.get_output_edges(node)
    consumers = {e.to_node.node_id for e in edges}
    if len(consumers) != 1 or edges[0].input_port_id != 0:
        return None
    return edges[0].to_node


def _consumer_past_hooks(graph: compat.NNCFGraph, node: compat.NNCFNode) -> compat.NNCFGraphEdge | None:
    """The edge into the only model operation that uses ``node``'s output (past NNCF's hooks)."""
    while True:
        edges = graph.get_output_edges(node)
        if len({e.to_node.node_id for e in edges}) != 1:
            return None
        if not compat.is_hook_node(edges[0].to_node):
            return edges[0]
        node = edges[0].to_node


def _residual_add(graph: compat.NNCFGraph, layer: compat.NNCFNode, tail: compat.NNCFNode) -> ResidualAdd | None:
    """The residual add ``tail`` (the layer or its BatchNorm) feeds, when the add is a plain
    ``a + b`` of equal shapes whose other operand is computed before the layer runs."""
    edge = _consumer_past_hooks(graph, tail)
    if edge is None or edge.to_node.metatype is not compat.ADD_METATYPE:
        return None
    add = edge.to_node
    attrs = add.layer_attributes
    if not isinstance(attrs, compat.PT2OpLayerAttributes) or attrs.op_kwargs or len(attrs.op_args) != 2:
        return None  # alpha, out=, or a constant operand
    inputs = {e.input_port_id: e for e in graph.get_input_edges(add)}
    if set(inputs) != {0, 1}:
        return None
    skip_port = 1 - edge.input_port_id
    if list(inputs[skip_port].tensor_shape) != list(edge.tensor_shape):
        return None  # broadcasting
    source = _producer(graph, add, skip_port)
    if source is None or source[0].metatype is compat.CONST_METATYPE or source[0].node_id >= layer.node_id:
        return None  # node ids follow execution order: the skip must be ready when the layer is fitted
    after = _consumer_past_hooks(graph, add)
    act = after.to_node if after is not None and after.to_node.metatype in compat.ACTIVATION_METATYPES else None
    return ResidualAdd(add=add, skip_port=skip_port, source=(source[0].node_name, source[1]), activation=act)


def const_inputs(graph: compat.NNCFGraph, node: compat.NNCFNode) -> dict[int, str]:
    """Names of the model parameters/buffers feeding ``node``, by input port (past NNCF's hooks)."""
    out = {}
    for e in graph.get_input_edges(node):
        found = _producer(graph, node, e.input_port_id)
        if found is not None and found[0].metatype is compat.CONST_METATYPE:
            out[e.input_port_id] = found[0].node_name
    return out


def is_quantization_agnostic(node: compat.NNCFNode) -> bool:
    """Whether a quantizer commutes with the operation (NNCF propagates quantizers through it)."""
    m = node.metatype
    return isinstance(m, type) and issubclass(m, compat.QUANTIZATION_AGNOSTIC_METATYPES)


def _input_quantizer(
    graph: compat.NNCFGraph, storage: nn.Module, node: compat.NNCFNode
) -> tuple[str, compat.BaseQuantizer] | None:
    """The quantizer whose output reaches ``node``'s data port through quantization-agnostic ops."""
    port_node, port = node, 0
    while True:
        found = _quantizer_at(storage, "pre_hooks", port_node.node_name, port)
        if found:
            return found
        source = _producer(graph, port_node, port)
        if source is None:
            return None
        producer, out_port = source
        found = _quantizer_at(storage, "post_hooks", producer.node_name, out_port)
        if found:
            return found
        if not is_quantization_agnostic(producer):
            return None
        port_node, port = producer, 0


def _reaches(graph: compat.NNCFGraph, start: compat.NNCFNode, targets: set[str], upstream: bool) -> bool:
    """Whether a node in ``targets`` is an ancestor (``upstream``) or descendant of ``start``."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        nxt = graph.get_previous_nodes(node) if upstream else graph.get_next_nodes(node)
        for n in nxt:
            if n.node_id in seen:
                continue
            if n.node_name in targets:
                return True
            seen.add(n.node_id)
            stack.append(n)
    return False


def find_quantized_layers(model: nn.Module, graph: compat.NNCFGraph) -> list[QuantizedLayer]:
    """All conv/linear layers with a weight quantizer, in execution order.

    :param model: A model wrapped by NNCF (``wrap_model``) with quantizers inserted.
    :param graph: Its NNCF graph.
    """
    storage = compat.get_hook_storage(model)
    layers: list[QuantizedLayer] = []
    weight_users: dict[str, list[str]] = {}
    for node in graph.topological_sort():
        if node.metatype not in compat.WEIGHTED_METATYPES:
            continue
        consts = const_inputs(graph, node)
        if 1 not in consts:
            continue  # weight computed at run time: not a layer with a parameter to calibrate
        wq = _quantizer_at(storage, "pre_hooks", node.node_name, 1)
        if wq is None:
            continue  # not quantized (ignored scope)
        weight_users.setdefault(consts[1], []).append(node.node_name)
        iq = _input_quantizer(graph, storage, node)
        bn = _single_consumer(graph, node)
        if bn is not None and bn.metatype not in compat.BATCH_NORM_METATYPES:
            bn = None
        act = _single_consumer(graph, bn or node)
        if act is not None and act.metatype not in compat.ACTIVATION_METATYPES:
            act = None
        residual = _residual_add(graph, node, bn or node) if act is None else None
        layers.append(
            QuantizedLayer(
                name=node.node_name,
                node=node,
                weight_name=consts[1],
                bias_name=consts.get(2),
                weight_quantizer=wq[1],
                weight_quantizer_key=wq[0],
                input_quantizer=iq[1] if iq else None,
                input_quantizer_key=iq[0] if iq else None,
                batch_norm=bn,
                batch_norm_params=const_inputs(graph, bn) if bn is not None else {},
                activation=act,
                residual=residual,
            )
        )
    shared = {k: v for k, v in sorted(weight_users.items()) if len(v) > 1}
    if shared:
        ops = sorted(n for v in shared.values() for n in v)
        msg = (
            f"Weights used by several operations: {shared}; layer-wise calibration needs one weight per layer. "
            f"Exclude those operations with nncf.IgnoredScope(names={ops})."
        )
        raise ValueError(msg)
    names = {layer.name for layer in layers}
    for layer in layers:
        layer.is_first = not _reaches(graph, layer.node, names, upstream=True)
        layer.is_last = not _reaches(graph, layer.node, names, upstream=False)
    return layers


def other_weight_quantizers(model: nn.Module, graph: compat.NNCFGraph, layers: Sequence[QuantizedLayer]) -> list[str]:
    """Operations other than ``layers`` whose constant inputs NNCF quantized (e.g. a transposed conv).

    They keep NNCF's own quantizer: the plan and the calibration cover conv/linear layers only.
    """
    storage = compat.get_hook_storage(model)
    names = {layer.name for layer in layers}
    return [
        node.node_name
        for node in graph.topological_sort()
        if node.node_name not in names
        and any(_quantizer_at(storage, "pre_hooks", node.node_name, port) for port in const_inputs(graph, node))
    ]


def batch_norm_eps(node: compat.NNCFNode) -> float | None:
    """The epsilon of a traced ``torch.batch_norm`` call, or None where the call does not show it."""
    attrs = node.layer_attributes
    if "eps" in attrs.op_kwargs:
        return float(attrs.op_kwargs["eps"])
    args = attrs.op_args
    # torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
    if len(args) > 7 and isinstance(args[7], float):
        return args[7]
    return None


def hook_node_ids(graph: compat.NNCFGraph, key: str) -> set[int]:
    """Ids of the graph nodes of hook ``key`` (a quantizer traces as a few operations)."""
    marker = compat.hook_node_marker(key)
    return {n.node_id for n in graph.get_all_nodes() if marker in n.node_name}


def quantizer_consumers(graph: compat.NNCFGraph, key: str) -> set[tuple[str, int]]:
    """The operations ``(node name, input port)`` that get the output of quantizer ``key``,
    past other hooks and quantization-agnostic operations (padding, max-pooling, reshapes)."""
    family = hook_node_ids(graph, key)
    stack = [e for nid in family for e in graph.get_output_edges(graph.get_node_by_id(nid))]
    seen: set[int] = set(family)
    consumers: set[tuple[str, int]] = set()
    while stack:
        edge = stack.pop()
        node = edge.to_node
        if node.node_id in family:
            continue
        if compat.is_hook_node(node) or is_quantization_agnostic(node):
            if node.node_id not in seen:
                seen.add(node.node_id)
                stack += graph.get_output_edges(node)
        else:
            consumers.add((node.node_name, edge.input_port_id))
    return consumers


def input_quantizer_owners(layers: Sequence[QuantizedLayer]) -> dict[str, QuantizedLayer]:
    """Input quantizer key -> the first layer (in ``layers``' order) using it: the one whose
    calibration trains a quantizer several layers share."""
    owners: dict[str, QuantizedLayer] = {}
    for layer in layers:
        if layer.input_quantizer_key is not None:
            owners.setdefault(layer.input_quantizer_key, layer)
    return owners


def call_op(node: compat.NNCFNode, tensors: Mapping[int, torch.Tensor | None]) -> torch.Tensor:
    """Run the operation of ``node`` again, with the tensors at its ports given by ``tensors``.

    Non-tensor arguments (stride, padding, groups, eps, ...) are the ones recorded when the
    graph was traced, so the call is exactly the model's.
    """
    attrs = node.layer_attributes
    if not isinstance(attrs, compat.PT2OpLayerAttributes):
        msg = f"Node {node.node_name} has no recorded call; rebuild the graph with NNCF's torch tracer."
        raise TypeError(msg)
    args: list[Any] = list(attrs.op_args)
    for port, value in tensors.items():
        if port < len(args):
            args[port] = value
    for i, a in enumerate(args):
        if isinstance(a, compat.TensorMeta):
            msg = f"No tensor given for port {i} of {node.node_name}."
            raise ValueError(msg)
    return attrs.func(*args, **attrs.op_kwargs)

"""Each layer's input from the quantized (or FP) model, with one forward pass per calibration batch.

Sequential AdaQuant fits layer ``k`` on the inputs the quantized model gives it once layers
``0..k-1`` are fitted. Re-running the model up to every layer costs layer evaluations that
grow with the square of the depth: most of sequential AdaQuant's time on a 50-layer network.
Here each calibration batch runs through the model once, in a thread of its own that pauses
before every layer. The main thread collects the layer's input from all paused batches, fits
the layer, and lets the batches go on: they compute the layer with its fitted weights and stop
before the next one. Only one thread runs at a time.

A layer that trains its input quantizer needs its input before quantization. Such quantizers
are deferred while the batches run: they hand on a copy of their input, and once the layer
that owns them is fitted, that copy, and what quantization-agnostic operations (padding,
max-pooling, reshapes) have made of it so far, is quantized in place with the fitted range.
Every later use then sees what the quantized model computes. That is exact unless an
operation other than a layer uses such a value before its owner runs: :func:`plan_stream`
finds those cases in the graph, and the caller then re-runs the model up to each layer instead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.calibration.data import call_model, iterate_on
from nncf_calibtip.quantized_layers import (
    QuantizedLayer,
    hook_node_ids,
    hooks_at,
    input_quantizer_owners,
    is_quantization_agnostic,
)


class StreamNotExact(Exception):
    """The graph has a use of a deferred quantizer's value that streaming cannot reproduce."""


def _derived_outputs(
    graph: compat.NNCFGraph, key: str, owner: QuantizedLayer, layer_names: set[str], per_channel: bool
) -> list[tuple[str, int]]:
    """Outputs ``(op name, port)`` of the quantization-agnostic operations fed by quantizer
    ``key``, which must be quantized in place when its owner is fitted.

    :raises StreamNotExact: when another operation uses the value before the owner runs (node
        ids follow execution order), an agnostic operation mixes it with other tensors, or
        moves the channel axis of a per-channel quantizer's value.
    """
    family = hook_node_ids(graph, key)
    if not family:
        msg = f"the graph has no node of quantizer {key}"
        raise StreamNotExact(msg)
    hook_ops = [graph.get_node_by_id(nid) for nid in family]
    stack = [e for node in hook_ops for e in graph.get_output_edges(node) if e.to_node.node_id not in family]
    outputs: list[tuple[str, int]] = []
    while stack:
        edge = stack.pop()
        node = edge.to_node
        if node.node_id in family or (node.node_name in layer_names and edge.input_port_id == 0):
            continue  # layers re-apply their input quantizer when they go on
        if is_quantization_agnostic(node):
            mixed = [
                e.from_node.node_name
                for e in graph.get_input_edges(node)
                if e.from_node.node_id not in family and e.from_node.metatype is not compat.CONST_METATYPE
            ]
            if mixed:
                msg = f"{node.node_name} combines the input of {owner.name} with {mixed[0]}"
                raise StreamNotExact(msg)
            if per_channel and not issubclass(node.metatype, compat.CHANNEL_PRESERVING_METATYPES):
                msg = f"{node.node_name} reshapes the per-channel quantized input of {owner.name}"
                raise StreamNotExact(msg)
            family.add(node.node_id)
            out_edges = graph.get_output_edges(node)
            outputs += [(node.node_name, p) for p in sorted({e.output_port_id for e in out_edges})]
            stack += out_edges
        elif node.node_id < owner.node.node_id:
            msg = f"{node.node_name} uses the quantized input of {owner.name} before that layer runs"
            raise StreamNotExact(msg)
    return outputs


def _per_tensor(q: compat.BaseQuantizer) -> bool:
    t = q.input_low if isinstance(q, compat.AsymmetricQuantizer) else q.scale
    return t.numel() == 1


def plan_stream(graph: compat.NNCFGraph, layers: Sequence[QuantizedLayer]) -> dict[str, list[tuple[str, int]]]:
    """For each input quantizer a layer trains, the agnostic outputs derived from it.

    :raises StreamNotExact: with the reason, when streaming would not reproduce the model.
    """
    names = {layer.name for layer in layers}
    plan = {}
    for key, owner in input_quantizer_owners(layers).items():
        assert owner.input_quantizer is not None
        plan[key] = _derived_outputs(graph, key, owner, names, not _per_tensor(owner.input_quantizer))
    return plan


class _Abort(Exception):
    """Ends a paused forward pass when the stream closes."""


class _Batch(threading.Thread):
    """One calibration item going through the model, pausing before every layer."""

    def __init__(self, model: nn.Module, item: Any) -> None:
        super().__init__(daemon=True, name="calibtip-sequential-batch")
        self.model, self.item = model, item
        self.paused, self.resumed = threading.Event(), threading.Event()
        self.at: str | None = None  # layer the batch waits before
        self.value: torch.Tensor | None = None  # that layer's input
        self.reply: torch.Tensor | None = None  # what the layer gets when the batch goes on
        self.deferred: dict[str, list[torch.Tensor]] = {}
        self.skips: dict[str, torch.Tensor] = {}  # layer -> its residual add's skip operand
        self.released: set[str] = set()
        self.patches: dict[nn.Module, Any] | None = None
        self.error: BaseException | None = None
        self.started_once = self.finished = self.abort = False

    def run(self) -> None:
        try:
            # One compute thread here: a thread that has run parallel work keeps an OpenMP team
            # of its own while it waits, and with more OpenMP threads than cores the calling
            # thread's team wakes up late (its optimisation ran 10-15% slower).
            torch.set_num_threads(1)
            with torch.no_grad():  # grad mode is per thread
                call_model(self.model, self.item)
        except _Abort:
            pass
        except BaseException as e:  # handed to the main thread
            self.error = e
        finally:
            self.at, self.finished = None, True
            self.paused.set()

    def wait_before(self, op_name: str, x: torch.Tensor) -> torch.Tensor:
        """In this thread: hand ``x`` over, wait, and return what the layer gets instead."""
        self.at, self.value = op_name, x
        self.patches = compat.module_call_patches(self.model)
        self.paused.set()
        self.resumed.wait()
        self.resumed.clear()
        if self.abort:
            raise _Abort
        reply, self.reply, self.value = self.reply, None, None
        assert reply is not None
        return reply

    def advance(self) -> None:
        """In the main thread: start or resume the batch and wait until it pauses or ends."""
        self.paused.clear()
        if self.started_once:
            compat.install_module_call_patches(self.model, self.patches)
            self.resumed.set()
        else:
            compat.install_module_call_patches(self.model, None)
            self.started_once = True
            self.start()
        self.paused.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if not self.started_once or self.finished:
            return
        self.paused.wait()
        compat.install_module_call_patches(self.model, self.patches)
        self.abort = True
        self.resumed.set()
        self.join()


def _current_batch() -> _Batch | None:
    t = threading.current_thread()
    return t if isinstance(t, _Batch) else None


class _PauseBefore(nn.Module):
    """Pre-hook on a layer's data input: a streamed batch stops here."""

    def __init__(self, op_name: str) -> None:
        super().__init__()
        self.op_name = op_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = _current_batch()
        return x if batch is None else batch.wait_before(self.op_name, x)


class _DeferredQuantizer(nn.Module):
    """Stands in for a layer's input quantizer while batches stream: hands on a copy of its
    input, quantized in place once the owning layer is fitted."""

    def __init__(self, key: str, quantizer: nn.Module) -> None:
        super().__init__()
        self.key = key
        object.__setattr__(self, "quantizer", quantizer)  # not a submodule: it stays where it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = _current_batch()
        if batch is None or self.key in batch.released:
            return self.quantizer(x)
        out = x.clone()
        batch.deferred.setdefault(self.key, []).append(out)
        return out


class _RecordDerived(nn.Module):
    """Post-hook on an agnostic operation fed by a deferred quantizer: remembers its output."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def forward(self, y: Any) -> Any:
        batch = _current_batch()
        if batch is not None and self.key not in batch.released and isinstance(y, torch.Tensor):
            batch.deferred.setdefault(self.key, []).append(y)
        return y


class _RecordSkip(nn.Module):
    """Post-hook (the first) on the operation that computes a residual add's skip operand:
    keeps it for the layer whose loss is taken after that add (the add itself runs only after
    the layer, while the batch is paused before it). The tensor itself, not a copy: when it
    derives from a deferred quantizer's value, the release quantizes it in place, as the add
    will see it."""

    def __init__(self, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name

    def forward(self, y: Any) -> Any:
        batch = _current_batch()
        if batch is not None and isinstance(y, torch.Tensor):
            batch.skips[self.layer_name] = y
        return y


class SequentialInputStream:
    """Inputs of the layers, in execution order, from the quantized model as fitted so far.

    :param model: The quantized torch model (NNCF-wrapped), on ``device``.
    :param layers: Its layers in execution order; :meth:`inputs` is called for each in turn.
    :param items: Calibration items (one forward pass, one thread, each).
    :param device: Where the model runs.
    :param plan: :func:`plan_stream` of the model's graph; empty for an FP model.
    :param quantized: Whether ``model`` quantizes. For the FP reference (every quantizer
        off) pass ``False``: the batches then go on with each layer's input as it is, which
        gives the FP inputs of every layer in one pass instead of a pass per window of them.
    :param skips: Layers (with a ``residual``) whose residual add's skip operand
        :meth:`skip_operands` gives.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[QuantizedLayer],
        items: Sequence[Any],
        device: torch.device,
        plan: dict[str, list[tuple[str, int]]],
        *,
        quantized: bool = True,
        skips: Sequence[QuantizedLayer] = (),
    ) -> None:
        if plan and not quantized:
            msg = "An FP stream defers no quantizer: pass an empty plan with quantized=False."
            raise ValueError(msg)
        self._model = model
        self._quantized = quantized
        self._threads = torch.get_num_threads()
        self._layers = list(layers)
        self._next = 0
        self._batches = [_Batch(model, item) for item in iterate_on(items, device)]
        self._handles: list[Any] = []
        self._replaced: dict[str, nn.Module] = {}
        owners = input_quantizer_owners(layers)
        try:
            for layer in self._layers:
                self._handles.append(compat.register_pre_function_hook(model, layer.name, 0, _PauseBefore(layer.name)))
            for key, outputs in plan.items():
                self._replaced[key] = compat.replace_hook(
                    model, key, _DeferredQuantizer(key, owners[key].input_quantizer)
                )
                for op_name, port in outputs:
                    self._handles.append(compat.register_post_function_hook(model, op_name, port, _RecordDerived(key)))
            for layer in skips:
                assert layer.residual is not None
                source, port = layer.residual.source
                self._handles.append(
                    compat.register_first_post_function_hook(model, source, port, _RecordSkip(layer.name))
                )
        except BaseException:
            self.close()
            raise

    def inputs(self, layer: QuantizedLayer) -> torch.Tensor:
        """The input of ``layer`` (before its input quantizer) for every calibration sample.

        The layer before it must be fitted by now: the batches go on through it with its
        current weights and quantizers.
        """
        if self._next >= len(self._layers) or self._layers[self._next].name != layer.name:
            expected = self._layers[self._next].name if self._next < len(self._layers) else "none"
            msg = f"Layers are streamed in execution order: expected {expected}, got {layer.name}."
            raise ValueError(msg)
        previous = self._layers[self._next - 1] if self._next else None
        chunks = []
        for batch in self._batches:
            if previous is not None:
                batch.reply = self._release(batch, previous)
            batch.advance()
            if batch.at != layer.name:
                where = f"before {batch.at}" if batch.at else "at the model output"
                msg = (
                    f"A calibration batch stopped {where} instead of before {layer.name}: the model does not run its "
                    "layers in the order of its traced graph (data-dependent control flow?). Use "
                    "sequential_inputs='recompute'."
                )
                raise RuntimeError(msg)
            assert batch.value is not None
            chunks.append(batch.value)
        self._next += 1
        return torch.cat(chunks)

    @torch.no_grad()
    def skip_operands(self, layer: QuantizedLayer) -> torch.Tensor:
        """The other operand of ``layer``'s residual add for every calibration sample, as the
        add will get it: the recorded value through the quantizers between its source and the
        add (those of layers fitted by now with their fitted ranges). Call after :meth:`inputs`
        of ``layer``; ``layer`` must be among the stream's ``skips``."""
        residual = layer.residual
        assert residual is not None
        storage = compat.get_hook_storage(self._model)
        source, port = residual.source
        hooks = hooks_at(storage, "post_hooks", source, port)
        hooks += hooks_at(storage, "pre_hooks", residual.add.node_name, residual.skip_port)
        chain = []
        for _, hook in hooks:
            hook = hook.quantizer if isinstance(hook, _DeferredQuantizer) else hook
            if self._quantized and isinstance(hook, compat.BaseQuantizer):
                chain.append(hook)
        chunks = []
        for batch in self._batches:
            if layer.name not in batch.skips:
                msg = f"{residual.source[0]} did not run before {layer.name}; use sequential_inputs='recompute'."
                raise RuntimeError(msg)
            t = batch.skips.pop(layer.name)
            for q in chain:
                t = q(t)
            chunks.append(t)
        return torch.cat(chunks)

    @torch.no_grad()
    def _release(self, batch: _Batch, layer: QuantizedLayer) -> torch.Tensor:
        """Quantize what the fitted layer's deferred quantizer handed on; the layer's input."""
        q, key = layer.input_quantizer, layer.input_quantizer_key
        assert batch.value is not None
        if q is None or key is None or not self._quantized:
            return batch.value
        if key in self._replaced and key not in batch.released:
            seen: set[int] = set()
            for t in batch.deferred.pop(key, []):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:  # views of a tensor already quantized change with it
                    seen.add(ptr)
                    t.copy_(q(t))
            batch.released.add(key)
        return q(batch.value)

    def close(self) -> None:
        """End the paused forward passes and take the stream's hooks out of the model."""
        try:
            for batch in self._batches:
                batch.stop()
        finally:
            torch.set_num_threads(self._threads)  # the batches set it (for threads that start later)
            compat.install_module_call_patches(self._model, None)
            for handle in self._handles:
                handle.remove()
            for key, hook in self._replaced.items():
                compat.replace_hook(self._model, key, hook)
            self._handles, self._replaced = [], {}

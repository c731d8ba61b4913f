"""AdaQuant on the torch backend: capture one layer's data, optimise it, write it back."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.backend import AdaQuantBackend, LayerReport
from nncf_calibtip.algorithms.adaquant.config import AdaQuantConfig
from nncf_calibtip.algorithms.adaquant.gptq_start import gptq_start
from nncf_calibtip.algorithms.adaquant.layer_problem import LayerProblem, cosine_lr, samples_per_chunk
from nncf_calibtip.algorithms.adaquant.range_search import search_input_range, search_weight_scales
from nncf_calibtip.calibration.capture import capture_input, capture_inputs, quantizers_disabled
from nncf_calibtip.calibration.data import count_samples
from nncf_calibtip.calibration.fp_reference import fp_reference, remember_fp_state
from nncf_calibtip.calibration.input_cache import FPInputCache, input_bytes_per_sample
from nncf_calibtip.calibration.memory_forecast import available_memory, forecast_adaquant_memory, memory_warning
from nncf_calibtip.calibration.sequential_stream import SequentialInputStream, StreamNotExact, plan_stream
from nncf_calibtip.quantized_layers import QuantizedLayer, call_op, find_quantized_layers


@dataclass
class _Session:
    model: nn.Module
    fp_model: nn.Module
    device: torch.device
    original_device: torch.device
    tensors: dict[str, torch.Tensor]
    fp_inputs: FPInputCache | SequentialInputStream
    stream: SequentialInputStream | None = None

    def fp_input(self, layer: QuantizedLayer) -> torch.Tensor:
        if isinstance(self.fp_inputs, SequentialInputStream):
            return self.fp_inputs.inputs(layer)
        return self.fp_inputs.pop(layer.name)

    def skip_operands(self, layer: QuantizedLayer, items: Sequence[Any], *, fp: bool) -> torch.Tensor:
        """The other operand of ``layer``'s residual add in the FP or the quantized model."""
        stream = self.fp_inputs if fp else self.stream
        if isinstance(stream, SequentialInputStream):
            return stream.skip_operands(layer)
        assert layer.residual is not None
        add = layer.residual.add.node_name
        model = self.fp_model if fp else self.model
        return capture_inputs(model, [add], items, self.device, port=layer.residual.skip_port)[add]


def _through_residual_add(layer: QuantizedLayer, config: AdaQuantConfig) -> bool:
    """Whether the layer's loss is taken after the residual add its output goes into."""
    return layer.residual is not None and config.mode == "sequential" and config.loss_after_residual_add


def _check_memory(
    graph: compat.NNCFGraph,
    layers: Sequence[QuantizedLayer],
    items: Sequence[Any],
    config: AdaQuantConfig,
    device: torch.device,
    *,
    streamed: bool,
    skips: Sequence[QuantizedLayer],
) -> None:
    """Log the calibration data's forecast memory; warn, with the fix, when it cannot fit."""
    range_steps = config.input_range_steps()
    kwargs = {
        "residual_layers": [layer.name for layer in skips],
        "fp_cache_bytes": config.fp_cache_mb * 2**20,
        "quantized_input_copy": not config.optimize_activation_range
        or (range_steps is not None and range_steps < config.iters),
    }
    samples = count_samples(items)
    forecast = forecast_adaquant_memory(graph, layers, samples, streamed=streamed, **kwargs)
    available = available_memory(device)
    compat.nncf_logger.info(
        f"AdaQuant's calibration data: {forecast.describe()}; {available / 2**30:.1f} GiB available on {device.type}"
    )
    if forecast.total_bytes <= available:
        return
    recompute = forecast_adaquant_memory(graph, layers, samples, streamed=False, **kwargs) if streamed else None
    warning = memory_warning(forecast, available, recompute)
    if warning:
        compat.nncf_logger.warning(warning)


def _relative_error(problem: LayerProblem, x: torch.Tensor, y: torch.Tensor, skip: torch.Tensor | None) -> float:
    """``||y_q - y||^2 / ||y||^2`` over a cached set."""
    chunk = samples_per_chunk(x, y)
    ref = sum(float(y[i : i + chunk].double().pow(2).sum()) for i in range(0, len(y), chunk))
    return float(problem.channel_errors(x, y, chunk, skip=skip).sum()) / max(ref, 1e-30)


class PTAdaQuantBackend(AdaQuantBackend):
    """Torch implementation of the AdaQuant steps."""

    def find_layers(self, model: Any, graph: compat.NNCFGraph) -> list[QuantizedLayer]:
        return find_quantized_layers(compat.unwrap(model), graph)

    def start(
        self,
        model: Any,
        graph: compat.NNCFGraph,
        device: torch.device,
        layers: Sequence[QuantizedLayer],
        items: Sequence[Any],
        config: AdaQuantConfig,
    ) -> _Session:
        torch_model = compat.unwrap(model)
        original = next(torch_model.parameters()).device
        torch_model.to(device).eval()
        # The FP reference: the same graph with every quantizer off and the FP weights
        # (AdaQuant changes the model's weights layer by layer).
        remember_fp_state(torch_model)
        fp_model = fp_reference(torch_model)
        tensors = dict(torch_model.named_parameters())
        tensors.update(dict(torch_model.named_buffers()))
        stream = None
        skips = [layer for layer in layers if _through_residual_add(layer, config)]
        plan = None
        if config.mode == "sequential" and config.sequential_inputs == "stream":
            try:
                plan = plan_stream(graph, layers)
            except StreamNotExact as e:
                compat.nncf_logger.info(f"AdaQuant recomputes each layer's input ({e}, so inputs cannot be streamed)")
        _check_memory(graph, layers, items, config, device, streamed=plan is not None, skips=skips)
        if plan is not None:
            stream = SequentialInputStream(torch_model, layers, items, device, plan, skips=skips)
        fp_inputs: FPInputCache | SequentialInputStream
        if stream is not None:
            # The FP model's inputs come the same way, in one pass instead of one per window.
            try:
                fp_inputs = SequentialInputStream(fp_model, layers, items, device, {}, quantized=False, skips=skips)
            except BaseException:
                stream.close()
                raise
        else:
            fp_inputs = FPInputCache(
                fp_model,
                [layer.name for layer in layers],
                [input_bytes_per_sample(layer.node) for layer in layers],
                items,
                device,
                config.fp_cache_mb * 2**20,
            )
        return _Session(torch_model, fp_model, device, original, tensors, fp_inputs, stream)

    def finish(self, session: _Session) -> None:
        for stream in (session.stream, session.fp_inputs):
            if isinstance(stream, SequentialInputStream):
                stream.close()
        session.model.to(session.original_device)
        del session.fp_model

    def calibrate_layer(
        self,
        session: _Session,
        layer: QuantizedLayer,
        items: Sequence[Any],
        config: AdaQuantConfig,
        train_input_range: bool,
        layer_index: int,
    ) -> LayerReport:
        t0 = time.perf_counter()
        # Target: the FP layer (with its BatchNorm and activation) on the FP model's input.
        x_fp = session.fp_input(layer)
        with torch.no_grad():
            y0 = _layer_only_output(layer, session.tensors, x_fp[: samples_per_chunk(x_fp)])
        problem = LayerProblem(layer, session.tensors, config, train_input_range, float(y0.pow(2).mean().sqrt()))
        del y0
        # With a residual add next, the target is the add's output (the block's), and the
        # quantized side gets the skip operand the quantized model computes.
        residual = _through_residual_add(layer, config)
        skip_fp = session.skip_operands(layer, items, fp=True) if residual else None
        targets = _in_chunks(problem.fp_output, x_fp, skip_fp)
        del skip_fp
        skip = None
        x_fp_train = x_fp if config.weight_start == "gptq" else None
        if config.mode == "sequential":
            del x_fp
            # Input from the quantized model as it is now, before the layer's own input
            # quantizer (the problem applies it).
            if session.stream is not None:
                inputs = session.stream.inputs(layer)
            else:
                off = [layer.input_quantizer] if layer.input_quantizer is not None else []
                with quantizers_disabled(off):
                    inputs = capture_input(session.model, layer.name, items, session.device)
            if residual:
                skip = session.skip_operands(layer, items, fp=False)
        else:
            inputs = x_fp
        n = len(inputs)
        n_hold = int(round(n * config.holdout_fraction))
        if n_hold >= n:
            n_hold = 0
        n_train = n - n_hold
        report = slice(n_train, None) if n_hold else slice(None)
        report_x, report_y = inputs[report], targets[report]
        report_skip = _rows(skip, report)
        before = _relative_error(problem, report_x, report_y, report_skip)
        t1 = time.perf_counter()
        if config.range_search:
            m = min(n_train, config.range_search_samples)
            # Input range first: at 4 bits its error dominates, and it changes which weight
            # scales are best.
            search_skip = _rows(skip, slice(m))
            search_input_range(problem, inputs[:m], targets[:m], search_skip)
            search_weight_scales(problem, inputs[:m], targets[:m], search_skip)
        if config.weight_start == "gptq":
            assert x_fp_train is not None
            gptq_start(problem, inputs[:n_train], x_fp_train[:n_train])
        del x_fp_train
        # The start (searched ranges, GPTQ's weights) is a candidate of its own: the steps can
        # end above it (seen on the stem and the first depthwise conv, whose starts are already
        # close to the best they can reach).
        start = _relative_error(problem, report_x, report_y, report_skip) if n_hold else None
        start_state = problem.snapshot() if n_hold else None

        groups = problem.trainable()
        if groups and config.iters > 0:
            opt = torch.optim.Adam(groups)
            base = [g["lr"] for g in groups]
            gen = torch.Generator(device="cpu").manual_seed(config.seed * 100003 + layer_index)
            bs = min(config.batch_size, n_train)
            fixed_range_from = _fixed_range_from(problem, config)
            x_quantized = None
            for step in range(config.iters):
                f = cosine_lr(step, config.iters)
                for g, lr in zip(opt.param_groups, base, strict=False):
                    g["lr"] = lr * f
                if step == fixed_range_from:
                    # From here on the input range does not move: quantize the inputs once.
                    x_quantized = _in_chunks(problem.quantize_input, inputs[:n_train])
                idx = torch.randint(0, n_train, (bs,), generator=gen).to(session.device)
                x = inputs[idx]
                keep_fp = None
                if config.input_drop > 0 and layer.input_quantizer is not None:
                    keep_fp = (torch.rand(x.shape, generator=gen) < config.input_drop).to(session.device)
                skip_batch = _rows(skip, idx)
                if x_quantized is None:
                    out = problem.quantized_output(x, keep_fp, skip=skip_batch)
                else:
                    xq = x_quantized[idx] if keep_fp is None else torch.where(keep_fp, x, x_quantized[idx])
                    out = problem.quantized_output(xq, input_quantized=True, skip=skip_batch)
                loss = F.mse_loss(out, targets[idx])  # one fused pass forward and backward
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            del x_quantized
        after = _relative_error(problem, report_x, report_y, report_skip)
        # Keep the best of round-to-nearest, the start and the fitted layer on held-out samples
        # (round-to-nearest on a tie: it is the start when there is no range search).
        kept, steps_undone = True, False
        if start is not None and start_state is not None:
            if before <= min(start, after):
                problem.reset()
                after, kept = before, False
            elif start < after:
                problem.restore(start_state)
                after, steps_undone = start, True
        problem.write_back()
        return LayerReport(
            name=layer.name,
            samples=n,
            held_out=n_hold,
            error_before=before,
            error_after=after,
            error_start=start,
            kept=kept,
            steps_undone=steps_undone,
            loss_after=layer.residual.add.node_name if residual else None,
            capture_s=t1 - t0,
            optimize_s=time.perf_counter() - t1,
        )


def _fixed_range_from(problem: LayerProblem, config: AdaQuantConfig) -> int | None:
    """The step from which the layer's input range stays fixed (None: it trains throughout,
    or the layer has no input quantizer)."""
    if problem.layer.input_quantizer is None:
        return None
    if not problem.train_input_range:
        return 0
    steps = config.input_range_steps()
    if steps is None or steps >= config.iters:
        return None
    return steps


def _rows(t: torch.Tensor | None, index: slice | torch.Tensor) -> torch.Tensor | None:
    """``t[index]``, or None for an absent per-sample tensor (a layer without a skip operand)."""
    return None if t is None else t[index]


@torch.no_grad()
def _in_chunks(fn: Callable[..., torch.Tensor], x: torch.Tensor, *more: torch.Tensor | None) -> torch.Tensor:
    """``fn`` over a whole cached set in chunks (bounds temporary memory), written into one
    preallocated result (no second copy from concatenating); ``more``: further per-sample
    arguments (None passes None). The chunk size follows the larger of input and output."""
    out: torch.Tensor | None = None
    i, chunk = 0, samples_per_chunk(x, *more)
    while i < len(x):
        rest = [_rows(m, slice(i, i + chunk)) for m in more]
        y = fn(x[i : i + chunk], *rest)
        if out is None:
            out = y.new_empty((len(x), *y.shape[1:]))
            chunk = samples_per_chunk(x, y, *more)
        out[i : i + len(y)] = y
        i += len(y)
    assert out is not None
    return out


def _layer_only_output(layer: QuantizedLayer, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    bias = tensors[layer.bias_name] if layer.bias_name else None
    return call_op(layer.node, {0: x, 1: tensors[layer.weight_name], 2: bias})

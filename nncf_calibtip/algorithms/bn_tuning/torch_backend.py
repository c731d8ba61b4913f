"""BN tuning on the torch backend."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.algorithms.bn_tuning.backend import BNTuningBackend, ChannelStatsReport
from nncf_calibtip.algorithms.bn_tuning.config import BNTuningConfig, Treatment
from nncf_calibtip.calibration.channel_stats import ChannelStats, ChannelStatsHook, distance, std_ratio
from nncf_calibtip.calibration.data import call_model, iterate_on
from nncf_calibtip.calibration.fitted_layers import fitted_layers
from nncf_calibtip.calibration.fp_reference import fp_reference, fp_tensors, remember_fp_state
from nncf_calibtip.placement import MIN_WEIGHT_SCALE
from nncf_calibtip.quantized_layers import QuantizedLayer, batch_norm_eps, find_quantized_layers

#: Channels with a std below this fraction of the layer's largest are treated as dead.
_MIN_STD = 1e-6


def _output_node(layer: QuantizedLayer) -> compat.NNCFNode:
    """Where the layer's channel statistics are taken: after its BatchNorm, if it has one."""
    return layer.batch_norm if layer.batch_norm is not None else layer.node


def _bn_eps(node: compat.NNCFNode) -> float:
    """The epsilon of a traced ``batch_norm`` call."""
    eps = batch_norm_eps(node)
    if eps is None:
        msg = f"Cannot read the epsilon of BatchNorm {node.node_name} from its traced call."
        raise ValueError(msg)
    return eps


def _bn_tensors(layer: QuantizedLayer, tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {port: tensors[name] for port, name in layer.batch_norm_params.items()}


@torch.no_grad()
def _observe(
    model: nn.Module,
    layers: Sequence[QuantizedLayer],
    items: Sequence[Any],
    device: torch.device,
    targets: dict[str, ChannelStats] | None = None,
    max_std_ratios: dict[str, float] | None = None,
) -> dict[str, ChannelStats]:
    """One pass over ``items``: each layer's output statistics (re-normalised to ``targets`` on
    the fly when given, so later layers see corrected inputs)."""
    hooks = {
        layer.name: ChannelStatsHook(
            layer.output_channel_dim,
            targets[layer.name] if targets else None,
            max_std_ratios[layer.name] if max_std_ratios else 1.0,
            _MIN_STD,
        )
        for layer in layers
    }
    with ExitStack() as stack:
        for layer in layers:
            hook = hooks[layer.name].to(device)
            handle = compat.register_first_post_function_hook(model, _output_node(layer).node_name, 0, hook)
            stack.callback(handle.remove)
        for item in iterate_on(items, device):
            call_model(model, item)
    return {name: hook.stats() for name, hook in hooks.items()}


def _max_std_ratios(
    layers: Sequence[QuantizedLayer], treatments: Mapping[str, Treatment], config: BNTuningConfig
) -> dict[str, float]:
    """Per layer, the bound on its std rescaling: 1 (means only) where the treatment says so."""
    return {layer.name: 1.0 if treatments[layer.name] == "means" else config.max_std_ratio for layer in layers}


class PTBNTuningBackend(BNTuningBackend):
    """Torch implementation of BN tuning."""

    def find_layers(self, model: Any, graph: compat.NNCFGraph, config: BNTuningConfig) -> list[QuantizedLayer]:
        layers = find_quantized_layers(compat.unwrap(model), graph)
        out = []
        for layer in layers:
            if layer.is_linear and not config.include_linear:
                continue
            if config.target == "batchnorm" and not {1, 2}.issubset(layer.batch_norm_params):
                continue
            out.append(layer)
        return out

    def fit_modes(self, model: Any) -> Mapping[str, str]:
        return fitted_layers(compat.unwrap(model))

    def tune(
        self,
        model: Any,
        layers: Sequence[QuantizedLayer],
        treatments: Mapping[str, Treatment],
        items: Sequence[Any],
        config: BNTuningConfig,
        device: torch.device,
    ) -> list[ChannelStatsReport]:
        torch_model = compat.unwrap(model)
        original = next(torch_model.parameters()).device
        torch_model.to(device).eval()
        remember_fp_state(torch_model)
        try:
            tensors = dict(torch_model.named_parameters())
            tensors.update(dict(torch_model.named_buffers()))
            targets = self._targets(torch_model, layers, items, config, device, tensors)
            nan = float("nan")
            before = _observe(torch_model, layers, items, device) if config.report else {}
            ratios = _max_std_ratios(layers, treatments, config)
            tuned = _observe(torch_model, layers, items, device, targets, ratios)
            reports = []
            for layer in compat.track(layers, description="BN tuning: folding"):
                t, q = targets[layer.name], tuned[layer.name]
                rescaled, clamped = _fold(torch_model, layer, tensors, t, q, ratios[layer.name])
                b = distance(before[layer.name], t) if config.report else (nan, nan)
                reports.append(ChannelStatsReport(layer.name, int(t.mean.numel()), *b, nan, nan, rescaled, clamped))
            if config.report:
                after = _observe(torch_model, layers, items, device)
                for i, layer in enumerate(layers):
                    r = reports[i]
                    m, s = distance(after[layer.name], targets[layer.name])
                    reports[i] = ChannelStatsReport(
                        r.name, r.channels, r.mean_error_before, r.std_error_before, m, s, r.rescaled, r.clamped
                    )
        finally:
            torch_model.to(original)
        return reports

    @staticmethod
    def _targets(
        model: nn.Module,
        layers: Sequence[QuantizedLayer],
        items: Sequence[Any],
        config: BNTuningConfig,
        device: torch.device,
        tensors: dict[str, torch.Tensor],
    ) -> dict[str, ChannelStats]:
        if config.target == "batchnorm":
            # A BatchNorm's output has mean beta and std |gamma| on the data it was trained on.
            fp = fp_tensors(model)
            out = {}
            for layer in layers:
                bn = _bn_tensors(layer, fp)
                out[layer.name] = ChannelStats(bn[2].float().to(device), bn[1].float().abs().to(device))
            return out
        fp = fp_reference(model).to(device)
        try:
            return _observe(fp, layers, items, device)
        finally:
            del fp


@torch.no_grad()
def _fold(
    model: nn.Module,
    layer: QuantizedLayer,
    tensors: dict[str, torch.Tensor],
    target: ChannelStats,
    tuned: ChannelStats,
    max_std_ratio: float,
) -> tuple[int, int]:
    """Make the layer's output ``a * z + c`` per channel (``a = target/tuned std``, ``c`` moves
    the mean to the target) by scaling the weights and their quantization scales by ``a`` and
    moving the bias. Returns how many channels were rescaled and how many hit the bound."""
    wq = layer.weight_quantizer
    weight = tensors[layer.weight_name]
    channels = weight.shape[0]
    raw = std_ratio(target.std, tuned.std, math.inf, _MIN_STD)
    a = raw.clamp(1 / max_std_ratio, max_std_ratio)
    clamped = int((a != raw).sum()) if max_std_ratio > 1 else 0
    per_channel = _per_channel_scale(wq, channels)
    if not per_channel:
        a = torch.ones_like(a)
        compat.nncf_logger.debug(f"{layer.name}: per-tensor weight quantizer, only the mean is corrected")
    c = target.mean - a * tuned.mean
    a, c = a.to(weight.device, weight.dtype), c.to(weight.device, weight.dtype)
    if per_channel:
        _rescale_weight(layer, weight, a)
    _shift_output(model, layer, tensors, a, c)
    return int((a != 1).sum()), clamped


def _per_channel_scale(wq: compat.BaseQuantizer, channels: int) -> bool:
    value = wq.input_range if isinstance(wq, compat.AsymmetricQuantizer) else wq.scale
    return value.numel() == channels and channels > 1


def _rescale_weight(layer: QuantizedLayer, weight: torch.Tensor, a: torch.Tensor) -> None:
    """``W <- a * Q(W)`` and ``scale <- a * scale``: the quantized weight becomes ``a * Q(W)`` and
    its integers stay exactly as they were (``Q(W)`` lies on the grid, so no rounding moves)."""
    wq = layer.weight_quantizer
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_(wq(weight) * a.view(shape))
    if isinstance(wq, compat.AsymmetricQuantizer):
        wq.input_low.copy_(wq.input_low * a.view_as(wq.input_low))
        compat.store_quantizer_range(wq, wq.input_range.abs() * a.view_as(wq.input_range))
    else:
        scale = wq.scale.abs() * a.view_as(wq.scale)
        compat.store_quantizer_range(wq, scale.clamp_min(MIN_WEIGHT_SCALE))


def _shift_output(
    model: nn.Module, layer: QuantizedLayer, tensors: dict[str, torch.Tensor], a: torch.Tensor, c: torch.Tensor
) -> None:
    """With the weight scaled by ``a``, make the output ``a * z + c``: through the BatchNorm's
    shift when there is one, else through the layer's bias (created when the layer has none)."""
    bias = tensors[layer.bias_name] if layer.bias_name else None
    if bias is not None:
        bias.mul_(a)  # the bias is part of the scaled pre-BatchNorm output
    if layer.batch_norm is not None:
        bn = _bn_tensors(layer, tensors)
        if not {2, 3, 4}.issubset(bn):
            msg = (
                f"BatchNorm after {layer.name} has no shift (affine=False) or no running statistics; BN tuning "
                "cannot fold into it. Exclude the layer with nncf.IgnoredScope."
            )
            raise ValueError(msg)
        # z = g*y + h with g = gamma/sqrt(var+eps), h = beta - g*mean; y -> a*y needs h -> a*h + c.
        gamma = bn[1] if 1 in bn else torch.ones_like(bn[2])
        g = gamma / (bn[4] + _bn_eps(layer.batch_norm)).sqrt()
        bn[2].copy_(a * bn[2] + c + (1 - a) * g * bn[3])
        return
    if bias is not None:
        bias.add_(c)
        return
    owner_name, _, attr = layer.weight_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr != "weight" or not hasattr(owner, "bias") or owner.bias is not None:
        msg = (
            f"{layer.name} has no bias and no BatchNorm after it, and its weight {layer.weight_name} does not "
            "belong to a module with a bias slot; exclude it with nncf.IgnoredScope or give it a bias."
        )
        raise ValueError(msg)
    owner.bias = nn.Parameter(c.clone())

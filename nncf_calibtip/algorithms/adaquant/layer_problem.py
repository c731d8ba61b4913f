"""One layer's AdaQuant problem: its trainable changes, its quantized forward and the update.

The quantized forward reuses NNCF's fake-quantize functions (straight-through rounding, LSQ
gradients for the ranges) on the layer's own NNCF quantizers' settings; the trainable tensors
are *changes* relative to the round-to-nearest start, so that all-zero changes reproduce it
exactly and learning rates are relative to each tensor's scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.config import AdaQuantConfig
from nncf_calibtip.algorithms.adaquant.depthwise_matmul import SmallMapDepthwise
from nncf_calibtip.placement import MIN_WEIGHT_SCALE
from nncf_calibtip.quantized_layers import QuantizedLayer, batch_norm_eps, call_op


@dataclass
class _Tensors:
    weight: torch.Tensor
    bias: torch.Tensor | None
    bn: dict[int, torch.Tensor]


def batch_norm_affine(
    layer: QuantizedLayer, bn: Mapping[int, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The BatchNorm after ``layer`` as ``y * scale + shift`` per output channel, or None when
    it cannot be folded that way (none, not ``torch.batch_norm``, or in training mode).

    :param bn: The BatchNorm's tensors by port (weight 1, bias 2, running mean 3 and variance 4).
    """
    node = layer.batch_norm
    if node is None or not isinstance(node.layer_attributes, compat.PT2OpLayerAttributes):
        return None
    attrs = node.layer_attributes
    eps = batch_norm_eps(node)
    training = attrs.op_kwargs.get("training", len(attrs.op_args) > 5 and attrs.op_args[5])
    if attrs.func is not torch.batch_norm or eps is None or training or 3 not in bn or 4 not in bn:
        return None
    with torch.no_grad():
        scale = torch.rsqrt(bn[4] + eps)
        if 1 in bn:
            scale = scale * bn[1]
        shift = -bn[3] * scale
        if 2 in bn:
            shift = shift + bn[2]
    return scale, shift


def _quantize_input(
    q: compat.BaseQuantizer,
    x: torch.Tensor,
    low_shift: torch.Tensor,
    range_scale: torch.Tensor,
    low0: torch.Tensor,
    range0: torch.Tensor,
) -> torch.Tensor:
    if isinstance(q, compat.AsymmetricQuantizer):
        low, range_ = compat.zero_on_grid(low0 + range0 * low_shift, range0 * (1 + range_scale), q.levels)
        return compat.asymmetric_quantize(x, q.levels, q.level_low, q.level_high, low, range_, q.eps)
    return compat.symmetric_quantize(x, q.levels, q.level_low, q.level_high, range0 * (1 + range_scale), q.eps)


#: Most samples per chunk when a whole cached set is evaluated (error, targets, quantized inputs).
CHUNK_SAMPLES = 256
#: Most bytes of one per-sample tensor in such a chunk. Each chunk makes several temporaries
#: of the layer's output size (output, BatchNorm, activation, difference): at 256 samples of a
#: 256-channel 56x56 map (ResNet-50 at 224 px) each would take 820 MB. Large enough that the
#: sample models' chunks (32x32 maps and smaller) stay at 256 samples.
CHUNK_BYTES = 128 * 2**20


class LayerProblem:
    """Trainable changes of one layer and the functions AdaQuant needs.

    :param layer: The layer.
    :param tensors: The model's parameters and buffers by name.
    :param config: AdaQuant settings.
    :param train_input_range: Whether this layer owns (and so trains) its input quantizer.
    :param output_rms: RMS of the layer's FP output before BatchNorm, the unit of the bias change.
    """

    def __init__(
        self,
        layer: QuantizedLayer,
        tensors: Mapping[str, torch.Tensor],
        config: AdaQuantConfig,
        train_input_range: bool,
        output_rms: float,
    ) -> None:
        self.layer = layer
        self.config = config
        self.fp = _Tensors(
            weight=tensors[layer.weight_name],
            bias=tensors[layer.bias_name] if layer.bias_name else None,
            bn={port: tensors[name] for port, name in layer.batch_norm_params.items()},
        )
        # The weight that all-zero changes round to nearest: the FP weight, or another start
        # (see gptq_start); the changes move around it.
        self.base_weight = self.fp.weight.detach().clone()
        wq = layer.weight_quantizer
        device = self.fp.weight.device
        # Weight grid: [-scale, scale] (symmetric) or [low, low + range] (asymmetric), per
        # output channel. Both ends scale by (1 + delta_scale); an asymmetric grid's low end
        # also shifts by delta_low ranges (its zero point moves).
        self.weight_asymmetric = isinstance(wq, compat.AsymmetricQuantizer)
        if self.weight_asymmetric:
            self.weight_low0 = wq.input_low.detach().clone()
            self.weight_scale0 = wq.input_range.detach().abs().clamp_min(MIN_WEIGHT_SCALE).clone()
            self.weight_step0 = self.weight_scale0 / (wq.levels - 1)
        else:
            self.weight_scale0 = wq.scale.detach().abs().clamp_min(MIN_WEIGHT_SCALE).clone()
            self.weight_step0 = self.weight_scale0 / max(abs(wq.level_high), 1)
        # The initial quantization step per output channel is the unit of the weight change.
        self.delta_w = torch.zeros_like(self.fp.weight, requires_grad=config.lr_weight > 0)
        self.delta_scale = torch.zeros_like(self.weight_scale0, requires_grad=config.optimize_weight_scale)
        self.delta_low = torch.zeros_like(
            self.weight_scale0, requires_grad=config.optimize_weight_scale and self.weight_asymmetric
        )
        # The bias change lives in the layer bias, or in the following BatchNorm's shift.
        self.bias_target: str | None = None
        if config.optimize_bias:
            if layer.bias_name:
                self.bias_target = "bias"
            elif layer.batch_norm is not None and 2 in layer.batch_norm_params:
                self.bias_target = "bn"
        bias_like = self.fp.bias if self.bias_target == "bias" else self.fp.bn.get(2)
        self.delta_b = torch.zeros_like(bias_like, requires_grad=True) if self.bias_target else None
        self.output_rms = max(output_rms, 1e-12)
        # Faster steps for a depthwise conv on a small map (same function, other summation order).
        self._depthwise = SmallMapDepthwise.for_node(layer.node)
        # The quantized forward folds the BatchNorm into the weight and bias (the same function
        # in another rounding order): no pass of its own over the output in every step and its
        # backward. The target keeps the model's own BatchNorm call.
        self._bn_fold = batch_norm_affine(layer, self.fp.bn)
        iq = layer.input_quantizer
        self.train_input_range = train_input_range and iq is not None and config.optimize_activation_range
        if iq is not None:
            if isinstance(iq, compat.AsymmetricQuantizer):
                self.low0 = iq.input_low.detach().clone()
                self.range0 = iq.input_range.detach().abs().clone()
            else:
                self.low0 = torch.zeros_like(iq.scale.detach())
                self.range0 = iq.scale.detach().abs().clone()
            self.low_shift = torch.zeros_like(self.range0, requires_grad=self.train_input_range)
            self.range_scale = torch.zeros_like(self.range0, requires_grad=self.train_input_range)
        self.to(device)

    def to(self, device: torch.device) -> None:
        for name in ("weight_scale0", "weight_step0", "weight_low0", "low0", "range0"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        if self._bn_fold is not None:
            self._bn_fold = (self._bn_fold[0].to(device), self._bn_fold[1].to(device))

    # ------------------------------------------------------------------ forward
    def trainable(self) -> list[dict]:
        """Parameter groups for the optimiser."""
        c = self.config
        groups = []
        if self.delta_w.requires_grad:
            groups.append({"params": [self.delta_w], "lr": c.lr_weight})
        if self.delta_scale.requires_grad:
            groups.append({"params": [self.delta_scale], "lr": c.lr_weight_scale})
        if self.delta_low.requires_grad:
            groups.append({"params": [self.delta_low], "lr": c.lr_weight_scale})
        if self.delta_b is not None:
            groups.append({"params": [self.delta_b], "lr": c.lr_bias})
        if self.train_input_range:
            groups.append({"params": [self.low_shift, self.range_scale], "lr": c.lr_activation_range})
        return groups

    def _weight_change(self) -> torch.Tensor:
        v = self.delta_w
        if self.config.max_weight_change is not None:
            m = self.config.max_weight_change
            v = v.clamp(-m, m)
        return v * self.weight_step0

    def weight_grid(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The weight grid with the current changes: ``(low, range)`` (asymmetric, zero on the
        grid) or ``(None, scale)`` (symmetric)."""
        scale = self.weight_scale0 * (1 + self.delta_scale)
        if not self.weight_asymmetric:
            return None, scale
        low = self.weight_low0 * (1 + self.delta_scale) + self.weight_scale0 * self.delta_low
        return compat.zero_on_grid(low, scale, self.layer.weight_quantizer.levels)

    def quantized_weight(self) -> torch.Tensor:
        wq = self.layer.weight_quantizer
        w = self.base_weight + self._weight_change()
        low, scale = self.weight_grid()
        if low is not None:
            return compat.asymmetric_quantize(w, wq.levels, wq.level_low, wq.level_high, low, scale, wq.eps)
        return compat.symmetric_quantize(w, wq.levels, wq.level_low, wq.level_high, scale, wq.eps)

    def _bias_change(self) -> torch.Tensor | None:
        return None if self.delta_b is None else self.delta_b * self.output_rms

    def _tail(self, y: torch.Tensor, bn_bias_change: torch.Tensor | None) -> torch.Tensor:
        layer = self.layer
        if layer.batch_norm is not None:
            bn = dict(self.fp.bn)
            if bn_bias_change is not None:
                bn[2] = bn[2] + bn_bias_change
            y = call_op(layer.batch_norm, {0: y, **bn})
        return self._activation(y)

    def _activation(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.layer.activation is None else call_op(self.layer.activation, {0: y})

    def _residual_tail(self, y: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """``y`` through the residual add (with ``skip``) and its activation; ``y`` without a skip."""
        if skip is None:
            return y
        assert self.layer.residual is not None
        y = y + skip
        act = self.layer.residual.activation
        return y if act is None else call_op(act, {0: y})

    def fp_output(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The FP layer (with its BatchNorm and activation) on FP input: the target.

        :param skip: The FP model's other operand of the layer's residual add, to take the
            target after the add (and its activation); None for the layer's own output.
        """
        y = call_op(self.layer.node, {0: x, 1: self.fp.weight, 2: self.fp.bias})
        return self._residual_tail(self._tail(y, None), skip)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the layer's input quantizer with the current range (``x`` when it has none)."""
        iq = self.layer.input_quantizer
        if iq is None:
            return x
        return _quantize_input(iq, x, self.low_shift, self.range_scale, self.low0, self.range0)

    def quantized_output(
        self,
        x: torch.Tensor,
        keep_fp: torch.Tensor | None = None,
        *,
        weight: torch.Tensor | None = None,
        input_quantized: bool = False,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The quantized layer on (unquantized) input ``x``, with the current changes.

        :param keep_fp: Optional boolean mask of ``x``'s shape: where set, the input stays
            unquantized (QDrop-style random dropping of the input quantization in training).
        :param weight: The quantized weight to use, when the caller has it already
            (:meth:`quantized_weight` with the current changes); saves re-quantizing it.
        :param input_quantized: ``x`` is already through :meth:`quantize_input`.
        :param skip: The quantized model's other operand of the residual add, as in
            :meth:`fp_output`.
        """
        if not input_quantized:
            xq = self.quantize_input(x)
            x = xq if keep_fp is None else torch.where(keep_fp, x, xq)
        db = self._bias_change()
        bias = self.fp.bias
        if self.bias_target == "bias":
            bias = bias + db
        w = self.quantized_weight() if weight is None else weight
        # A linear layer's channels are its output's last axis, a BatchNorm's the second.
        fold = self._bn_fold is not None and (not self.layer.is_linear or x.dim() == 2)
        if fold:
            scale, shift = self._bn_fold
            if self.bias_target == "bn":
                shift = shift + db
            w = w * scale.view(-1, *([1] * (w.dim() - 1)))
            bias = shift if bias is None else bias * scale + shift
        if self._depthwise is not None:
            y = self._depthwise(x, w, bias)
        else:
            y = call_op(self.layer.node, {0: x, 1: w, 2: bias})
        if fold:
            return self._residual_tail(self._activation(y), skip)
        return self._residual_tail(self._tail(y, db if self.bias_target == "bn" else None), skip)

    @torch.no_grad()
    def channel_errors(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        chunk: int | None = None,
        *,
        weight: torch.Tensor | None = None,
        input_quantized: bool = False,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Squared error of :meth:`quantized_output` against ``y`` per output channel, summed
        over ``x`` in chunks of ``chunk`` samples (default: :func:`samples_per_chunk`; bounds
        temporary memory); float64 across chunks. ``weight``, ``input_quantized`` and ``skip``
        (all samples') as in :meth:`quantized_output`."""
        dim = self.layer.output_channel_dim
        chunk = chunk or samples_per_chunk(x, y)
        total = None
        for i in range(0, len(x), chunk):
            out = self.quantized_output(
                x[i : i + chunk],
                weight=weight,
                input_quantized=input_quantized,
                skip=None if skip is None else skip[i : i + chunk],
            )
            d = out - y[i : i + chunk]
            dim_i = dim % d.dim()
            e = (d * d).sum(dim=[k for k in range(d.dim()) if k != dim_i]).double()
            total = e if total is None else total + e
        return total

    # ------------------------------------------------------------------ state
    def _changes(self) -> list[torch.Tensor]:
        """The trainable changes (zero at round-to-nearest)."""
        names = ("delta_w", "delta_scale", "delta_low", "delta_b", "low_shift", "range_scale")
        return [t for t in (getattr(self, n, None) for n in names) if t is not None]

    def _state_tensors(self) -> list[torch.Tensor]:
        return [self.base_weight, *self._changes()]

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the current changes (and base weight), for :meth:`restore`."""
        return [t.detach().clone() for t in self._state_tensors()]

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        """Back to the changes of :meth:`snapshot`."""
        for t, saved in zip(self._state_tensors(), state, strict=True):
            t.copy_(saved)

    def reset(self) -> None:
        """Back to round-to-nearest (all changes zero, the FP weight as the base)."""
        with torch.no_grad():
            self.base_weight.copy_(self.fp.weight)
            for t in self._changes():
                t.zero_()

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the changes in the model's weight, bias/BatchNorm shift and quantizers."""
        self.fp.weight.copy_(self.base_weight + self._weight_change())
        wq = self.layer.weight_quantizer
        low, scale = self.weight_grid()
        if low is not None:
            wq.input_low.copy_(low)
            compat.store_quantizer_range(wq, scale.abs().clamp_min(MIN_WEIGHT_SCALE))
            compat.put_zero_on_grid(wq)  # as the forward above saw it
        else:
            wq.scale.copy_(scale.abs().clamp_min(MIN_WEIGHT_SCALE))
        db = self._bias_change()
        if db is not None:
            (self.fp.bias if self.bias_target == "bias" else self.fp.bn[2]).add_(db)
        iq = self.layer.input_quantizer
        if self.train_input_range and iq is not None:
            new_range = (self.range0 * (1 + self.range_scale)).abs()
            if isinstance(iq, compat.AsymmetricQuantizer):
                iq.input_low.copy_(self.low0 + self.range0 * self.low_shift)
            compat.store_quantizer_range(iq, new_range)
            compat.put_zero_on_grid(iq)  # as the forward above saw it


def samples_per_chunk(*tensors: torch.Tensor | None) -> int:
    """Samples per chunk when a whole cached set is evaluated: at most :data:`CHUNK_SAMPLES`,
    and fewer where one sample of any of ``tensors`` (per-sample first dimension) is so large
    that a chunk of it would exceed :data:`CHUNK_BYTES`."""
    per_sample = max((t[:1].numel() * t.element_size() for t in tensors if t is not None and len(t)), default=1)
    return max(1, min(CHUNK_SAMPLES, CHUNK_BYTES // max(per_sample, 1)))


def cosine_lr(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps."""
    return 0.5 * (1 + math.cos(math.pi * step / total))

"""Quantizer placement with per-layer bit widths.

NNCF's MinMax places the quantizers (per-channel symmetric weights, per-tensor asymmetric
activations, ranges from the calibration set) at 8 bits, since NNCF's hardware configs refuse
lower widths. :class:`PrecisionSetup` then gives every quantized layer the bits of a
:class:`~nncf_calibtip.plan.PrecisionPlan`: its weight quantizer (below 8 bits by default an
asymmetric one on the weight's per-channel min/max) and the activation quantizer at its
input. Ranges carry over (min/max ranges do not depend on the bit width). A layer whose input
quantizer also serves a reader at more bits (a residual add) first gets a quantizer of its own
(:func:`separate_low_bit_inputs`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import nncf
import torch

from nncf_calibtip import compat
from nncf_calibtip.plan import ACTIVATION_BITS, WEIGHT_BITS, LayerPrecision, PrecisionPlan
from nncf_calibtip.quantized_layers import (
    QuantizedLayer,
    find_quantized_layers,
    other_weight_quantizers,
    quantizer_consumers,
)

#: Weight scales are kept at least this large: dead channels (all-zero weights) would otherwise
#: give a zero quantization range, which OpenVINO's FakeQuantize turns into NaN.
MIN_WEIGHT_SCALE = 1e-8

#: Bits of the activation quantizers NNCF's MinMax places (readers other than layers keep them).
DEFAULT_ACTIVATION_BITS = 8

OverflowFixMode = Literal["enable", "first_layer", "disable"]
WeightScheme = Literal["symmetric", "asymmetric"]
ModelTypeName = Literal["transformer"]


@dataclass(frozen=True)
class PrecisionConfig:
    """Bit widths of the quantized model.

    :param weight_bits: Default weight bits of every quantized layer (8, 4 or 2).
    :param activation_bits: Default bits of every quantized layer's input activations (8 or 4).
    :param keep_first_last_8bit: Keep the first and the last layers (read from the graph) at
        W8A8, as in the paper.
    :param overflow_fix: NNCF's fix for int8 overflow on CPUs without VNNI: 8-bit weights use
        a 7-bit range. ``"enable"`` (every 8-bit layer) keeps OpenVINO's results equal to
        torch's on every x86 CPU; ``"first_layer"`` is NNCF's default; ``"disable"`` uses the
        full range (only safe on VNNI/AMX CPUs). Weights below 8 bits cannot overflow.
    :param low_bit_weights: Grid of weights below 8 bits. ``"asymmetric"``: per output
        channel from the channel's min to its max (zero on the grid), as in the reference
        code; a channel whose weights are mostly of one sign (common in depthwise convs with
        9 weights per channel) uses all 16 levels instead of about half of them. OpenVINO
        stores them as int4 with a per-channel zero point. ``"symmetric"``: NNCF's
        ``[-scale, scale]`` grid. 8-bit weights stay symmetric either way (NNCF's overflow
        fix needs it).
    :param layers: Per-layer overrides ``{node name: LayerPrecision}``, applied last.
    :param separate_low_bit_inputs: Activation bits are those of each layer's own input. NNCF
        places one quantizer on a tensor that several operations read: a ReLU's output feeding
        both the next block's conv and the residual add, say. Where such a quantizer feeds a
        layer at fewer activation bits than another of its readers (the add, which keeps
        NNCF's 8 bits, or a layer at more bits), the layer gets a quantizer of its own on its
        input, at its bits, starting from the shared one's range; the shared one keeps the
        widest bits its other readers need. As in the paper, whose W4A4 quantizes the inputs
        of convs and linears only. False: the shared quantizer takes the widest bits of the
        layers reading it, and every other reader shares them (a W4A4 ResNet's residual
        stream is then 4-bit).
    :param model_type: ``"transformer"``: NNCF's placement for transformers, as
        ``nncf.quantize(model_type=nncf.ModelType.TRANSFORMER)``: the operations NNCF leaves
        in FP there (additions and the like, LayerNorm's inputs and parameters, embeddings)
        keep their FP values, so that linears and matmuls carry the quantization. None: NNCF's
        placement for convolutional networks.
    :param smooth_quant_alpha: Run NNCF's SmoothQuant before MinMax: per input channel of
        each linear layer, a scale moves part of the activation's outliers into the weights
        (``alpha``, 0 to 1, is the part; ``nncf.quantize`` uses 0.95 for transformers). None:
        off, also for transformers, unlike ``nncf.quantize``: the outliers it moves make
        weights harder to quantize, which on all-MiniLM-L6-v2 cost more than it gained at
        4-bit weights and with the 7-bit range of ``overflow_fix="enable"`` (it helped at
        W8A8 with ``"disable"``; see the README).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    keep_first_last_8bit: bool = True
    overflow_fix: OverflowFixMode = "enable"
    layers: dict[str, LayerPrecision] = field(default_factory=dict)
    separate_low_bit_inputs: bool = True
    low_bit_weights: WeightScheme = "asymmetric"
    model_type: ModelTypeName | None = None
    smooth_quant_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS:
            msg = f"weight_bits={self.weight_bits} is not supported; use one of {WEIGHT_BITS}."
            raise ValueError(msg)
        if self.activation_bits not in ACTIVATION_BITS:
            msg = f"activation_bits={self.activation_bits} is not supported; use one of {ACTIVATION_BITS}."
            raise ValueError(msg)
        if self.overflow_fix not in ("enable", "first_layer", "disable"):
            msg = f"overflow_fix={self.overflow_fix!r} is not one of 'enable', 'first_layer', 'disable'."
            raise ValueError(msg)
        if self.low_bit_weights not in ("symmetric", "asymmetric"):
            msg = f"low_bit_weights={self.low_bit_weights!r} is not one of 'symmetric', 'asymmetric'."
            raise ValueError(msg)
        if self.model_type not in (None, "transformer"):
            msg = f"model_type={self.model_type!r} is not supported; use 'transformer' or None."
            raise ValueError(msg)
        if self.smooth_quant_alpha is not None and not 0 <= self.smooth_quant_alpha <= 1:
            msg = f"smooth_quant_alpha={self.smooth_quant_alpha} is not in [0, 1]; use None to switch SmoothQuant off."
            raise ValueError(msg)
        fixed = {}
        for name, p in self.layers.items():
            fixed[name] = p if isinstance(p, LayerPrecision) else LayerPrecision(**p)
        object.__setattr__(self, "layers", fixed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = {k: v.to_dict() for k, v in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionConfig:
        return cls(**data)

    @property
    def label(self) -> str:
        return f"W{self.weight_bits}A{self.activation_bits}"


def min_max_algorithm(
    config: PrecisionConfig, subset_size: int, ignored_scope: Any | None = None
) -> compat.MinMaxQuantization:
    """NNCF MinMax set up as the paper's reference: per-channel min/max weights, per-tensor
    activations from the batch mean of per-sample min/max, asymmetric activations."""
    return compat.MinMaxQuantization(
        preset=compat.QuantizationPreset.MIXED,
        subset_size=subset_size,
        ignored_scope=ignored_scope,
        overflow_fix=compat.OverflowFix(config.overflow_fix),
        batchwise_statistics=True,
        activations_range_estimator_params=compat.RangeEstimatorParametersSet.MEAN_MINMAX,
        weights_range_estimator_params=compat.RangeEstimatorParametersSet.MINMAX,
        model_type=nncf.ModelType.TRANSFORMER if config.model_type == "transformer" else None,
    )


def smooth_quant_algorithm(config: PrecisionConfig, subset_size: int) -> compat.SmoothQuant | None:
    """NNCF's SmoothQuant on linear layers when ``config`` asks for it, else None
    (convolutions are left alone, as in ``nncf.quantize``)."""
    if config.smooth_quant_alpha is None:
        return None
    return compat.SmoothQuant(subset_size, alpha_map={"convolution": -1, "matmul": config.smooth_quant_alpha})


def default_plan(layers: list[QuantizedLayer], config: PrecisionConfig) -> PrecisionPlan:
    """The plan ``config`` asks for: its default bits, first/last at 8 bits, then its overrides."""
    names = {layer.name for layer in layers}
    unknown = sorted(set(config.layers) - names)
    if unknown:
        msg = f"PrecisionConfig.layers names {unknown} that are not quantized layers; known: {sorted(names)}."
        raise ValueError(msg)
    plan = {}
    for layer in layers:
        if config.keep_first_last_8bit and (layer.is_first or layer.is_last):
            plan[layer.name] = LayerPrecision(8, 8)
        else:
            plan[layer.name] = LayerPrecision(config.weight_bits, config.activation_bits)
    plan.update(config.layers)
    return PrecisionPlan(plan)


def effective_plan(layers: list[QuantizedLayer], plan: PrecisionPlan) -> PrecisionPlan:
    """The plan as it can be realised: an input quantizer shared by several layers takes the
    widest activation bits any of them asks for."""
    shared: dict[str, int] = {}
    for layer in layers:
        if layer.input_quantizer_key is not None:
            bits = plan[layer.name].activation_bits
            shared[layer.input_quantizer_key] = max(shared.get(layer.input_quantizer_key, 0), bits)
    out = {}
    for layer in layers:
        p = plan[layer.name]
        a_bits = shared.get(layer.input_quantizer_key, p.activation_bits) if layer.input_quantizer_key else 8
        if a_bits != p.activation_bits:
            compat.nncf_logger.info(
                f"{layer.name}: input quantizer is shared with a layer at {a_bits} bits; using A{a_bits}."
            )
        out[layer.name] = LayerPrecision(p.weight_bits, a_bits)
    return PrecisionPlan(out)


def separate_low_bit_inputs(
    model: torch.nn.Module, graph: compat.NNCFGraph, layers: list[QuantizedLayer], plan: PrecisionPlan
) -> list[str]:
    """Give every layer whose input quantizer also feeds a reader needing more activation bits
    a quantizer of its own (a copy of the shared one, as a pre-hook on its input). Returns the
    names of those layers; :func:`find_quantized_layers` then finds their new quantizers."""
    ports = {(layer.node.node_name, 0): layer for layer in layers}
    by_key: dict[str, list[QuantizedLayer]] = {}
    for layer in layers:
        if layer.input_quantizer_key is not None:
            by_key.setdefault(layer.input_quantizer_key, []).append(layer)
    separated = []
    for key, users in by_key.items():
        readers = quantizer_consumers(graph, key)
        if not readers:
            continue
        widest = max(plan[ports[r].name].activation_bits if r in ports else DEFAULT_ACTIVATION_BITS for r in readers)
        for layer in users:
            if plan[layer.name].activation_bits < widest and (layer.node.node_name, 0) in readers:
                assert layer.input_quantizer is not None
                own = copy.deepcopy(layer.input_quantizer)
                compat.register_pre_function_hook(model, layer.node.node_name, 0, own)
                separated.append(layer.name)
    return separated


def use_asymmetric_low_bit_weights(model: torch.nn.Module, layers: list[QuantizedLayer], plan: PrecisionPlan) -> int:
    """Replace the symmetric weight quantizer of every layer the plan puts below 8 bits by an
    asymmetric per-channel one on the weight's min/max (:func:`compat.asymmetric_weight_quantizer`).
    Returns how many were replaced; :func:`find_quantized_layers` then finds the new ones."""
    tensors = dict(model.named_parameters())
    replaced = 0
    for layer in layers:
        bits = plan[layer.name].weight_bits
        if bits >= 8 or isinstance(layer.weight_quantizer, compat.AsymmetricQuantizer):
            continue
        new = compat.asymmetric_weight_quantizer(
            layer.weight_quantizer, tensors[layer.weight_name], bits, MIN_WEIGHT_SCALE
        )
        compat.replace_hook(model, layer.weight_quantizer_key, new)
        replaced += 1
    return replaced


def apply_plan(model: torch.nn.Module, layers: list[QuantizedLayer], plan: PrecisionPlan, overflow_fix: str) -> None:
    """Set every layer's quantizer bits from ``plan`` (in place)."""
    for layer in layers:
        p = plan[layer.name]
        half = overflow_fix == "enable" or (overflow_fix == "first_layer" and layer.is_first)
        # Low-bit weights use the full signed grid (-8..7 at 4 bits): one more level than the
        # narrow grid NNCF uses at 8 bits, which matters at 4 and decides at 2 bits.
        low = p.weight_bits < 8
        wq = layer.weight_quantizer
        compat.set_quantizer_bits(wq, p.weight_bits, narrow_range=not low, half_range=half and not low)
        with torch.no_grad():
            if isinstance(wq, compat.AsymmetricQuantizer):
                compat.store_quantizer_range(wq, wq.input_range.abs().clamp_min(MIN_WEIGHT_SCALE))
                compat.put_zero_on_grid(wq)
            else:
                wq.scale.copy_(wq.scale.abs().clamp_min(MIN_WEIGHT_SCALE))
        if layer.input_quantizer is not None:
            iq = layer.input_quantizer
            compat.set_quantizer_bits(iq, p.activation_bits, narrow_range=iq.narrow_range, half_range=False)
            # MinMax's range can leave zero off a low-bit grid, where OpenVINO rounds differently.
            compat.put_zero_on_grid(iq)


PLAN_ATTRIBUTE = "_calibtip_plan"


def get_plan(model: torch.nn.Module) -> PrecisionPlan | None:
    """The precision plan a quantized model was built with (None for other models)."""
    return getattr(model, PLAN_ATTRIBUTE, None)


class PrecisionSetup(compat.Algorithm):
    """NNCF post-training algorithm that gives each quantized layer its bits.

    Runs after NNCF's MinMax in a pipeline; needs no statistics.

    :param config: Default bits, first/last-layer rule, overflow fix and per-layer overrides.
    :param plan: An explicit plan (e.g. from bit allocation); overrides ``config``'s defaults.
    """

    def __init__(self, config: PrecisionConfig | None = None, plan: PrecisionPlan | None = None) -> None:
        self.config = config or PrecisionConfig()
        self.plan = plan
        self.applied_plan: PrecisionPlan | None = None

    @property
    def available_backends(self) -> list[compat.BackendType]:
        return [compat.BackendType.TORCH]

    def get_statistic_points(self, model: Any, graph: compat.NNCFGraph) -> compat.StatisticPointsContainer:
        return compat.StatisticPointsContainer()

    def apply(
        self,
        model: Any,
        graph: compat.NNCFGraph,
        statistic_points: compat.StatisticPointsContainer | None = None,
        dataset: Any | None = None,
    ) -> Any:
        torch_model = compat.unwrap(model)
        layers = find_quantized_layers(torch_model, graph)
        if not layers:
            msg = (
                "No quantized conv/linear layers found: NNCF MinMax put no weight quantizer on a Conv or "
                "Linear layer (the model has none, or the ignored scope excludes them all), so there is "
                "nothing to calibrate. Quantize such a model with nncf.quantize; in a Pipeline of your "
                "own, run NNCF MinMax quantization before PrecisionSetup."
            )
            raise ValueError(msg)
        plan = self.plan if self.plan is not None else default_plan(layers, self.config)
        missing = sorted({layer.name for layer in layers} - set(plan))
        if missing:
            msg = f"The plan has no entry for layers {missing}; give every quantized layer a precision."
            raise ValueError(msg)
        if self.config.separate_low_bit_inputs:
            separated = separate_low_bit_inputs(torch_model, graph, layers, plan)
            if separated:
                compat.nncf_logger.info(
                    f"{len(separated)} layers get input quantizers of their own: their input also feeds "
                    "operations at more bits (separate_low_bit_inputs)"
                )
                layers = find_quantized_layers(torch_model, graph)
                compat.graph_changed(model)
        plan = effective_plan(layers, plan)
        if self.config.low_bit_weights == "asymmetric" and use_asymmetric_low_bit_weights(torch_model, layers, plan):
            layers = find_quantized_layers(torch_model, graph)
            compat.graph_changed(model)
        apply_plan(torch_model, layers, plan, self.config.overflow_fix)
        others = other_weight_quantizers(torch_model, graph, layers)
        if others:
            compat.nncf_logger.warning(
                f"{len(others)} operations with quantized weights are not conv/linear layers and keep NNCF's "
                f"8-bit weights, outside the precision plan and the calibration: {others}. Keep them in float "
                f"with nncf.IgnoredScope(names={others})."
            )
        setattr(torch_model, PLAN_ATTRIBUTE, plan)
        self.applied_plan = plan
        compat.nncf_logger.info(f"Precision plan: {plan.summary()}")
        return model

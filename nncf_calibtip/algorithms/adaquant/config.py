"""Settings of AdaQuant layer-wise calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from nncf_calibtip.algorithms.base import ConfigMixin

AdaQuantMode = Literal["parallel", "sequential"]
SequentialInputs = Literal["stream", "recompute"]
WeightStart = Literal["nearest", "gptq"]

#: Sequential mode's input-range training steps under ``activation_range_iters="auto"``.
AUTO_ACTIVATION_RANGE_ITERS = 50


@dataclass(frozen=True)
class AdaQuantConfig(ConfigMixin):
    """AdaQuant: per layer, minimise ``||f(X W + b) - f(Q(X') Q(W + V) + b')||^2`` over the
    calibration set, where ``f`` is the BatchNorm and activation that follow the layer.

    Learning rates are relative to the tensor they move, so one setting suits layers of any
    scale: the weight change is in units of the layer's initial quantization step (per output
    channel), the weight-scale and activation-range changes are fractions of their initial
    values, the bias change is in units of the layer output's RMS.

    :param mode: ``"sequential"``: a layer's input comes from the model as quantized and
        fitted so far, for every batch; ``"parallel"``: from the FP model, so
        layers are independent.
    :param sequential_inputs: How sequential mode gets each layer's input from the quantized
        model. ``"stream"``: every calibration batch runs through the model once, pausing
        before each layer until that layer is fitted, so the model is evaluated once in all;
        each batch's live activations stay in memory meanwhile (about two layer inputs for a
        chain of layers, more with long skip connections). Where streaming cannot reproduce
        the model exactly (an operation other than a layer uses a layer's quantized input
        before that layer runs), the log says so and ``"recompute"`` is used. The FP model's
        input of every layer (for the targets) is streamed alongside, in one pass.
        ``"recompute"``: run the model again up to each layer: memory of one layer input,
        time growing with the square of the depth.
    :param iters: Adam steps per layer (the reference used 1000).
    :param batch_size: Samples per step, drawn at random from the cached layer inputs.
    :param lr_weight: Learning rate of the weight change, in quantization steps.
    :param lr_bias: Learning rate of the bias change, in units of the output RMS.
    :param lr_weight_scale: Learning rate of the per-channel weight scales (relative) and, for
        asymmetric weights, of their low ends (in ranges).
    :param lr_activation_range: Learning rate of the input quantizer's low end and range (relative).
    :param max_weight_change: Bound on ``|V|`` in initial quantization steps; None for unbounded.
    :param optimize_bias: Train the layer bias (or the following BatchNorm's shift when the
        layer has none).
    :param optimize_weight_scale: Train the per-channel weight scales (and asymmetric weights'
        low ends).
    :param optimize_activation_range: Train the input quantizer's range (a quantizer shared by
        several layers is trained by the first of them only).
    :param range_search: Before the gradient steps, set the input range and the per-channel
        weight scales to the points of a small grid (fractions of the MinMax ones) with the
        lowest reconstruction error on up to ``range_search_samples`` training samples; the
        steps then refine them (each only where ``optimize_activation_range`` /
        ``optimize_weight_scale`` is on). Off: start from MinMax's ranges, as the paper does.
    :param range_search_samples: Calibration samples the range search scores on.
    :param weight_start: Where the weights start before the gradient steps (after the range
        search): ``"nearest"``, round-to-nearest, as the paper; ``"gptq"``, the weight that
        best maps the layer's quantized training inputs to the FP output (least squares, so
        it also corrects the input quantizer's error), rounded by error feedback (GPTQ), with
        each output channel's damping chosen on held-back training samples (conv2d and linear
        layers; others start at round-to-nearest). Off by default: on unseen images it brought
        ResNet-20 W4A4 closer to FP (KL -12%) but EfficientNet-Lite0 W4A4 further (KL +9%),
        and it costs 15-40% more time (see benchmarks/EXPERIMENTS.md).
    :param activation_range_iters: Steps (the first ones) in which the input range trains; the
        range is then fixed, every training input is quantized once, and the remaining steps
        fit the weights, scales and bias to that range without re-quantizing the input or
        back-propagating into it (a step then costs 30-70% less; the quantized copy of the
        layer's training inputs is held meanwhile). None: every step, as the paper.
        ``"auto"``: 50 in sequential mode, every step in parallel mode. Chosen on held-out
        data of both sample models (see the README): in sequential mode fixing the range after
        50 of 200 steps raised the top-1 agreement with FP on unseen images for every seed
        tried, in 15-25% less time; in parallel mode it cost EfficientNet-Lite0 12 pt of it.
        A layer that does not train its input range takes the cheap steps from the start.
    :param loss_after_residual_add: Sequential mode: for a layer whose output (after its
        BatchNorm) goes straight into a residual add ``a + b``, take the loss after the add and
        the activation that follows it, with the skip operand from the quantized model
        (target: from the FP model). The layer then fits the block's output, correcting the
        error the skip branch carries in, instead of its own branch alone. Only where the skip
        operand is computed before the layer runs (identity shortcuts; a shortcut conv that
        runs after the main branch is itself fitted through the add). It costs one tensor of
        the layer's output size per sample. Chosen on held-out data of both sample models
        (see the README).
    :param input_drop: Probability with which each input element skips the layer's input
        quantizer in a training step (QDrop, Wei et al. 2022): the weights then fit a range
        of activation noise instead of the calibration set's exact one. Off (0) by default:
        0.5 improved the FP agreement on unseen data of both sample models but its random
        mask costs 10-25% of the optimisation time, and test accuracy moved both ways (see
        the README). The held-out report and the final model always quantize every element.
    :param holdout_fraction: Share of the calibration samples kept out of the optimisation to
        report each layer's reconstruction error and to choose what each layer keeps: its
        round-to-nearest result, its start (the searched ranges and the weight start) or the
        result of the gradient steps, whichever is closest to FP on them (0: always the steps').
    :param subset_size: Calibration samples used at most.
    :param fp_cache_mb: Memory for FP layer inputs captured ahead in one pass (the FP model
        does not change, so one pass can serve several layers) when they are not streamed
        (parallel mode, ``"recompute"``). Peak memory is this plus the current layer's data,
        whatever the depth; 0 captures one layer per pass.
    :param seed: Seed of the mini-batch sampling; the same seed gives the same model.
    :param device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
    """

    algorithm_name: ClassVar[str] = "AdaQuant"

    mode: AdaQuantMode = "sequential"
    sequential_inputs: SequentialInputs = "stream"
    iters: int = 200
    batch_size: int = 32
    lr_weight: float = 2e-2
    lr_bias: float = 1e-3
    lr_weight_scale: float = 1e-3
    lr_activation_range: float = 1e-2
    max_weight_change: float | None = 1.0
    optimize_bias: bool = True
    optimize_weight_scale: bool = True
    optimize_activation_range: bool = True
    range_search: bool = True
    range_search_samples: int = 128
    weight_start: WeightStart = "nearest"
    activation_range_iters: int | Literal["auto"] | None = "auto"
    loss_after_residual_add: bool = True
    input_drop: float = 0.0
    holdout_fraction: float = 0.1
    subset_size: int = 1024
    fp_cache_mb: int = 1024
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("parallel", "sequential"):
            msg = f"mode={self.mode!r} is not supported; use 'parallel' or 'sequential'."
            raise ValueError(msg)
        if self.sequential_inputs not in ("stream", "recompute"):
            msg = f"sequential_inputs={self.sequential_inputs!r} is not supported; use 'stream' or 'recompute'."
            raise ValueError(msg)
        for name in ("iters", "batch_size", "subset_size", "range_search_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                msg = f"{name}={getattr(self, name)!r} must be a positive integer."
                raise ValueError(msg)
        for name in ("lr_weight", "lr_bias", "lr_weight_scale", "lr_activation_range"):
            if not getattr(self, name) >= 0:
                msg = f"{name}={getattr(self, name)!r} must be a non-negative number."
                raise ValueError(msg)
        if self.weight_start not in ("nearest", "gptq"):
            msg = f"weight_start={self.weight_start!r} is not supported; use 'nearest' or 'gptq'."
            raise ValueError(msg)
        ri = self.activation_range_iters
        if ri not in (None, "auto") and (not isinstance(ri, int) or isinstance(ri, bool) or ri < 0):
            msg = f"activation_range_iters={ri!r} must be a non-negative integer, 'auto' or None."
            raise ValueError(msg)
        if not isinstance(self.fp_cache_mb, int) or self.fp_cache_mb < 0:
            msg = f"fp_cache_mb={self.fp_cache_mb!r} must be a non-negative integer."
            raise ValueError(msg)
        if self.max_weight_change is not None and not self.max_weight_change > 0:
            msg = f"max_weight_change={self.max_weight_change!r} must be positive or None."
            raise ValueError(msg)
        if not 0.0 <= self.input_drop < 1.0:
            msg = f"input_drop={self.input_drop!r} must be in [0, 1)."
            raise ValueError(msg)
        if not 0.0 <= self.holdout_fraction < 0.5:
            msg = f"holdout_fraction={self.holdout_fraction!r} must be in [0, 0.5)."
            raise ValueError(msg)
        self._check_device()

    def input_range_steps(self) -> int | None:
        """The steps in which the input range trains (None: all), ``"auto"`` resolved."""
        if self.activation_range_iters == "auto":
            return AUTO_ACTIVATION_RANGE_ITERS if self.mode == "sequential" else None
        return self.activation_range_iters

"""BN tuning ("global statistics tuning") as an NNCF post-training algorithm."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import nncf

from nncf_calibtip import compat
from nncf_calibtip.algorithms.base import StreamingAlgorithm
from nncf_calibtip.algorithms.bn_tuning.backend import BNTuningBackend, ChannelStatsReport
from nncf_calibtip.algorithms.bn_tuning.config import BNTuningConfig
from nncf_calibtip.calibration.data import count_samples, inference_items, rebatch, resolve_device


class BNTuning(StreamingAlgorithm):
    """BN tuning (Hubara et al., 2021, "global statistics tuning"): quantization shifts and
    scales each layer's output channels; re-estimate their statistics on the quantized model
    with a true average over the calibration set, re-normalise them to the FP model's, and fold
    the correction back into the layer: the weights and their per-channel quantization scales
    are multiplied by the same factor (the integer weights do not change), the bias or the
    BatchNorm shift absorbs the rest.

    The statistics are taken at the layer's output after its BatchNorm when it has one, so
    models with and without BatchNorm (folded into the convolution) are handled alike. One
    tuning pass re-normalises every layer on the fly, batch by batch, as BatchNorm layers in
    training mode would, so each layer is measured on inputs from already-corrected layers.

    NNCF's :class:`~nncf.quantization.algorithms.pipeline.Pipeline` does not hand the dataset
    to ``apply``; pass it here when running in a plain NNCF pipeline.

    :param config: BN tuning settings.
    :param dataset: Calibration dataset, used when ``apply`` gets none.
    """

    name = "BN tuning"

    def __init__(self, config: BNTuningConfig | None = None, dataset: nncf.Dataset | None = None) -> None:
        super().__init__(config or BNTuningConfig(), dataset)
        self.config: BNTuningConfig
        self.reports: list[ChannelStatsReport] = []

    def _backend(self, model: Any) -> BNTuningBackend:
        from nncf_calibtip.algorithms.bn_tuning.torch_backend import PTBNTuningBackend

        return PTBNTuningBackend()

    def apply(
        self,
        model: Any,
        graph: compat.NNCFGraph,
        statistic_points: compat.StatisticPointsContainer | None = None,
        dataset: nncf.Dataset | None = None,
    ) -> Any:
        dataset = self._dataset(dataset)
        cfg = self.config
        items = inference_items(dataset, cfg.subset_size)
        n = count_samples(items)
        if n < 2:
            msg = f"The calibration set has {n} sample; BN tuning needs at least 2 to estimate a standard deviation."
            raise ValueError(msg)
        items = rebatch(items, cfg.batch_size)
        backend = self._backend(model)
        layers = backend.find_layers(model, graph, cfg)
        if not layers:
            raise ValueError(_no_layers_message(backend, model, graph, cfg))
        fit_modes = backend.fit_modes(model)
        treatments = {layer.name: cfg.treatment(fit_modes.get(layer.name)) for layer in layers}
        skipped = {name for name, treatment in treatments.items() if treatment == "skip"}
        layers = [layer for layer in layers if layer.name not in skipped]
        if skipped:
            compat.nncf_logger.info(
                f"BN tuning leaves the {len(skipped)} layers sequential AdaQuant fitted as they are "
                "(rescale='auto'; rescale='always' tunes them too)"
            )
        self.reports = []
        if not layers:
            compat.nncf_logger.info("BN tuning: no layer left to tune, the model is unchanged")
            return model
        compat.nncf_logger.info(f"BN tuning ({cfg.target}) on {len(layers)} layers, {n} samples")
        start = time.perf_counter()
        self.reports = backend.tune(model, layers, treatments, items, cfg, resolve_device(cfg.device))
        self.calibration_seconds = time.perf_counter() - start
        if cfg.report:
            before = sum(r.mean_error_before + r.std_error_before for r in self.reports) / len(self.reports)
            after = sum(r.mean_error_after + r.std_error_after for r in self.reports) / len(self.reports)
            compat.nncf_logger.info(
                f"BN tuning done in {self.calibration_seconds:.1f} s: mean channel-statistics error "
                f"{before:.4f} -> {after:.4f}"
            )
        return model


def _no_layers_message(backend: BNTuningBackend, model: Any, graph: compat.NNCFGraph, cfg: BNTuningConfig) -> str:
    """Why BN tuning has nothing to tune, and what to do about it."""
    if cfg.target == "batchnorm":
        return (
            "BN tuning (target='batchnorm') found no quantized layer followed by a BatchNorm: use "
            "target='fp_statistics' for a model without BatchNorm (or with it folded into the layers)."
        )
    if not cfg.include_linear and backend.find_layers(model, graph, dataclasses.replace(cfg, include_linear=True)):
        return (
            "BN tuning found only fully-connected quantized layers, which it tunes only with "
            "include_linear=True: set BNTuningConfig(include_linear=True), or leave BN tuning out "
            "(bias tuning is the tool for fully-connected layers)."
        )
    return (
        "BN tuning found no quantized conv or fully-connected layer: quantize the model first "
        "(nncf_calibtip.quantize runs MinMax and the precision setup before it)."
    )

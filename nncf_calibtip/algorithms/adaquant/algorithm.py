"""AdaQuant layer-wise calibration as an NNCF post-training algorithm."""

from __future__ import annotations

import time
from typing import Any

import nncf
import torch

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.backend import AdaQuantBackend, LayerReport
from nncf_calibtip.algorithms.adaquant.config import AdaQuantConfig
from nncf_calibtip.algorithms.base import StreamingAlgorithm
from nncf_calibtip.calibration.data import count_samples, inference_items, rebatch, resolve_device
from nncf_calibtip.calibration.fitted_layers import mark_fitted
from nncf_calibtip.quantized_layers import input_quantizer_owners

#: Samples per forward pass when capturing or streaming layers' inputs. Larger batches spread
#: the per-call cost of NNCF's hooks over more samples, but past ~128 the activations outgrow
#: the CPU caches: streaming both passes of EfficientNet-Lite0 at 64 px (one compute thread
#: per batch) took 36 s at 128 samples per batch, 46 s at 256 and 49 s at 32.
_CAPTURE_BATCH = 128


class AdaQuant(StreamingAlgorithm):
    """AdaQuant (Hubara et al., 2021): per layer, optimise the weights, the bias, the weight
    scales and the input quantizer's range so that the quantized layer reproduces the FP
    layer's output on the calibration set.

    Runs on a model NNCF has placed quantizers in (MinMax, then
    :class:`~nncf_calibtip.placement.PrecisionSetup` for the bit widths). Layers go in
    execution order; only the layer being optimised holds cached data.

    NNCF's :class:`~nncf.quantization.algorithms.pipeline.Pipeline` does not hand the dataset
    to ``apply``; pass it here (``AdaQuant(config, dataset)``) when running in a plain NNCF
    pipeline. :func:`nncf_calibtip.quantize` does this for you.

    :param config: AdaQuant settings.
    :param dataset: Calibration dataset, used when ``apply`` gets none.
    """

    name = "AdaQuant"

    def __init__(self, config: AdaQuantConfig | None = None, dataset: nncf.Dataset | None = None) -> None:
        super().__init__(config or AdaQuantConfig(), dataset)
        self.config: AdaQuantConfig
        self.reports: list[LayerReport] = []

    def _backend(self, model: Any) -> AdaQuantBackend:
        from nncf_calibtip.algorithms.adaquant.torch_backend import PTAdaQuantBackend

        return PTAdaQuantBackend()

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
        if n * (1 - cfg.holdout_fraction) < cfg.batch_size:
            msg = (
                f"The calibration set has {n} samples; AdaQuant needs at least batch_size={cfg.batch_size} "
                f"outside the held-out {cfg.holdout_fraction:.0%}. Give more samples or lower batch_size."
            )
            raise ValueError(msg)
        items = rebatch(items, _CAPTURE_BATCH)
        backend = self._backend(model)
        layers = backend.find_layers(model, graph)
        if not layers:
            msg = "AdaQuant found no quantized conv/linear layers: run MinMax (and PrecisionSetup) first."
            raise ValueError(msg)
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        compat.nncf_logger.info(
            f"AdaQuant ({cfg.mode}) on {len(layers)} layers, {n} samples, {cfg.iters} steps per layer, {device}"
        )
        start = time.perf_counter()
        session = backend.start(model, graph, device, layers, items, cfg)
        owners = input_quantizer_owners(layers)  # a shared input quantizer is trained by its first layer
        self.reports = []
        try:
            for index, layer in enumerate(compat.track(layers, description=f"AdaQuant {cfg.mode}")):
                key = layer.input_quantizer_key
                owns_input = key is not None and owners[key] is layer
                report = backend.calibrate_layer(session, layer, items, cfg, owns_input, index)
                self.reports.append(report)
                compat.nncf_logger.debug(
                    f"{report.name}: error {report.error_before:.4g} -> {report.error_after:.4g}"
                    + ("" if report.kept else " (kept round-to-nearest)")
                    + (" (steps undone: kept the start)" if report.steps_undone else "")
                )
        finally:
            backend.finish(session)
        # Sequential mode fitted every later layer on the outputs of the model as it is, so a layer
        # left at round-to-nearest is part of the fit too: changing it would undo its successors'.
        fitted = [r.name for r in self.reports if r.kept or cfg.mode == "sequential"]
        mark_fitted(compat.unwrap(model), fitted, cfg.mode)
        self.calibration_seconds = time.perf_counter() - start
        improved = sum(r.error_after < r.error_before for r in self.reports)
        undone = sum(r.steps_undone for r in self.reports)
        compat.nncf_logger.info(
            f"AdaQuant done in {self.calibration_seconds:.1f} s: {improved}/{len(self.reports)} layers "
            "closer to FP on held-out samples"
            + (f" ({undone} kept their start: the steps ended above it)" if undone else "")
        )
        return model

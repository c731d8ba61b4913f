"""Label-free bias tuning as an NNCF post-training algorithm."""

from __future__ import annotations

import math
import time
from typing import Any

import nncf

from nncf_calibtip import compat
from nncf_calibtip.algorithms.base import StreamingAlgorithm
from nncf_calibtip.algorithms.bias_tuning.backend import BiasTuningBackend, BiasTuningReport
from nncf_calibtip.algorithms.bias_tuning.config import BiasTuningConfig
from nncf_calibtip.algorithms.bias_tuning.put_back import SIGNIFICANT_P
from nncf_calibtip.calibration.data import count_samples, inference_items, resolve_device


def _put_back_reason(report: BiasTuningReport, cfg: BiasTuningConfig) -> str:
    if not math.isfinite(report.change_stderr):
        return "non-finite held-out loss"
    if cfg.put_back == "unless_better" and report.change_p_lower >= SIGNIFICANT_P:
        return f"no measurable fall (mean within two standard errors, signed-rank p >= {SIGNIFICANT_P})"
    # "if_worse", or most samples fell but the mean rose beyond its noise
    return "higher by more than two standard errors"


class BiasTuning(StreamingAlgorithm):
    """Bias tuning (Hubara et al., 2021): train only the biases of the quantized model, end to
    end, so that its output distribution matches the FP model's: KL divergence from the FP
    softmax to the quantized log-softmax, computed from unlabeled calibration data (the
    reference looked the teacher's logits up by label; no label is read here). For outputs
    that are not class scores, MSE or cosine distance to the FP output.

    The trained tensors are the layers' biases, or the shift of the BatchNorm after a layer
    that has no bias; weights, their integers and the quantizer ranges do not move (except the
    last layer's input range with ``train_last_input_range``).

    NNCF's :class:`~nncf.quantization.algorithms.pipeline.Pipeline` does not hand the dataset
    to ``apply``; pass it here when running in a plain NNCF pipeline.

    :param config: Bias tuning settings.
    :param dataset: Calibration dataset, used when ``apply`` gets none.
    """

    name = "Bias tuning"

    def __init__(self, config: BiasTuningConfig | None = None, dataset: nncf.Dataset | None = None) -> None:
        super().__init__(config or BiasTuningConfig(), dataset)
        self.config: BiasTuningConfig
        self.reports: list[BiasTuningReport] = []

    def _backend(self, model: Any) -> BiasTuningBackend:
        from nncf_calibtip.algorithms.bias_tuning.torch_backend import PTBiasTuningBackend

        return PTBiasTuningBackend()

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
        n_train = n - int(round(n * cfg.holdout_fraction))
        if n_train < cfg.batch_size:
            msg = (
                f"The calibration set has {n} samples, {n_train} outside the held-out {cfg.holdout_fraction:.0%}: "
                f"too few for {cfg.steps} steps of batch_size={cfg.batch_size}. Give at least "
                f"{int(cfg.batch_size / (1 - cfg.holdout_fraction)) + 1} samples or lower batch_size."
            )
            raise ValueError(msg)
        backend = self._backend(model)
        layers = backend.find_layers(model, graph)
        if not layers:
            msg = "Bias tuning found no quantized conv/linear layers: run MinMax (and PrecisionSetup) first."
            raise ValueError(msg)
        loss = f"kl at T={cfg.temperature:g}" if cfg.loss == "kl" else cfg.loss
        compat.nncf_logger.info(
            f"Bias tuning ({loss}, {cfg.optimizer} lr {cfg.lr}) for {cfg.steps} steps of {cfg.batch_size}, {n} samples"
        )
        start = time.perf_counter()
        report = backend.tune(model, layers, items, cfg, resolve_device(cfg.device))
        self.reports = [report]
        self.calibration_seconds = time.perf_counter() - start
        compat.nncf_logger.info(
            f"Bias tuning done in {self.calibration_seconds:.1f} s: held-out {cfg.loss} "
            f"{report.loss_before:.5g} -> {report.loss_tuned:.5g} (+-{report.change_stderr:.2g}; "
            f"lower on {report.held_out_lower} of {report.held_out} samples, signed-rank p {report.change_p_lower:.2g})"
            + ("" if report.kept else f": {_put_back_reason(report, cfg)}, biases put back")
        )
        return model

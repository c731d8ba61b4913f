"""Settings of BN tuning (the paper's "global statistics tuning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from nncf_calibtip.algorithms.base import ConfigMixin

BNTarget = Literal["fp_statistics", "batchnorm"]
Rescale = Literal["auto", "always", "never"]
#: What BN tuning does to one layer: leave it, correct channel means only, or means and stds.
Treatment = Literal["skip", "means", "full"]


@dataclass(frozen=True)
class BNTuningConfig(ConfigMixin):
    """BN tuning: re-normalise each quantized layer's output channels to the FP model's, then
    fold the correction into the layer's per-channel weight scales and bias, so the integer
    weights stay as they are.

    :param target: What each channel is re-normalised to. ``"fp_statistics"``: the mean and
        standard deviation of the FP model's output of that layer on the calibration set;
        works with or without BatchNorm in the model, and with data unlike the data the
        BatchNorm statistics were trained on. ``"batchnorm"``: the running mean and standard
        deviation of the BatchNorm after the layer, the paper's target (BatchNorm outputs then
        have mean beta and std ``|gamma|``); layers without a BatchNorm after them are skipped.
    :param rescale: Which layers are tuned, and how. ``"auto"``: layers that sequential
        AdaQuant fitted are left as they are: each was fitted to its FP output, after its
        activation, on the quantized model's own inputs, so the drift BN tuning corrects is
        already accounted for, and matching the statistics before the activation undoes part
        of that fit (EfficientNet-Lite0 W4A4, 2,048 unseen images: agreement with FP after bias
        tuning 84.0% without BN tuning, 82.9% with means corrected; README). Layers fitted by
        parallel AdaQuant get their means corrected only: the MSE-best output is narrower
        than the FP output on purpose, and stretching it back amplifies the noise. All other
        layers get means and stds re-normalised. ``"always"``: every layer, means and stds,
        as the paper does; ``"never"``: every layer, means only.
    :param include_linear: Also correct fully-connected layers per output feature (off, as in
        the paper: bias tuning is the tool for the classifier).
    :param max_std_ratio: Bound on the per-channel rescaling (``1/r .. r``); larger gaps come
        from dead or near-dead channels, where rescaling only amplifies rounding noise.
    :param batch_size: Samples per forward pass; statistics are re-normalised per batch during
        the tuning pass, as a BatchNorm in training mode does (the reference used 200).
    :param subset_size: Calibration samples used at most.
    :param report: Measure the quantized statistics before and after tuning (two more passes)
        for the per-layer report.
    :param device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
    """

    algorithm_name: ClassVar[str] = "BN tuning"

    target: BNTarget = "fp_statistics"
    rescale: Rescale = "auto"
    include_linear: bool = False
    max_std_ratio: float = 2.0
    batch_size: int = 200
    subset_size: int = 1024
    report: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.target not in ("fp_statistics", "batchnorm"):
            msg = f"target={self.target!r} is not supported; use 'fp_statistics' or 'batchnorm'."
            raise ValueError(msg)
        if self.rescale not in ("auto", "always", "never"):
            msg = f"rescale={self.rescale!r} is not supported; use 'auto', 'always' or 'never'."
            raise ValueError(msg)
        for name in ("batch_size", "subset_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                msg = f"{name}={getattr(self, name)!r} must be a positive integer."
                raise ValueError(msg)
        if not self.max_std_ratio >= 1.0:
            msg = f"max_std_ratio={self.max_std_ratio!r} must be at least 1."
            raise ValueError(msg)
        self._check_device()

    def treatment(self, fit_mode: str | None) -> Treatment:
        """What tuning does to a layer that AdaQuant fitted in ``fit_mode`` (``"sequential"``,
        ``"parallel"``, or None when no algorithm fitted it); see ``rescale``."""
        if self.rescale == "always":
            return "full"
        if self.rescale == "never":
            return "means"
        if fit_mode == "sequential":
            return "skip"
        if fit_mode == "parallel":
            return "means"
        return "full"

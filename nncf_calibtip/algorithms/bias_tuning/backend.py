"""The backend interface bias tuning's algorithm drives, and what it reports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nncf_calibtip import compat
from nncf_calibtip.algorithms.bias_tuning.config import BiasTuningConfig


@dataclass(frozen=True)
class BiasTuningReport:
    """Outcome of one bias-tuning run.

    :param loss: The loss (``"kl"``, ``"mse"``, ``"cosine"``).
    :param tensors: Bias tensors trained (plus the last layer's input range when asked).
    :param samples: Calibration samples used (training and held-out).
    :param held_out: Samples kept for the figures (0: they are on the training samples).
    :param loss_before: Loss to the FP model's outputs before tuning.
    :param loss_after: The same after tuning (equal to ``loss_before`` when the biases were put back).
    :param kept: False when the biases were put back (see ``BiasTuningConfig.put_back``).
    :param loss_tuned: The held-out loss the tuned biases reached, kept or not.
    :param change_stderr: Standard error of the held-out loss change (0 without held-out samples).
    :param change_p_lower: One-sided p-value of the signed-rank test that the held-out samples'
        losses fell (1 without held-out samples).
    :param held_out_lower: Held-out samples whose loss fell.
    """

    loss: str
    tensors: int
    samples: int
    held_out: int
    loss_before: float
    loss_after: float
    kept: bool
    loss_tuned: float
    change_stderr: float
    change_p_lower: float
    held_out_lower: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BiasTuningBackend(ABC):
    """Backend-specific steps of bias tuning."""

    @abstractmethod
    def find_layers(self, model: Any, graph: compat.NNCFGraph) -> list[Any]:
        """The quantized layers, in execution order."""

    @abstractmethod
    def tune(
        self, model: Any, layers: Sequence[Any], items: Sequence[Any], config: BiasTuningConfig, device: Any
    ) -> BiasTuningReport:
        """Train the biases in place and report."""

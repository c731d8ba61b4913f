"""The backend interface AdaQuant's algorithm drives, and what it reports per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.config import AdaQuantConfig


@dataclass(frozen=True)
class LayerReport:
    """Reconstruction error of one layer, ``||y_q - y||^2 / ||y||^2`` on held-out samples.

    :param name: Layer (graph node) name.
    :param samples: Calibration samples the layer saw (optimisation and held-out).
    :param held_out: Samples kept for the error figures (0: they are on the optimisation set).
    :param error_before: Error at round-to-nearest, with the same ranges.
    :param error_after: Error after AdaQuant: the lowest of round-to-nearest, the start and
        the fitted layer, which is the one kept.
    :param kept: False when AdaQuant did not lower the held-out error and the layer was left
        at round-to-nearest.
    :param loss_after: The residual add the error (and the loss) is taken after, or None:
        after the layer's own BatchNorm and activation.
    :param error_start: Error at the start of the gradient steps (after the range search and
        the weight start), or None when not measured.
    :param steps_undone: True when the gradient steps ended above the start on held-out
        samples and the layer was put back to the start (a layer kept at round-to-nearest
        reports False).
    :param capture_s: Seconds spent running the model to get the layer's inputs and targets.
    :param optimize_s: Seconds spent optimising the layer.
    """

    name: str
    samples: int
    held_out: int
    error_before: float
    error_after: float
    kept: bool
    loss_after: str | None = None
    error_start: float | None = None
    steps_undone: bool = False
    capture_s: float = 0.0
    optimize_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AdaQuantBackend(ABC):
    """Backend-specific steps of AdaQuant."""

    @abstractmethod
    def find_layers(self, model: Any, graph: compat.NNCFGraph) -> list[Any]:
        """Quantized layers in execution order (objects with ``name``, ``input_quantizer_key``)."""

    @abstractmethod
    def start(
        self,
        model: Any,
        graph: compat.NNCFGraph,
        device: Any,
        layers: Sequence[Any],
        items: Sequence[Any],
        config: AdaQuantConfig,
    ) -> Any:
        """Prepare a calibration session (device placement, FP reference, FP input cache, and
        in sequential mode the quantized model's inputs)."""

    @abstractmethod
    def calibrate_layer(
        self,
        session: Any,
        layer: Any,
        items: Sequence[Any],
        config: AdaQuantConfig,
        train_input_range: bool,
        layer_index: int,
    ) -> LayerReport:
        """Optimise one layer in place and report its reconstruction error."""

    @abstractmethod
    def finish(self, session: Any) -> None:
        """Release the session and put the model back where it was."""

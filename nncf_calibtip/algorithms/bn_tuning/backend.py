"""The backend interface BN tuning's algorithm drives, and what it reports per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nncf_calibtip import compat
from nncf_calibtip.algorithms.bn_tuning.config import BNTuningConfig, Treatment


@dataclass(frozen=True)
class ChannelStatsReport:
    """How far one layer's output channels are from their target, before and after tuning.

    Errors are means over channels: ``mean_error`` of ``|mean - target mean| / target std``,
    ``std_error`` of ``|std / target std - 1|``. The "before" and "after" figures are NaN when
    the config turned the report off.

    :param name: Layer (graph node) name.
    :param channels: Output channels.
    :param rescaled: Channels whose weight scale moved (the others were only shifted: dead
        channels, or a per-tensor weight quantizer that cannot take per-channel factors).
    :param clamped: Channels whose rescaling hit ``max_std_ratio``.
    """

    name: str
    channels: int
    mean_error_before: float
    std_error_before: float
    mean_error_after: float
    std_error_after: float
    rescaled: int
    clamped: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BNTuningBackend(ABC):
    """Backend-specific steps of BN tuning."""

    @abstractmethod
    def find_layers(self, model: Any, graph: compat.NNCFGraph, config: BNTuningConfig) -> list[Any]:
        """The quantized layers to tune, in execution order."""

    @abstractmethod
    def fit_modes(self, model: Any) -> Mapping[str, str]:
        """Layer name -> how AdaQuant fitted it (``"sequential"`` / ``"parallel"``), for the
        layers an earlier algorithm fitted on ``model``."""

    @abstractmethod
    def tune(
        self,
        model: Any,
        layers: Sequence[Any],
        treatments: Mapping[str, Treatment],
        items: Sequence[Any],
        config: BNTuningConfig,
        device: Any,
    ) -> list[ChannelStatsReport]:
        """Measure targets, run the tuning pass, fold the corrections in (means only where
        ``treatments`` says ``"means"``); report per layer."""

"""What the dataset-streaming algorithms and their configs share."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

import nncf

from nncf_calibtip import compat

_C = TypeVar("_C", bound="ConfigMixin")


class ConfigMixin:
    """JSON round trip and shared checks of a frozen config dataclass."""

    #: Name used in error messages, e.g. ``"AdaQuant"``.
    algorithm_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"Unknown {cls.algorithm_name} settings {unknown}; known: {sorted(known)}."
            raise ValueError(msg)
        return cls(**data)

    def _check_device(self) -> None:
        device = self.device
        if not (device == "auto" or device == "cpu" or device.startswith("cuda")):
            msg = f"device={device!r} must be 'auto', 'cpu' or 'cuda[:N]'."
            raise ValueError(msg)


class StreamingAlgorithm(compat.Algorithm):
    """An NNCF post-training algorithm that streams the calibration dataset itself (torch backend).

    NNCF's :class:`~nncf.quantization.algorithms.pipeline.Pipeline` hands only statistics to
    ``apply``; such an algorithm takes the dataset in its constructor when run in a plain NNCF
    pipeline (:func:`nncf_calibtip.quantize` passes it to ``apply``).

    :param config: The algorithm's settings.
    :param dataset: Calibration dataset, used when ``apply`` gets none.
    """

    #: Name used in messages, e.g. ``"AdaQuant"``.
    name: ClassVar[str] = ""

    def __init__(self, config: Any, dataset: nncf.Dataset | None = None) -> None:
        self.config = config
        self.dataset = dataset
        self.reports: list[Any] = []
        self.calibration_seconds = 0.0

    @property
    def available_backends(self) -> list[compat.BackendType]:
        return [compat.BackendType.TORCH]

    def get_statistic_points(self, model: Any, graph: compat.NNCFGraph) -> compat.StatisticPointsContainer:
        # The data is streamed by the algorithm itself: no statistics for NNCF to collect.
        return compat.StatisticPointsContainer()

    def _dataset(self, dataset: nncf.Dataset | None) -> nncf.Dataset:
        """The dataset given to ``apply``, else the constructor's; an error naming the fix if neither."""
        dataset = dataset if dataset is not None else self.dataset
        if dataset is None:
            msg = (
                f"{self.name} needs the calibration dataset: pass it as {type(self).__name__}(config, dataset) "
                "or to apply(); NNCF's Pipeline does not forward it."
            )
            raise ValueError(msg)
        return dataset

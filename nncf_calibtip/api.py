"""``quantize()``: a config -> an NNCF pipeline of our algorithms -> the quantized model."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nncf
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant import AdaQuant, AdaQuantConfig
from nncf_calibtip.algorithms.bias_tuning import BiasTuning, BiasTuningConfig
from nncf_calibtip.algorithms.bn_tuning import BNTuning, BNTuningConfig
from nncf_calibtip.calibration.data import check_item_call, check_item_device, inference_items
from nncf_calibtip.calibration.fp_reference import remember_fp_state
from nncf_calibtip.config_schema import validate_quantization_config
from nncf_calibtip.placement import PrecisionConfig, PrecisionSetup, min_max_algorithm, smooth_quant_algorithm
from nncf_calibtip.plan import PrecisionPlan

#: Configs of the algorithms that run after placement.
AlgorithmConfig = AdaQuantConfig | BNTuningConfig | BiasTuningConfig
#: Config class of each algorithm, by the name used in JSON configs.
ALGORITHM_CONFIGS: dict[str, type] = {
    "adaquant": AdaQuantConfig,
    "bn_tuning": BNTuningConfig,
    "bias_tuning": BiasTuningConfig,
}
#: The NNCF algorithm each config builds.
ALGORITHM_CLASSES: dict[type, type] = {
    AdaQuantConfig: AdaQuant,
    BNTuningConfig: BNTuning,
    BiasTuningConfig: BiasTuning,
}


@dataclass(frozen=True)
class QuantizationConfig:
    """A whole quantization recipe: bit widths, then algorithms in order.

    :param precision: Bit widths (defaults, first/last rule, overrides).
    :param algorithms: Algorithms run after placement, in order (e.g. ``[AdaQuantConfig()]``).
    :param subset_size: Calibration samples used for the quantizer ranges.
    """

    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    algorithms: tuple[AlgorithmConfig, ...] = ()
    subset_size: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        for a in self.algorithms:
            if not isinstance(a, tuple(ALGORITHM_CONFIGS.values())):
                msg = f"Unknown algorithm config {type(a).__name__}; use one of {sorted(ALGORITHM_CONFIGS)}."
                raise TypeError(msg)
        if not isinstance(self.subset_size, int) or self.subset_size < 1:
            msg = f"subset_size={self.subset_size!r} must be a positive integer."
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        names = {cls: name for name, cls in ALGORITHM_CONFIGS.items()}
        return {
            "precision": self.precision.to_dict(),
            "algorithms": [{"type": names[type(a)], **a.to_dict()} for a in self.algorithms],
            "subset_size": self.subset_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        """Build from JSON data, checked against :func:`~nncf_calibtip.config_schema.quantization_config_schema`
        first, so that every problem in a file is reported at once with its place."""
        validate_quantization_config(data)
        algorithms = []
        for entry in data.get("algorithms", []):
            entry = dict(entry)
            kind = entry.pop("type", None)
            if kind not in ALGORITHM_CONFIGS:
                msg = f"Algorithm type {kind!r} is unknown; use one of {sorted(ALGORITHM_CONFIGS)}."
                raise ValueError(msg)
            algorithms.append(ALGORITHM_CONFIGS[kind].from_dict(entry))
        return cls(
            precision=PrecisionConfig.from_dict(data.get("precision", {})),
            algorithms=tuple(algorithms),
            subset_size=data.get("subset_size", 1024),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> QuantizationConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            msg = f"{path} is not valid JSON: {e}"
            raise ValueError(msg) from e
        return cls.from_dict(data)


class DatasetPipeline(compat.Pipeline):
    """NNCF's Pipeline that also hands the dataset to each algorithm's ``apply`` (NNCF's own
    passes only statistics, which suits MinMax but not algorithms that stream data)."""

    _dataset: nncf.Dataset | None = None

    def run_from_step(self, model: Any, dataset: nncf.Dataset, *args: Any, **kwargs: Any) -> Any:
        self._dataset = dataset
        try:
            return super().run_from_step(model, dataset, *args, **kwargs)
        finally:
            self._dataset = None

    def run_step(self, step_index: int, step_statistics: Any, model: Any, graph: Any) -> Any:
        current_model, current_graph = model, graph
        step = self._remove_unsupported_algorithms(compat.get_backend(model))[step_index]
        for i, algorithm in enumerate(step):
            if i:
                current_graph = compat.build_graph(current_model)
            current_model = algorithm.apply(current_model, current_graph, step_statistics, dataset=self._dataset)
        return current_model


@dataclass
class QuantizationResult:
    """What a quantization run produced besides the model: the plan and per-algorithm reports."""

    plan: PrecisionPlan
    reports: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


RESULT_ATTRIBUTE = "_calibtip_result"


def _collect_reports(out: QuantizationResult, algorithms: list[compat.Algorithm]) -> None:
    """Add each algorithm's reports and time under its JSON name (``bn_tuning_2`` for a repeat)."""
    names = {cls: name for name, cls in ALGORITHM_CONFIGS.items()}
    for a in algorithms:
        name = names[type(a.config)]
        key, i = name, 2
        while key in out.reports:
            key, i = f"{name}_{i}", i + 1
        out.reports[key] = [r.to_dict() for r in a.reports]
        out.seconds[key] = a.calibration_seconds


def nncf_subset_size(dataset: nncf.Dataset, samples: int) -> int:
    """NNCF's ``subset_size`` that covers ``samples`` samples: NNCF counts samples when it can
    tell the batch size (a DataLoader), and dataset items otherwise."""
    if dataset.get_batch_size() is not None:
        return samples
    return len(inference_items(dataset, samples))


def build_pipeline(
    config: QuantizationConfig,
    ignored_scope: nncf.IgnoredScope | None = None,
    plan: PrecisionPlan | None = None,
    min_max_subset_size: int | None = None,
) -> tuple[DatasetPipeline, list[compat.Algorithm]]:
    """The NNCF pipeline for ``config``: SmoothQuant (where the precision config asks for it),
    MinMax, PrecisionSetup, then the algorithms.

    :param min_max_subset_size: NNCF ``subset_size`` for MinMax (default ``config.subset_size``).
    """
    setup = PrecisionSetup(config.precision, plan)
    algorithms: list[compat.Algorithm] = [setup]
    for a in config.algorithms:
        algorithms.append(ALGORITHM_CLASSES[type(a)](a))
    subset = min_max_subset_size or config.subset_size
    smooth_quant = smooth_quant_algorithm(config.precision, subset)
    steps = [[smooth_quant]] if smooth_quant is not None else []
    steps += [[min_max_algorithm(config.precision, subset, ignored_scope)], [setup]]
    steps += [[a] for a in algorithms[1:]]
    return DatasetPipeline(steps), algorithms


def quantize(
    model: nn.Module,
    calibration_dataset: nncf.Dataset,
    config: QuantizationConfig | AlgorithmConfig | None = None,
    *,
    precision: PrecisionConfig | None = None,
    plan: PrecisionPlan | None = None,
    ignored_scope: nncf.IgnoredScope | None = None,
) -> nn.Module:
    """Quantize a torch model below 8 bits with a small unlabeled calibration set.

    The caller's model is not modified. The result is an NNCF-quantized torch model (fake
    quantization) that :func:`nncf_calibtip.export_openvino` turns into OpenVINO IR.

    :param model: FP torch model in eval mode.
    :param calibration_dataset: Unlabeled calibration data (``nncf.Dataset`` whose transform
        gives model inputs).
    :param config: A full :class:`QuantizationConfig`, or a single algorithm config such as
        :class:`AdaQuantConfig`; None quantizes with round-to-nearest only.
    :param precision: Bit widths; overrides ``config.precision``.
    :param plan: An explicit per-layer plan; overrides the precision defaults.
    :param ignored_scope: Operations left in FP (NNCF's ``IgnoredScope``).
    :return: The quantized model; :func:`get_result` gives its plan and reports.
    """
    if not isinstance(model, nn.Module):
        msg = f"quantize() takes a torch.nn.Module, got {type(model).__name__}."
        raise TypeError(msg)
    if not isinstance(calibration_dataset, nncf.Dataset):
        msg = "calibration_dataset must be an nncf.Dataset: wrap your loader as nncf.Dataset(loader, transform_fn)."
        raise TypeError(msg)
    if config is None:
        config = QuantizationConfig()
    elif not isinstance(config, QuantizationConfig):
        config = QuantizationConfig(algorithms=(config,))
    if precision is not None:
        config = QuantizationConfig(precision=precision, algorithms=config.algorithms, subset_size=config.subset_size)
    subset = nncf_subset_size(calibration_dataset, config.subset_size)
    pipeline, algorithms = build_pipeline(config, ignored_scope, plan, subset)
    example = next(iter(calibration_dataset.get_inference_data()))
    check_item_device(model, example)
    work = copy.deepcopy(model).eval()
    check_item_call(work, example)
    wrapped = compat.GraphModelWrapper(compat.wrap_model(work), example)
    result = pipeline.run(wrapped, calibration_dataset)
    quantized = compat.unwrap(result)
    # Keep the FP tensors on the model even when no algorithm changed a weight: a later
    # refine() then compares with the real FP model, also after a saved state was loaded into
    # this placement (round-to-nearest + load_state_dict). A no-op when an algorithm stored it.
    remember_fp_state(quantized)
    setup = algorithms[0]
    out = QuantizationResult(plan=setup.applied_plan)
    _collect_reports(out, algorithms[1:])
    setattr(quantized, RESULT_ATTRIBUTE, out)
    return quantized


def refine(model: nn.Module, calibration_dataset: nncf.Dataset, *configs: AlgorithmConfig) -> nn.Module:
    """Run more algorithms on a model :func:`quantize` returned, e.g. BN tuning and bias tuning
    after AdaQuant, without redoing what was done. The given model is not modified.

    :param model: A model from :func:`quantize` (or from an earlier :func:`refine`).
    :param calibration_dataset: Unlabeled calibration data.
    :param configs: Algorithm configs, run in order.
    :return: A new quantized model; :func:`get_result` holds the earlier and the new reports.
    """
    previous = get_result(model)
    if not configs:
        msg = "refine() needs at least one algorithm config, e.g. BNTuningConfig()."
        raise ValueError(msg)
    for c in configs:
        if type(c) not in ALGORITHM_CLASSES:
            msg = f"Unknown algorithm config {type(c).__name__}; use one of {sorted(ALGORITHM_CONFIGS)}."
            raise TypeError(msg)
    algorithms = [ALGORITHM_CLASSES[type(c)](c) for c in configs]
    example = next(iter(calibration_dataset.get_inference_data()))
    check_item_device(model, example)
    work = copy.deepcopy(model)
    result = DatasetPipeline([[a] for a in algorithms]).run(
        compat.GraphModelWrapper(work, example), calibration_dataset
    )
    refined = compat.unwrap(result)
    out = QuantizationResult(plan=previous.plan, reports=dict(previous.reports), seconds=dict(previous.seconds))
    _collect_reports(out, algorithms)
    setattr(refined, RESULT_ATTRIBUTE, out)
    return refined


def get_result(model: nn.Module) -> QuantizationResult:
    """The plan and reports of a model returned by :func:`quantize`."""
    result = getattr(model, RESULT_ATTRIBUTE, None)
    if result is None:
        msg = "This model was not produced by nncf_calibtip.quantize()."
        raise ValueError(msg)
    return result

"""The steps the samples and benchmarks share: calibration sets, FP32 export, IR measurements."""

from __future__ import annotations

import json
import resource
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nncf
import numpy as np
import openvino as ov
import torch
from torch import nn

from nncf_calibtip import evaluation


def calibration_indices(pool_size: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of the ``size`` pool samples :func:`calibration_dataset` draws."""
    if size > pool_size:
        msg = f"Asked for {size} calibration samples, only {pool_size} available."
        raise ValueError(msg)
    return np.sort(np.random.default_rng(seed).choice(pool_size, size, replace=False))


def calibration_dataset(x: np.ndarray, size: int, batch_size: int = 32, seed: int = 0) -> nncf.Dataset:
    """``size`` samples of ``x`` drawn without replacement (fixed seed), as batches of tensors."""
    idx = calibration_indices(len(x), size, seed)
    sample = torch.from_numpy(np.ascontiguousarray(x[idx]))
    return nncf.Dataset([sample[i : i + batch_size] for i in range(0, size, batch_size)])


def export_fp32(model: nn.Module, example: torch.Tensor, xml: Path) -> Path:
    """Export the FP model as IR (FP32 constants) with a dynamic batch."""
    xml.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        ov_model = ov.convert_model(model.eval(), example_input=example, input=[(-1, *example.shape[1:])])
    ov.save_model(ov_model, xml, compress_to_fp16=False)
    return xml


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Row:
    """One line of a results table (the benchmark JSON format)."""

    method: str
    weight_bits: int | None
    activation_bits: int | None
    accuracy: float
    weight_bytes: int
    latency_ms: float
    calib_s: float
    peak_rss_mb: float
    #: Share of the held-out samples on which the row's IR predicts the FP32 IR's class (None
    #: when the rows have no FP32 row). Unlike the accuracy delta, it does not net out the
    #: predictions quantization breaks against those it happens to fix.
    fp32_agreement: float | None = None
    xml: str = ""

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("xml")
        return d


def measure(
    entries: Sequence[dict[str, Any]], x_test: np.ndarray, y_test: np.ndarray, latency_rounds: int = 7
) -> list[Row]:
    """Accuracy, size and (side-by-side) latency of several IRs.

    :param entries: dicts with ``method``, ``weight_bits``, ``activation_bits``, ``xml``,
        ``calib_s``, ``peak_rss_mb``; the one whose method is ``"FP32"`` (if any) is the
        reference of every row's ``fp32_agreement``.
    """
    lat = evaluation.latencies_ms([e["xml"] for e in entries], x_test[:1], rounds=latency_rounds)
    predicted = [evaluation.ir_top1(e["xml"], x_test) for e in entries]
    fp32 = next((p for e, p in zip(entries, predicted, strict=True) if e["method"] == "FP32"), None)
    rows = []
    for e, times, pred in zip(entries, lat, predicted, strict=True):
        rows.append(
            Row(
                method=e["method"],
                weight_bits=e.get("weight_bits"),
                activation_bits=e.get("activation_bits"),
                accuracy=round(float((pred == y_test).mean()), 5),
                weight_bytes=evaluation.weight_bytes(e["xml"]),
                latency_ms=round(evaluation.median(times), 4),
                calib_s=round(float(e.get("calib_s", 0.0)), 2),
                peak_rss_mb=round(float(e.get("peak_rss_mb", 0.0)), 1),
                fp32_agreement=None if fp32 is None else round(float((pred == fp32).mean()), 5),
                xml=str(e["xml"]),
            )
        )
    return rows


def table(rows: Sequence[Row], baseline: float | None = None) -> str:
    """A Markdown table of ``rows``; ``baseline`` (FP32 accuracy) adds a delta column."""
    head = (
        "| method | W | A | accuracy % | delta pt | agrees with FP32 % | IR bytes | latency ms | calib s "
        "| peak RSS MB |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r.accuracy - baseline):+.2f}" if baseline is not None else ""
        agreement = f"{100 * r.fp32_agreement:.2f}" if r.fp32_agreement is not None else ""
        lines.append(
            f"| {r.method} | {r.weight_bits or '-'} | {r.activation_bits or '-'} | {100 * r.accuracy:.2f} | {delta} "
            f"| {agreement} | {r.weight_bytes:,} | {r.latency_ms:.3f} | {r.calib_s:.1f} | {r.peak_rss_mb:.0f} |"
        )
    return "\n".join(lines)


def write_results(path: Path, model: str, dataset: str, rows: Sequence[Row], extra: dict[str, Any]) -> None:
    """The benchmark JSON: ``{"model", "dataset", "metric", "rows": [...]}`` plus context."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "dataset": dataset, "metric": "top1_accuracy", "rows": [r.public() for r in rows]}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2) + "\n")

"""Measure an OpenVINO IR on the CPU: accuracy on held-out data, latency, size, and the CPU.

Accuracy is always taken on the exported IR, compiled with ``INFERENCE_PRECISION_HINT=f32``
so that a CPU with bf16 does not run the FP32 baseline in bf16.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openvino as ov

#: Compile settings for accuracy and latency: f32 where the plan says float, and no dynamic
#: quantization. On CPUs with AVX-512/AMX, OpenVINO by default also quantizes, on the fly, the
#: inputs of fully connected layers whose weights are stored compressed (the plan's 4-bit
#: Linear layers) to 8 bits in groups: an extra quantization the plan does not have, which
#: moved a tiny W4A4 model's outputs by 0.6% of their range against 1e-7 without it. Turn it
#: on for speed only after measuring the accuracy with it.
PLAN_EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def compile_ir(xml: str | Path, config: dict[str, str] | None = None, core: ov.Core | None = None) -> ov.CompiledModel:
    """Compile an IR for the CPU with :data:`PLAN_EXACT` unless ``config`` says otherwise."""
    core = core or ov.Core()
    return core.compile_model(core.read_model(xml), "CPU", PLAN_EXACT if config is None else config)


def predict(compiled: ov.CompiledModel, x: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Outputs of a compiled single-input model on ``x``, in batches."""
    request = compiled.create_infer_request()
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(request.infer([x[i : i + batch_size]])[0].copy())
    return np.concatenate(outs)


def ir_top1(xml: str | Path, x: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """The class an IR predicts for each sample of ``x``."""
    return predict(compile_ir(xml), x, batch_size).argmax(1)


def ir_accuracy(xml: str | Path, x: np.ndarray, y: np.ndarray, batch_size: int = 250) -> float:
    """Top-1 accuracy of an IR on labelled held-out data (``x`` inputs, ``y`` class ids)."""
    return float((ir_top1(xml, x, batch_size) == y).mean())


def latencies_ms(
    xmls: Sequence[str | Path], example: np.ndarray, rounds: int = 7, runs_per_round: int = 30, warmup: int = 10
) -> list[list[float]]:
    """Batch-1 latency of several IRs measured side by side.

    Every IR is compiled once (f32 precision hint, one stream); rounds visit the IRs in turn so
    that slow phases of a shared machine hit every IR alike. Each round gives the mean of
    ``runs_per_round`` synchronous inferences.

    :return: per IR, the per-round mean latencies in milliseconds.
    """
    core = ov.Core()
    cfg = {**PLAN_EXACT, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    requests = []
    for xml in xmls:
        req = compile_ir(xml, cfg, core).create_infer_request()
        for _ in range(warmup):
            req.infer([example])
        requests.append(req)
    results: list[list[float]] = [[] for _ in xmls]
    for _ in range(rounds):
        for i, req in enumerate(requests):
            start = time.perf_counter()
            for _ in range(runs_per_round):
                req.infer([example])
            results[i].append((time.perf_counter() - start) * 1000 / runs_per_round)
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def weight_bytes(xml: str | Path) -> int:
    """Bytes of the IR's ``.bin`` (weights and other constants)."""
    return Path(xml).with_suffix(".bin").stat().st_size


def cpu_description() -> dict[str, object]:
    """CPU model and the ISA extensions that decide OpenVINO's int8 speed and accuracy."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": model, "isa": [f for f in wanted if f in flags], "cores": _cores()}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

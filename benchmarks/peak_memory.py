"""Peak memory of sequential AdaQuant on a torchvision architecture at a given input size.

Memory does not grow with depth (only the current layer's data is cached), but it grows with
the number of calibration samples times the largest activations. This measures how much, on
a real architecture at a real resolution, so that a user can size the calibration set to the
machine: random weights and random images (memory and the fixed cost do not depend on them),
and few Adam steps per layer (the steps add little memory: one batch's graph). Prints the
process's resident memory after each layer and its peak so far, and writes
``benchmarks/results/peak_memory_<arch>_<size>px_<samples>.json``.

    python benchmarks/peak_memory.py --arch resnet50 --size 224 --samples 256 [--stop-after layer2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import nncf
import torch
import torchvision

import nncf_calibtip as nc
from nncf_calibtip.algorithms.adaquant import torch_backend
from nncf_calibtip.evaluation import cpu_description
from nncf_calibtip.zoo.experiment import peak_rss_mb

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> tuple[int, int]:
    """(resident, peak resident) memory of this process in MB; the current one from /proc (Linux)."""
    with open("/proc/self/status") as f:
        current = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
    return current, int(peak_rss_mb())


class _Stop(Exception):
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="a torchvision.models constructor, e.g. resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--iters", type=int, default=2, help="Adam steps per layer (memory barely depends on them)")
    p.add_argument("--bits", default="W4A4", choices=("W8A8", "W4A8", "W4A4"))
    p.add_argument("--stop-after", default=None, help="stop before the first layer whose name starts with this")
    args = p.parse_args()

    rows: list[dict[str, Any]] = []
    calibrate = torch_backend.PTAdaQuantBackend.calibrate_layer

    def measured(self: Any, session: Any, layer: Any, *a: Any, **k: Any) -> Any:
        if args.stop_after and layer.name.startswith(args.stop_after):
            raise _Stop
        before = rss_mb()[0]
        report = calibrate(self, session, layer, *a, **k)
        after, peak = rss_mb()
        rows.append({"layer": layer.name, "rss_before_mb": before, "rss_after_mb": after, "peak_mb": peak})
        print(f"{layer.name:45s} RSS {before:6d} -> {after:6d} MB, peak so far {peak:6d} MB", flush=True)
        return report

    torch_backend.PTAdaQuantBackend.calibrate_layer = measured  # type: ignore[method-assign]
    # AdaQuant's own forecast (a lower bound, logged before the first layer), for comparison.
    forecasts: list[Any] = []
    forecast = torch_backend.forecast_adaquant_memory

    def recorded(*a: Any, **k: Any) -> Any:
        forecasts.append(forecast(*a, **k))
        return forecasts[-1]

    torch_backend.forecast_adaquant_memory = recorded  # type: ignore[assignment]
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(min(32, args.samples - i), 3, args.size, args.size, generator=gen)
        for i in range(0, args.samples, 32)
    ]
    start = rss_mb()[0]
    w, a = int(args.bits[1]), int(args.bits[3])
    t0 = time.perf_counter()
    stopped = False
    try:
        nc.quantize(
            model,
            nncf.Dataset(batches),
            nc.AdaQuantConfig(mode="sequential", iters=args.iters),
            precision=nc.PrecisionConfig(w, a),
        )
    except _Stop:
        stopped = True
    seconds = time.perf_counter() - t0
    peak = rss_mb()[1]
    per_sample = (max(r["peak_mb"] for r in rows) - start) / args.samples if rows else None
    result = {
        "arch": args.arch,
        "input_size": args.size,
        "samples": args.samples,
        "bits": args.bits,
        "iters": args.iters,
        "stopped_before": args.stop_after if stopped else None,
        "rss_at_start_mb": start,
        "peak_rss_mb": peak,
        "peak_above_start_per_sample_mb": round(per_sample, 2) if per_sample is not None else None,
        # The first forecast is the one for the mode that runs (the stream's).
        "forecast_per_sample_mb": round(forecasts[0].bytes_per_sample / 2**20, 2) if forecasts else None,
        "forecast_peak_layer": forecasts[0].peak_layer if forecasts else None,
        "seconds": round(seconds, 1),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "layers": rows,
    }
    print(
        f"{args.arch} {args.size} px, {args.samples} samples, {args.bits}: peak RSS {peak} MB "
        f"({start} MB at start, {result['peak_above_start_per_sample_mb']} MB per sample above it; forecast "
        f"{result['forecast_per_sample_mb']} MB per sample at {result['forecast_peak_layer']}), {seconds:.0f} s"
        + (f", stopped before {args.stop_after}" if stopped else "")
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"peak_memory_{args.arch}_{args.size}px_{args.samples}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

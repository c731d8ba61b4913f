"""Compare pipeline variants without touching the test set: each variant continues the same
quantized model and is scored on training-pool images outside the calibration set, by top-1
agreement with the FP model and the KL divergence from the FP model's softmax (torch, not the IR).
This is how defaults are chosen here; the test set only reports.

    python benchmarks/dev_agreement.py --model resnet20 --bits W4A4 --base adaquant_sequential \
        --variants bias bn bn+bias "bn:rescale=always" "bn:rescale=always+bias"

A variant is stages joined by ``+``; a stage is ``bn`` or ``bias``, optionally with config
fields after a colon (``bias:lr=0.01,steps=400``, values as JSON). ``--set`` changes a field of
the base algorithm, as in ``run_benchmark.py``. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import nncf_calibtip as nc
from nncf_calibtip.zoo import experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmark import BITS, configured, load_task, parse_settings  # noqa: E402

STAGE_CONFIGS = {"bn": nc.BNTuningConfig, "bias": nc.BiasTuningConfig}


def parse_variant(variant: str) -> list:
    """``"bn:rescale=always+bias"`` -> ``[BNTuningConfig(rescale="always"), BiasTuningConfig()]``."""
    configs = []
    for stage in variant.split("+"):
        name, _, fields = stage.partition(":")
        if name not in STAGE_CONFIGS:
            msg = f"Variant {variant!r}: unknown stage {name!r}; use {sorted(STAGE_CONFIGS)}."
            raise SystemExit(msg)
        kwargs = {}
        for item in filter(None, fields.split(",")):
            key, eq, raw = item.partition("=")
            if not eq:
                raise SystemExit(f"Variant {variant!r}: write fields as name=value, got {item!r}.")
            try:
                kwargs[key] = json.loads(raw)
            except json.JSONDecodeError:
                kwargs[key] = raw
        try:
            configs.append(STAGE_CONFIGS[name](**kwargs))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"Variant {variant!r}: {e}") from e
    return configs


def dev_inputs(pool: np.ndarray, calibration_size: int, samples: int) -> torch.Tensor:
    """``samples`` pool images outside the benchmark's calibration draw."""
    rest = np.setdiff1d(np.arange(len(pool)), experiment.calibration_indices(len(pool), calibration_size))
    if samples > len(rest):
        raise SystemExit(f"Only {len(rest)} pool images lie outside the calibration set; lower --dev-samples.")
    idx = np.sort(np.random.default_rng(5).choice(rest, samples, replace=False))
    return torch.from_numpy(np.ascontiguousarray(pool[idx]))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])


def score(fp: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    kl = torch.nn.functional.kl_div(q.log_softmax(1), fp.log_softmax(1), log_target=True, reduction="none").sum(1)
    return {
        "agreement_pct": round(100 * (fp.argmax(1) == q.argmax(1)).double().mean().item(), 2),
        "kl": round(kl.mean().item(), 5),
        "kl_stderr": round(kl.std().item() / len(kl) ** 0.5, 5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=("resnet20", "efficientnet_lite0"))
    p.add_argument("--bits", required=True, choices=list(BITS))
    p.add_argument("--base", default="adaquant_sequential", choices=("rtn", "adaquant_sequential", "adaquant_parallel"))
    p.add_argument("--variants", nargs="*", default=[], help="stage chains continuing the base model")
    p.add_argument("--calibration-size", type=int, default=1024)
    p.add_argument("--dev-samples", type=int, default=2048)
    p.add_argument("--set", action="append", default=[], metavar="ALGORITHM.FIELD=VALUE")
    p.add_argument("--reports", type=Path, help="write the base model's per-layer reports (JSON) here")
    args = p.parse_args()
    settings = parse_settings(args.set)
    variants = {v: parse_variant(v) for v in args.variants}
    task = load_task(args.model, with_test=False)
    calib = experiment.calibration_dataset(task.calibration_pool, args.calibration_size)
    x = dev_inputs(task.calibration_pool, args.calibration_size, args.dev_samples)
    fp = logits(task.model, x)
    algorithms: tuple = ()
    if args.base != "rtn":
        algorithms = (configured(nc.AdaQuantConfig(mode=args.base.split("_")[1]), settings),)
    start = time.perf_counter()
    precision = configured(nc.PrecisionConfig(*BITS[args.bits]), settings)
    config = nc.QuantizationConfig(precision=precision, algorithms=algorithms)
    base = nc.quantize(task.model, calib, config)
    rows = [{"variant": args.base, "seconds": round(time.perf_counter() - start, 1), **score(fp, logits(base, x))}]
    print(json.dumps(rows[-1]), flush=True)
    if args.reports:
        args.reports.write_text(json.dumps(nc.get_result(base).reports, indent=1))
    for name, configs in variants.items():
        start = time.perf_counter()
        model = nc.refine(base, calib, *configs)
        rows.append({"variant": f"{args.base}+{name}", "seconds": round(time.perf_counter() - start, 1)})
        rows[-1].update(score(fp, logits(model, x)))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

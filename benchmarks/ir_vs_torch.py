"""How far the exported IR's outputs are from the torch quantized model's, per bit width.

Round-to-nearest (or ``--base adaquant_sequential``) at each width, exported and run on the
CPU (f32, as the benchmark), against the same torch model on the first test images. Prints
the median and largest absolute difference relative to the outputs' largest magnitude, and
how many images' top-1 class differs. ``--float64`` adds how far the torch model itself moves
when run in float64 instead of float32 (how much this model amplifies float error).

    python benchmarks/ir_vs_torch.py --model resnet20 [--base adaquant_sequential] [--bits W4A4]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import nncf_calibtip as nc
from nncf_calibtip.evaluation import compile_ir, predict
from nncf_calibtip.zoo import experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dev_agreement import logits  # noqa: E402
from run_benchmark import BITS, load_task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=("resnet20", "efficientnet_lite0"))
    p.add_argument("--bits", nargs="*", default=list(BITS), choices=list(BITS))
    p.add_argument("--base", default="rtn", choices=("rtn", "adaquant_sequential"))
    p.add_argument("--calibration-size", type=int, default=1024)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--float64", action="store_true", help="also compare torch in float64 with torch in float32")
    args = p.parse_args()
    task = load_task(args.model, with_test=True)
    calib = experiment.calibration_dataset(task.calibration_pool, args.calibration_size)
    x = torch.from_numpy(np.ascontiguousarray(task.x_test[: args.images]))
    print(f"{args.model}, {args.base}, first {len(x)} test images")
    extra = " torch f64: median diff / range | torch f64: top-1 differs |" if args.float64 else ""
    print(f"| bits | median diff / range | max diff / range | top-1 differs |{extra}")
    print("|---|---|---|---|" + "---|---|" * args.float64)
    config = nc.AdaQuantConfig() if args.base == "adaquant_sequential" else None
    for bits in args.bits:
        q = nc.quantize(task.model, calib, config, precision=nc.PrecisionConfig(*BITS[bits]))
        with tempfile.TemporaryDirectory() as d:
            res = nc.export_openvino(q, x[:1], Path(d) / "m.xml", input_shape=[(-1, *x.shape[1:])])
            ir = predict(compile_ir(res.xml), x.numpy())
        ref = logits(q, x).numpy()
        scale = np.abs(ref).max()
        diff = np.abs(ir - ref)
        flips = int((ir.argmax(1) != ref.argmax(1)).sum())
        row = f"| {bits} | {np.median(diff) / scale:.1e} | {diff.max() / scale:.1e} | {flips} of {len(x)} |"
        if args.float64:
            ref64 = logits(copy.deepcopy(q).double(), x.double()).float().numpy()
            flips64 = int((ref64.argmax(1) != ref.argmax(1)).sum())
            row += f" {np.median(np.abs(ref64 - ref)) / scale:.1e} | {flips64} of {len(x)} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""Quantize a ResNet-20 trained on Fashion-MNIST to 4-bit weights and activations with AdaQuant,
export it to OpenVINO IR and compare it with the FP32 IR on the 10,000 test images.

    python samples/resnet_fashion_mnist/main.py                      # W4A4, sequential AdaQuant
    python samples/resnet_fashion_mnist/main.py --weight-bits 4 --activation-bits 8 --mode parallel
    python samples/resnet_fashion_mnist/main.py --config configs/adaquant_w4a4.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import nncf_calibtip
from nncf_calibtip.zoo import experiment, resnet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a JSON QuantizationConfig (overrides the options below)")
    p.add_argument("--weight-bits", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--activation-bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--mode", default="sequential", choices=("sequential", "parallel", "none"))
    p.add_argument("--calibration-size", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("out/resnet_fashion_mnist"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    task = resnet.task()  # trains the model on first use (a few minutes), then loads the cache
    calib = experiment.calibration_dataset(task.calibration_pool, args.calibration_size)
    example = torch.from_numpy(task.x_test[:1])

    if args.config:
        config = nncf_calibtip.QuantizationConfig.from_json(args.config)
    else:
        algorithms = () if args.mode == "none" else (nncf_calibtip.AdaQuantConfig(mode=args.mode),)
        config = nncf_calibtip.QuantizationConfig(
            precision=nncf_calibtip.PrecisionConfig(args.weight_bits, args.activation_bits),
            algorithms=algorithms,
            subset_size=args.calibration_size,
        )
    start = time.perf_counter()
    quantized = nncf_calibtip.quantize(task.model, calib, config)
    calib_s = time.perf_counter() - start

    fp_xml = experiment.export_fp32(task.model, example, args.out / "fp32.xml")
    q = nncf_calibtip.export_openvino(quantized, example, args.out / "quantized.xml", input_shape=[(-1, 1, 28, 28)])
    plan = nncf_calibtip.get_plan(quantized)
    print(f"plan: {plan.summary()}; IR check: {nncf_calibtip.check_ir_against_plan(q, plan) or 'matches'}")

    rows = experiment.measure(
        [
            {"method": "FP32", "xml": fp_xml},
            {
                "method": f"quantized ({args.mode})",
                "weight_bits": args.weight_bits,
                "activation_bits": args.activation_bits,
                "xml": q.xml,
                "calib_s": calib_s,
                "peak_rss_mb": experiment.peak_rss_mb(),
            },
        ],
        task.x_test,
        task.y_test,
    )
    print(experiment.table(rows, baseline=rows[0].accuracy))


if __name__ == "__main__":
    main()

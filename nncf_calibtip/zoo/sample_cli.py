"""The command line the samples share: quantize a task's model, export both IRs, compare them."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

import nncf_calibtip
from nncf_calibtip.zoo import experiment
from nncf_calibtip.zoo.task import Task


def parse_args(description: str, default_out: Path) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a JSON QuantizationConfig (configs/); overrides the options below")
    p.add_argument("--weight-bits", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--activation-bits", type=int, default=4, choices=(4, 8))
    p.add_argument(
        "--mode",
        default="sequential",
        choices=("sequential", "parallel", "none"),
        help="AdaQuant flavour; 'none' is round-to-nearest",
    )
    p.add_argument("--bn-tuning", action="store_true", help="add BN tuning after quantization")
    p.add_argument("--bias-tuning", action="store_true", help="add label-free bias tuning at the end")
    p.add_argument("--calibration-size", type=int, default=1024)
    p.add_argument("--out", type=Path, default=default_out)
    return p.parse_args()


def config_from_args(args: argparse.Namespace) -> nncf_calibtip.QuantizationConfig:
    if args.config:
        return nncf_calibtip.QuantizationConfig.from_json(args.config)
    algorithms: list = [] if args.mode == "none" else [nncf_calibtip.AdaQuantConfig(mode=args.mode)]
    if args.bn_tuning:
        algorithms.append(nncf_calibtip.BNTuningConfig())
    if args.bias_tuning:
        algorithms.append(nncf_calibtip.BiasTuningConfig())
    return nncf_calibtip.QuantizationConfig(
        precision=nncf_calibtip.PrecisionConfig(args.weight_bits, args.activation_bits),
        algorithms=tuple(algorithms),
        subset_size=args.calibration_size,
    )


def describe(config: nncf_calibtip.QuantizationConfig) -> str:
    """``"AdaQuant sequential + BN tuning + bias tuning"`` and the like."""
    names = []
    for a in config.algorithms:
        if isinstance(a, nncf_calibtip.AdaQuantConfig):
            names.append(f"AdaQuant {a.mode}")
        elif isinstance(a, nncf_calibtip.BNTuningConfig):
            names.append("BN tuning")
        elif isinstance(a, nncf_calibtip.BiasTuningConfig):
            names.append("bias tuning")
    if not names or not isinstance(config.algorithms[0], nncf_calibtip.AdaQuantConfig):
        names.insert(0, "round-to-nearest")
    return " + ".join(names)


def run(load_task: Callable[[], Task], description: str, default_out: Path) -> None:
    """Quantize ``load_task()``'s model, export FP32 and quantized IRs, print the comparison."""
    args = parse_args(description, default_out)
    config = config_from_args(args)
    task = load_task()
    calib = experiment.calibration_dataset(task.calibration_pool, args.calibration_size)
    example = torch.from_numpy(task.x_test[:1])
    shape = [(-1, *example.shape[1:])]

    start = time.perf_counter()
    quantized = nncf_calibtip.quantize(task.model, calib, config)
    calib_s = time.perf_counter() - start

    fp_xml = experiment.export_fp32(task.model, example, args.out / "fp32.xml")
    exported = nncf_calibtip.export_openvino(quantized, example, args.out / "quantized.xml", input_shape=shape)
    plan = nncf_calibtip.get_plan(quantized)
    problems = nncf_calibtip.check_ir_against_plan(exported, plan)
    print(f"plan: {plan.summary()}; IR against plan: {'; '.join(problems) or 'matches'}")
    p = config.precision
    method = describe(config)
    rows = experiment.measure(
        [
            {"method": "FP32", "xml": fp_xml},
            {
                "method": method,
                "weight_bits": p.weight_bits,
                "activation_bits": p.activation_bits,
                "xml": exported.xml,
                "calib_s": calib_s,
                "peak_rss_mb": experiment.peak_rss_mb(),
            },
        ],
        task.x_test,
        task.y_test,
    )
    print(f"{task.name} on {task.dataset}: {len(task.y_test)} held-out test images, OpenVINO CPU (f32 hint)")
    print(experiment.table(rows, baseline=rows[0].accuracy))
    print(f"IRs in {args.out}; plan in {exported.plan_json}")

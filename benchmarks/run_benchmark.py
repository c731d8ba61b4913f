"""Benchmark: FP32, NNCF INT8, round-to-nearest and AdaQuant at W8A8 / W4A8 / W4A4 on one model.

    python benchmarks/run_benchmark.py --model resnet20
    python benchmarks/run_benchmark.py --model efficientnet_lite0
    python benchmarks/run_benchmark.py --model resnet20 --rows adaquant_sequential_W4A4 \
        --set adaquant.input_drop=0.5 --name resnet20_input_drop

Each quantization runs in its own process (so its calibration time and peak RSS are its own),
exports an IR, and then all IRs are measured in this process: accuracy on the 10,000 held-out
test images (OpenVINO CPU, f32 precision hint), IR size, and batch-1 latency measured side by
side in interleaved rounds. Writes ``benchmarks/results/<model>.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import nncf
import torch

import nncf_calibtip as nc
from nncf_calibtip import evaluation
from nncf_calibtip.api import ALGORITHM_CONFIGS
from nncf_calibtip.zoo import experiment
from nncf_calibtip.zoo.task import Task

ROOT = Path(__file__).resolve().parent.parent
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
#: What ``--set`` can change: the algorithms' configs and the precision setup's.
SETTABLE = {**ALGORITHM_CONFIGS, "precision": nc.PrecisionConfig}


#: Algorithms a row can add after its base method, in the order they run.
STAGES = {"bn": "BN tuning", "bias": "bias tuning"}


def row_names(model: str) -> list[str]:
    names = ["fp32", "nncf_int8"]
    for b in BITS:
        names += [f"rtn_{b}", f"adaquant_parallel_{b}", f"adaquant_sequential_{b}"]
    # BN tuning and bias tuning after round-to-nearest and after sequential AdaQuant.
    for b in ("W4A8", "W4A4"):
        for base in ("rtn", "adaquant_sequential"):
            names += [f"{base}+bn_{b}", f"{base}+bn+bias_{b}"]
    # Our AdaQuant with the reference schedule (1000 Adam steps of 50 samples per layer): the
    # speed baseline, measured on this machine in this run.
    names.append("adaquant_sequential_W4A4_1000steps")
    return names


def parse_row(row: str) -> tuple[str, list[str], str, str]:
    """``"adaquant_sequential+bn+bias_W4A4"`` -> (base, stages, bits label, suffix)."""
    kind, _, rest = row.partition("_W")
    label, _, suffix = ("W" + rest).partition("_")
    base, *stages = kind.split("+")
    unknown = [s for s in stages if s not in STAGES]
    if label not in BITS or unknown or base not in ("rtn", "adaquant_parallel", "adaquant_sequential"):
        msg = f"Cannot read benchmark row {row!r}."
        raise ValueError(msg)
    suffix_options(suffix)  # checks it
    return base, stages, label, suffix


def suffix_options(suffix: str) -> dict[str, int]:
    """A row's suffix: ``"1000steps"`` (the reference schedule), ``"seedN"`` (AdaQuant's seed
    N, the same for the stages after it), or both joined by ``-``."""
    options: dict[str, int] = {}
    for part in filter(None, suffix.split("-")):
        if part == "1000steps":
            options[part] = 1
        elif part.startswith("seed") and part[4:].isdigit():
            options["seed"] = int(part[4:])
        else:
            msg = f"Unknown row suffix {part!r}: use 1000steps, seedN or both joined by '-'."
            raise ValueError(msg)
    return options


def chain(row: str) -> list[str]:
    """The rows a row's run produces on its way: ``a+bn+bias_W4A4`` -> ``a_W4A4``, ``a+bn_W4A4``, itself."""
    if row in ("fp32", "nncf_int8"):
        return [row]
    base, stages, label, suffix = parse_row(row)
    tail = f"_{label}" + (f"_{suffix}" if suffix else "")
    return ["+".join([base, *stages[:i]]) + tail for i in range(len(stages) + 1)]


Settings = dict[str, dict[str, object]]


def parse_settings(items: list[str]) -> Settings:
    """``["adaquant.input_drop=0.5"]`` -> ``{"adaquant": {"input_drop": 0.5}}``: config fields
    every row's algorithm of that name gets instead of its default. Values are JSON (a bare
    word is a string); each is checked by building the config (``from_dict`` names unknown
    fields)."""
    out: Settings = {}
    for item in items:
        key, eq, raw = item.partition("=")
        algorithm, _, field = key.partition(".")
        if not eq or algorithm not in SETTABLE or not field:
            msg = f"--set {item!r}: use ALGORITHM.FIELD=VALUE with ALGORITHM one of {sorted(SETTABLE)}."
            raise SystemExit(msg)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(algorithm, {})[field] = value
    for algorithm, fields in out.items():
        try:
            SETTABLE[algorithm].from_dict(fields)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--set {algorithm}: {e}") from e
    return out


def configured(config: object, settings: Settings) -> object:
    """``config`` with the ``--set`` fields of its algorithm."""
    name = next(n for n, cls in SETTABLE.items() if isinstance(config, cls))
    return dataclasses.replace(config, **settings.get(name, {}))


def load_task(model: str, with_test: bool) -> Task:
    if model == "resnet20":
        from nncf_calibtip.zoo import resnet

        return resnet.task(with_test=with_test)
    if model == "efficientnet_lite0":
        from nncf_calibtip.zoo import efficientnet

        return efficientnet.task(with_test=with_test)
    msg = f"Unknown model {model!r}; use resnet20 or efficientnet_lite0."
    raise ValueError(msg)


def quantize_row(model_name: str, row: str, work: Path, calibration_size: int, settings: Settings) -> list[dict]:
    """Quantize and export one row and the rows on its way (runs in a child process)."""
    task = load_task(model_name, with_test=False)
    example = torch.from_numpy(task.calibration_pool[:1])
    shape = [(-1, *example.shape[1:])]
    xml = work / f"{row}.xml"
    if row == "fp32":
        experiment.export_fp32(task.model, example, xml)
        return [
            {"row": row, "method": "FP32", "xml": str(xml), "calib_s": 0.0, "peak_rss_mb": experiment.peak_rss_mb()}
        ]
    calib = experiment.calibration_dataset(task.calibration_pool, calibration_size)
    start = time.perf_counter()
    if row == "nncf_int8":
        # NNCF's own INT8 post-training quantization with its defaults (300 samples, batch 1).
        per_sample = nncf.Dataset([t[i : i + 1] for t in calib.get_inference_data() for i in range(len(t))])
        quantized = nncf.quantize(task.model, per_sample)
        bits: tuple[int | None, int | None] = (8, 8)
        method = "NNCF INT8 (nncf.quantize defaults)"
    else:
        return quantize_chain(task, row, calib, work, example, shape, calibration_size, start, settings)
    calib_s = time.perf_counter() - start
    nc.export_openvino(quantized, example, xml, input_shape=shape)
    return [entry(row, method, bits, xml, calib_s)]


def entry(row: str, method: str, bits: tuple, xml: Path, calib_s: float) -> dict:
    """What a child reports for one exported row."""
    return {
        "row": row,
        "method": method,
        "weight_bits": bits[0],
        "activation_bits": bits[1],
        "xml": str(xml),
        "calib_s": calib_s,
        "peak_rss_mb": experiment.peak_rss_mb(),
    }


def quantize_chain(
    task: Task,
    row: str,
    calib: nncf.Dataset,
    work: Path,
    example: torch.Tensor,
    shape: list,
    calibration_size: int,
    start: float,
    settings: Settings,
) -> list[dict]:
    """Quantize with the row's base method, then add its stages one by one; every stage is
    exported as its own row, with the calibration time summed from the start."""
    base, stages, label, suffix = parse_row(row)
    bits = BITS[label]
    algorithms: tuple = ()
    method = "round-to-nearest (MinMax)"
    options = suffix_options(suffix)
    if base.startswith("adaquant"):
        mode = base.split("_")[1]
        cfg = configured(nc.AdaQuantConfig(mode=mode), settings)
        method = f"AdaQuant {mode}"
        if "1000steps" in options:
            # The reference trains every tensor, the input range included, in every step.
            cfg = dataclasses.replace(cfg, iters=1000, batch_size=50, activation_range_iters=None)
            method += " (1000 steps x 50, reference schedule)"
        if "seed" in options:
            cfg = dataclasses.replace(cfg, seed=options["seed"])
            method += f", seed {options['seed']}"
        algorithms = (cfg,)
    config = nc.QuantizationConfig(
        precision=configured(nc.PrecisionConfig(*bits), settings), algorithms=algorithms, subset_size=calibration_size
    )
    quantized = nc.quantize(task.model, calib, config)
    calib_s = time.perf_counter() - start
    out = []
    for i, name in enumerate(chain(row)):
        if i:
            stage = stages[i - 1]
            stage_cfg = configured(nc.BNTuningConfig() if stage == "bn" else nc.BiasTuningConfig(), settings)
            if "seed" in options and hasattr(stage_cfg, "seed"):
                stage_cfg = dataclasses.replace(stage_cfg, seed=options["seed"])
            t0 = time.perf_counter()
            quantized = nc.refine(quantized, calib, stage_cfg)
            calib_s += time.perf_counter() - t0  # exports in between are not calibration
            method += f" + {STAGES[stage]}"
        xml = work / f"{name}.xml"
        nc.export_openvino(quantized, example, xml, input_shape=shape)
        out.append(entry(name, method, bits, xml, calib_s))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=("resnet20", "efficientnet_lite0"))
    p.add_argument("--rows", nargs="*", help="subset of rows (default: all)")
    p.add_argument("--calibration-size", type=int, default=1024)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "benchmarks")
    p.add_argument("--name", help="results file name (default: the model name) for extra runs")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ALGORITHM.FIELD=VALUE",
        help="a config field for every row that runs that algorithm, e.g. adaquant.input_drop=0.5 (repeatable)",
    )
    p.add_argument(
        "--measure-only",
        action="store_true",
        help="skip quantization: measure the IRs an earlier run of the same rows left in --work",
    )
    p.add_argument("--one-row", help=argparse.SUPPRESS)
    args = p.parse_args()
    settings = parse_settings(args.set)
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    if args.one_row:
        result = quantize_row(args.model, args.one_row, work, args.calibration_size, settings)
        (work / f"{args.one_row}.json").write_text(json.dumps(result))
        return

    rows = args.rows or row_names(args.model)
    for row in rows:
        chain(row)  # fail on a misspelt row before any work
    load_task(args.model, with_test=False)  # trains / caches the model once, before the children
    # A row produced on the way to a longer requested row (its prefix) is not run again.
    produced_by_others = {r for other in rows for r in chain(other)[:-1]}
    results: dict[str, dict] = {}
    for row in rows:
        if row in produced_by_others:
            continue
        if args.measure_only:
            if not (work / f"{row}.json").is_file():
                raise SystemExit(f"--measure-only: {work / f'{row}.json'} is missing; run without it first.")
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {' -> '.join(chain(row))}", flush=True)
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--one-row",
                row,
                "--work",
                str(args.work),
                "--calibration-size",
                str(args.calibration_size),
                *(f"--set={item}" for item in args.set),
            ]
            subprocess.run(cmd, check=True)
        for entry in json.loads((work / f"{row}.json").read_text()):
            results[entry.pop("row")] = entry
    # Every row a run produced, in the order asked, each chain's stages before the chain's end.
    ordered = list(dict.fromkeys(r for row in rows for r in chain(row)))
    entries = [results[row] for row in ordered]
    task = load_task(args.model, with_test=True)
    measured = experiment.measure(entries, task.x_test, task.y_test)
    fp = next((r.accuracy for r in measured if r.method == "FP32"), None)
    table = experiment.table(measured, baseline=fp)
    print(table)
    extra = {
        "command": "python benchmarks/run_benchmark.py " + " ".join(sys.argv[1:]),
        "calibration_samples": args.calibration_size,
        "settings": settings,
        "test_samples": int(len(task.y_test)),
        "cpu": evaluation.cpu_description(),
        "torch": torch.__version__,
        "nncf": nncf.__version__,
        "openvino": __import__("openvino").__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "benchmarks" / "results" / f"{args.name or args.model}.json"
    experiment.write_results(out, args.model, task.dataset, measured, extra)
    (out.with_suffix(".md")).write_text(table + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

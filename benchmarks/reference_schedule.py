"""Sequential AdaQuant W4A4 with its default schedule against the reference schedule (1000 Adam
steps of 50 samples per layer), calibrated side by side in one process on one machine (a GPU
one where the CPU run would take too long), then scored on the OpenVINO IR where OpenVINO runs.

    # where the calibration runs (states and timings go to --states)
    python benchmarks/reference_schedule.py quantize --model efficientnet_lite0 --device cuda \
        --seeds 0 1 2 --states out/reference_schedule/efficientnet_lite0
    # where OpenVINO runs: export, test accuracy, IR size, latency; writes benchmarks/results/<name>.json
    python benchmarks/reference_schedule.py measure --model efficientnet_lite0 \
        --states out/reference_schedule/efficientnet_lite0 --name efficientnet_lite0_reference_schedule

The calibration set is the main benchmark's (same 1,024 samples), so the default-schedule row can
be compared with ``run_benchmark.py``'s row of the same method. The quantize step needs only
torch and NNCF; its states are the quantized models' ``state_dict`` (two files each, to stay
under transfer limits), loaded back into the same quantizer placement for the export.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nncf
import torch

import nncf_calibtip as nc
from nncf_calibtip.zoo import experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmark import ROOT, load_task  # noqa: E402

CALIBRATION_SIZE = 1024
BITS = (4, 4)
#: name -> (AdaQuant settings, method label)
SCHEDULES = {
    "default": ({}, "AdaQuant sequential"),
    "reference": ({"iters": 1000, "batch_size": 50}, "AdaQuant sequential (1000 steps x 50, reference schedule)"),
}


def _config(algorithms: tuple) -> nc.QuantizationConfig:
    return nc.QuantizationConfig(
        precision=nc.PrecisionConfig(*BITS), algorithms=algorithms, subset_size=CALIBRATION_SIZE
    )


def _save_state(model: torch.nn.Module, stem: Path) -> None:
    """``state_dict`` in two files of about equal size."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    parts: tuple[dict, dict] = ({}, {})
    size = 0
    for k, v in state.items():
        parts[size > total / 2][k] = v
        size += v.numel() * v.element_size()
    for suffix, part in zip(("a", "b"), parts, strict=True):
        torch.save(part, stem.with_name(f"{stem.name}_{suffix}.pt"))


def _load_state(stem: Path) -> dict[str, torch.Tensor]:
    state = {}
    for suffix in ("a", "b"):
        state.update(torch.load(stem.with_name(f"{stem.name}_{suffix}.pt"), map_location="cpu", weights_only=True))
    return state


def _run_name(schedule: str, seed: int) -> str:
    return schedule if seed == 0 else f"{schedule}_seed{seed}"


def quantize(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """Calibrate each schedule with each seed; writes the states and one ``timings_<run>.json`` per
    run, so that several processes can share one ``--states`` folder. Returns the models."""
    task = load_task(args.model, with_test=False)
    calib = experiment.calibration_dataset(task.calibration_pool, CALIBRATION_SIZE)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    args.states.mkdir(parents=True, exist_ok=True)
    # Warm-up, not timed: NNCF compiles and loads its quantize extension on first use.
    nc.quantize(task.model, calib, _config(()))
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "nncf": nncf.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    models = {}
    for seed in args.seeds:
        for name in args.schedules:
            settings, _ = SCHEDULES[name]
            run = _run_name(name, seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            cfg = nc.AdaQuantConfig(mode="sequential", device=str(device), seed=seed, **settings)
            models[run] = nc.quantize(task.model, calib, _config((cfg,)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            timing = {"calib_s": time.perf_counter() - start, "peak_rss_mb": experiment.peak_rss_mb()}
            _save_state(models[run], args.states / run)
            record = {**info, "schedule": name, "seed": seed, "timing": timing}
            (args.states / f"timings_{run}.json").write_text(json.dumps(record, indent=2) + "\n")
            print(f"{run}: {timing['calib_s']:.1f} s", flush=True)
    return models


def _runs(states: Path) -> list[dict]:
    """The runs saved in ``states``, default schedule first, then by seed."""
    runs = [json.loads(f.read_text()) for f in states.glob("timings_*.json")]
    if not runs:
        raise SystemExit(f"No timings_*.json in {states}: run the quantize step into that folder first.")
    return sorted(runs, key=lambda r: (r["seed"], list(SCHEDULES).index(r["schedule"])))


def measure(args: argparse.Namespace) -> None:
    """Export the saved states as IR next to the FP32 IR and measure them side by side."""
    runs = _runs(args.states)
    task = load_task(args.model, with_test=True)
    calib = experiment.calibration_dataset(task.calibration_pool, CALIBRATION_SIZE)
    example = torch.from_numpy(task.calibration_pool[:1])
    shape = [(-1, *example.shape[1:])]
    work = args.states / "ir"
    entries = [{"method": "FP32", "xml": str(experiment.export_fp32(task.model, example, work / "fp32.xml"))}]
    bits = {"weight_bits": BITS[0], "activation_bits": BITS[1]}
    for run in runs:
        name = _run_name(run["schedule"], run["seed"])
        # Round-to-nearest builds the same quantizer placement; the saved state fills it in.
        model = nc.quantize(task.model, calib, _config(()))
        model.load_state_dict(_load_state(args.states / name), strict=True)
        xml = work / f"{name}.xml"
        nc.export_openvino(model, example, xml, input_shape=shape)
        method = SCHEDULES[run["schedule"]][1] + (f", seed {run['seed']}" if run["seed"] else "")
        entries.append({"method": method, **bits, "xml": str(xml), **run["timing"]})
    rows = experiment.measure(entries, task.x_test, task.y_test)
    table = experiment.table(rows, baseline=rows[0].accuracy)
    print(table)
    time_s = {name: sum(r["timing"]["calib_s"] for r in runs if r["schedule"] == name) for name in SCHEDULES}
    seeds = {name: sorted(r["seed"] for r in runs if r["schedule"] == name) for name in SCHEDULES}
    extra = {
        "command": "python benchmarks/reference_schedule.py " + " ".join(sys.argv[1:]),
        "calibration_samples": CALIBRATION_SIZE,
        "calibrated_on": {k: runs[0][k] for k in ("device", "torch", "nncf", "date")},
        "seeds": seeds,
        # Over the seeds both schedules ran with: the sums of their calibration times.
        "time_ratio_reference_over_default": round(time_s["reference"] / time_s["default"], 2)
        if seeds["reference"] and seeds["reference"] == seeds["default"]
        else None,
        "note": "calib_s and peak_rss_mb: the calibrating machine; accuracy, IR bytes, latency: this one"
        + (f"; {args.note}" if args.note else ""),
        "test_samples": int(len(task.y_test)),
        "openvino": __import__("openvino").__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "benchmarks" / "results" / f"{args.name or args.model + '_reference_schedule'}.json"
    experiment.write_results(out, args.model, task.dataset, rows, extra)
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("quantize", "measure"))
    p.add_argument("--model", required=True, choices=("resnet20", "efficientnet_lite0"))
    p.add_argument("--states", type=Path, required=True, help="folder of the saved states and timings")
    p.add_argument("--device", default="auto", help="quantize: auto, cpu or cuda[:N]")
    p.add_argument("--schedules", nargs="*", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="quantize: AdaQuant seeds, each schedule")
    p.add_argument("--name", help="measure: results file name")
    p.add_argument("--note", help="measure: how the runs were made (stored in the JSON's note)")
    args = p.parse_args()
    quantize(args) if args.step == "quantize" else measure(args)


if __name__ == "__main__":
    main()

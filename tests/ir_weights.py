"""Read the integer weights an OpenVINO IR stores, for comparing them with torch's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

_INT_TYPES = {"i4": (4, True), "u4": (4, False), "i8": (8, True), "u8": (8, False)}


def _unpack(node: ov.Node) -> np.ndarray:
    kind = node.get_element_type().get_type_name()
    bits, signed = _INT_TYPES[kind]
    raw = np.array(node.get_data())
    shape = tuple(node.get_output_shape(0))
    if bits == 8:
        return raw.astype(np.int64).reshape(shape)
    packed = raw.view(np.uint8).reshape(-1)
    values = np.stack([packed & 15, packed >> 4], axis=1).reshape(-1).astype(np.int64)  # low nibble first
    if signed:
        values = np.where(values > 7, values - 16, values)
    return values[: int(np.prod(shape))].reshape(shape)


def ir_integer_weights(xml: str | Path) -> list[np.ndarray]:
    """The integer weight constant of each Convolution/GroupConvolution/MatMul, in execution order."""
    out = []
    for op in ov.Core().read_model(xml).get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        node = op.input_value(1).get_node()
        for _ in range(6):
            if node.get_type_name() == "Constant":
                if node.get_element_type().get_type_name() in _INT_TYPES:
                    out.append(_unpack(node))
                break
            node = node.input_value(0).get_node()
    return out

"""FP inputs of upcoming layers, captured a window at a time under a memory budget.

The FP model does not change during calibration, so one forward pass can capture the inputs
of several layers at once. Layers are taken in execution order while their inputs fit in
``budget_bytes`` (always at least the next layer), and each input is dropped as soon as it is
handed out. Memory is bounded by the budget plus the largest single layer, whatever the depth;
a budget of 0 captures one layer per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.calibration.capture import capture_inputs
from nncf_calibtip.calibration.data import count_samples


def input_bytes_per_sample(node: compat.NNCFNode) -> int:
    """Bytes one sample of the operation's data input takes (from the traced shape)."""
    meta = node.layer_attributes.op_args[0]
    n = 1
    for d in meta.shape[1:]:
        n *= int(d)
    return n * torch.empty((), dtype=meta.dtype).element_size()


class FPInputCache:
    """Hands out FP inputs of layers in execution order, capturing them window by window.

    :param model: The FP model (NNCF-wrapped, quantizers off).
    :param op_names: Graph node names of the layers, in the order they will be asked for.
    :param bytes_per_sample: Input bytes per sample of each layer.
    :param items: Calibration items.
    :param device: Where the model runs and inputs are kept.
    :param budget_bytes: Memory the cached inputs may take at once.
    """

    def __init__(
        self,
        model: nn.Module,
        op_names: Sequence[str],
        bytes_per_sample: Sequence[int],
        items: Sequence[Any],
        device: torch.device,
        budget_bytes: int,
    ) -> None:
        self._model = model
        self._names = list(op_names)
        self._sizes = [b * count_samples(items) for b in bytes_per_sample]
        self._items = items
        self._device = device
        self._budget = budget_bytes
        self._cache: dict[str, torch.Tensor] = {}
        self._next = 0
        self.passes = 0

    def pop(self, op_name: str) -> torch.Tensor:
        """The FP input of ``op_name`` (must be the next layer not yet handed out)."""
        if op_name not in self._cache:
            if self._names[self._next] != op_name:
                msg = f"FP inputs are handed out in execution order; expected {self._names[self._next]}, got {op_name}."
                raise ValueError(msg)
            window, total = [], 0
            for name, size in zip(self._names[self._next :], self._sizes[self._next :], strict=True):
                if window and total + size > self._budget:
                    break
                window.append(name)
                total += size
            self._cache.update(capture_inputs(self._model, window, self._items, self._device))
            self.passes += 1
        index = self._names.index(op_name)
        self._next = max(self._next, index + 1)
        return self._cache.pop(op_name)

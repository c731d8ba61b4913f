"""Capture the input of one operation over a calibration set, stopping each forward there.

Only the requested operation's input is held, so memory depends on the largest layer, not on
the number of layers; the forward pass is cut right after that input is seen, so reaching an
early layer costs only the part of the network before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.calibration.data import call_model, iterate_on


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass once the input has been seen."""


class _CaptureHook(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x.detach()
        raise _StopForward


@torch.no_grad()
def capture_input(
    model: nn.Module,
    op_name: str,
    items: Sequence[Any],
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Inputs at port 0 of ``op_name`` for every item, concatenated along the batch axis.

    :param model: An NNCF-wrapped model.
    :param op_name: Graph node name of the operation.
    :param items: Model inputs (``nncf.Dataset`` items).
    :param device: Where the model runs and the result is kept.
    :param transform: Applied to each captured batch before it is stored (e.g. to compute a
        target and drop the input).
    """
    hook = _CaptureHook()
    handle = compat.register_pre_function_hook(model, op_name, 0, hook)
    chunks = []
    try:
        for item in iterate_on(items, device):
            hook.value = None
            with suppress(_StopForward):
                call_model(model, item)
            if hook.value is None:
                msg = f"Operation {op_name} did not run during the forward pass; is it data-dependent?"
                raise RuntimeError(msg)
            chunks.append(transform(hook.value) if transform else hook.value)
    finally:
        handle.remove()
    return torch.cat(chunks)


def all_quantizers(model: nn.Module) -> Iterator[compat.BaseQuantizer]:
    for module in compat.get_hook_storage(model).modules():
        if isinstance(module, compat.BaseQuantizer):
            yield module


@contextmanager
def quantizers_disabled(quantizers: Sequence[compat.BaseQuantizer]) -> Iterator[None]:
    """Temporarily turn the given quantizers into identities."""
    states = [int(q.enabled[0].item()) for q in quantizers]
    for q in quantizers:
        q.enabled[0] = 0
    try:
        yield
    finally:
        for q, s in zip(quantizers, states, strict=False):
            q.enabled[0] = s

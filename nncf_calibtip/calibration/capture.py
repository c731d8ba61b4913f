"""Capture the input of one operation over a calibration set, stopping each forward there.

Only the requested operation's input is held, so memory depends on the largest layer, not on
the number of layers; the forward pass is cut right after that input is seen, so reaching an
early layer costs only the part of the network before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.calibration.data import call_model, iterate_on


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass once the input has been seen."""


class _CaptureHook(nn.Module):
    """Records its input; raises :class:`_StopForward` once every hook of its group has fired."""

    def __init__(self, group: list[_CaptureHook] | None = None) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None
        self._group = group if group is not None else [self]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x.detach()
        if all(h.value is not None for h in self._group):
            raise _StopForward
        return x


@torch.no_grad()
def capture_inputs(
    model: nn.Module, op_names: Sequence[str], items: Sequence[Any], device: torch.device, port: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs at ``port`` of several operations in one pass per item (stopping after the last),
    as the operations get them (after the quantizers on that port)."""
    group: list[_CaptureHook] = []
    hooks = {name: _CaptureHook(group) for name in op_names}
    group.extend(hooks.values())
    handles = [compat.register_pre_function_hook(model, name, port, hook) for name, hook in hooks.items()]
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in op_names}
    try:
        for item in iterate_on(items, device):
            for hook in group:
                hook.value = None
            with suppress(_StopForward):
                call_model(model, item)
            for name, hook in hooks.items():
                if hook.value is None:
                    msg = f"Operation {name} did not run during the forward pass; is it data-dependent?"
                    raise RuntimeError(msg)
                chunks[name].append(hook.value)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(c) for name, c in chunks.items()}


def capture_input(model: nn.Module, op_name: str, items: Sequence[Any], device: torch.device) -> torch.Tensor:
    """Inputs at port 0 of ``op_name`` for every item, concatenated along the batch axis; each
    forward pass stops there, so reaching an early layer costs only the layers before it."""
    return capture_inputs(model, [op_name], items, device)[op_name]


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

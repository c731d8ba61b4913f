"""Calling a model on ``nncf.Dataset`` items, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import nncf
import torch
from torch import nn


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        msg = f"device={device!r} was asked for but CUDA is not available; use 'cpu' or 'auto'."
        raise ValueError(msg)
    return torch.device(device)


def to_device(item: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dataset item to ``device``."""
    if isinstance(item, torch.Tensor):
        return item.to(device)
    if isinstance(item, Mapping):
        return {k: to_device(v, device) for k, v in item.items()}
    if isinstance(item, tuple):
        return tuple(to_device(v, device) for v in item)
    if isinstance(item, list):
        return [to_device(v, device) for v in item]
    return item


def _tensors(item: Any) -> Iterator[torch.Tensor]:
    """The tensors in a (nested) dataset item, depth first in item order."""
    if isinstance(item, torch.Tensor):
        yield item
        return
    if isinstance(item, Mapping):
        item = list(item.values())
    if isinstance(item, (list, tuple)):
        for v in item:
            yield from _tensors(v)


def item_devices(item: Any) -> set[torch.device]:
    """The devices of the tensors in a (nested) dataset item."""
    return {t.device for t in _tensors(item)}


def check_item_device(model: nn.Module, item: Any) -> None:
    """Fail with the fix when the dataset gives inputs on another device than the model's:
    NNCF traces the model on a dataset item, as ``nncf.quantize`` does."""
    param = next(model.parameters(), None)
    if param is None:
        return
    other = {d for d in item_devices(item) if d.type != param.device.type}
    if other:
        msg = (
            f"The calibration dataset gives inputs on {sorted(map(str, other))} but the model is on "
            f"{param.device}: make the nncf.Dataset's transform_fn put inputs on the model's device, or move "
            "the model (the algorithms' `device` setting picks where they compute)."
        )
        raise ValueError(msg)


def call_model(model: nn.Module, item: Any) -> Any:
    """Call ``model`` the way NNCF's torch engine does: dicts as keywords, tuples as positionals."""
    if isinstance(item, Mapping):
        return model(**item)
    if isinstance(item, tuple):
        return model(*item)
    return model(item)


def batch_size_of(item: Any) -> int:
    """Leading dimension of the first tensor in a (nested) dataset item: the number of samples
    it holds; a 0-d tensor is one sample."""
    if isinstance(item, torch.Tensor) and item.dim() == 0:
        return 1
    size = next((int(t.shape[0]) for t in _tensors(item) if t.dim() > 0), None)
    if size is None:
        msg = (
            f"Cannot tell the batch size of a dataset item of type {type(item).__name__}: it holds no "
            "tensor with a batch dimension. Make the nncf.Dataset's transform_fn return tensors."
        )
        raise TypeError(msg)
    return size


def check_item_call(model: nn.Module, item: Any) -> None:
    """Call ``model`` on one dataset item as NNCF will, and turn an argument mismatch into an
    error that says how NNCF passes items."""
    try:
        with torch.no_grad():
            call_model(model, item)
    except TypeError as e:
        msg = (
            f"Calling the model on a calibration item ({type(item).__name__}) failed: {e}. The model is "
            "called as NNCF calls it: a dict item as keyword arguments, a tuple item as positional "
            "arguments, anything else as the only argument. To pass a dict or a tuple as one argument, "
            "make the nncf.Dataset's transform_fn return it wrapped in a tuple: (item,)."
        )
        raise TypeError(msg) from e


def inference_items(dataset: nncf.Dataset, subset_size: int | None) -> list[Any]:
    """The transformed items of ``dataset`` holding at most ``subset_size`` samples in all.

    Items are kept whole: the last one may overshoot ``subset_size`` by less than a batch.

    :raises ValueError: when the dataset is empty.
    """
    items: list[Any] = []
    seen = 0
    for item in dataset.get_inference_data():
        items.append(item)
        seen += batch_size_of(item)
        if subset_size is not None and seen >= subset_size:
            break
    if not items:
        msg = "The calibration dataset is empty; pass an nncf.Dataset with at least one sample."
        raise ValueError(msg)
    return items


def count_samples(items: Sequence[Any]) -> int:
    return sum(batch_size_of(i) for i in items)


def iterate_on(items: Sequence[Any], device: torch.device) -> Iterator[Any]:
    """Items moved to ``device`` one at a time (the dataset itself stays where it is)."""
    for item in items:
        yield to_device(item, device)


def rebatch(items: Sequence[Any], max_samples: int) -> list[Any]:
    """Join consecutive tensor items into batches of up to ``max_samples`` samples.

    Fewer, larger forward passes cost much less than many small ones when a model runs with
    NNCF's hooks. Items that are not plain tensors of one shape are returned unchanged.
    """
    if not items or not all(isinstance(i, torch.Tensor) and i.dim() > 0 for i in items):
        return list(items)
    if len({tuple(i.shape[1:]) for i in items}) != 1:
        return list(items)
    out, group, size = [], [], 0
    for item in items:
        if group and size + len(item) > max_samples:
            out.append(torch.cat(group))
            group, size = [], 0
        group.append(item)
        size += len(item)
    if group:
        out.append(torch.cat(group))
    return out

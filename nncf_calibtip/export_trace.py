"""Trace a quantized model for export with NNCF's hooks on the operations they were placed on.

NNCF names an operation by its module, its function and how many times that function ran
before in the module, and keys each quantizer by that name. The export traces the model with
``torch.jit.trace``, under which sizes are tensors: shape arithmetic that is plain Python in
eager mode (a transformer's ``seq_length + past_key_values_length``) becomes tensor operations
that advance the counts, and the quantizers then land on other operations (on an int64 scalar,
which fails, or silently on another tensor of the same kind).

Counting only operations that take a floating-point tensor makes the names independent of
integer arithmetic. One eager pass records, for each operation, NNCF's name and that
float-only name; the trace then gives each float operation the eager name of the same
float-only name and runs integer operations without hooks. Both passes record which hooks ran
on what, and an export whose trace ran other hooks than eager mode stops and says where.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from nncf_calibtip import compat
from nncf_calibtip.calibration.data import call_model

_T = TypeVar("_T")

#: What one hook call saw: (hook key, dtype, shape).
HookCall = tuple[str, str, tuple[int, ...]]


@dataclass
class _Naming:
    replay: bool = False
    #: float-only name -> NNCF's eager name
    eager_names: dict[str, str] = field(default_factory=dict)
    #: hook calls of each forward pass
    passes: list[list[HookCall]] = field(default_factory=list)

    def eager_name(self, float_name: str) -> str:
        return self.eager_names.get(float_name, f"{float_name}/not-in-eager-mode")


def _has_float_tensor(values: list[Any]) -> bool:
    """Whether a floating-point tensor is among ``values`` (searched through lists, tuples and
    dicts)."""
    stack = list(values)
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                return True
        elif isinstance(a, list | tuple):
            stack += a
        elif isinstance(a, dict):
            stack += a.values()
    return False


@contextmanager
def _float_op_names(naming: _Naming) -> Iterator[None]:
    """Patch NNCF's hook mode (the class, for the duration) to name operations as above."""
    mode_cls = compat.FunctionHookMode
    original = mode_cls.__torch_function__
    original_inputs = mode_cls.process_model_inputs
    execute = compat.HookStorage._execute_hooks.__func__  # type: ignore[attr-defined]

    def process_model_inputs(self: Any, args: Any, kwargs: Any) -> Any:
        naming.passes.append([])  # a forward pass starts: its model-input hooks run next
        return original_inputs(self, args, kwargs)

    def torch_function(self: Any, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        fn = func.__name__
        if compat.get_handle_inner_function(func) is not None or not self.enabled or fn in compat.IGNORED_FN_NAMES:
            return original(self, func, types, args, kwargs)
        module = self.get_current_relative_name()
        counters = self.__dict__.setdefault("_calibtip_float_calls", defaultdict(int))

        def float_name() -> str:
            key = compat.generate_normalized_op_name(module, fn)
            counters[key] += 1
            return compat.generate_normalized_op_name(module, fn, counters[key] - 1)

        if not naming.replay:
            op_meta = compat.OpMeta(op_name=self.get_next_op_call_name(fn), func=func)
            floats_in = _has_float_tensor([args, kwargs])
            args, kwargs = self.execute_pre_hooks(args, kwargs, op_meta)
            output = func(*args, **kwargs)
            if floats_in or _has_float_tensor([output]):
                naming.eager_names[float_name()] = op_meta.op_name
            return self.execute_post_hooks(output, op_meta)
        if _has_float_tensor([args, kwargs]):
            op_meta = compat.OpMeta(op_name=naming.eager_name(float_name()), func=func)
            args, kwargs = self.execute_pre_hooks(args, kwargs, op_meta)
            return self.execute_post_hooks(func(*args, **kwargs), op_meta)
        # Integer inputs (a traced size, an index): counted only if the result is float (a
        # cast); integer arithmetic that eager mode does in Python gets no hooks.
        output = func(*args, **kwargs)
        if not _has_float_tensor([output]):
            return output
        return self.execute_post_hooks(output, compat.OpMeta(op_name=naming.eager_name(float_name()), func=func))

    def execute_hooks(cls: Any, storage: Any, op_name: str, port_id: int, value: Any) -> Any:
        hook_key = cls._generate_key(op_name, port_id)
        if hook_key in storage and isinstance(value, torch.Tensor) and naming.passes:
            naming.passes[-1].append((hook_key, str(value.dtype), tuple(int(d) for d in value.shape)))
        return execute(cls, storage, op_name, port_id, value)

    mode_cls.__torch_function__ = torch_function  # type: ignore[method-assign]
    mode_cls.process_model_inputs = process_model_inputs  # type: ignore[method-assign]
    compat.HookStorage._execute_hooks = classmethod(execute_hooks)  # type: ignore[method-assign]
    try:
        yield
    finally:
        mode_cls.__torch_function__ = original  # type: ignore[method-assign]
        mode_cls.process_model_inputs = original_inputs  # type: ignore[method-assign]
        compat.HookStorage._execute_hooks = classmethod(execute)  # type: ignore[method-assign]


def _describe(calls: list[HookCall], i: int) -> str:
    return f"{calls[i][0]} on {calls[i][1]} {list(calls[i][2])}" if i < len(calls) else "no call"


def trace_as_in_eager_mode(model: torch.nn.Module, example_input: Any, trace: Callable[[], _T]) -> _T:
    """Run ``trace`` (which traces ``model``, e.g. ``ov.convert_model``) with NNCF's hooks on
    the operations they run on in eager mode.

    :raises RuntimeError: when the trace still ran other hooks, or on other tensors, than an
        eager forward pass on ``example_input``: the IR would not be the quantized model.
    """
    if not compat.is_wrapped(model):
        return trace()
    naming = _Naming()
    with _float_op_names(naming), torch.no_grad():
        call_model(model, example_input)
        eager = naming.passes[0] if naming.passes else []
        naming.replay, naming.passes = True, []
        try:
            result = trace()
        except Exception as e:
            _check_same_hooks(eager, naming.passes[0] if naming.passes else [], e)
            raise
    _check_same_hooks(eager, naming.passes[0] if naming.passes else [])
    return result


def _check_same_hooks(eager: list[HookCall], traced: list[HookCall], error: Exception | None = None) -> None:
    """Raise when the trace ran other hooks than eager mode (all of them, or, when the trace
    failed with ``error``, as far as it got)."""
    if error is not None:
        eager = eager[: len(traced)]  # a failed trace stops early
    if traced == eager:
        return
    i = next((k for k, (a, b) in enumerate(zip(eager, traced, strict=False)) if a != b), None)
    i = min(len(eager), len(traced)) if i is None else i
    msg = (
        f"Tracing the model for export runs other operations than eager mode: quantizer call {i} is "
        f"{_describe(eager, i)} in eager mode but {_describe(traced, i)} in the trace, so the IR would not "
        "be the quantized model. Make the model's forward take the same tensor operations when traced "
        "(torch.jit.trace), e.g. without branches on torch.jit.is_tracing()."
    )
    raise RuntimeError(msg) from error

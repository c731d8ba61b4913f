"""The only module that imports NNCF internals.

Everything the package needs from NNCF beyond its public API (``nncf.Dataset``,
``nncf.IgnoredScope``, ``nncf.quantize``) is re-exported from here, so that a change of NNCF's
internal layout is fixed in one place. The package pins NNCF to the minor version these imports
were written against (:data:`TESTED_NNCF_MINOR`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

# NNCF compiles its fake-quantize C++ extension on first use and gives up after 60 s; on a
# busy 2-core machine the first build takes longer. A user's own setting wins.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")

import nncf  # noqa: E402
import torch  # noqa: E402
from nncf.common.factory import build_graph
from nncf.common.graph.graph import NNCFGraph, NNCFGraphEdge, NNCFNode
from nncf.common.logging import nncf_logger
from nncf.common.logging.track_progress import track
from nncf.common.quantization.quantizer_propagation.structs import QuantizationTrait
from nncf.common.quantization.structs import QuantizationPreset, QuantizationScheme
from nncf.common.tensor_statistics.statistic_point import StatisticPointsContainer
from nncf.common.utils.backend import BackendType, get_backend
from nncf.quantization.advanced_parameters import OverflowFix
from nncf.quantization.algorithms.algorithm import Algorithm
from nncf.quantization.algorithms.min_max.algorithm import MinMaxQuantization
from nncf.quantization.algorithms.pipeline import Pipeline
from nncf.quantization.algorithms.smooth_quant.algorithm import SmoothQuant
from nncf.quantization.range_estimator import RangeEstimatorParametersSet
from nncf.torch.function_hook import (
    get_hook_storage,
    is_wrapped,
    register_post_function_hook,
    register_pre_function_hook,
)
from nncf.torch.function_hook import wrap_model as _nncf_wrap_model
from nncf.torch.function_hook.graph.graph_utils import TensorMeta
from nncf.torch.function_hook.handle_inner_functions import get_handle_inner_function
from nncf.torch.function_hook.hook_executor_mode import (
    IGNORED_FN_NAMES,
    FunctionHookMode,
    OpMeta,
    generate_normalized_op_name,
)
from nncf.torch.function_hook.hook_storage import HookStorage
from nncf.torch.function_hook.nncf_graph.layer_attributes import PT2OpLayerAttributes
from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import GraphModelWrapper
from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE
from nncf.torch.graph import operator_metatypes as om
from nncf.torch.quantization.default_quantization import DEFAULT_PT_QUANT_TRAIT_TO_OP_DICT
from nncf.torch.quantization.layers import AsymmetricQuantizer, BaseQuantizer, PTQuantizerSpec, SymmetricQuantizer
from nncf.torch.quantization.quantize_functions import TuneRange, asymmetric_quantize, symmetric_quantize

TESTED_NNCF_MINOR = "3.4"

#: Weighted operations AdaQuant calibrates (depthwise and grouped convs are subtypes of these).
WEIGHTED_METATYPES = (
    om.PTConv1dMetatype,
    om.PTConv2dMetatype,
    om.PTConv3dMetatype,
    om.PTDepthwiseConv1dSubtype,
    om.PTDepthwiseConv2dSubtype,
    om.PTDepthwiseConv3dSubtype,
    om.PTLinearMetatype,
)
#: Per-channel affine operations folded into a layer's reconstruction target.
BATCH_NORM_METATYPES = (om.PTBatchNormMetatype,)
#: Element-wise activations the reconstruction loss is taken after (the paper: ReLU).
ACTIVATION_METATYPES = (
    om.PTRELUMetatype,
    om.PTRELU6Metatype,
    om.PTHardTanhMetatype,
    om.PTLeakyRELUMetatype,
    om.PTGELUMetatype,
    om.PTSILUMetatype,
    om.PTHardSwishMetatype,
    om.PTELUMetatype,
)
#: Operations a quantizer commutes with (NNCF propagates quantizers through them).
QUANTIZATION_AGNOSTIC_METATYPES = tuple(DEFAULT_PT_QUANT_TRAIT_TO_OP_DICT[QuantizationTrait.QUANTIZATION_AGNOSTIC])
#: Agnostic operations that keep a tensor's channel axis where it is (a per-channel
#: quantizer still applies to their output the same way).
CHANNEL_PRESERVING_METATYPES = (
    om.PTPadMetatype,
    om.PTMaxPool1dMetatype,
    om.PTMaxPool2dMetatype,
    om.PTMaxPool3dMetatype,
    om.PTDropoutMetatype,
    om.PTThresholdMetatype,
)
LINEAR_METATYPE = om.PTLinearMetatype
ADD_METATYPE = om.PTAddMetatype
CONST_METATYPE = om.PTConstNoopMetatype
INPUT_METATYPE = om.PTInputNoopMetatype
OUTPUT_METATYPE = om.PTOutputNoopMetatype


_HOOK_NODE = re.compile(r"(^|/)(pre|post)_hook__")


def is_hook_node(node: NNCFNode) -> bool:
    """Whether a graph node is one of NNCF's inserted hooks (a quantizer) rather than a model op."""
    return bool(_HOOK_NODE.search(node.node_name))


def set_quantizer_bits(quantizer: BaseQuantizer, bits: int, *, narrow_range: bool, half_range: bool) -> None:
    """Give an NNCF quantizer another bit width (NNCF's MinMax only places 8-bit ones).

    :param narrow_range: Symmetric grid without its lowest level (-127..127 at 8 bits).
    :param half_range: NNCF's overflow fix: use one bit less, export with the full width.
    """
    quantizer.num_bits = bits
    quantizer._narrow_range = narrow_range
    quantizer._half_range = half_range
    quantizer.set_levels()


def store_quantizer_range(quantizer: BaseQuantizer, value: torch.Tensor) -> None:
    """Write a symmetric quantizer's scale or an asymmetric quantizer's range in place."""
    attr = "_input_range_param_storage" if isinstance(quantizer, AsymmetricQuantizer) else "_scale_param_storage"
    storage = getattr(quantizer, attr)
    storage.data.copy_(value.log() if quantizer._is_using_log_scale_storage else value)


def zero_on_grid(low: torch.Tensor, range_: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric range ``(low, range)`` on which zero is a grid point.

    NNCF's ``TuneRange`` moves a range so that zero is on its grid, except when zero lies within
    half a step of one end (its zero point rounds to 0 or ``levels - 1``): it then leaves the
    range as it is and NNCF's fake quantization rounds differently from OpenVINO's
    FakeQuantize, so the exported model no longer matches torch. Moving that end to zero is
    the nearest range on which both agree. Differentiable where it changes nothing.
    """
    range_ = range_.abs()
    high = low + range_
    with torch.no_grad():
        low_c, high_c = low.clamp(max=0), high.clamp(min=0)
        zp = torch.round(-low_c * (levels - 1) / (high_c - low_c).clamp_min(torch.finfo(low.dtype).tiny))
        at_low = (zp == 0) & (low < 0)
        at_high = (zp == levels - 1) & (high > 0)
    low = torch.where(at_low, torch.zeros_like(low), low)
    high = torch.where(at_high, torch.zeros_like(high), high)
    return low, high - low


@torch.no_grad()
def quantizer_grid(quantizer: BaseQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(origin, step)`` of the grid a quantizer rounds to: ``round((q(x) - origin) / step)``
    are its integers. Symmetric: origin 0, signed integers. Asymmetric: origin is the low end
    after NNCF moved the range to put zero on the grid, integers ``0 .. levels - 1``."""
    if isinstance(quantizer, AsymmetricQuantizer):
        low, range_ = TuneRange.apply(
            quantizer.input_low, quantizer.input_range.abs() + quantizer.eps, quantizer.levels
        )
        return low, range_ / (quantizer.levels - 1)
    step = quantizer.scale.abs() / quantizer.level_high
    return torch.zeros_like(step), step


@torch.no_grad()
def put_zero_on_grid(quantizer: BaseQuantizer) -> None:
    """Apply :func:`zero_on_grid` to an asymmetric quantizer's stored range (in place)."""
    if not isinstance(quantizer, AsymmetricQuantizer):
        return
    low, range_ = zero_on_grid(quantizer.input_low, quantizer.input_range, quantizer.levels)
    quantizer.input_low.copy_(low)
    store_quantizer_range(quantizer, range_)


class HookedSequential(torch.nn.Sequential):
    """An ``nn.Sequential`` whose forward skips NNCF's hook storage. NNCF stores its hooks as a
    child module of the model it wraps, and ``nn.Sequential.forward`` calls every child, so
    NNCF 3.4 fails on a top-level Sequential ("Module [HookStorage] is missing the required
    forward function")."""

    def forward(self, input: Any) -> Any:  # noqa: A002 (nn.Sequential's name)
        for name, module in self._modules.items():
            if name != ATR_HOOK_STORAGE:
                input = module(input)
        return input


def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """NNCF's ``wrap_model``; a plain ``nn.Sequential`` (one that keeps ``nn.Sequential``'s
    forward) becomes a :class:`HookedSequential` first, the same model with the same names."""
    if isinstance(model, torch.nn.Sequential) and type(model).forward is torch.nn.Sequential.forward:
        cls = type(model)
        if cls is torch.nn.Sequential:
            model.__class__ = HookedSequential
        else:  # a subclass with methods of its own: keep them
            model.__class__ = type(cls.__name__, (cls,), {"forward": HookedSequential.forward})
    return _nncf_wrap_model(model)


def unwrap(model: Any) -> torch.nn.Module:
    """The torch model inside NNCF's ``GraphModelWrapper`` (the model itself otherwise)."""
    return model.model if isinstance(model, GraphModelWrapper) else model


def graph_changed(model: Any) -> None:
    """Tell NNCF's ``GraphModelWrapper`` that hooks were added, so that the next pipeline step
    traces the model again (it caches its graph; NNCF's own model transformer does the same)."""
    if isinstance(model, GraphModelWrapper):
        model.reset_graph()


@torch.no_grad()
def asymmetric_weight_quantizer(
    quantizer: BaseQuantizer, weight: torch.Tensor, bits: int, min_range: float
) -> AsymmetricQuantizer:
    """An NNCF asymmetric per-channel quantizer for ``weight`` at ``bits`` bits, in place of
    ``quantizer`` (same scale layout). Its range per output channel is the channel's min/max
    widened to hold zero (at least ``min_range`` wide, so an all-zero channel has a grid),
    with zero on the grid."""
    shape = tuple(quantizer.scale_shape)
    spec = PTQuantizerSpec(
        num_bits=bits,
        mode=QuantizationScheme.ASYMMETRIC,
        signedness_to_force=None,
        narrow_range=False,
        half_range=False,
        scale_shape=shape,
        logarithm_scale=False,
        is_quantized_on_export=quantizer._is_quantized_on_export,
    )
    new = AsymmetricQuantizer(spec).to(weight.device)
    if len(shape) == weight.dim() and all(n in (1, weight.shape[d]) for d, n in enumerate(shape)):
        dims = [d for d, n in enumerate(shape) if n == 1]
    elif math.prod(shape) == 1:  # per-tensor
        dims = list(range(weight.dim()))
    else:
        msg = f"Weight quantizer scale shape {shape} does not fit weight shape {tuple(weight.shape)}."
        raise ValueError(msg)
    w = weight.detach().float()
    low = w.amin(dim=dims, keepdim=True).clamp(max=0)
    high = w.amax(dim=dims, keepdim=True).clamp(min=0)
    new.input_low.copy_(low.reshape(shape))
    store_quantizer_range(new, (high - low).clamp_min(min_range).reshape(shape))
    put_zero_on_grid(new)
    return new


def register_first_post_function_hook(model: torch.nn.Module, op_name: str, port_id: int, hook: torch.nn.Module) -> Any:
    """Like NNCF's ``register_post_function_hook``, but ``hook`` runs before the hooks already
    there (e.g. sees a layer's output before the quantizer placed on it). Their names stay."""
    handle = register_post_function_hook(model, op_name, port_id, hook)
    hooks = get_hook_storage(model).post_hooks[handle.key]
    for hook_id in [k for k in hooks if k != handle.id]:
        hooks[hook_id] = hooks.pop(hook_id)  # re-insert after the new hook, same id
    return handle


def replace_hook(model: torch.nn.Module, hook_name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Put ``module`` in the place of the hook named ``hook_name`` (``"post_hooks.<key>.<id>"``,
    as :func:`~nncf_calibtip.quantized_layers.find_quantized_layers` names them); returns the old one."""
    kind, key, hook_id = hook_name.split(".")
    table = getattr(get_hook_storage(model), kind)[key]
    old = table[hook_id]
    table[hook_id] = module
    return old


def hook_node_marker(hook_name: str) -> str:
    """The part of a graph node name that marks the operations of one hook (NNCF names a hook's
    operations ``<scope>/post_hook__<key with / as ->[<id>]/<function>/<call>``)."""
    kind, key, hook_id = hook_name.split(".")
    prefix = "pre_hook" if kind == "pre_hooks" else "post_hook"
    return f"{prefix}__{key.replace('/', '-')}[{hook_id}]/"


def module_call_patches(model: torch.nn.Module) -> dict[torch.nn.Module, Any]:
    """The call wrappers a running forward pass has put on the model's modules.

    NNCF's ``FunctionHookMode`` wraps every module's ``_call_impl`` (instance attribute) for the
    duration of a forward pass, to know the module a function is called from. A forward pass
    paused in one thread while another runs must get its own wrappers back before it goes on.
    """
    return {m: m.__dict__.get("_call_impl") for m in model.modules()}


def install_module_call_patches(model: torch.nn.Module, patches: dict[torch.nn.Module, Any] | None) -> None:
    """Give the model's modules the wrappers of :func:`module_call_patches` (None: none)."""
    for m in model.modules():
        impl = patches.get(m) if patches else None
        if impl is None:
            m.__dict__.pop("_call_impl", None)
        else:
            m.__dict__["_call_impl"] = impl


def nncf_version_ok() -> bool:
    """Whether the installed NNCF has the minor version these imports were written for."""
    return nncf.__version__.startswith(TESTED_NNCF_MINOR + ".")


if not nncf_version_ok():  # pragma: no cover - depends on the environment
    nncf_logger.warning(
        f"nncf_calibtip was tested with NNCF {TESTED_NNCF_MINOR}.x, found {nncf.__version__}; "
        f"install nncf=={TESTED_NNCF_MINOR}.* if quantization fails."
    )

__all__ = [
    "ACTIVATION_METATYPES",
    "ADD_METATYPE",
    "Algorithm",
    "AsymmetricQuantizer",
    "BATCH_NORM_METATYPES",
    "BackendType",
    "BaseQuantizer",
    "CHANNEL_PRESERVING_METATYPES",
    "CONST_METATYPE",
    "FunctionHookMode",
    "GraphModelWrapper",
    "HookStorage",
    "IGNORED_FN_NAMES",
    "INPUT_METATYPE",
    "LINEAR_METATYPE",
    "MinMaxQuantization",
    "NNCFGraph",
    "NNCFGraphEdge",
    "NNCFNode",
    "OUTPUT_METATYPE",
    "OpMeta",
    "OverflowFix",
    "PT2OpLayerAttributes",
    "PTQuantizerSpec",
    "Pipeline",
    "QUANTIZATION_AGNOSTIC_METATYPES",
    "QuantizationPreset",
    "QuantizationScheme",
    "RangeEstimatorParametersSet",
    "SmoothQuant",
    "StatisticPointsContainer",
    "SymmetricQuantizer",
    "TESTED_NNCF_MINOR",
    "TensorMeta",
    "WEIGHTED_METATYPES",
    "asymmetric_quantize",
    "asymmetric_weight_quantizer",
    "build_graph",
    "generate_normalized_op_name",
    "get_backend",
    "get_handle_inner_function",
    "get_hook_storage",
    "graph_changed",
    "hook_node_marker",
    "install_module_call_patches",
    "is_hook_node",
    "is_wrapped",
    "module_call_patches",
    "nncf_logger",
    "put_zero_on_grid",
    "quantizer_grid",
    "register_first_post_function_hook",
    "register_post_function_hook",
    "register_pre_function_hook",
    "replace_hook",
    "set_quantizer_bits",
    "store_quantizer_range",
    "symmetric_quantize",
    "track",
    "unwrap",
    "wrap_model",
    "zero_on_grid",
]

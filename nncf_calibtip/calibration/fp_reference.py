"""The FP model a quantized model is compared with, kept through algorithms that change weights.

AdaQuant changes weights and biases, BN tuning changes scales and biases, bias tuning changes
biases: after any of them, the quantized model with its quantizers switched off is no longer
the FP model. The first of our algorithms to run stores the model's FP tensors on it
(:func:`remember_fp_state`); :func:`fp_reference` rebuilds the FP model from them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nncf_calibtip import compat
from nncf_calibtip.calibration.capture import all_quantizers

FP_STATE_ATTRIBUTE = "_calibtip_fp_state"


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the model itself, not of NNCF's quantizers."""
    skip = {id(t) for q in all_quantizers(model) for t in (*q.parameters(), *q.buffers())}
    out = {name: t for name, t in model.named_parameters() if id(t) not in skip}
    out.update({name: t for name, t in model.named_buffers() if id(t) not in skip})
    return out


def remember_fp_state(model: nn.Module) -> None:
    """Store a copy of the model's FP tensors on it, unless an earlier algorithm already did.

    Call this before changing any weight, bias or normalisation parameter.
    """
    if getattr(model, FP_STATE_ATTRIBUTE, None) is None:
        state = {name: t.detach().clone() for name, t in _model_tensors(model).items()}
        setattr(model, FP_STATE_ATTRIBUTE, state)


def copy_without_fp_state(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that does not carry the stored FP state (saves its memory)."""
    state = getattr(model, FP_STATE_ATTRIBUTE, None)
    if state is not None:
        delattr(model, FP_STATE_ATTRIBUTE)
    try:
        return copy.deepcopy(model)
    finally:
        if state is not None:
            setattr(model, FP_STATE_ATTRIBUTE, state)


def fp_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's FP tensors by name: the stored state, or the current tensors when none is stored."""
    state = getattr(model, FP_STATE_ATTRIBUTE, None)
    if state is None:
        return {name: t.detach() for name, t in _model_tensors(model).items()}
    return state


def fp_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its FP tensors and every quantizer switched off.

    Uses the state :func:`remember_fp_state` stored; without one, the model's current tensors
    are taken to be FP (nothing of ours has changed them yet).
    """
    state = getattr(model, FP_STATE_ATTRIBUTE, None)
    fp = copy_without_fp_state(model)
    if state is not None:
        tensors = _model_tensors(fp)
        missing = sorted(set(state) - set(tensors))
        if missing:
            msg = f"The model lost tensors {missing[:5]} since its FP state was stored; re-run quantization."
            raise RuntimeError(msg)
        with torch.no_grad():
            for name, t in tensors.items():
                if name in state:
                    t.copy_(state[name])
                elif t.is_floating_point():
                    # Added after the snapshot (a bias BN tuning created): FP value is zero.
                    t.zero_()
    for q in all_quantizers(fp):
        q.enabled[0] = 0
    compat.nncf_logger.debug("Built the FP reference model")
    return fp.eval()

"""Which layers a reconstruction algorithm (AdaQuant) has fitted, remembered on the model.

Later algorithms treat those layers differently: a layer fitted to its FP output in the MSE
sense has, under quantization noise, a deliberately narrower output than the FP layer (the
MSE-best estimate shrinks towards the mean), so BN tuning should not stretch it back.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

FITTED_ATTRIBUTE = "_calibtip_fitted_layers"


def mark_fitted(model: nn.Module, names: Iterable[str]) -> None:
    """Record that the layers ``names`` (NNCF node names) were fitted on ``model``."""
    setattr(model, FITTED_ATTRIBUTE, fitted_layers(model) | frozenset(names))


def fitted_layers(model: nn.Module) -> frozenset[str]:
    """Names of the layers fitted on ``model`` so far (empty for other models)."""
    return getattr(model, FITTED_ATTRIBUTE, frozenset())

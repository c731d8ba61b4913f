"""Which layers a reconstruction algorithm (AdaQuant) has fitted, and how, remembered on the model.

Later algorithms treat those layers differently. BN tuning leaves alone a layer that sequential
AdaQuant fitted (it was fitted to its FP output on the quantized model's own inputs, so the
drift BN tuning corrects is already accounted for; that includes a layer it left at
round-to-nearest, since every later layer was fitted on that layer's outputs), and only
re-centres one fitted in parallel mode: a layer fitted to its FP output in the MSE sense has,
under quantization noise, a deliberately narrower output than the FP layer (the MSE-best
estimate shrinks towards the mean), so stretching it back would amplify the noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from torch import nn

FITTED_ATTRIBUTE = "_calibtip_fitted_layers"

#: The inputs a layer was fitted on: the quantized model's own ("sequential") or the FP model's.
FitMode = Literal["sequential", "parallel"]


def mark_fitted(model: nn.Module, names: Iterable[str], mode: FitMode) -> None:
    """Record that the layers ``names`` (NNCF node names) were fitted on ``model`` in ``mode``
    (a later fit of the same layer replaces the earlier record)."""
    if mode not in ("sequential", "parallel"):
        msg = f"mode={mode!r}: use 'sequential' or 'parallel'."
        raise ValueError(msg)
    # A plain dict, so that deep copies of the model (refine, fp_reference) carry it along.
    setattr(model, FITTED_ATTRIBUTE, {**fitted_layers(model), **dict.fromkeys(names, mode)})


def fitted_layers(model: nn.Module) -> Mapping[str, FitMode]:
    """Layer name -> how it was fitted, for the layers fitted on ``model`` so far (empty for
    other models); a copy."""
    return dict(getattr(model, FITTED_ATTRIBUTE, {}))

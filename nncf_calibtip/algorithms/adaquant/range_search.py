"""Starting ranges for AdaQuant: the input range and per-channel weight scales that minimise
the layer's own reconstruction error on a grid, before the gradient steps refine them.

MinMax ranges are poor below 8 bits: at 4 bits a per-channel absmax, or a mean of per-sample
maxima, spends most of the 16 levels on rare large values. AdaQuant's steps on the ranges are
small relative steps (a few percent over a whole run for the weight scales), so they stay near
where they start; this search decides where that is, on the objective AdaQuant minimises
(the error after the layer's BatchNorm and activation, with the other quantizer on).
Round-to-nearest's ranges are on both grids, so the search never starts AdaQuant worse than
round-to-nearest on the samples it sees.
"""

from __future__ import annotations

import torch

from nncf_calibtip import compat
from nncf_calibtip.algorithms.adaquant.layer_problem import LayerProblem

#: Fractions of the MinMax per-channel weight scale tried (1.0 is round-to-nearest's).
WEIGHT_SCALE_GRID = tuple(1.0 - 0.05 * i for i in range(11))
#: Fractions of each end of the MinMax input range tried (1.0 is round-to-nearest's).
RANGE_END_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
#: Relative amount by which a shrunk end is moved off its exact fraction. A layer's input
#: quantizer often reads another quantizer's output (its own 4-bit quantizer after the 8-bit
#: one a residual add shares, or after a max-pool), and at fractions like 0.8 of the same range
#: the two grids are commensurate: many inputs then lie exactly on a rounding midpoint, where
#: float rounding decides (torch's against OpenVINO's, float32's against float64's). A layer
#: that keeps its start keeps such a range; on a ResNet-18 IR that moved the outputs by 5% of
#: their range against float error. 1e-3 of a range leaves no midpoint within float error.
TIE_BREAK = 1e-3


def _fractions() -> list[float]:
    return [f if f == 1.0 else f * (1 - TIE_BREAK) for f in RANGE_END_GRID]


@torch.no_grad()
def search_input_range(
    problem: LayerProblem, x: torch.Tensor, y: torch.Tensor, skip: torch.Tensor | None = None
) -> None:
    """Shrink the upper, then the lower end of the layer's input range to the grid point with
    the lowest error (only for a layer that trains its input quantizer). ``skip``: the residual
    add's other operand when the target ``y`` is taken after the add."""
    if not problem.train_input_range:
        return
    low0, range0 = problem.low0, problem.range0
    high0 = low0 + range0
    weight = problem.quantized_weight()  # fixed while only the input range moves
    asymmetric = isinstance(problem.layer.input_quantizer, compat.AsymmetricQuantizer)

    def set_ends(low: torch.Tensor, high: torch.Tensor) -> None:
        if asymmetric:
            problem.low_shift.copy_((low - low0) / range0)
            problem.range_scale.copy_((high - low) / range0 - 1)
        else:  # symmetric: the range is [-scale, scale] (or [0, scale] unsigned)
            problem.range_scale.copy_(high / range0 - 1)

    def best_of(candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        errors = []
        for low, high in candidates:
            set_ends(low, high)
            errors.append(float(problem.channel_errors(x, y, weight=weight, skip=skip).sum()))
        return candidates[min(range(len(errors)), key=errors.__getitem__)]

    low, high = best_of([(low0, high0 * f) if asymmetric else (low0, range0 * f) for f in _fractions()])
    if asymmetric and bool((low0 < 0).any()):
        low, high = best_of([(low0 * f, high) for f in _fractions()])
    set_ends(low, high)


@torch.no_grad()
def search_weight_scales(
    problem: LayerProblem, x: torch.Tensor, y: torch.Tensor, skip: torch.Tensor | None = None
) -> None:
    """Per output channel, the weight scale on the grid with the lowest error. Output channels
    are independent (BatchNorm and activations act per channel), so one forward pass per grid
    point scores every channel at once (a residual add and the activation after it act per
    channel too)."""
    scale = problem.delta_scale
    if not scale.requires_grad:
        return
    xq = problem.quantize_input(x)  # fixed while only the weight scales move
    errors = []
    for f in WEIGHT_SCALE_GRID:
        scale.fill_(f - 1)
        errors.append(problem.channel_errors(xq, y, input_quantized=True, skip=skip))
    err = torch.stack(errors)  # [grid, channels]
    grid = torch.tensor(WEIGHT_SCALE_GRID, dtype=scale.dtype, device=scale.device)
    if scale.numel() == err.shape[1]:
        best = grid[err.argmin(0)]
    elif scale.numel() == 1:
        best = grid[err.sum(1).argmin()]
    else:  # a scale layout that does not map to output channels: keep MinMax's
        best = torch.ones((), dtype=scale.dtype, device=scale.device)
    scale.copy_((best - 1).reshape(-1).expand(scale.numel()).reshape(scale.shape))

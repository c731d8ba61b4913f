"""Per-channel output statistics of layers, accumulated over a calibration pass.

The statistics are true averages over every sample and position the pass saw (sums in float64,
not a momentum average), which is what BN tuning re-normalises to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ChannelStats:
    """Mean and standard deviation of each output channel."""

    mean: torch.Tensor
    std: torch.Tensor


def per_channel(y: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and mean square of one batch, and the elements per channel."""
    dim = channel_dim % y.dim()
    dims = [d for d in range(y.dim()) if d != dim]
    y64 = y.detach().double()
    return y64.mean(dims), y64.pow(2).mean(dims), y.numel() // y.shape[dim]


class ChannelStatsHook(nn.Module):
    """Post-hook on a layer output: accumulates its per-channel statistics.

    With ``target`` set, it also re-normalises each batch's output on the fly to the target
    mean and standard deviation (as a BatchNorm in training mode would), so that the layers
    after it see inputs as they will be once this layer is corrected. The accumulated
    statistics are those of the output *before* that re-normalisation.

    :param channel_dim: Channel axis of the output (1 for convolutions, -1 for linear layers).
    :param target: Statistics to re-normalise to, or None to only observe.
    :param max_std_ratio: Bound on the per-channel rescaling, ``1/r <= target/batch std <= r``.
    :param min_std: Channels whose batch or target std is below this (relative to the layer's
        largest target std) are only shifted, not rescaled.
    """

    def __init__(
        self,
        channel_dim: int,
        target: ChannelStats | None = None,
        max_std_ratio: float = 2.0,
        min_std: float = 1e-6,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.target = target
        self.max_std_ratio = max_std_ratio
        self.min_std = min_std
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.count = 0

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        mean, mean_sq, n = per_channel(y, self.channel_dim)
        if self.sum is None:
            self.sum, self.sum_sq = mean * n, mean_sq * n
        else:
            self.sum += mean * n
            self.sum_sq += mean_sq * n
        self.count += n
        if self.target is None:
            return y
        std = (mean_sq - mean.pow(2)).clamp_min(0).sqrt()
        scale = std_ratio(self.target.std.double(), std, self.max_std_ratio, self.min_std)
        shift = self.target.mean.double() - scale * mean
        shape = [1] * y.dim()
        shape[self.channel_dim % y.dim()] = -1
        return y * scale.to(y.dtype).view(shape) + shift.to(y.dtype).view(shape)

    def stats(self) -> ChannelStats:
        if self.sum is None or self.sum_sq is None:
            msg = "The layer did not run during the calibration pass."
            raise RuntimeError(msg)
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean.pow(2)).clamp_min(0)
        return ChannelStats(mean.float(), var.sqrt().float())


def std_ratio(target: torch.Tensor, actual: torch.Tensor, max_ratio: float, min_std: float) -> torch.Tensor:
    """``target / actual`` per channel, bounded to ``[1/max_ratio, max_ratio]``; 1 where either
    std is negligible (dead channels: rescaling them would only amplify rounding noise)."""
    floor = min_std * float(target.abs().max().clamp_min(1e-30))
    valid = (target > floor) & (actual > floor)
    ratio = torch.where(valid, target / actual.clamp_min(1e-30), torch.ones_like(target))
    return ratio.clamp(1 / max_ratio, max_ratio)


def distance(stats: ChannelStats, target: ChannelStats) -> tuple[float, float]:
    """How far ``stats`` are from ``target``: mean over channels of ``|mean - target mean| /
    target std`` and of ``|std / target std - 1|`` (channels with a dead target are skipped)."""
    floor = 1e-6 * float(target.std.abs().max().clamp_min(1e-30))
    live = target.std > floor
    if not bool(live.any()):
        return 0.0, 0.0
    t_std = target.std[live]
    mean_err = ((stats.mean[live] - target.mean[live]).abs() / t_std).mean()
    std_err = (stats.std[live] / t_std - 1).abs().mean()
    return float(mean_err), float(std_err)

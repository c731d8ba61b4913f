"""Whether tuned biases stay: a paired comparison of per-sample held-out losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from nncf_calibtip.algorithms.bias_tuning.config import PutBackRule

#: A change of the mean counts when it exceeds this many standard errors of the paired
#: per-sample change. ~100 held-out samples measure the KL change to about +-0.06 on the
#: EfficientNet sample, as much as bias tuning's usual effect after AdaQuant; a diverging run
#: rises far beyond it.
SIGNIFICANT_STDERR = 2.0

#: One-sided p-value of the signed-rank test below which the held-out samples, taken one by
#: one, count as closer to FP.
SIGNIFICANT_P = 0.05


@dataclass(frozen=True)
class HeldOutChange:
    """The paired change of per-sample held-out losses, ``after - before``.

    :param mean: Mean change (negative: tuning lowered the loss).
    :param stderr: Standard error of the mean change.
    :param p_lower: One-sided p-value of the Wilcoxon signed-rank test that the changes lean
        negative (1 when no sample changed).
    :param lower: Samples whose loss fell.
    """

    mean: float
    stderr: float
    p_lower: float
    lower: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.mean)

    @property
    def mean_lower(self) -> bool:
        """The mean fell by more than its noise."""
        return self.mean < -SIGNIFICANT_STDERR * self.stderr

    @property
    def mean_higher(self) -> bool:
        """The mean rose by more than its noise (e.g. a diverging learning rate)."""
        return self.mean > SIGNIFICANT_STDERR * self.stderr

    @property
    def ranks_lower(self) -> bool:
        """The samples, one by one, moved closer to FP (signed-rank test)."""
        return self.p_lower < SIGNIFICANT_P


def held_out_change(before: np.ndarray, after: np.ndarray) -> HeldOutChange:
    """Compare per-sample held-out losses ``before`` and ``after`` tuning (paired by sample)."""
    change = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    n = change.size
    if not np.isfinite(change).all():
        return HeldOutChange(math.nan, math.nan, 1.0, 0)
    stderr = float(change.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    p_lower = 1.0
    if np.count_nonzero(change) > 0:
        p_lower = float(stats.wilcoxon(change, alternative="less").pvalue)
    return HeldOutChange(float(change.mean()), stderr, p_lower, int((change < 0).sum()))


def keep_tuned(change: HeldOutChange, rule: PutBackRule) -> bool:
    """Whether the tuned biases stay under ``rule`` (see :class:`BiasTuningConfig`).

    ``"unless_better"`` keeps them when the mean loss fell by more than two standard errors,
    or when the signed-rank test finds the samples closer one by one while the mean did not
    rise beyond its noise. The per-sample KL is heavy-tailed: a few samples far from FP can
    hide, in the mean, a fall that nearly every other sample shows.
    """
    if not change.finite:
        return False  # whatever the rule: NaN or infinite outputs are no model
    if rule == "unless_better":
        return change.mean_lower or (change.ranks_lower and not change.mean_higher)
    if rule == "if_worse":
        return not change.mean_higher
    return True

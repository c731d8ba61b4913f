"""BN tuning: re-normalise quantized layers' output channels to the FP model's."""

from nncf_calibtip.algorithms.bn_tuning.algorithm import BNTuning
from nncf_calibtip.algorithms.bn_tuning.backend import ChannelStatsReport
from nncf_calibtip.algorithms.bn_tuning.config import BNTuningConfig

__all__ = ["BNTuning", "BNTuningConfig", "ChannelStatsReport"]

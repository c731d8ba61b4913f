"""Label-free bias tuning: train the quantized model's biases to match the FP model's outputs."""

from nncf_calibtip.algorithms.bias_tuning.algorithm import BiasTuning
from nncf_calibtip.algorithms.bias_tuning.backend import BiasTuningReport
from nncf_calibtip.algorithms.bias_tuning.config import BiasTuningConfig

__all__ = ["BiasTuning", "BiasTuningConfig", "BiasTuningReport"]

"""AdaQuant layer-wise calibration."""

from nncf_calibtip.algorithms.adaquant.algorithm import AdaQuant
from nncf_calibtip.algorithms.adaquant.backend import LayerReport
from nncf_calibtip.algorithms.adaquant.config import AdaQuantConfig

__all__ = ["AdaQuant", "AdaQuantConfig", "LayerReport"]

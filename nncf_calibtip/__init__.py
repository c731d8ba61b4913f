"""CalibTIP post-training quantization below 8 bits for NNCF / OpenVINO.

Public face::

    import nncf, nncf_calibtip
    q = nncf_calibtip.quantize(model, nncf.Dataset(loader, transform_fn),
                               nncf_calibtip.AdaQuantConfig(mode="sequential"),
                               precision=nncf_calibtip.PrecisionConfig(weight_bits=4, activation_bits=4))
    nncf_calibtip.export_openvino(q, example_input, "out/model.xml")
"""

from nncf_calibtip.algorithms.adaquant import AdaQuant, AdaQuantConfig, LayerReport
from nncf_calibtip.algorithms.bias_tuning import BiasTuning, BiasTuningConfig, BiasTuningReport
from nncf_calibtip.algorithms.bn_tuning import BNTuning, BNTuningConfig, ChannelStatsReport
from nncf_calibtip.api import QuantizationConfig, QuantizationResult, build_pipeline, get_result, quantize, refine
from nncf_calibtip.export import ExportResult, check_ir_against_plan, export_openvino
from nncf_calibtip.placement import PrecisionConfig, PrecisionSetup, get_plan
from nncf_calibtip.plan import LayerPrecision, PrecisionPlan

__version__ = "0.1.0"

__all__ = [
    "AdaQuant",
    "AdaQuantConfig",
    "BNTuning",
    "BiasTuning",
    "BiasTuningConfig",
    "BiasTuningReport",
    "BNTuningConfig",
    "ChannelStatsReport",
    "ExportResult",
    "LayerPrecision",
    "LayerReport",
    "PrecisionConfig",
    "PrecisionPlan",
    "PrecisionSetup",
    "QuantizationConfig",
    "QuantizationResult",
    "build_pipeline",
    "check_ir_against_plan",
    "export_openvino",
    "get_plan",
    "get_result",
    "quantize",
    "refine",
]

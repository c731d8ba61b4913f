import json
from pathlib import Path

import pytest

import nncf_calibtip as nc
from nncf_calibtip.config_schema import quantization_config_schema, validate_quantization_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    validate_quantization_config(json.loads(path.read_text()))


def test_every_default_config_is_valid():
    cfg = nc.QuantizationConfig(
        precision=nc.PrecisionConfig(4, 4, layers={"a/conv2d/0": nc.LayerPrecision(2, 8)}),
        algorithms=(nc.AdaQuantConfig(max_weight_change=None), nc.BNTuningConfig(), nc.BiasTuningConfig()),
    )
    validate_quantization_config(cfg.to_dict())


def test_every_problem_is_named_with_its_place():
    bad = {
        "precision": {"weight_bits": "4"},
        "algorithms": [{"type": "adaquant", "iters": 1.5}, {"type": "bias_tuning", "loss": "ce", "epochs": 2}],
    }
    with pytest.raises(ValueError) as info:
        nc.QuantizationConfig.from_dict(bad)
    text = str(info.value)
    assert "precision/weight_bits: '4' is not of type 'integer'" in text
    assert "algorithms/0 (adaquant): 1.5 is not of type 'integer'" in text
    assert "algorithms/1 (bias_tuning)" in text and "'ce' is not one of" in text and "'epochs' was unexpected" in text


def test_schema_lists_every_algorithm():
    options = quantization_config_schema()["properties"]["algorithms"]["items"]["oneOf"]
    assert [o["properties"]["type"]["const"] for o in options] == ["adaquant", "bn_tuning", "bias_tuning"]

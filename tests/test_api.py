import json

import pytest

import nncf_calibtip as nc


def test_quantization_config_json_round_trip(tmp_path):
    cfg = nc.QuantizationConfig(
        precision=nc.PrecisionConfig(4, 4, layers={"a/conv2d/0": nc.LayerPrecision(8, 8)}),
        algorithms=(nc.AdaQuantConfig(mode="parallel", iters=10),),
        subset_size=512,
    )
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert nc.QuantizationConfig.from_json(path) == cfg
    assert json.loads(path.read_text())["algorithms"][0]["type"] == "adaquant"


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="Unknown config keys"):
        nc.QuantizationConfig.from_dict({"precison": {}})
    with pytest.raises(ValueError, match="Algorithm type"):
        nc.QuantizationConfig.from_dict({"algorithms": [{"type": "adaround"}]})
    with pytest.raises(ValueError, match="subset_size"):
        nc.QuantizationConfig(subset_size=0)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))
    assert configs
    for path in configs:
        nc.QuantizationConfig.from_json(path)

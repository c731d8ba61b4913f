import pytest

from nncf_calibtip.plan import LayerPrecision, PrecisionPlan


def test_plan_round_trips_through_json(tmp_path):
    plan = PrecisionPlan({"a/conv2d/0": LayerPrecision(4, 4), "b/linear/0": LayerPrecision(8, 8)})
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert PrecisionPlan.from_json(path) == plan
    assert PrecisionPlan.from_json(plan.to_json()) == plan
    assert list(PrecisionPlan.from_json(path)) == ["a/conv2d/0", "b/linear/0"]


def test_plan_summary_and_replace():
    plan = PrecisionPlan({"a": LayerPrecision(4, 4), "b": LayerPrecision(8, 8), "c": LayerPrecision(4, 4)})
    assert plan.summary() == "W4A4 x2, W8A8 x1"
    assert plan.replace({"a": LayerPrecision(2, 4)})["a"] == LayerPrecision(2, 4)
    with pytest.raises(KeyError, match="not in the plan"):
        plan.replace({"zzz": LayerPrecision(8, 8)})


@pytest.mark.parametrize(("w", "a"), [(3, 8), (16, 8), (8, 2), (8, 16)])
def test_unsupported_bits_are_rejected(w, a):
    with pytest.raises(ValueError, match="not supported"):
        LayerPrecision(w, a)


def test_malformed_plan_json_names_the_problem():
    with pytest.raises(ValueError, match="weight_bits"):
        PrecisionPlan.from_dict({"layers": {"a": {"bits": 4}}})
    with pytest.raises(ValueError, match="mapping"):
        PrecisionPlan.from_dict({"a": 1})

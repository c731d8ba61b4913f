import pytest
import torch

import nncf_calibtip as nc
from nncf_calibtip.algorithms.adaquant.range_search import RANGE_END_GRID, WEIGHT_SCALE_GRID
from nncf_calibtip.placement import PrecisionConfig

W4A4 = PrecisionConfig(4, 4, keep_first_last_8bit=False)
# No gradient steps: the model is round-to-nearest with the searched ranges.
SEARCH_ONLY = {"iters": 1, "lr_weight": 0.0, "lr_bias": 0.0, "lr_weight_scale": 0.0, "lr_activation_range": 0.0}


def _mse_to_fp(fp, q, x):
    with torch.no_grad():
        return (q(x) - fp(x)).pow(2).mean().item()


def test_search_alone_beats_round_to_nearest_per_layer_and_on_unseen_data(tiny_model, calib_dataset, test_data):
    cfg = nc.AdaQuantConfig(mode="sequential", holdout_fraction=0.25, **SEARCH_ONLY)
    q = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    reports = nc.get_result(q).reports["adaquant"]
    # Held-out samples (not searched on): every layer's error drops below round-to-nearest's.
    for r in reports:
        assert r["kept"] and r["error_after"] < r["error_before"], r
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    assert _mse_to_fp(tiny_model, q, test_data) < 0.8 * _mse_to_fp(tiny_model, rtn, test_data)


def test_search_off_starts_from_min_max(tiny_model, calib_dataset, test_data):
    cfg = nc.AdaQuantConfig(range_search=False, **SEARCH_ONLY)
    q = nc.quantize(tiny_model, calib_dataset, cfg, precision=W4A4)
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    with torch.no_grad():
        torch.testing.assert_close(q(test_data), rtn(test_data), rtol=0, atol=0)


def _ranges(model) -> dict[str, torch.Tensor]:
    """Symmetric quantizers' scales and the asymmetric weight quantizers' (port 1) ranges."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.endswith(".scale") or ("__1." in k and k.endswith(".input_range"))
    }


def test_searched_weight_scales_are_grid_points(tiny_model, calib_dataset):
    rtn = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    q = nc.quantize(tiny_model, calib_dataset, nc.AdaQuantConfig(**SEARCH_ONLY), precision=W4A4)
    rtn_scales, q_scales = _ranges(rtn), _ranges(q)
    assert rtn_scales.keys() == q_scales.keys() and rtn_scales
    grid = torch.tensor(WEIGHT_SCALE_GRID + RANGE_END_GRID, dtype=torch.float64)
    moved = 0
    for k, v in q_scales.items():
        ratio = (v.double().abs() / rtn_scales[k].double().abs()).reshape(-1)
        assert torch.isclose(ratio[:, None], grid[None, :], atol=1e-5).any(1).all(), k
        moved += int((ratio < 1 - 1e-6).sum())
    assert moved > 0


@pytest.mark.parametrize("n", [0, -1])
def test_range_search_samples_validated(n):
    with pytest.raises(ValueError, match="range_search_samples"):
        nc.AdaQuantConfig(range_search_samples=n)


@pytest.mark.parametrize("bits", [4, 2])
def test_searched_input_ranges_put_no_midpoint_on_an_8bit_grid_of_the_same_range(bits):
    # A layer's low-bit input quantizer often reads the output of the 8-bit one a residual add
    # shares (same MinMax range). At 0.8 of that range the 8-bit value 34/255 is exactly the
    # 4-bit midpoint 2.5, so float rounding decides it: torch and OpenVINO then disagree on
    # many inputs (a ResNet-18 IR moved by 5% of its output range).
    from nncf_calibtip.algorithms.adaquant.range_search import _fractions

    levels = 2**bits - 1
    exact = torch.tensor([0.8], dtype=torch.float64)
    k = torch.arange(256, dtype=torch.float64)[:, None] / 255
    assert ((k * levels / exact) % 1 - 0.5).abs().min() < 1e-9  # the tie this guards against
    for f in _fractions():
        pos = (k * levels / f) % 1
        if f < 1:
            assert (pos - 0.5).abs().min() > 1e-5, f

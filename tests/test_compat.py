import pytest
import torch

from nncf_calibtip import compat


def _fake_quantize_openvino(x, low, high, levels):
    """OpenVINO's FakeQuantize: round on the grid from ``low`` to ``high``, no zero point."""
    step = (high - low) / (levels - 1)
    return torch.round((x.clamp(low, high) - low) / step) * step + low


def _nncf(x, low, range_, levels):
    return compat.asymmetric_quantize(x, levels, 0, levels - 1, low, range_, 1e-16)


def _nncf_tuned_ends(low, range_, levels):
    """The ends NNCF exports to OpenVINO (its ``TuneRange`` output)."""
    from nncf.torch.quantization.quantize_functions import TuneRange

    lo, r = TuneRange.apply(low.clone(), range_.clone(), levels)
    return float(lo), float(lo + r)


def _share_apart(a, b):
    """Share of elements more than float noise apart (float rounding may split a near-tie)."""
    return float(((a - b).abs() > 1e-5).float().mean())


def _points():
    # Random points: no exact ties, where the two roundings may legitimately differ.
    return torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 8 - 4


@pytest.mark.parametrize(("low", "high"), [(-0.01, 3.0), (-3.0, 0.02), (-0.7, 2.3), (0.3, 2.0)])
def test_zero_on_grid_makes_nncf_agree_with_openvino(low, high):
    x = _points()
    low_t, range_t = compat.zero_on_grid(torch.tensor([low]), torch.tensor([high - low]), 16)
    ends = _nncf_tuned_ends(low_t, range_t, 16)
    assert _share_apart(_nncf(x, low_t, range_t, 16), _fake_quantize_openvino(x, *ends, 16)) < 1e-3


def test_without_the_fix_nncf_and_openvino_disagree():
    """The case the fix is for: zero within half a step of the low end."""
    x = _points()
    low, range_ = torch.tensor([-0.01]), torch.tensor([3.01])
    lo, hi = _nncf_tuned_ends(low, range_, 16)
    assert _share_apart(_nncf(x, low, range_, 16), _fake_quantize_openvino(x, lo, hi, 16)) > 0.01


def test_zero_on_grid_moves_only_the_end_near_zero():
    low, range_ = compat.zero_on_grid(torch.tensor([-0.01, -3.0, -0.7]), torch.tensor([3.01, 3.02, 3.0]), 16)
    torch.testing.assert_close(low, torch.tensor([0.0, -3.0, -0.7]))
    torch.testing.assert_close(low + range_, torch.tensor([3.0, 0.0, 2.3]))

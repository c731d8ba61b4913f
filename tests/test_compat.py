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


def _weight_quantizer(shape):
    spec = compat.PTQuantizerSpec(8, compat.QuantizationScheme.SYMMETRIC, None, True, False, shape, False)
    return compat.SymmetricQuantizer(spec)


def test_asymmetric_weight_quantizer_spans_each_channel_and_keeps_zero():
    w = torch.randn(4, 3, 3, 3)
    w[1] = w[1].abs() + 0.5  # one-signed channel: its grid still holds zero
    w[2] = 0.0  # dead channel
    q = compat.asymmetric_weight_quantizer(_weight_quantizer((4, 1, 1, 1)), w, 4, 1e-8)
    assert isinstance(q, compat.AsymmetricQuantizer) and q.levels == 16
    low, high = q.input_low.detach().flatten(), (q.input_low + q.input_range).detach().flatten()
    w_min, w_max = w.amin((1, 2, 3)), w.amax((1, 2, 3))
    assert (low <= w_min.clamp(max=0) + 1e-7).all() and (high >= w_max.clamp(min=0) - 1e-7).all()
    assert float(low[1]) == 0.0 and float(high[2]) >= torch.tensor(1e-8).item()
    with torch.no_grad():
        qw = q(w)
        assert torch.isfinite(qw).all() and (qw[2] == 0).all()
        assert (q(torch.zeros_like(w)) == 0).all()
        _, step = compat.quantizer_grid(q)
        assert ((qw - w).abs() <= step / 2 + 1e-6).all()  # min..max: nothing clipped


def test_asymmetric_weight_quantizer_per_tensor_and_bad_shape():
    w = torch.randn(8, 5)
    q = compat.asymmetric_weight_quantizer(_weight_quantizer((1,)), w, 4, 1e-8)
    assert q.input_low.shape == (1,) and float(q.input_low.detach()) <= float(w.min())
    with pytest.raises(ValueError, match="does not fit"):
        compat.asymmetric_weight_quantizer(_weight_quantizer((5, 1)), w, 4, 1e-8)

import torch

import nncf_calibtip as nc
from nncf_calibtip.calibration.fp_reference import fp_reference

W4A4 = nc.PrecisionConfig(4, 4, keep_first_last_8bit=False)


def test_round_to_nearest_model_keeps_its_fp_reference_after_a_loaded_state(tiny_model, calib_dataset, test_data):
    """A state saved from an AdaQuant run and loaded into a round-to-nearest placement changes the
    weights in place; the FP reference that BN and bias tuning compare with must not follow."""
    aq = nc.quantize(tiny_model, calib_dataset, nc.AdaQuantConfig(iters=20), precision=W4A4)
    loaded = nc.quantize(tiny_model, calib_dataset, precision=W4A4)
    loaded.load_state_dict(aq.state_dict())
    with torch.no_grad():
        expected = tiny_model(test_data)
        torch.testing.assert_close(fp_reference(loaded)(test_data), expected)
        torch.testing.assert_close(fp_reference(aq)(test_data), expected)
        assert not torch.allclose(loaded(test_data), nc.quantize(tiny_model, calib_dataset, precision=W4A4)(test_data))

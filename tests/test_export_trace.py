import nncf
import numpy as np
import pytest
import torch
from torch import nn

import nncf_calibtip as nc
from nncf_calibtip.evaluation import compile_ir


class ShapeArithmetic(nn.Module):
    """``area`` is a Python int in eager mode and a traced integer tensor under
    ``torch.jit.trace``, so the trace runs one more ``mul`` than eager mode, before the ``mul``
    whose output NNCF quantizes (the input of ``c2``), as transformers do with sequence
    lengths."""

    def __init__(self, extra_op_when_traced: bool = False) -> None:
        super().__init__()
        self.extra_op_when_traced = extra_op_when_traced
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        area = x.shape[-1] * x.shape[-2]
        if self.extra_op_when_traced and torch.jit.is_tracing():
            x = x * 1.0  # a float operation eager mode does not run
        y = torch.relu(self.c1(x)) * 0.5
        y = torch.relu(self.c2(y))
        return self.fc(y.sum((2, 3)) / area)


def _quantized(model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    config = nc.QuantizationConfig(precision=nc.PrecisionConfig(8, 8), algorithms=(), subset_size=16)
    return nc.quantize(model.eval(), nncf.Dataset([x]), config), x


def test_integer_arithmetic_of_the_trace_does_not_move_the_quantizers(tmp_path):
    q, x = _quantized(ShapeArithmetic())
    nc.export_openvino(q, x[:2], tmp_path / "m.xml")
    ir = compile_ir(tmp_path / "m.xml")
    with torch.no_grad():
        expected = q(x).numpy()
    np.testing.assert_allclose(ir(x.numpy())[0], expected, atol=1e-5)


def test_a_trace_that_runs_other_operations_is_refused(tmp_path):
    q, x = _quantized(ShapeArithmetic(extra_op_when_traced=True))
    with pytest.raises(RuntimeError, match="runs other operations than eager mode: quantizer call"):
        nc.export_openvino(q, x[:2], tmp_path / "m.xml")
    assert not (tmp_path / "m.xml").exists()

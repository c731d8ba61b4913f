import torch

from nncf_calibtip.zoo import experiment


def test_measure_scores_each_ir_and_its_agreement_with_the_fp32_row(tmp_path):
    torch.manual_seed(0)
    fp = torch.nn.Linear(6, 4).eval()
    other = torch.nn.Linear(6, 4).eval()
    with torch.no_grad():
        other.weight.copy_(fp.weight + 0.3 * torch.randn_like(fp.weight))
        other.bias.copy_(fp.bias)
    x = torch.randn(400, 6)
    with torch.no_grad():
        p_fp, p_other = fp(x).argmax(1).numpy(), other(x).argmax(1).numpy()
    y = p_fp.copy()
    y[:50] = (y[:50] + 1) % 4  # labels the FP model gets wrong
    assert 0.5 < (p_other == p_fp).mean() < 0.99
    entries = [
        {"method": "FP32", "xml": experiment.export_fp32(fp, x[:1], tmp_path / "fp.xml")},
        {"method": "other", "weight_bits": 4, "xml": experiment.export_fp32(other, x[:1], tmp_path / "o.xml")},
    ]
    rows = experiment.measure(entries, x.numpy(), y, latency_rounds=1)
    assert rows[0].accuracy == (p_fp == y).mean() and rows[0].fp32_agreement == 1.0
    assert rows[1].accuracy == round((p_other == y).mean(), 5)
    assert rows[1].fp32_agreement == round((p_other == p_fp).mean(), 5)
    assert "fp32_agreement" in rows[1].public()
    table = experiment.table(rows, baseline=rows[0].accuracy)
    assert f"| {100 * rows[1].fp32_agreement:.2f} |" in table.splitlines()[3]
    no_fp32 = experiment.measure(entries[1:], x.numpy(), y, latency_rounds=1)
    assert no_fp32[0].fp32_agreement is None

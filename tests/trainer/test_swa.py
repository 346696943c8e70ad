import pytest
import torch
from torch import nn

from jepatune.trainer.swa import WeightAverage


def test_ema_arithmetic():
    m = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    avg = WeightAverage(m, decay=0.995)
    with torch.no_grad():
        m.weight.fill_(3.0)
    avg.update(m)
    assert avg.averaged_state(m)["weight"][0, 0].item() == pytest.approx(0.995 * 1 + 0.005 * 3)
    avg.update(m)
    assert avg.averaged_state(m)["weight"][0, 0].item() == pytest.approx(3 - 2 * 0.995**2)


def test_bf16_quirk_and_fp32_shadow_fix():
    """Averaged in bf16 in place (the reference), a 0.5% step below bf16's resolution is lost;
    the fp32 shadow keeps it."""
    def run(shadow: bool) -> float:
        m = nn.Embedding(4, 8).to(torch.bfloat16)
        with torch.no_grad():
            m.weight.fill_(1.0)
        avg = WeightAverage(m, decay=0.995, fp32_shadow=shadow)
        with torch.no_grad():
            m.weight.fill_(1.5)
        for _ in range(100):
            avg.update(m)
        return avg.averaged_state(m)["weight"].float().mean().item()

    true = 1.5 - 0.5 * 0.995**100  # 1.197
    assert run(shadow=False) == pytest.approx(1.0)  # stuck at the SWA start
    assert run(shadow=True) == pytest.approx(true, abs=0.01)

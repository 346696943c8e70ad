import pytest
import torch

from jepatune.trainer.losses import epps_pulley_weights, lejepa_directions, lejepa_rows, lejepa_sigreg, varcov


def test_varcov_by_hand():
    h = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 1.0]]).reshape(1, 3, 2)
    z = h.reshape(3, 2) - h.reshape(3, 2).mean(0)
    std = z.std(0, unbiased=True)  # (2, 1)
    cov = z.T @ z / 2
    expected = torch.relu(1 - std).mean() + 0.04 * (2 * cov[0, 1] ** 2) / 2
    assert varcov(h).item() == pytest.approx(expected.item())
    assert std.tolist() == pytest.approx([2.0, 1.0])


def test_varcov_punishes_collapse():
    torch.manual_seed(0)
    healthy = torch.randn(8, 64, 16)
    collapsed = torch.randn(8, 64, 1).expand(8, 64, 16) * 0.01 + 0.001 * torch.randn(8, 64, 16)
    assert varcov(collapsed) > varcov(healthy) + 0.5


def test_epps_pulley_weights():
    t, w = epps_pulley_weights(17)
    dt = 3 / 16
    assert t[0] == 0 and t[-1] == pytest.approx(3.0)
    assert w[0].item() == pytest.approx(dt) and w[-1].item() == pytest.approx(dt * torch.exp(torch.tensor(-4.5)))
    assert w[1].item() == pytest.approx(2 * dt * torch.exp(-(t[1] ** 2) / 2).item())


def test_lejepa_sigreg_is_lower_for_a_gaussian_than_for_a_collapsed_sample():
    torch.manual_seed(0)
    d = 32
    dirs = lejepa_directions(d, 64, step=3, seed=1, device="cpu")
    assert torch.allclose(dirs.norm(dim=0), torch.ones(64))
    gaussian = torch.randn(4, 512, d)
    collapsed = torch.randn(4, 512, 1).expand(4, 512, d).clone()  # all dims equal: a 1-D line
    tiny = 0.01 * torch.randn(4, 512, d)  # shrunk towards a point
    g = lejepa_sigreg(gaussian, dirs).item()
    assert g < lejepa_sigreg(collapsed, dirs).item()
    assert g < lejepa_sigreg(tiny, dirs).item()
    assert g < 5.0  # N * (a small distance) stays O(1) for a true N(0, I) sample


def test_lejepa_randomness_is_seeded_by_the_step():
    a = lejepa_directions(8, 4, step=5, seed=0, device="cpu")
    assert torch.equal(a, lejepa_directions(8, 4, step=5, seed=0, device="cpu"))
    assert not torch.equal(a, lejepa_directions(8, 4, step=6, seed=0, device="cpu"))
    rows = lejepa_rows(100, 10, step=2, seed=0, device="cpu")
    assert rows.numel() == 10 and len(set(rows.tolist())) == 10
    assert lejepa_rows(100, 0, 2, 0, "cpu") is None and lejepa_rows(100, 200, 2, 0, "cpu") is None

"""`teacher.heat`: a selective heat (per-position temperature, a plausible set), against float64 references."""

import math

import pytest
import torch

from tsopsd.distributions import entropy_sums, keep_plausible_, row_temperatures
from tsopsd.loss import divergence_and_grad


def _reference_teacher(z0: torch.Tensor, temps: torch.Tensor, min_p: float) -> torch.Tensor:
    """log q in float64, written plainly: the original's p0; tokens below min_p * max p0 dropped; the rest at T."""
    z = z0.double()
    p0 = z.softmax(-1)
    keep = p0 >= min_p * p0.amax(-1, keepdim=True)
    return (z / temps.double()[:, None]).masked_fill(~keep, -math.inf).log_softmax(-1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("min_p", [0.0, 0.02])
def test_the_loss_heats_only_where_and_over_what_it_is_told(divergence, min_p):
    g = torch.Generator().manual_seed(0)
    zs, z0 = torch.randn(6, 50, generator=g) * 2, torch.randn(6, 50, generator=g) * 4
    heated = torch.tensor([True, False, True, True, False, False])
    temps = row_temperatures(1.8, heated)
    assert temps.tolist() == pytest.approx([1.8, 1, 1.8, 1.8, 1, 1])
    grad, stats = divergence_and_grad(zs.clone(), z0.clone(), divergence=divergence, teacher_temperature=temps[:, None],
                                      min_p=min_p, grad_scale=1.0)
    logq = _reference_teacher(z0, temps, min_p)
    q, logp = logq.exp(), zs.double().log_softmax(-1)
    p = logp.exp()
    finite = torch.where(q > 0, logq, torch.zeros_like(logq))  # 0 log 0 = 0
    if divergence == "forward_kl":
        per_token = (q * (finite - logp)).sum(-1)
        want_grad = p - q
    else:
        per_token = (p * (logp - logq)).sum(-1)
        g_ = logp - logq
        want_grad = p * (g_ - (p * g_).sum(-1, keepdim=True))
    if divergence == "reverse_kl" and min_p:  # the student has mass where the teacher has none: infinite, as it is
        assert stats.divergence > 1e3
        return
    assert stats.divergence == pytest.approx(float(per_token.sum()), rel=1e-4)
    assert stats.teacher_entropy == pytest.approx(float(-(q * finite).sum()), rel=1e-4)
    assert torch.allclose(grad.double(), want_grad, atol=1e-5)
    # the original's KL and top-1 are the unmasked original's, whatever the heat
    lse0 = z0.double().logsumexp(-1)
    kl_orig = (p * (logp - (z0.double() - lse0[:, None]))).sum()
    assert stats.kl_student_original == pytest.approx(float(kl_orig), rel=1e-4)


def test_entropy_sums_heat_only_the_heated_rows_and_their_slope_is_the_derivative():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 40, generator=g) * 3
    hidden = [torch.randn(5, 16, generator=g), torch.randn(4, 16, generator=g)]
    heated = [torch.tensor([1, 0, 0, 1, 1]).bool(), torch.tensor([0, 0, 1, 0]).bool()]
    head = lambda h: h @ w  # noqa: E731
    for min_p in (0.0, 0.01):
        h, slope, n = entropy_sums(hidden, head, 2.0, heated=heated, min_p=min_p, chunk_size=3)
        want = 0.0
        for part, mask in zip(hidden, heated):
            logq = _reference_teacher(head(part), row_temperatures(2.0, mask), min_p)
            want += float(-(logq.exp() * torch.where(logq > -math.inf, logq, 0)).sum())
        assert n == 9 and h == pytest.approx(want, rel=1e-4)
        eps = 1e-3
        up = entropy_sums(hidden, head, 2.0 + eps, heated=heated, min_p=min_p)[0]
        down = entropy_sums(hidden, head, 2.0 - eps, heated=heated, min_p=min_p)[0]
        assert slope == pytest.approx((up - down) / (2 * eps), rel=2e-2)


def test_keep_plausible_drops_the_tail_only():
    z = torch.tensor([[0.0, -1.0, -5.0, -9.0]])
    kept = keep_plausible_(z.clone() + 3.0, 0.01)  # p / p_max = 1, e^-1, e^-5 (0.0067 < 0.01), e^-9
    assert kept[0, :2].tolist() == [0.0, -1.0] and (kept[0, 2:] < -1e3).all()


def test_forking_heats_the_most_uncertain_fraction_of_the_step():
    from tsopsd.teacher import heat_masks

    class Teacher:
        @staticmethod
        def logits(h):
            return h  # hidden states are the logits here: each row's entropy is set by its spread

    g = torch.Generator().manual_seed(2)
    spreads = torch.tensor([0.1, 5.0, 0.5, 9.0, 1.0, 3.0, 0.2, 7.0, 2.0, 0.3])
    rows = torch.randn(10, 30, generator=g) * spreads[:, None]  # a larger spread: a lower entropy
    masks = heat_masks(Teacher(), [rows[:4], None, rows[4:]], 0.3, chunk_size=3)
    flat = torch.cat([masks[0], masks[2]])
    assert masks[1] is None and int(flat.sum()) == 3
    entropies = -(rows.log_softmax(-1).exp() * rows.log_softmax(-1)).sum(-1)
    assert set(flat.nonzero().flatten().tolist()) == set(entropies.topk(3).indices.tolist())

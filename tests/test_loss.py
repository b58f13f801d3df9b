"""Divergences against a plain float64 reference: values, gradients, masking, chunking."""

import math

import pytest
import torch

from tsopsd.loss import Workspace, chunked_divergence_backward, masked_divergence, token_divergence

TAU = 1.7


def reference(student, teacher, divergence, tau, beta=0.5):
    """Plain float64 per-token divergence, written independently of tsopsd.loss."""
    p = torch.softmax(student.double(), -1)
    q = torch.softmax(teacher.double() / tau, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if divergence == "forward_kl":
        return kl(q, p)
    if divergence == "reverse_kl":
        return kl(p, q)
    m = beta * q + (1 - beta) * p
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_values_and_gradients_match_float64_reference(divergence):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 5, 11, generator=g) * 2).requires_grad_()
    t = torch.randn(2, 5, 11, generator=g) * 3
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    loss = masked_divergence(s, t, mask, divergence=divergence, teacher_temperature=TAU, beta=0.3)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    per = reference(s64, t.double(), divergence, TAU, beta=0.3)
    ref = (per * mask.double()).sum() / mask.sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(s.grad.double(), s64.grad, atol=1e-6)
    assert (s.grad[~mask] == 0).all()  # masked positions get no gradient


def test_zero_at_identical_distributions_and_jsd_symmetric():
    z = torch.randn(4, 9)
    for d in ("forward_kl", "reverse_kl", "jsd"):
        assert token_divergence(z, z * TAU, divergence=d, teacher_temperature=TAU).abs().max() < 1e-6
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    ab = token_divergence(a, b, divergence="jsd", beta=0.5)
    ba = token_divergence(b, a, divergence="jsd", beta=0.5)
    assert torch.allclose(ab, ba, atol=1e-6)
    assert (ab <= math.log(2) + 1e-6).all()  # JSD is bounded by ln 2


def test_two_token_forward_kl_by_hand():
    # teacher logits (ln 4, 0) at tau=1 -> q=(0.8, 0.2); student uniform p=(0.5, 0.5)
    hand = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    got = token_divergence(torch.zeros(1, 2), torch.tensor([[math.log(4.0), 0.0]]), teacher_temperature=1.0)
    assert got.item() == pytest.approx(hand, abs=1e-6)
    # at tau=2 the teacher is (2/3, 1/3)
    hand2 = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    got2 = token_divergence(torch.zeros(1, 2), torch.tensor([[math.log(4.0), 0.0]]), teacher_temperature=2.0)
    assert got2.item() == pytest.approx(hand2, abs=1e-6)


def test_all_masked_gives_zero_not_nan():
    s = torch.randn(2, 3, 5, requires_grad=True)
    loss = masked_divergence(s, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_values_and_gradients(divergence):
    torch.manual_seed(0)
    D, V, N = 8, 37, 23
    trunk = torch.nn.Linear(6, D)
    head = torch.nn.Linear(D, V, bias=False)
    teacher_head = torch.nn.Linear(D, V, bias=False)
    x = torch.randn(N, 6)
    t_hidden = torch.randn(N, D)
    grads, stats = [], []
    shared = Workspace()  # buffers reused across chunks and calls, with rows fewer and more than before
    for chunk, ws in ((5, shared), (0, shared), (1000, None)):
        trunk.zero_grad()
        head.zero_grad()
        st = chunked_divergence_backward(trunk(x), t_hidden, head, teacher_head, normalizer=N, divergence=divergence,
                                         teacher_temperature=TAU, chunk_size=chunk, workspace=ws)
        grads.append([p.grad.clone() for p in (*trunk.parameters(), head.weight)])
        stats.append(st)
    # float64 reference for the loss and the gradients, through the same modules
    trunk64, head64, th64 = (m.double() for m in (trunk, head, teacher_head))
    trunk64.zero_grad()
    head64.zero_grad()
    ref = reference(head64(trunk64(x.double())), th64(t_hidden.double()), divergence, TAU).mean()
    ref.backward()
    ref_grads = [p.grad for p in (*trunk64.parameters(), head64.weight)]
    for st, gs in zip(stats, grads):
        assert st.divergence / N == pytest.approx(ref.item(), rel=1e-5)
        for a, b in zip(gs, ref_grads):
            assert torch.allclose(a.double(), b, atol=1e-6)
    assert stats[0].student_entropy == pytest.approx(stats[1].student_entropy, rel=1e-6)


def test_a_steps_statistics_add_each_chunks_sums_in_float64():
    """Each chunk's sums come as float32 work gives them; across chunks (and micro-batches) they add in float64, on
    the device: exactly what adding the chunks' values as Python floats gives. Added in float32, a long step's sums
    drift in their last digits, which the stop rules and pace read (a run's course then differs)."""
    from tsopsd.loss import divergence_and_grad

    torch.manual_seed(0)
    D, V, N, chunk = 8, 37, 300, 3
    head, teacher_head = torch.nn.Linear(D, V, bias=False), torch.nn.Linear(D, V, bias=False)
    hidden, t_hidden = torch.randn(N, D) * 3, torch.randn(N, D) * 3
    with torch.no_grad():
        total = chunked_divergence_backward(hidden, t_hidden, head, teacher_head, normalizer=N, divergence="forward_kl",
                                            teacher_temperature=TAU, chunk_size=chunk, backward=False)
        by_hand = [0.0] * 5
        for s in range(0, N, chunk):
            _, st = divergence_and_grad(head(hidden[s:s + chunk]), teacher_head(t_hidden[s:s + chunk]),
                                        divergence="forward_kl", teacher_temperature=TAU)
            for i, v in enumerate(st.fields()[:5]):
                by_hand[i] += float(v)
    assert total.sums().tolist()[:5] == by_hand


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_hand_gradient_equals_float64_autograd(divergence):
    from tsopsd.loss import divergence_and_grad

    g = torch.Generator().manual_seed(1)
    s = torch.randn(7, 29, generator=g) * 3
    t = torch.randn(7, 29, generator=g) * 2
    grad, stats = divergence_and_grad(s, t.clone(), divergence=divergence, teacher_temperature=TAU, beta=0.3, grad_scale=0.25)
    s64 = s.double().requires_grad_()
    per = reference(s64, t.double(), divergence, TAU, beta=0.3)
    (per.sum() * 0.25).backward()
    assert stats.divergence == pytest.approx(per.sum().item(), rel=1e-5)
    assert torch.allclose(grad.double(), s64.grad, atol=1e-6)
    p = torch.softmax(s.double(), -1)
    assert stats.student_entropy == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    q0 = torch.softmax(t.double(), -1)
    assert stats.kl_student_original == pytest.approx(float((p * (p.log() - q0.log())).sum()), rel=1e-5)
    assert stats.top1_agreement == float((s.argmax(-1) == t.argmax(-1)).sum())

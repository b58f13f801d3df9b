"""Metric maths against plain float64 references."""

import math

import pytest
import torch

from tsopsd.batch import Rollout
from tsopsd.checkpoint import load_checkpoint
from tsopsd.distributions import (
    entropy,
    kl_divergence,
    masked_mean,
    summarize_entropy,
    temperature_for_entropy,
    topk_overlap,
)
from tsopsd.lab.tiny import sharpen_
from tsopsd.metrics import distinct_n, layer_similarity, measure, score_rollout, sequence_stats
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts


def ref_entropy(z, t=1.0):
    z = [x / t for x in z]
    m = max(z)
    s = sum(math.exp(x - m) for x in z)
    p = [math.exp(x - m) / s for x in z]
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def ref_kl(zp, zq):
    def probs(z):
        m = max(z)
        e = [math.exp(x - m) for x in z]
        return [x / sum(e) for x in e]
    p, q = probs(zp), probs(zq)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_uniform_logits_give_log_v_and_one_hot_gives_zero():
    for V in (2, 7, 1000):
        assert entropy(torch.zeros(3, V)).tolist() == pytest.approx([math.log(V)] * 3, abs=1e-5)
    one_hot = torch.full((2, 50), -1e4)
    one_hot[:, 3] = 0
    assert entropy(one_hot).abs().max().item() < 1e-6


def test_entropy_and_kl_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 33, generator=g) * 3
    w = torch.randn(16, 33, generator=g) * 2
    for t in (0.5, 1.0, 1.7):
        expect = [ref_entropy(row, t) for row in z.double().tolist()]
        assert entropy(z, t).tolist() == pytest.approx(expect, abs=1e-5)
    expect = [ref_kl(a, b) for a, b in zip(z.double().tolist(), w.double().tolist())]
    assert kl_divergence(z, w).tolist() == pytest.approx(expect, abs=1e-5)


def test_two_token_kl_by_hand():
    # p = (0.5, 0.5), q = (0.8, 0.2): KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(0.8), math.log(0.2)]])
    hand = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert kl_divergence(p, q).item() == pytest.approx(hand, abs=1e-6)
    assert kl_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_topk_overlap_by_hand():
    a = torch.tensor([[5.0, 4, 3, 2, 1, 0]])
    b = torch.tensor([[5.0, 0, 4, 1, 2, 3]])  # top-3 of a: {0,1,2}; of b: {0,2,5}
    assert topk_overlap(a, b, 3).item() == pytest.approx(2 / 3)
    assert topk_overlap(a, b, 1).item() == 1.0
    assert topk_overlap(a, b, 6).item() == 1.0


def test_masked_mean_and_empty_mask_give_no_nan():
    v = torch.tensor([1.0, 2.0, 100.0])
    assert masked_mean(v, torch.tensor([True, True, False])).item() == 1.5
    assert masked_mean(v, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    assert summarize_entropy(torch.zeros(0))["mean"] == 0.0


def test_entropy_summary_quantiles_and_top20():
    v = torch.arange(10, dtype=torch.float32)
    s = summarize_entropy(v)
    assert s["mean"] == pytest.approx(4.5)
    assert s["p50"] == pytest.approx(4.5)
    assert s["p10"] == pytest.approx(0.9)
    assert s["top20_mean"] == pytest.approx(8.5)  # the two highest: 9 and 8


def test_distinct_and_sequence_stats_by_hand():
    assert distinct_n([[1, 2, 1], [1, 2]], 1) == pytest.approx(2 / 5)
    assert distinct_n([[1, 2, 1], [1, 2]], 2) == pytest.approx(2 / 3)  # (1,2),(2,1),(1,2)
    ids = torch.tensor([[9, 1, 2, 0], [9, 1, 2, 0], [9, 3, 0, 7], [9, 4, 5, 6]])
    cm = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    r = Rollout(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=cm,
                prompt_lengths=torch.ones(4), prompt_index=torch.tensor([0, 0, 1, 1]),
                sample_logprobs=torch.zeros(4, 4), prompt_width=1)
    s = sequence_stats(r, eos_ids=[0])
    assert s["response_length"] == pytest.approx(11 / 4)
    assert s["unique_completion_rate"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert s["distinct_1"] == pytest.approx((2 / 4 + 4 / 4) / 2)  # EOS is not content


def test_temperature_for_entropy_inverts_entropy():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 12, generator=g) * 4
    head = lambda h: h  # noqa: E731 - identity head: the hidden states are the logits
    target = sum(ref_entropy(r, 1.8) for r in hidden.double().tolist()) / 40
    assert temperature_for_entropy(hidden, head, target) == pytest.approx(1.8, rel=1e-3)
    assert temperature_for_entropy(hidden, head, math.log(12) + 0.1) is None


@pytest.fixture(scope="module")
def rollout_and_model(ckpt):
    ck = load_checkpoint(ckpt, device="cpu")
    tok = ck.tokenizer
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in ["the cat", "one two three four"]]
    r = sample_rollouts(ck.model, tok, prompts, samples_per_prompt=3, max_new_tokens=10, seed=0)
    return ck, r


def test_scores_use_completion_tokens_only(rollout_and_model):
    ck, r = rollout_and_model
    base = score_rollout(ck.model, r)
    assert base["tokens"] == int(r.completion_mask.sum())
    # Changing tokens at masked positions (the pad area) and prompts' padding never changes the result...
    r2 = Rollout(**r.__dict__)
    r2.input_ids = r.input_ids.clone()
    r2.input_ids[r.attention_mask == 0] = 7
    assert score_rollout(ck.model, r2)["entropy"] == pytest.approx(base["entropy"], abs=1e-5)
    # ...and the mean equals a float64 recomputation from full-sequence logits at those positions.
    with torch.no_grad():
        full = ck.model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                        position_ids=(r.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits.double()
    pred = torch.zeros_like(r.completion_mask)
    pred[:, :-1] = r.completion_mask[:, 1:]
    expect = sum(ref_entropy(row) for row in full[pred].tolist()) / int(pred.sum())
    assert base["entropy"]["mean"] == pytest.approx(expect, abs=1e-5)


def test_all_masked_batch_gives_zeros_not_nan(rollout_and_model):
    ck, r = rollout_and_model
    r2 = Rollout(**r.__dict__)
    r2.completion_mask = torch.zeros_like(r.completion_mask)
    s = score_rollout(ck.model, r2, reference=ck.model)
    assert s["tokens"] == 0
    flat = [s["entropy"]["mean"], s["top1_prob"],
            *[v for k, v in s["reference"].items() if v is not None and k != "layers"]]
    assert all(v == 0.0 for v in flat)


def test_reference_metrics_self_and_sharpened(ckpt, rollout_and_model):
    ck, r = rollout_and_model
    same = score_rollout(ck.model, r, reference=ck.model)["reference"]
    assert same["kl_model_ref"] == pytest.approx(0, abs=1e-6)
    assert same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0
    assert same["effective_temperature"] == pytest.approx(1.0, rel=1e-3)
    # A reference whose logits are 2x the model's has, at T=2, exactly the model's distribution.
    sharp = load_checkpoint(ckpt, device="cpu").model
    sharpen_(sharp, 2.0)
    other = score_rollout(ck.model, r, reference=sharp)["reference"]
    assert other["effective_temperature"] == pytest.approx(2.0, rel=1e-3)
    assert other["top1_agreement"] == 1.0  # scaling logits never changes the argmax
    assert other["kl_model_ref"] > 0.01


def test_measure_end_to_end_fields(rollout_and_model):
    ck, _ = rollout_and_model
    prompts = [Prompt("x", tuple(ck.tokenizer("the cat")["input_ids"]))]
    m = measure(ck.model, ck.tokenizer, prompts, samples_per_prompt=4, max_new_tokens=8, temperature=0.7)
    for key in ("entropy", "entropy_at_sampling_temperature", "top1_prob", "response_length", "distinct_1",
                "distinct_2", "unique_completion_rate", "tokens"):
        assert key in m
    assert m["entropy_at_sampling_temperature"] < m["entropy"]["mean"]  # T<1 sharpens


# ---- per-layer similarity to a reference -------------------------------------------------------------

def ref_cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def ref_cka(xs, ys):
    """Linear CKA by its HSIC definition: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), H = I - 11'/n."""
    n = len(xs)
    gram = lambda rows: [[sum(a * b for a, b in zip(r, s)) for s in rows] for r in rows]  # noqa: E731
    centre = lambda k: [[k[i][j] - sum(k[i]) / n - sum(r[j] for r in k) / n + sum(map(sum, k)) / n ** 2  # noqa: E731
                         for j in range(n)] for i in range(n)]
    k, m = centre(gram(xs)), centre(gram(ys))
    hsic = lambda p, q: sum(p[i][j] * q[i][j] for i in range(n) for j in range(n))  # noqa: E731
    return hsic(k, m) / math.sqrt(hsic(k, k) * hsic(m, m))


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_layer_states_are_each_layers_output_at_the_final_position(ckpts, arch):
    """The hooks record what `output_hidden_states` gives for every layer but the last (whose entry there
    is after the final norm), at each row's last real token."""
    from tsopsd.scoring import completion_hidden, final_positions

    ck = load_checkpoint(ckpts[arch], device="cpu")
    prompts = [Prompt(t, tuple(ck.tokenizer(t)["input_ids"])) for t in ["the cat", "one two three four five"]]
    r = sample_rollouts(ck.model, ck.tokenizer, prompts, samples_per_prompt=3, max_new_tokens=6, seed=1)
    states = []
    completion_hidden(ck.model, r, micro_batch=4, layer_states=states)
    states = torch.cat(states)
    assert states.shape[:2] == (6, 2)
    with torch.no_grad():
        out = ck.model(input_ids=r.input_ids, attention_mask=r.attention_mask, output_hidden_states=True,
                       position_ids=(r.attention_mask.cumsum(-1) - 1).clamp_min(0))
    last = [max(j for j in range(r.attention_mask.shape[1]) if r.attention_mask[i, j]) for i in range(6)]
    assert final_positions(r.attention_mask).tolist() == last
    expect = torch.stack([out.hidden_states[1][i, j] for i, j in enumerate(last)])
    assert torch.allclose(states[:, 0], expect, atol=1e-5)


def test_layer_similarity_matches_plain_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 5, generator=g)
    y = x + 0.7 * torch.randn(7, 3, 5, generator=g)
    got = layer_similarity(x, y)
    for layer in range(3):
        a, b = x[:, layer].double().tolist(), y[:, layer].double().tolist()
        assert got["cosine"][layer] == pytest.approx(sum(ref_cosine(u, v) for u, v in zip(a, b)) / 7, abs=1e-12)
        assert got["linear_cka"][layer] == pytest.approx(ref_cka(a, b), abs=1e-12)
    # CKA is blind to rotation and scale; cosine is not.
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    turned = layer_similarity(x.double(), 3 * x.double() @ q)
    assert turned["linear_cka"] == pytest.approx([1.0] * 3, abs=1e-12)
    assert max(turned["cosine"]) < 0.99
    assert layer_similarity(x[:1], x[:1])["linear_cka"] == [None] * 3  # one sequence: nothing to compare across
    assert layer_similarity(x, x[:, :2]) is None


def test_layer_similarity_is_one_for_the_same_model_and_shows_the_perturbed_layer(ckpt, rollout_and_model):
    ck, r = rollout_and_model
    same = score_rollout(ck.model, r, reference=ck.model)["reference"]["layers"]
    assert same["cosine"] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert same["linear_cka"] == pytest.approx([1.0, 1.0], abs=1e-9)
    for hit in (0, 1):
        other = load_checkpoint(ckpt, device="cpu").model
        with torch.no_grad():
            layer = other.model.layers[hit]
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight) * 0.5)
        got = score_rollout(ck.model, r, reference=other)["reference"]["layers"]
        for i in range(2):
            if i < hit:  # layers before the perturbed one see exactly the same inputs
                assert got["cosine"][i] == pytest.approx(1.0, abs=1e-9)
                assert got["linear_cka"][i] == pytest.approx(1.0, abs=1e-9)
            else:
                assert got["cosine"][i] < 0.999 and got["linear_cka"][i] < 0.999


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_entropy_quantiles_equal_torch_quantile(n):
    """The summary's quantiles (sort and interpolate, no data-dependent op) equal torch.quantile's, in float64."""
    v = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3
    want = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    s = summarize_entropy(v)
    assert [s["p10"], s["p50"], s["p90"]] == pytest.approx(want.tolist(), rel=1e-12, abs=1e-15)

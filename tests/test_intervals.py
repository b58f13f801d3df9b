"""Intervals of measured entropies, on a model whose true mean entropy is known exactly.

The model is a real Llama checkpoint whose one layer adds nothing (its attention output and MLP output
projections are zero): its next-token distribution depends on the current token only, a Markov chain
whose expected entropy per completion token is computed exactly, in float64, from its weights.
"""

import math

import pytest
import torch

from tsopsd.intervals import prompt_interval, ratio_interval, relative_half_width
from tsopsd.metrics import measure, score_rollout
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts

MAX_NEW = 16
TEXTS = ["the cat", "one two", "red blue green", "sum of", "what is", "give me a", "nine ten", "rhymes with"]


@pytest.fixture(scope="module")
def markov():
    from transformers import AutoModelForCausalLM

    from tsopsd.lab.tiny import build_tokenizer, model_config

    tok = build_tokenizer()
    tok.pad_token = tok.eos_token  # as load_checkpoint leaves a tokenizer without a pad token
    cfg = model_config("llama", len(tok), hidden=64, layers=1, heads=4, eos_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.requires_grad_(False)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb = torch.randn(len(tok), 64)
        emb[:, 0] = 3.0  # a component every token shares: the EOS logit reads it
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.randn(len(tok), 64) * 0.6
        head[:, 0] = 0
        head[tok.eos_token_id] = 0
        head[tok.eos_token_id, 0] = 4.0  # EOS ~15% a step: completions of ~7 tokens, many cut at MAX_NEW
        model.lm_head.weight.copy_(head)
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in TEXTS]
    return model, tok, prompts


def exact_mean_entropy(model, tok, prompts) -> float:
    """sum over prompts of E[entropy summed over a completion] / sum of E[completion length], in float64:
    the value a measurement's mean tends to as samples per prompt grow."""
    e = model.model.embed_tokens.weight.double()
    x = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * model.model.norm.weight.double()
    logp = (x @ model.lm_head.weight.double().T).log_softmax(-1)  # row s: the next token's law after token s
    p = logp.exp()
    h = -(p * logp).sum(-1)
    go_on = p.clone()
    go_on[:, tok.eos_token_id] = 0  # a completion that sampled EOS has ended
    total_h = total_n = 0.0
    for prompt in prompts:
        alive = torch.zeros(p.shape[0], dtype=torch.float64)
        alive[prompt.ids[-1]] = 1.0  # the state that draws completion token t (its previous token)
        for _ in range(MAX_NEW):
            total_h += float(alive @ h)
            total_n += float(alive.sum())
            alive = alive @ go_on
    return total_h / total_n


def test_the_model_is_the_markov_chain_the_reference_computes(markov):
    model, tok, _ = markov
    ids = torch.arange(len(tok))[:, None]
    with torch.no_grad():
        got = model(input_ids=ids).logits[:, 0].double().log_softmax(-1)
    e = model.model.embed_tokens.weight.double()
    x = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * model.model.norm.weight.double()
    want = (x @ model.lm_head.weight.double().T).log_softmax(-1)
    assert (got - want).abs().max() < 1e-4


def test_intervals_cover_the_exact_mean_entropy_in_at_least_90_percent_of_draws(markov):
    """100 independent measurements of 8 prompts x 4 samples: the exact mean lies inside >= 90 of the intervals."""
    model, tok, prompts = markov
    truth = exact_mean_entropy(model, tok, prompts)
    draws, k = 100, 4
    rollout = sample_rollouts(model, tok, prompts, samples_per_prompt=draws * k, max_new_tokens=MAX_NEW, seed=3,
                              batch_size=256)
    s = score_rollout(model, rollout, micro_batch=256, per_sample=True)["per_sample"]
    pooled = float(s["entropy"].sum() / s["tokens"].sum())
    assert abs(pooled - truth) < 0.02 * truth  # 3,200 completions agree with the exact value
    draw = torch.arange(s["prompt"].numel()) % draws  # each prompt's samples dealt to the 100 draws, k each
    covered, widths = 0, []
    for d in range(draws):
        mine = draw == d
        lo, hi = ratio_interval(s["entropy"][mine], s["tokens"][mine], s["prompt"][mine], seed=d)
        covered += lo <= truth <= hi
        widths.append((hi - lo) / 2 / truth)
    print(f"exact {truth:.4f}, pooled {pooled:.4f}: covered {covered}/{draws}, median half-width "
          f"{sorted(widths)[draws // 2]:.1%}")
    assert covered >= 90
    assert sorted(widths)[draws // 2] < 0.5  # and informative: not covering by being enormous


def test_ratio_interval_against_a_plain_two_stage_bootstrap():
    """The vectorized redraws equal a loop over redraws written out plainly (same uniforms)."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    sums = torch.rand(9, generator=g, dtype=torch.float64) * 10
    counts = torch.randint(1, 6, (9,), generator=g).double()
    lo, hi = ratio_interval(sums, counts, prompt, seed=5, reps=50)
    groups = [[i for i in range(9) if prompt[i] == p] for p in range(3)]
    g = torch.Generator().manual_seed(5)
    stats = []
    P, K = 3, 4
    firsts = torch.randint(P, (50, P), generator=g)
    within = torch.rand(50, P, K, generator=g, dtype=torch.float64)
    for b in range(50):
        num = den = 0.0
        for j in range(P):
            members = groups[int(firsts[b, j])]
            for slot in range(len(members)):
                i = members[int(within[b, j, slot] * len(members))]
                num, den = num + float(sums[i]), den + float(counts[i])
        stats.append(num / den)
    stats.sort()

    def q(p):
        x = p * (len(stats) - 1)
        i = math.floor(x)
        return stats[i] + (stats[min(i + 1, len(stats) - 1)] - stats[i]) * (x - i)

    assert lo == pytest.approx(q(0.025), abs=1e-12) and hi == pytest.approx(q(0.975), abs=1e-12)


def test_prompt_interval_and_degenerate_cases():
    assert prompt_interval(torch.tensor([0.5, 0.5, 0.5])) == (0.5, 0.5)
    lo, hi = prompt_interval(torch.tensor([0.0, 1.0] * 20))
    assert 0.3 < lo < 0.5 < hi < 0.7
    assert ratio_interval(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long)) is None
    assert relative_half_width(0.0, (0.0, 1.0)) == math.inf


def test_measure_reports_the_interval_of_its_own_samples(markov):
    model, tok, prompts = markov
    r = measure(model, tok, prompts, samples_per_prompt=4, max_new_tokens=MAX_NEW, seed=2)
    lo, hi = r["intervals"]["entropy"]
    assert lo < r["entropy"]["mean"] < hi
    for key in ("distinct_1", "distinct_2", "unique_completion_rate"):
        lo_k, hi_k = r["intervals"][key]
        assert lo_k <= r[key] <= hi_k
    assert r["samples"] == 32 and r["rounds"] == 1 and r["precision"]["asked"] is None


def test_precision_samples_in_rounds_until_the_interval_is_narrow_enough(markov):
    model, tok, prompts = markov
    # 8 prompts whose entropies differ: their spread alone keeps the interval near +-7% however many samples
    r = measure(model, tok, prompts, samples_per_prompt=2, max_new_tokens=MAX_NEW, seed=2, precision=0.09,
                max_samples_per_prompt=200)
    assert r["rounds"] > 1 and r["precision"]["relative_half_width"] <= 0.09
    assert r["precision"]["outcome"].startswith("reached")
    lo, hi = r["intervals"]["entropy"]
    assert (hi - lo) / 2 <= 0.09 * r["entropy"]["mean"]
    assert lo <= exact_mean_entropy(model, tok, prompts) <= hi
    capped = measure(model, tok, prompts, samples_per_prompt=2, max_new_tokens=MAX_NEW, seed=2, precision=0.001,
                     max_samples_per_prompt=6)
    assert capped["precision"]["outcome"].startswith("stopped at the cap of 6 samples per prompt")
    assert capped["samples"] == 6 * len(prompts) and capped["precision"]["relative_half_width"] > 0.001


def test_precision_draws_new_prompts_from_a_pool_before_more_samples(markov):
    model, tok, prompts = markov
    r = measure(model, tok, prompts, samples_per_prompt=2, max_new_tokens=MAX_NEW, seed=2, precision=0.09,
                max_samples_per_prompt=200, first_prompts=2)
    assert r["prompts"] == len(prompts) and r["rounds"] > 1
    one = measure(model, tok, prompts, samples_per_prompt=2, max_new_tokens=MAX_NEW, seed=2, precision=0.9,
                  first_prompts=2)
    assert one["prompts"] == 2 and one["rounds"] == 1  # precise enough at once: the pool is not touched

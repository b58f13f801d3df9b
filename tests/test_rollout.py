import math
from types import SimpleNamespace

import pytest
import torch

from tsopsd.batch import completion_targets
from tsopsd.checkpoint import load_checkpoint
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts
from tsopsd.scoring import completion_hidden, head_logits

EOS, PAD, V = 0, 11, 12


class MockLM(torch.nn.Module):
    """Uniform over tokens 1..9; after a 9 it must emit EOS. Never emits PAD or 10."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        B, T = input_ids.shape
        logits = torch.full((B, T, V), float("-inf"))
        logits[..., 1:10] = 0.0
        forced = input_ids == 9
        logits[forced] = float("-inf")
        logits[..., EOS] = torch.where(forced, 0.0, float("-inf"))
        return SimpleNamespace(logits=logits[:, -1:] if logits_to_keep == 1 else logits)


def test_masks_cover_completion_up_to_eos_and_nothing_else():
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    prompts = [Prompt("a", (3, 4)), Prompt("b", (5, 6, 7, 8, 2)), Prompt("c", (1,))]
    r = sample_rollouts(MockLM(), tok, prompts, samples_per_prompt=3, max_new_tokens=12, batch_size=4, seed=0)
    assert r.input_ids.shape[0] == 9 and r.prompt_width == 5
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.prompt_lengths.tolist() == [2, 2, 2, 5, 5, 5, 1, 1, 1]
    saw_eos = saw_cap = False
    for row in range(9):
        n = r.prompt_lengths[row].item()
        ids, cm, am = r.input_ids[row], r.completion_mask[row], r.attention_mask[row]
        # prompt: left-padded, attended, never in the completion mask
        assert ids[5 - n:5].tolist() == list(prompts[row // 3].ids)
        assert am[:5].tolist() == [0] * (5 - n) + [1] * n
        assert not cm[:5].any()
        comp = ids[5:].tolist()
        mask = cm[5:].tolist()
        if EOS in comp:
            saw_eos = True
            end = comp.index(EOS)
            assert comp[end - 1] == 9  # the mock only stops after a 9
            assert mask == [True] * (end + 1) + [False] * (len(comp) - end - 1)
            assert all(t == PAD for t in comp[end + 1:])  # after EOS: padding
        else:
            saw_cap = True
            assert all(mask) and len(comp) == 12
        assert am[5:].bool().tolist() == mask
        # uniform over 9 tokens, EOS forced with probability 1
        lp = r.sample_logprobs[row, 5:][cm[5:]]
        expect = [0.0 if t == EOS else -math.log(9) for t in ids[5:][cm[5:]].tolist()]
        assert torch.allclose(lp, torch.tensor(expect), atol=1e-6)
        assert (r.sample_logprobs[row][~cm] == 0).all()
    assert saw_eos  # the seed gives both kinds of rows; the test would be vacuous otherwise
    assert saw_cap  # (seed 0 gives both; with neither kind the checks above would be vacuous)


def test_same_seed_same_rollout_other_seed_differs():
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    prompts = [Prompt("a", (3, 4))]
    a = sample_rollouts(MockLM(), tok, prompts, samples_per_prompt=4, max_new_tokens=8, seed=1)
    b = sample_rollouts(MockLM(), tok, prompts, samples_per_prompt=4, max_new_tokens=8, seed=1)
    c = sample_rollouts(MockLM(), tok, prompts, samples_per_prompt=4, max_new_tokens=8, seed=2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_greedy_picks_argmax():
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    r = sample_rollouts(MockLM(), tok, [Prompt("a", (3,))], max_new_tokens=6, temperature=0)
    assert r.completions() == [[1] * 6]  # ties break to the first maximum; 9 (then EOS) never comes


def test_suppressed_eos_gives_fixed_length(ckpt):
    ck = load_checkpoint(ckpt, device="cpu")
    eos = ck.tokenizer.eos_token_id
    with torch.no_grad():
        ck.model.lm_head.weight[eos].zero_()  # EOS logit 0: likely enough to appear in 64 tokens
    prompts = [Prompt("x", (5, 6))]
    free = sample_rollouts(ck.model, ck.tokenizer, prompts, samples_per_prompt=8, max_new_tokens=64, seed=0)
    fixed = sample_rollouts(ck.model, ck.tokenizer, prompts, samples_per_prompt=8, max_new_tokens=64, seed=0,
                            suppress_eos=True)
    assert fixed.completion_lengths.tolist() == [64] * 8
    assert all(eos not in c for c in fixed.completions())
    assert free.completion_lengths.tolist() != [64] * 8


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "qwen3"])
def test_rescoring_equals_sampling_logprobs(ckpts, arch):
    """One left-padded forward pass reproduces the log-probs seen while sampling (fp32, 1e-4)."""
    ck = load_checkpoint(ckpts[arch], device="cpu")
    tok = ck.tokenizer
    texts = ["the cat", "one two three four five six seven eight nine", "a red dog sat on the mat"]
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in texts]
    assert len({len(p.ids) for p in prompts}) == 3  # different prompt lengths in one batch
    r = sample_rollouts(ck.model, tok, prompts, samples_per_prompt=2, max_new_tokens=20, batch_size=6, seed=0)
    with torch.no_grad():
        hidden = completion_hidden(ck.model, r)
        logits = head_logits(ck.model, hidden)
        rescored = logits.log_softmax(-1).gather(-1, completion_targets(r)[:, None]).squeeze(-1)
        # and the chunked head equals the model's own forward logits
        full = ck.model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                        position_ids=(r.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits
        mask = torch.zeros_like(r.completion_mask)
        mask[:, :-1] = r.completion_mask[:, 1:]
    sampled = r.sample_logprobs[r.completion_mask]
    assert rescored.shape == sampled.shape and rescored.numel() > 20
    assert (rescored - sampled).abs().max().item() < 1e-4
    assert torch.allclose(full[mask].float(), logits, atol=1e-4)


def test_sampler_draws_from_the_distribution():
    """The inverse-CDF sampler's frequencies match softmax(logits / T) (chi-square-sized tolerance)."""
    from tsopsd.sampling import sample_next, uniforms

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    g = uniforms(0, torch.arange(20000), 3)  # the counter-based draws: uniform enough for the sampler
    for t in (1.0, 0.5):
        draws = sample_next(logits.clone(), t, 1.0, 0, g)
        freq = torch.bincount(draws, minlength=5).double() / len(draws)
        expect = torch.softmax(logits[0].double() / t, -1)
        assert (freq - expect).abs().max() < 0.012, (freq, expect)
    # top-k keeps only the k best; top-p keeps the smallest prefix reaching p
    assert set(sample_next(logits.clone(), 1.0, 1.0, 2, g).tolist()) == {0, 1}
    assert set(sample_next(logits.clone(), 1.0, 0.5, 0, g).tolist()) == {0}


def long_tail(path, stops=40):
    """A tiny Qwen3 whose completions end by a natural EOS at widely spread lengths: near-uniform next-token
    logits (the sharpening undone) and `stops` stop ids, so each token ends the row with probability ~stops/V."""
    ck = load_checkpoint(path, device="cpu")
    with torch.no_grad():
        ck.model.model.norm.weight.div_(8.0)
    ck.model.generation_config.eos_token_id = list(range(1, stops + 1))
    return ck


def _rows(r):
    return [(ids, lp) for ids, lp in zip(r.input_ids.tolist(), r.sample_logprobs)]


def test_continuous_batching_samples_what_one_row_at_a_time_samples(ckpts):
    """Slots refilled as rows end (4 slots, 15 rows) draw the same tokens as rows sampled one by one through
    the model's own forward, and as static batches: a row's draws depend on the seed, its index and its step."""
    ck = long_tail(ckpts["qwen3"])
    tok = ck.tokenizer
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in ("the cat", "one two three four", "a", "red dog sat",
                                                                "give me a number now please")]
    kw = dict(samples_per_prompt=3, max_new_tokens=30, seed=7)
    slots = sample_rollouts(ck.model, tok, prompts, batch_size=4, **kw)
    lengths = slots.completion_lengths.tolist()
    assert len(set(lengths)) >= 5 and min(lengths) < 10 and max(lengths) > 20, lengths  # a real spread
    one_by_one = sample_rollouts(ck.model, tok, prompts, batch_size=1, engine="model", **kw)
    static = sample_rollouts(ck.model, tok, prompts, batch_size=4, continuous=False, **kw)
    single_slot = sample_rollouts(ck.model, tok, prompts, batch_size=1, **kw)
    for other in (one_by_one, static, single_slot):
        assert torch.equal(slots.input_ids, other.input_ids) and torch.equal(slots.completion_mask, other.completion_mask)
        assert torch.allclose(slots.sample_logprobs, other.sample_logprobs, atol=1e-4)


def test_ranks_draw_the_rows_one_process_draws_for_any_batch_size(ckpts):
    """Rows [0, 6) on one rank and [6, 15) on another (row_offset), any batch sizes = one process, any batch."""
    ck = long_tail(ckpts["qwen3"])
    tok = ck.tokenizer
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in ("the cat", "one two", "a", "red dog sat", "give me")]
    kw = dict(samples_per_prompt=3, max_new_tokens=24, seed=3)
    whole = sample_rollouts(ck.model, tok, prompts, batch_size=5, **kw)
    for b0, b1, continuous in ((2, 3, True), (6, 1, True), (1, 9, True), (4, 2, False)):  # False: lock-step (FSDP)
        rank0 = sample_rollouts(ck.model, tok, prompts[:2], batch_size=b0, continuous=continuous, **kw)
        rank1 = sample_rollouts(ck.model, tok, prompts[2:], batch_size=b1, row_offset=6, continuous=continuous, **kw)
        assert whole.completions() == rank0.completions() + rank1.completions(), (b0, b1, continuous)

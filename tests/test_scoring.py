"""Shared prompt prefixes: each prompt run once for its k samples gives the unshared pass's hidden states
and gradients (float64 models, four architectures, full and LoRA).

The models are float64 but transformers' RMSNorm/LayerNorm compute in float32 inside, so the two
passes, which sum the k samples' gradients in different places, agree to float32 rounding: 1e-6 of
each tensor's norm (measured: 1e-7; the prompt keys detached from the graph give 2e-3 to 0.2).
"""

import dataclasses

import pytest
import torch

from tsopsd.checkpoint import load_checkpoint
from tsopsd.prompts import load_prompts
from tsopsd.rollout import sample_rollouts
from tsopsd.scoring import completion_hidden

ARCHS = ("gpt2", "llama", "qwen2", "qwen3")


def _rollout(folder, prompts_file, k=3):
    ck = load_checkpoint(folder, device="cpu")
    model, tok = ck.model, ck.tokenizer
    prompts = load_prompts(prompts_file, tok)[:4]  # different lengths: left padding inside the shared pass
    assert len({len(p.ids) for p in prompts}) > 1
    r = sample_rollouts(model, tok, prompts, samples_per_prompt=k, max_new_tokens=7, seed=3)
    for i in range(0, r.input_ids.shape[0], 2):  # right padding too: every other row ends early
        end = r.prompt_width + 1 + i % 5
        r.completion_mask[i, end:], r.attention_mask[i, end:], r.input_ids[i, end:] = False, 0, tok.pad_token_id
    return model.double(), r


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return float((a - b).norm()) <= rel * float(b.norm())


def _loss_and_grads(model, rollout, share, micro_batch=None):
    model.zero_grad()
    h = completion_hidden(model, rollout, share_prompts=share, micro_batch=micro_batch)
    w = torch.linspace(-1, 1, h.numel(), dtype=h.dtype).reshape(h.shape)  # a loss that weighs every value
    (h * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompts_equal_the_unshared_pass(arch, ckpts, prompts_file):
    model, r = _rollout(ckpts[arch], prompts_file)
    h0, g0 = _loss_and_grads(model, r, share=False)
    for micro_batch in (None, 5):  # 5: a prompt's rows split across micro-batches
        h1, g1 = _loss_and_grads(model, r, share=True, micro_batch=micro_batch)
        assert h1.shape == h0.shape and close(h1, h0), (h1 - h0).abs().max()
        assert g1.keys() == g0.keys() and len(g0) > 5
        for n in g0:
            assert close(g1[n], g0[n]), (n, float((g1[n] - g0[n]).norm() / g0[n].norm()))


def test_shared_prompts_with_lora_and_without_grad(ckpts, prompts_file):
    from peft import LoraConfig, get_peft_model

    model, r = _rollout(ckpts["qwen3"], prompts_file)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    h0, g0 = _loss_and_grads(lora, r, share=False)
    h1, g1 = _loss_and_grads(lora, r, share=True)
    assert close(h1, h0)
    assert {n for n in g0} == {n for n in g1} and all("lora_" in n for n in g0)
    assert all(close(g1[n], g0[n]) for n in g0)
    with torch.no_grad(), lora.disable_adapter():  # the teacher's pass
        assert close(completion_hidden(lora, r), completion_hidden(lora, r, share_prompts=False))


def test_micro_batches_run_only_the_columns_their_rows_use(ckpts, prompts_file):
    """Rows of very different lengths: each micro-batch is trimmed to its own rows' columns; hidden states
    and gradients equal each row run alone (no padding at all), in float64."""
    model, r = _rollout(ckpts["qwen3"], prompts_file, k=2)
    r.completion_mask[:4, r.prompt_width + 2:] = False  # the first micro-batch's rows are short
    r.attention_mask[:4, r.prompt_width + 2:] = 0
    part = r.rows(0, 4).trimmed()
    assert part.input_ids.shape[1] < r.input_ids.shape[1] and part.prompt_width <= r.prompt_width
    assert torch.equal(part.input_ids[part.attention_mask.bool()], r.rows(0, 4).input_ids[r.rows(0, 4).attention_mask.bool()])
    h0, g0 = _loss_and_grads(model, r, share=False, micro_batch=4)
    alone = [_loss_and_grads(model, r.rows(i, i + 1), share=False)[0] for i in range(r.input_ids.shape[0])]
    assert close(h0, torch.cat(alone))
    full = dataclasses.replace(r)  # the untrimmed pass: every micro-batch as wide as the whole step
    from tsopsd import batch

    orig = batch.Rollout.trimmed
    try:
        batch.Rollout.trimmed = lambda self: self
        h1, g1 = _loss_and_grads(model, full, share=False, micro_batch=4)
    finally:
        batch.Rollout.trimmed = orig
    assert close(h1, h0) and all(close(g1[n], g0[n]) for n in g0)


def test_grouped_kv_heads_on_cpu_are_not_repeated_and_change_nothing(ckpts, prompts_file, monkeypatch):
    """On CPU the passes hand transformers' SDPA a grouped-query model's key/value heads as they are
    (`family.grouped_kv_attention`): no `repeat_kv` copy in the prefill, the teacher's or the student's
    pass, and the same hidden states, gradients and sampled tokens as with the heads repeated."""
    import os

    from transformers.integrations import sdpa_attention

    from tsopsd.family import grouped_kv_attention

    model, r = _rollout(ckpts["qwen3"], prompts_file)
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    repeats = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: repeats.append(n) or real(x, n))
    tok = load_checkpoint(ckpts["qwen3"], device="cpu").tokenizer
    prompts = load_prompts(prompts_file, tok)[:3]

    def run(share):
        h, g = _loss_and_grads(model, r, share=share)
        rolled = sample_rollouts(model, tok, prompts, samples_per_prompt=2, max_new_tokens=5, seed=1, engine="model")
        return h, g, rolled.input_ids

    for share in (True, False):
        repeats.clear()
        h1, g1, ids1 = run(share)
        assert repeats == [] and "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")  # the switch set off: transformers repeats them
        h0, g0, ids0 = run(share)
        monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA")
        assert repeats and set(repeats) == {cfg.num_attention_heads // cfg.num_key_value_heads}
        assert close(h1, h0) and g1.keys() == g0.keys() and all(close(g1[n], g0[n]) for n in g0)
        assert torch.equal(ids1, ids0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    ids = r.input_ids
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(ids)
    model.gradient_checkpointing_enable()
    model.train()
    for case, t in (("a GPU's fused kernels take no mask with grouped heads", ids.to("meta")),
                    ("the plan's fake tensors model a GPU run", fake),
                    ("backward recomputes the layers after the context has ended", ids)):
        with grouped_kv_attention(model, t):
            assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ, case
    with torch.no_grad(), grouped_kv_attention(model, ids):  # no backward: nothing recomputed
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"

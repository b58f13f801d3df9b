"""A decode step keeps to the device: what it reads back and copies, counted at the dispatcher, and the
addresses a CUDA graph captures (weight copies, KV cache, decode state) kept across rollouts and compaction."""

import pytest
import torch
from test_rollout import long_tail

from tsopsd import decode
from tsopsd.checkpoint import load_checkpoint
from tsopsd.lab.traffic import HostTraffic
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts


def _prompts(tok, texts):
    return [Prompt(t, tuple(tok(t)["input_ids"])) for t in texts]


def _spy(monkeypatch, traffic: HostTraffic, name: str, label: str):
    real = getattr(decode._Session, name)

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        traffic.mark(label)  # after the call: what follows it, up to the next step, is counted against it
        return out

    monkeypatch.setattr(decode._Session, name, spy)


def _kinds(events, *kinds):
    return [e for e in events if e.kind in kinds]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_lock_step_decoding_reads_the_device_only_at_its_done_checks(ckpts, monkeypatch, arch):
    """Lock-step (static batches, FSDP): between done checks a step reads nothing back and makes no tensor from
    host data; each check is one read. The tokens are those of a check at every step (the steps past the end
    are masked and cut off)."""
    ck = long_tail(ckpts[arch])
    tok = ck.tokenizer
    prompts = _prompts(tok, ["the cat", "one two three four"])
    kw = dict(samples_per_prompt=2, max_new_tokens=40, seed=4, batch_size=4, continuous=False)
    every = sample_rollouts(ck.model, tok, prompts, check_every=1, **kw)
    traffic = HostTraffic()
    _spy(monkeypatch, traffic, "step", "step")
    with traffic:
        sparse = sample_rollouts(ck.model, tok, prompts, check_every=4, **kw)
    assert torch.equal(every.input_ids, sparse.input_ids) and torch.equal(every.completion_mask, sparse.completion_mask)
    assert torch.equal(every.sample_logprobs, sparse.sample_logprobs)
    lengths = sparse.completion_lengths.tolist()
    assert max(lengths) < 40 and len(set(lengths)) > 1, lengths  # rows ended by EOS, at different steps
    steps = traffic.between("step")
    assert len(steps) == -(-max(lengths) // 4) * 4  # ran on to the check after the last row ended
    for i, events in enumerate(steps[:-1]):  # the last: the final check, then the rollout's assembly
        reads, made = _kinds(events, "read", "d2h"), _kinds(events, "from host", "h2d")
        assert made == [], (i, made)
        assert len(reads) == (1 if (i + 1) % 4 == 0 else 0), (i, reads)


def test_continuous_batching_reads_one_small_tensor_a_step(ckpts, monkeypatch):
    """Continuous batching: each step reads back one (slots,) tensor (which rows ended) and, unless it admits
    rows or compacts the batch, makes no tensor from host data."""
    ck = long_tail(ckpts["qwen3"])
    tok = ck.tokenizer
    prompts = _prompts(tok, ["the cat", "one two three four", "a", "red dog sat", "give me a number now please"])
    traffic = HostTraffic()
    _spy(monkeypatch, traffic, "step", "step")
    _spy(monkeypatch, traffic, "admit", "admit")
    _spy(monkeypatch, traffic, "keep", "keep")
    with traffic:
        sample_rollouts(ck.model, tok, prompts, samples_per_prompt=3, max_new_tokens=30, seed=7, batch_size=4)
    steps = traffic.between("step")
    quiet = [events for events in steps[:-1] if not _kinds(events, "mark")]
    assert len(quiet) > 20 and len(quiet) < len(steps) - 3  # most steps, not all: rows were admitted
    for events in quiet:
        reads = _kinds(events, "read", "d2h")
        assert len(reads) == 1 and reads[0].what == "tolist" and reads[0].nbytes <= 4, reads
        assert _kinds(events, "from host", "h2d") == []


@pytest.fixture
def kept_decoder(monkeypatch, compile_state):
    """The compiled step on, with the eager step standing in for what torch.compile would make of it: the
    decoder is kept for the model and its buffers are reused, as on a GPU, without compiling anything."""
    monkeypatch.setattr(decode, "_compile_choice", lambda setting, device: (setting == "true", "test"))
    calls = []

    def compiled(*args):
        calls.append(args[-1])
        return decode._decode_step(*args)

    monkeypatch.setattr(decode, "_compiled", {"default": compiled})
    monkeypatch.setattr(decode, "_mkldnn_ok", lambda dtype: False)  # the dense copies a GPU decodes with
    monkeypatch.setattr(decode, "_DECODERS", decode.weakref.WeakKeyDictionary())
    return calls


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft_model.eval()


def _addresses(dec: decode.LeanDecoder) -> dict[str, int]:
    out = {f"weight {i}": lin.weight.data_ptr() for i, lin in enumerate(dec.linears) if lin.owns_copy}
    out.update({name: t.data_ptr() for name, t in dec.buffers.items()})
    return out


def test_weight_copies_cache_and_state_keep_their_addresses_across_rollouts_and_compaction(ckpts, kept_decoder,
                                                                                          monkeypatch):
    """Where the compiled step is on: two rollouts of a LoRA policy whose adapter changes in place between them
    (as an optimizer step does) use one decoder; its fused, LoRA-merged weights are rewritten where they are
    and sample what a fresh decoder samples; the KV cache, the decode state and the rows' buffers never move,
    the batch shrinking at the tail included."""
    ck = long_tail(ckpts["qwen3"], stops=60)
    with torch.no_grad():  # sharper than the long tail's near-uniform logits, so that the adapter matters
        ck.model.model.norm.weight.mul_(4.0)
    model, tok = _lora(ck.model), ck.tokenizer
    prompts = _prompts(tok, ["the cat", "one two three four", "a", "red dog sat"])
    kw = dict(samples_per_prompt=3, max_new_tokens=30, seed=2, batch_size=8)
    seen: list[dict[str, int]] = []
    real_keep = decode._Session.keep

    def keep(self, slots):
        before = {i: k.data_ptr() for i, k in enumerate(self.keys)}
        real_keep(self, slots)
        seen.append({i: k.data_ptr() for i, k in enumerate(self.keys)} == before)

    monkeypatch.setattr(decode._Session, "keep", keep)
    sample_rollouts(model, tok, prompts, compile="true", **kw)
    dec = decode._DECODERS[model]
    assert dec.fused and not dec.packed and dec.persistent and kept_decoder
    assert any(lin.owns_copy and lin.parts[0][1] for lin in dec.linears)  # LoRA merged into dense copies
    where = _addresses(dec)
    assert seen and all(seen)  # compacted in place
    with torch.no_grad():  # an optimizer step on the adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    steps = len(kept_decoder)
    second = sample_rollouts(model, tok, prompts, compile="true", **kw)
    # decoded by the kept decoder (not by the model's forward: a copy that disagrees with its modules is refused)
    assert len(kept_decoder) > steps and decode._DECODERS[model] is dec
    assert _addresses(dec) == where
    decode._DECODERS.clear()
    fresh = sample_rollouts(model, tok, prompts, compile="false", **kw)  # a decoder built from scratch
    assert torch.equal(second.input_ids, fresh.input_ids)
    assert torch.allclose(second.sample_logprobs, fresh.sample_logprobs, atol=1e-5)
    lengths = second.completion_lengths.tolist()
    assert len(set(lengths)) > 3 and max(lengths) < 30, lengths  # rows end at different steps: the tail shrinks


def test_a_decoder_is_kept_only_where_the_compiled_step_is_on(ckpts, kept_decoder):
    """Eager decoding (every CPU run, `rollout.compile: false`) holds no copy or cache between rollouts."""
    ck = load_checkpoint(ckpts["qwen3"], device="cpu")
    prompts = _prompts(ck.tokenizer, ["the cat"])
    sample_rollouts(ck.model, ck.tokenizer, prompts, max_new_tokens=4, compile="false")
    assert ck.model not in decode._DECODERS
    sample_rollouts(ck.model, ck.tokenizer, prompts, max_new_tokens=4, compile="true")
    assert ck.model in decode._DECODERS

"""A decode step keeps to the device: what it reads back and copies, counted at the dispatcher, and the
addresses a CUDA graph captures (weight copies, KV cache, decode state) kept across rollouts and compaction."""

import pytest
import torch
from test_rollout import long_tail

from tsopsd import decode, onednn
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
    monkeypatch.setattr(onednn, "available", lambda dtype: False)  # the dense copies a GPU decodes with
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


def test_a_training_step_reads_the_device_per_micro_batch_not_per_chunk(ckpts):
    """The loss's statistics stay on the device as the chunks go (one read of them a step, by the caller): a step
    cut into 16x more LM-head chunks reads back exactly as often, and sums the same statistics."""
    from tsopsd.config import load_config
    from tsopsd.policy import prepare_policy
    from tsopsd.step import train_step

    ck = long_tail(ckpts["qwen3"])
    prompts = _prompts(ck.tokenizer, ["the cat", "one two three four", "a", "red dog sat"])
    rollout = sample_rollouts(ck.model, ck.tokenizer, prompts, samples_per_prompt=2, max_new_tokens=30, seed=1,
                              suppress_eos=True)
    reads, sums = {}, {}
    for chunk in (4, 64):
        cfg = load_config(None, {"train.micro_batch": 4, "loss.chunk_size": chunk}, inputs=False)
        policy = prepare_policy(load_checkpoint(ckpts["qwen3"], device="cpu").model, cfg.train)
        with HostTraffic() as traffic:
            stats = train_step(policy, rollout, tau=1.5, cfg=cfg, normalizer=float(rollout.completion_mask.sum()))
        reads[chunk] = len(_kinds(traffic.events, "read", "d2h"))
        sums[chunk] = torch.as_tensor(stats.sums())
    chunks = -(-int(rollout.completion_mask.sum()) // 4)
    assert chunks >= 32 and reads[4] == reads[64] < chunks, (chunks, reads)  # reading per chunk: 7 reads each
    assert torch.allclose(sums[4], sums[64], rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it on a lent device)")
def test_on_a_gpu_a_second_compiled_rollout_records_no_graph_and_steps_read_one_small_tensor(ckpts):
    """CUDA graphs over the whole step: the kept decoder's buffers do not move, so the second rollout replays what
    the first recorded; each of its steps copies one (slots,) flag tensor to the host and nothing to the device."""
    ck = long_tail(ckpts["qwen3"])
    model = ck.model.to("cuda", torch.bfloat16)
    prompts = _prompts(ck.tokenizer, ["the cat", "one two three four", "a", "red dog sat"])
    captures = []
    real = torch.cuda.CUDAGraph.capture_begin

    def capture_begin(self, *args, **kwargs):
        captures.append(1)
        return real(self, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_begin = capture_begin
    try:
        kw = dict(samples_per_prompt=4, max_new_tokens=40, seed=2, batch_size=8, compile="true")
        first = sample_rollouts(model, ck.tokenizer, prompts, **kw)
        recorded = len(captures)
        traffic = HostTraffic()
        real_step = decode._Session.step

        def step(self, *args, **kwargs):
            out = real_step(self, *args, **kwargs)
            traffic.mark("step")
            return out

        decode._Session.step = step
        with traffic:
            second = sample_rollouts(model, ck.tokenizer, prompts, **kw)
    finally:
        torch.cuda.CUDAGraph.capture_begin = real
        decode._Session.step = real_step
        decode.forget(model)
    assert recorded > 0 and len(captures) == recorded, (recorded, len(captures))
    assert torch.equal(first.input_ids, second.input_ids)
    quiet = [ev for ev in traffic.between("step")[:-1] if not _kinds(ev, "mark")]
    assert quiet and all(len(_kinds(ev, "read")) == 1 and not _kinds(ev, "h2d", "from host") for ev in quiet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it on a lent device)")
def test_on_a_gpu_the_step_clock_times_phases_by_events_without_synchronising(monkeypatch):
    from tsopsd.step import Clock

    syncs = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1) or real(*a))
    timings = {}
    clock = Clock(torch.device("cuda"), timings)
    x = torch.randn(4096, 4096, device="cuda")
    with clock("matmul"):
        for _ in range(20):
            x = (x @ x).tanh_()
    assert timings == {} and syncs == []  # nothing read yet
    clock.settle()
    assert timings["matmul"] > 0 and syncs == []


def test_a_forgotten_decoder_frees_its_copies_and_cache_without_waiting_for_the_gc(ckpts, kept_decoder):
    """The kept decoder's weight copies and KV cache go as soon as `forget` drops it (the loop does before the report),
    not at the garbage collector's next pass: a reference cycle would keep device memory through the report."""
    import gc
    import weakref

    ck = load_checkpoint(ckpts["qwen3"], device="cpu")
    sample_rollouts(ck.model, ck.tokenizer, _prompts(ck.tokenizer, ["the cat"]), max_new_tokens=4, compile="true")
    dec = decode._DECODERS[ck.model]
    copies = [weakref.ref(lin.weight) for lin in dec.linears if lin.owns_copy]
    cache = [weakref.ref(t) for t in dec.buffers.values()]
    assert copies and cache
    del dec
    gc.disable()
    try:
        decode.forget(ck.model)
        assert all(r() is None for r in copies + cache)
    finally:
        gc.enable()

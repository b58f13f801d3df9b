"""The lean decode step equals the model's own forward, with and without packing and LoRA."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tsopsd import decode, onednn, rollout
from tsopsd.batch import position_ids_from_mask
from tsopsd.checkpoint import load_checkpoint
from tsopsd.lab.tiny import model_config
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts
from tsopsd.sampling import Draw
from tsopsd.scoring import head_logits

LEAN_ARCHS = ("llama", "qwen2", "qwen3")


def _lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero: make the adapter do something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.eval()


def _step_by_step(model, ids, mask, new_tokens, engine):
    """Prefill a left-padded batch, then feed `new_tokens` (B, n) one column at a time; (B, n, V) logits."""
    cache = DynamicCache()
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        lean = decode.LeanDecoder.build(model, batch_size=ids.shape[0], max_length=ids.shape[1] + new_tokens.shape[1])
        if engine == "lean":
            assert lean is not None
            step = lean.session(cache, mask, capacity=ids.shape[1] + 2)  # small: the cache must grow
        pos = positions[:, -1] + 1
        out = []
        alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        for j in range(new_tokens.shape[1]):
            tok = new_tokens[:, j]
            if engine == "lean":
                out.append(step(tok, pos, alive))
            else:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out.append(model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache,
                                 use_cache=True, logits_to_keep=1).logits[:, -1].float())
            pos = pos + 1
    return torch.stack(out, 1)


def _batch(vocab, B=3, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    return ids, mask, torch.randint(1, vocab, (B, 9), generator=g)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_lean_logits_equal_the_models_forward(ckpts, arch, pack, monkeypatch):
    if not pack:
        monkeypatch.setattr(onednn, "available", lambda dtype: False)
    model = load_checkpoint(ckpts[arch], device="cpu").model
    ids, mask, new = _batch(model.config.vocab_size)
    ref = _step_by_step(model, ids, mask, new, "model")
    got = _step_by_step(model, ids, mask, new, "lean")
    assert (got - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
def test_lean_logits_with_lora_and_with_the_adapter_disabled(ckpts, pack, monkeypatch):
    if not pack:
        monkeypatch.setattr(onednn, "available", lambda dtype: False)
    model = _lora(load_checkpoint(ckpts["qwen3"], device="cpu").model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask, new = _batch(model.config.vocab_size)
    ref = _step_by_step(model, ids, mask, new, "model")
    got = _step_by_step(model, ids, mask, new, "lean")
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    with model.disable_adapter():  # the frozen teacher's view: the base model
        ref_off = _step_by_step(model, ids, mask, new, "model")
        got_off = _step_by_step(model, ids, mask, new, "lean")
    assert (got_off - ref_off).abs().max().item() < 1e-4 * ref_off.abs().max().item()
    assert (ref_off - ref).abs().max().item() > 1e-2  # the adapter did change the logits
    # LoRA is merged into the packed copy only: every weight of the model is bit-identical
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters())


def test_lean_rollouts_match_the_model_engine(ckpts):
    """Same seed, same tokens; log-probs as sampled agree and equal the re-scored ones."""
    ck = load_checkpoint(ckpts["qwen3"], device="cpu")
    tok = ck.tokenizer
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in ["the cat", "one two three four", "a red dog sat"]]
    a = sample_rollouts(ck.model, tok, prompts, samples_per_prompt=2, max_new_tokens=20, seed=4, engine="auto")
    b = sample_rollouts(ck.model, tok, prompts, samples_per_prompt=2, max_new_tokens=20, seed=4, engine="model")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert (a.sample_logprobs - b.sample_logprobs).abs().max().item() < 1e-4


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain (the GPU's path)"])
def test_bf16_lean_logits_close_to_the_models_forward(ckpts, pack, monkeypatch):
    if not pack:
        monkeypatch.setattr(onednn, "available", lambda dtype: False)
    model = load_checkpoint(ckpts["llama"], device="cpu", dtype="bfloat16").model
    ids, mask, new = _batch(model.config.vocab_size)
    ref = _step_by_step(model, ids, mask, new, "model")
    got = _step_by_step(model, ids, mask, new, "lean")
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_mistral_is_supported():
    import transformers as tf

    cfg = tf.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask, new = _batch(96)
    ref = _step_by_step(model, ids, mask, new, "model")
    got = _step_by_step(model, ids, mask, new, "lean")
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_unsupported_models_fall_back(ckpts):
    import transformers as tf

    gpt2 = load_checkpoint(ckpts["gpt2"], device="cpu").model
    assert decode.LeanDecoder.build(gpt2, batch_size=2, max_length=16) is None
    cfg = tf.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    windowed = AutoModelForCausalLM.from_config(cfg).eval()
    assert decode.LeanDecoder.build(windowed, batch_size=2, max_length=8) is not None  # window never reached
    assert decode.LeanDecoder.build(windowed, batch_size=2, max_length=9) is None
    lora = _lora(load_checkpoint(ckpts["llama"], device="cpu").model)
    lora.merge_adapter()
    assert decode.LeanDecoder.build(lora, batch_size=2, max_length=16) is None


def test_lean_head_applies_the_models_logit_transforms():
    """Soft-capping and logit scaling are applied as the model's forward applies them."""
    torch.manual_seed(0)
    cfg = model_config("llama", 64, hidden=32, layers=1)
    cfg.logit_scale = 0.5  # read by scoring.transform_logits, as for Cohere
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask, new = _batch(64)
    got = _step_by_step(model, ids, mask, new, "lean")
    hidden_ref = _step_by_step(model, ids, mask, new, "model")  # llama's forward ignores logit_scale
    assert torch.allclose(got, hidden_ref * 0.5, atol=1e-5)
    assert torch.allclose(head_logits(model, torch.ones(1, 32)), model.lm_head(torch.ones(1, 32)) * 0.5)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_tied_embeddings_and_a_lora_head():
    """Qwen3 with the LM head tied to the embeddings, and with LoRA on the head as well."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    cfg = tf.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids, mask, new = _batch(96)
    ref = _step_by_step(model, ids, mask, new, "model")
    got = _step_by_step(model, ids, mask, new, "lean")
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj", "lm_head"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora.eval()
    ref = _step_by_step(lora, ids, mask, new, "model")
    got = _step_by_step(lora, ids, mask, new, "lean")
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it on a lent device)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_logits_on_cuda(ckpts, dtype):
    """The plain (unpacked) path on a GPU, with LoRA: run by bench/gpu.sh on a lent device."""
    model = _lora(load_checkpoint(ckpts["qwen3"], device="cuda", dtype=str(dtype).removeprefix("torch.")).model)
    ids, mask, new = (t.cuda() for t in _batch(model.config.vocab_size))
    ref = _step_by_step(model, ids, mask, new, "model")
    got = _step_by_step(model, ids, mask, new, "lean")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got - ref).abs().max().item() < tol * ref.abs().max().item()


def test_no_packed_copy_without_room(ckpts, monkeypatch):
    """Packing doubles the decoder's weights for a rollout: skipped when memory is short, same logits."""
    model = load_checkpoint(ckpts["qwen3"], device="cpu").model
    assert decode.LeanDecoder.build(model, batch_size=2, max_length=16).packed
    monkeypatch.setattr(decode, "_room_for", lambda nbytes, device: False)
    lean = decode.LeanDecoder.build(model, batch_size=2, max_length=16)
    assert lean is not None and not lean.packed and not lean.fused
    ids, mask, new = _batch(model.config.vocab_size)
    ref = _step_by_step(model, ids, mask, new, "model")
    got = _step_by_step(model, ids, mask, new, "lean")
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def _compiled_steps(model, compile, steps=6, device="cpu"):
    """Logits after each of `steps` whole lean decode steps (draw, record, forward) over a left-padded batch,
    (steps, B, V), the decoder and the tokens made."""
    ids, mask, _ = (t.to(device) for t in _batch(model.config.vocab_size))
    cache = DynamicCache()
    positions = position_ids_from_mask(mask)
    out = []
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1].float()
        lean = decode.LeanDecoder.build(model, batch_size=ids.shape[0], max_length=ids.shape[1] + steps,
                                        compile="false" if callable(compile) else compile)
        if callable(compile):  # a stand-in for the compiled step
            lean.compiled = compile
        session = lean.session(cache, mask, capacity=ids.shape[1] + steps + 1)
        B = ids.shape[0]
        draw = Draw.make(5, [], device, pad_id=0, max_new_tokens=steps + 1)
        rows = torch.arange(B, device=device)
        state, made = rollout._state(lean, logits, rows, rows, positions[:, -1] + 1, B, draw)
        for _ in range(steps):
            session.step(state, made, draw, lockstep=True)
            out.append(state.logits.clone())
    return torch.stack(out), lean, made.tokens.clone()


@pytest.mark.parametrize("fault", ["wrong logits", "compiler error"])
def test_a_compiled_step_that_fails_or_disagrees_is_turned_off(ckpts, compile_state, fault, caplog):
    """The first compiled step of a rollout is checked against the eager one: a wrong or failing compiled
    step costs a warning, never a wrong token, and stays off for the process."""
    model = load_checkpoint(ckpts["qwen3"], device="cpu").model

    def broken(dec, keys, values, bias, length, rows, made, draw, lockstep, n):
        if fault == "compiler error":
            raise RuntimeError("inductor could not compile this\nsecond line")
        ended = decode._decode_step(dec, keys, values, bias, length, rows, made, draw, lockstep, n)
        rows.logits.zero_()  # the state moved on, with wrong logits
        return ended

    ref, _, ref_tokens = _compiled_steps(model, "false")
    with caplog.at_level("WARNING"):
        got, lean, tokens = _compiled_steps(model, broken)
    assert torch.equal(tokens, ref_tokens) and torch.equal(got.argmax(-1), ref.argmax(-1))
    assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()  # the same logits to rounding
    assert lean.compiled is None and not compile_state["on"]
    assert compile_state["why"].startswith("turned off")
    assert any("compiled decode step is off" in r.message for r in caplog.records)
    decode.LeanDecoder.build(model, batch_size=2, max_length=8, compile="false")  # e.g. a measurement between
    again = decode.LeanDecoder.build(model, batch_size=2, max_length=8, compile="true")
    assert again.compiled is None and compile_state["why"].startswith("turned off")  # not retried in this process


def test_compile_auto_is_off_on_cpu_and_false_is_off(ckpts, compile_state):
    model = load_checkpoint(ckpts["qwen3"], device="cpu").model
    for setting in ("auto", "false"):
        lean = decode.LeanDecoder.build(model, batch_size=2, max_length=8, compile=setting)
        assert lean.compiled is None and not compile_state["on"] and compile_state["setting"] == setting


@pytest.mark.parametrize("pack", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["packed", "plain"])
def test_compiled_step_equals_the_eager_step(ckpts, compile_state, pack, monkeypatch):
    """torch.compile of the lean step (inductor on CPU; the packed oneDNN linears as a custom op) gives the
    eager step's logits, step after step, and was checked and kept on."""
    if not pack:
        monkeypatch.setattr(onednn, "available", lambda dtype: False)
    model = _lora(load_checkpoint(ckpts["qwen3"], device="cpu").model)
    ref, _, ref_tokens = _compiled_steps(model, "false")
    got, lean, tokens = _compiled_steps(model, "true")
    assert torch.equal(tokens, ref_tokens)
    assert lean.packed == pack and lean.compiled is not None and compile_state["on"]
    assert compile_state["compile_s"] > 0
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.mark.slow
def test_compiled_rollouts_sample_what_eager_rollouts_sample(ckpts, compile_state, monkeypatch):
    """Continuous batching with the compiled step (slots refilled, the batch shrinking at the tail, the
    attended width growing by COMPILED_WIDTHS: new shapes) samples the same tokens as the eager step."""
    monkeypatch.setattr(decode, "COMPILED_WIDTHS", 8)
    ck = load_checkpoint(ckpts["qwen3"], device="cpu")
    tok = ck.tokenizer
    prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in ["the cat", "one two three four", "a red dog sat"]]
    kw = dict(samples_per_prompt=3, max_new_tokens=24, seed=5, batch_size=4)
    a = sample_rollouts(ck.model, tok, prompts, compile="false", **kw)
    b = sample_rollouts(ck.model, tok, prompts, compile="true", **kw)
    assert compile_state["on"]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert (a.sample_logprobs - b.sample_logprobs).abs().max().item() < 1e-4
    compiled = decode._frames_compiled()  # a later rollout (a new LeanDecoder, as every step builds) compiles nothing
    sample_rollouts(ck.model, tok, prompts, compile="true", **kw)
    assert decode._frames_compiled() == compiled and compile_state["on"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it on a lent device)")
def test_compiled_step_with_cuda_graphs_equals_the_eager_step(ckpts, compile_state):
    """CUDA graphs (`mode="reduce-overhead"`) over the same step: run by bench/gpu.sh on a lent device."""
    model = _lora(load_checkpoint(ckpts["qwen3"], device="cuda", dtype="bfloat16").model)
    ref, _, ref_tokens = _compiled_steps(model, "false", device="cuda")
    got, lean, tokens = _compiled_steps(model, "true", device="cuda")
    assert torch.equal(tokens, ref_tokens)
    assert lean.compiled is not None and compile_state["on"], compile_state
    assert (got - ref).abs().max().item() < 5e-2 * ref.abs().max().item()


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op a decode step runs; the bytes copied out of the KV cache; ops whose output depends on data."""

    def __init__(self, cache: list[torch.Tensor]):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in cache}
        self.count, self.gemms, self.copied, self.written, self.data_dependent = 0, 0, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += not func.is_view  # a view launches no kernel
        self.gemms += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
        if torch.Tag.data_dependent_output in func.tags:
            self.data_dependent.append(str(func))
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        reads_cache = any(a.untyped_storage().data_ptr() in self.storages for a in ins)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if reads_cache and torch.Tag.inplace_view not in func.tags and func.overloadpacket is not torch.ops.aten.index_put_:
            # a new tensor made from the cache (not a view, not a matmul's small result): a copy of cache bytes
            if func.overloadpacket not in (torch.ops.aten.bmm, torch.ops.aten.baddbmm, torch.ops.aten.mm):
                self.copied += sum(o.numel() * o.element_size() for o in outs
                                   if o.untyped_storage().data_ptr() not in self.storages)
        if func.overloadpacket is torch.ops.aten.index_put_ and ins[0].untyped_storage().data_ptr() in self.storages:
            self.written += args[2].numel() * args[2].element_size()  # the values written
        return out


def _one_step_ops(layers: int, lora: bool):
    cfg = model_config("qwen3", 384, layers=layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if lora:
        model = _lora(model)
    ids, mask, new = _batch(cfg.vocab_size)
    cache = DynamicCache()
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        lean = decode.LeanDecoder.build(model, batch_size=3, max_length=256)
        step = lean.session(cache, mask, capacity=256)  # a column is 1/256 of the cache (at 4B: 1/3072)
        alive, pos = torch.ones(3, dtype=torch.bool), positions[:, -1] + 1
        step(new[:, 0], pos, alive)
        ops = _Ops([*step.keys, *step.values])
        with ops:
            step(new[:, 1], pos + 1, alive)
    kv_bytes = sum(t.numel() * t.element_size() for t in (*step.keys, *step.values))
    return ops, kv_bytes, lean


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "no room to fuse"])
def test_the_gpu_decode_step_runs_few_ops_per_layer_and_copies_no_cache(monkeypatch, fused):
    """The GPU path (no oneDNN packing), counted with a dispatch mode: the ops that launch a kernel, per layer.

    Fused (the decode copy fits): four GEMMs a layer (q|k|v, o, gate|up, down; LoRA merged into the copy), the
    same count with or without an adapter: 36 ops a layer (4 GEMMs, 3 for attention, 2 cache writes, 3 RMSNorms
    of 6 ops each as aten spells them, 3 for RoPE, 2 residual adds, SiLU and its product, the query's reshape).
    Before the decode copy (and still without room for it): 41 a layer, 69 with LoRA (7 GEMMs and a cat per
    layer, 4 more ops per adapted module). Either way no byte of the KV cache is copied (attention reads it in
    place), only the new column is written (< 1% of the cache), and no op's output depends on data (no host sync)."""
    monkeypatch.setattr(onednn, "available", lambda dtype: False)
    if not fused:
        monkeypatch.setattr(decode, "_room_for", lambda nbytes, device: False)
    counts = {}
    for lora in (False, True):
        two, kv_bytes, lean = _one_step_ops(2, lora)
        four, _, _ = _one_step_ops(4, lora)
        assert lean.fused == fused and not lean.packed
        counts[lora] = (four.count - two.count) / 2, (four.gemms - two.gemms) / 2
        print(f"kernel-launching aten ops per layer per decode step ({'fused' if fused else 'unfused'}, LoRA {lora}): "
              f"{counts[lora][0]:g}, GEMMs {counts[lora][1]:g}")
        assert two.copied == 0 and four.copied == 0
        assert 0 < two.written <= 0.01 * kv_bytes
        assert two.data_dependent == [] and four.data_dependent == []
    if fused:  # the adapter costs no op at all; a layer is four GEMMs and a few dozen small ops, not more
        assert counts[True] == counts[False] and counts[False][1] == 4 and counts[False][0] <= 40, counts
    else:
        assert counts[False][1] == 7 and counts[True][1] == 21, counts


def test_two_rollouts_compile_each_shape_bucket_at_most_once(ckpts, compile_state, monkeypatch):
    """Inductor on the CPU (CUDA graphs on a GPU take the same path): two rollouts of prompts of different lengths,
    the attended width rounded to buckets of COMPILED_WIDTHS columns (8 here, 256 in a run), the batch shrinking at
    the tail. Each (rows, columns) bucket is compiled at most once in the process, and the second rollout compiles
    only buckets the first did not see (torch.compile marks a size dynamic once it changes, so most never compile)."""
    monkeypatch.setattr(decode, "COMPILED_WIDTHS", 8)
    calls, compiled = [], []
    real = decode._Session._compiled

    def spy(self, args):
        n = args[-1]
        before = decode._frames_compiled()
        out = real(self, args)
        calls.append((self.slots, n))
        if decode._frames_compiled() != before:
            compiled.append((self.slots, n))
        return out

    monkeypatch.setattr(decode._Session, "_compiled", spy)
    ck = load_checkpoint(ckpts["qwen3"], device="cpu")
    tok = ck.tokenizer
    seen = []
    for texts in (["the cat", "one two three four"], ["a red dog sat on the mat and then the cat", "one"]):
        prompts = [Prompt(t, tuple(tok(t)["input_ids"])) for t in texts]
        first = len(compiled)
        sample_rollouts(ck.model, tok, prompts, samples_per_prompt=2, max_new_tokens=12, seed=5, batch_size=4,
                        compile="true")
        assert compile_state["on"], compile_state
        assert not set(compiled[first:]) & set(seen)  # nothing compiled again that was compiled before
        seen += compiled[first:]
    assert len(compiled) == len(set(compiled)) <= len(set(calls)), (compiled, sorted(set(calls)))
    print(f"{len(set(calls))} (rows, columns) buckets in two rollouts, {len(compiled)} compiled: {compiled}")

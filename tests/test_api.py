"""The Python API: a reheat on paths and of a model in memory, and a measurement, without the CLI."""

import json
from pathlib import Path

import pytest
import torch

from tsopsd.api import measure_entropy, reheat
from tsopsd.checkpoint import load_checkpoint
from tsopsd.errors import TsopsdError

TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


def test_reheat_and_measure_from_python(collapsed, tmp_path):
    ckpt, prompts = collapsed
    report = reheat(ckpt, prompts, tmp_path / "o", config=TINY,
                    overrides={"train.steps": 2, "output.eval_prompts": 2})
    assert report["steps_run"] == 2  # the report OUT holds (JSON: tuples come back as lists)
    assert json.loads(json.dumps(report)) == json.loads((tmp_path / "o" / "reheat_report.json").read_text())
    on_disk = measure_entropy(tmp_path / "o", prompts, samples_per_prompt=2, max_new_tokens=8, precision=0)
    ck = load_checkpoint(tmp_path / "o", device="cpu")
    texts = [json.loads(line)["prompt"] for line in Path(prompts).read_text().splitlines()]
    in_memory = measure_entropy(ck.model, texts, tokenizer=ck.tokenizer, samples_per_prompt=2, max_new_tokens=8,
                                precision=0)
    assert in_memory["entropy"] == on_disk["metrics"]["entropy"]  # the same model, prompts and draws
    with pytest.raises(TsopsdError, match="needs its tokenizer"):
        measure_entropy(ck.model, texts)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reheat_a_model_in_memory(collapsed, tmp_path, mode):
    """`tsopsd.reheat(model, ...)`: a 2-step reheat of a model in memory trains that object in
    place and hands it back as a plain model (the adapter merged in), frozen as it came, holding exactly the
    weights the same run on the checkpoint folder writes; with out= it writes that checkpoint too."""
    import torch

    import tsopsd

    ckpt, prompts = collapsed
    options = dict(config=TINY, overrides={"train.steps": 2, "output.eval_prompts": 2, "train.mode": mode,
                                           "output.save": "merged"})
    on_disk = tsopsd.reheat(ckpt, prompts, tmp_path / "from-folder", **options)
    ck = load_checkpoint(ckpt, device="cpu")
    model, cls = ck.model, type(ck.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False).lm_head.weight.requires_grad_(True)  # a caller's own flags: come back as they were
    texts = [json.loads(line)["prompt"] for line in Path(prompts).read_text().splitlines()]
    report = tsopsd.reheat(model, texts, tmp_path / "from-memory", tokenizer=ck.tokenizer, **options)
    assert type(model) is cls and report["steps_run"] == 2 and report["after_measured_on"] == "the model in memory"
    assert not any("lora" in k for k in model.state_dict())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"] and not model.training
    written = load_checkpoint(tmp_path / "from-folder", device="cpu").model.state_dict()
    changed = 0
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype
        torch.testing.assert_close(value, written[name], rtol=0, atol=0)  # the same run, to the bit
        changed += not torch.equal(value, before[name])
    assert changed > 0
    assert report["after"]["entropy"] == on_disk["after"]["entropy"] or mode == "lora"  # lora: measured pre-merge
    assert load_checkpoint(tmp_path / "from-memory", device="cpu").model.state_dict().keys() == written.keys()


def test_reheat_in_memory_writes_nothing_without_out(collapsed, tmp_path, monkeypatch):
    import tempfile

    import tsopsd

    ckpt, prompts = collapsed
    ck = load_checkpoint(ckpt, device="cpu")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = tsopsd.reheat(ck.model, prompts, tokenizer=ck.tokenizer, config=TINY,
                           overrides={"train.steps": 2, "output.eval_prompts": 2})
    assert report["output"] is None and report["steps_run"] == 2
    assert list(tmp_path.iterdir()) == []  # the run's scratch folder is gone
    with pytest.raises(TsopsdError, match="needs its tokenizer"):
        tsopsd.reheat(ck.model, prompts)
    with pytest.raises(TsopsdError, match="cannot resume"):
        tsopsd.reheat(ck.model, prompts, tokenizer=ck.tokenizer, config=TINY, overrides={"output.resume": True})


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("stop", ["ctrl-c", "nothing trained"])
def test_a_stopped_reheat_in_memory_hands_the_model_back_as_it_came(collapsed, interrupt_rollout, monkeypatch, mode,
                                                                    stop):
    """Ctrl-C after two updates, or a non-finite loss on the first step (no update kept), leaves the caller's
    model as it was: no adapter layers left in it, its weights and dtype the input's."""
    import torch

    import tsopsd
    from tsopsd.errors import TrainingStopped

    ckpt, prompts = collapsed
    ck = load_checkpoint(ckpt, device="cpu")
    model, cls = ck.model, type(ck.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if stop == "ctrl-c":
        interrupt_rollout(2)
    else:
        import tsopsd.loss as loss_mod

        real = loss_mod.divergence_and_grad
        monkeypatch.setattr(loss_mod, "divergence_and_grad", lambda logits, *a, **k: real(logits * float("nan"), *a, **k))
    with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else TrainingStopped):
        tsopsd.reheat(model, prompts, tokenizer=ck.tokenizer, config=TINY,
                      overrides={"train.steps": 4, "output.eval_prompts": 2, "train.mode": mode, "train.lr": 3e-4})
    assert type(model) is cls and model.state_dict().keys() == before.keys()
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name


def _state(model) -> dict:
    """Everything of the caller's model a call may not change: weights (exact), train/eval, requires_grad flags."""
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "training": model.training,
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "checkpointing": model.is_gradient_checkpointing}


def _same(model, before: dict) -> bool:
    import torch

    now = _state(model)
    return (now["weights"].keys() == before["weights"].keys()
            and all(torch.equal(v, before["weights"][k]) for k, v in now["weights"].items())
            and {k: now[k] for k in ("training", "grad", "checkpointing")} ==
            {k: before[k] for k in ("training", "grad", "checkpointing")})


def test_the_api_takes_a_model_as_an_rl_loop_holds_it(ckpts):
    """A GPT-2-shaped policy in train mode with gradient checkpointing (TRL's default) and a tokenizer with no pad
    token (GPT-2's, Llama's): measured and reheated, then handed back with its flags and the tokenizer as they were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tsopsd

    model = AutoModelForCausalLM.from_pretrained(str(ckpts["gpt2"]))
    tok = AutoTokenizer.from_pretrained(str(ckpts["gpt2"]))
    tok.pad_token, tok.padding_side = None, "right"
    model.gradient_checkpointing_enable()
    model.train()
    before = _state(model)
    prompts = ["the cat sat on", "one two three", "give me a number", "a b c d"] * 2
    result = tsopsd.measure_entropy(model, prompts, tokenizer=tok, max_new_tokens=6, precision=0)
    assert result["tokens"] > 0 and result["samples"] == 32
    assert _same(model, before) and tok.pad_token is None and tok.padding_side == "right"
    report = tsopsd.reheat(model, prompts, tokenizer=tok, config=TINY,
                           overrides={"train.steps": 2, "output.eval_prompts": 2, "rollout.max_new_tokens": 6})
    assert report["steps_run"] == 2 and report["status"] == "goal_not_met"  # 2 steps: said, not hidden
    after = _state(model)
    assert {k: after[k] for k in ("training", "grad", "checkpointing")} == \
        {k: before[k] for k in ("training", "grad", "checkpointing")}
    assert any(not (v == before["weights"][k]).all() for k, v in after["weights"].items())  # it trained, in place
    assert tok.pad_token is None and tok.padding_side == "right"


def test_the_api_refuses_what_it_cannot_take_before_touching_it(ckpts):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tsopsd
    from tsopsd.errors import TsopsdError

    model = AutoModelForCausalLM.from_pretrained(str(ckpts["gpt2"]))
    tok = AutoTokenizer.from_pretrained(str(ckpts["gpt2"]))
    prompts = ["the cat sat on", "one two three"] * 4
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))  # a PEFT policy, as TRL trains one
    before = _state(policy)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    with pytest.raises(TsopsdError, match="reheat of a PEFT model in memory: .*merge it first"):
        tsopsd.reheat(policy, prompts, tokenizer=tok, config=TINY, overrides={"train.steps": 2})
    assert _same(policy, before) and sum(p.numel() for p in policy.parameters() if p.requires_grad) == trainable
    assert tsopsd.measure_entropy(policy, prompts, tokenizer=tok, max_new_tokens=4, precision=0)["tokens"] > 0
    assert _same(policy, before)  # measuring a PEFT policy is fine, and changes nothing
    plain = AutoModelForCausalLM.from_pretrained(str(ckpts["gpt2"]))
    before = _state(plain)
    bare = AutoTokenizer.from_pretrained(str(ckpts["gpt2"]))
    bare.pad_token = bare.eos_token = None
    cases = [((42, prompts), {"tokenizer": tok}, "model must be a transformers causal LM"),
             ((torch.nn.Linear(2, 2), prompts), {"tokenizer": tok}, "model must be a transformers causal LM"),
             ((plain, prompts), {"tokenizer": "gpt2"}, "tokenizer= must be the model's transformers tokenizer"),
             ((plain, prompts), {"tokenizer": bare}, "neither a pad token nor an eos token")]
    for args, kwargs, message in cases:
        for call in (tsopsd.reheat, tsopsd.measure_entropy):
            with pytest.raises(TsopsdError, match=message):
                call(*args, **kwargs)
    with pytest.raises(TsopsdError, match="overrides= must be a dict of dotted keys"):
        tsopsd.reheat(plain, prompts, tokenizer=tok, overrides="train.steps=2")
    with pytest.raises(TsopsdError, match="non-empty list of non-empty strings"):
        tsopsd.measure_entropy(plain, ["ok", ""], tokenizer=tok)
    with pytest.raises(TsopsdError, match="--samples-per-prompt must be"):
        tsopsd.measure_entropy(plain, prompts, tokenizer=tok, samples_per_prompt=0)
    assert _same(plain, before)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_reheat_that_fails_in_set_up_hands_the_model_back_as_it_came(ckpts, collapsed, mode):
    """An error after the policy is built (here: --target-entropy-from a checkpoint with another tokenizer, found
    while measuring the target): no adapter layers left, a bf16 model still bf16 with its exact weights."""
    from transformers import AutoModelForCausalLM

    import tsopsd

    ckpt, prompts = collapsed
    ck = load_checkpoint(ckpt, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16)
    cls, before = type(model), _state(model)
    with pytest.raises(TsopsdError, match="its tokenizer differs"):
        tsopsd.reheat(model, prompts, tokenizer=ck.tokenizer, config=TINY,
                      overrides={"train.mode": mode, "teacher.target_entropy_from": str(ckpts["qwen3"]),
                                 "output.eval_prompts": 2})
    assert type(model) is cls and _same(model, before)
    assert {v.dtype for v in model.state_dict().values()} == {torch.bfloat16}


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_a_reheat_called_under_no_grad_still_trains(collapsed, context):
    """An RL loop may call it inside its own no-grad or inference block: the run trains all the same."""
    import tsopsd

    ckpt, prompts = collapsed
    ck = load_checkpoint(ckpt, device="cpu")
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    with getattr(torch, context)():
        report = tsopsd.reheat(ck.model, prompts, tokenizer=ck.tokenizer, config=TINY,
                               overrides={"train.steps": 2, "output.eval_prompts": 2})
    assert report["steps_run"] == 2
    assert any(not torch.equal(v, before[k]) for k, v in ck.model.state_dict().items())  # it trained


def test_out_onto_the_folder_the_model_came_from_is_refused_from_any_directory(ckpts, tmp_path, monkeypatch):
    """A model loaded by a relative path knows only that string: after a chdir, out= naming its folder by another
    path (with overwrite) would replace the weights it came with. They are recognised by content; another model's
    folder is still replaced as asked."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd.folders import fingerprint

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(ckpts["gpt2"], home / "policy")
    monkeypatch.chdir(home)
    model = AutoModelForCausalLM.from_pretrained("policy", dtype=torch.bfloat16)  # cast on load: still recognised
    tok = AutoTokenizer.from_pretrained("policy")
    monkeypatch.chdir(elsewhere)
    before, weights = fingerprint(home / "policy"), _state(model)
    with pytest.raises(TsopsdError, match="holds the weights this model came with"):
        reheat(model, ["the cat sat on", "one two three"] * 4, tokenizer=tok, out="../home/policy", config=TINY,
               overrides={"train.steps": 2, "output.overwrite": True, "output.eval_prompts": 0})
    assert fingerprint(home / "policy") == before and _same(model, weights)
    from safetensors.torch import load_file, save_file

    from tsopsd.folders import holds_weights_of

    (elsewhere / "tuned").mkdir()  # the same names and shapes, every matrix a little changed: other weights
    save_file({k: v + 0.01 if v.dim() >= 2 else v for k, v in load_file(home / "policy" / "model.safetensors").items()},
              elsewhere / "tuned" / "model.safetensors", metadata={"format": "pt"})
    assert holds_weights_of(home / "policy", model) and not holds_weights_of(elsewhere / "tuned", model)
    shutil.copytree(ckpts["llama"], elsewhere / "other")  # not this model's weights: replaced, as overwrite asks
    report = reheat(model, ["the cat sat on", "one two three"] * 4, tokenizer=tok, out="other", config=TINY,
                    overrides={"train.steps": 2, "output.overwrite": True, "output.eval_prompts": 0})
    assert report["steps_run"] == 2 and json.loads((elsewhere / "other" / "config.json").read_text())["model_type"] == "gpt2"


def test_a_measurement_in_memory_leaves_the_callers_random_state_as_it_was(ckpts):
    """An RL loop that measures its policy between steps samples what it would have sampled without measuring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(ckpts["llama"]))
    tok = AutoTokenizer.from_pretrained(str(ckpts["llama"]))
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    measure_entropy(model, ["the cat sat on", "one two three"], tokenizer=tok, max_new_tokens=4, precision=0.2)
    assert torch.equal(torch.random.get_rng_state(), state)

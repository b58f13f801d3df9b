"""`ReheatCallback` inside a real TRL GRPOTrainer on the CPU: it fires on a collapsed policy, reheats it in place to its
target, and training goes on; without it the policy stays collapsed. Needs TRL (`make test-slow` installs it)."""

import json
from pathlib import Path

import pytest
import torch

from tsopsd.lab.sumtask import is_correct, parse_target

TARGET = 0.6  # nats on the held-out prompts: well above the collapsed model's, below the SFT-like range


def _trainer(model, tok, texts, tmp_path, callbacks, steps):
    import trl
    from datasets import Dataset

    def reward(prompts, completions, **kwargs):  # the task's verifier: the reward that collapsed the model
        return [float(is_correct(parse_target(p), c)) for p, c in zip(prompts, completions)]

    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=steps, learning_rate=1e-4, temperature=1.0,
                          logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0)
    return trl.GRPOTrainer(model=model, reward_funcs=[reward], args=args, processing_class=tok, callbacks=callbacks,
                           train_dataset=Dataset.from_list([{"prompt": t} for t in texts]))


@pytest.mark.slow  # needs TRL, which only `make test-slow` installs
@pytest.mark.parametrize("peft", [False, True])
def test_the_callback_reheats_a_collapsed_policy_in_the_run(collapsed, tmp_path, peft):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd.integrations.trl import ReheatCallback

    ckpt, prompts = collapsed
    texts = [json.loads(line)["prompt"] for line in Path(prompts).read_text().splitlines()]
    train, held_out = texts[:16], texts[-12:]
    tok = AutoTokenizer.from_pretrained(ckpt)

    def policy():
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        if peft:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        return model

    callback = ReheatCallback(held_out, every=2, min_entropy=TARGET / 2, target_entropy=TARGET, consecutive=1,
                              max_new_tokens=8, samples_per_prompt=8, precision=0.1)
    trainer = _trainer(policy(), tok, train, tmp_path, [callback], steps=4)
    trainer.train()  # goes on after the reheat at step 2, to step 4
    assert trainer.state.global_step == 4 and len(callback.reheats) == 1, callback.reheats
    r = callback.reheats[0]
    assert r["step"] == 2 and r["low"] <= TARGET <= r["high"] and abs(r["entropy"] - TARGET) <= 0.1 * TARGET, r
    assert r["parameters_changed"] >= 1 and (peft or r["moments_reset"] >= 1)
    logged = [h for h in trainer.state.log_history if "tsopsd/entropy" in h]
    assert [h["step"] for h in logged if "tsopsd/tau" in h] == [2] and logged[-1]["tsopsd/reheats"] == 1
    after = callback.measure(trainer.model, tok)["entropy"]  # the reheated policy after two more GRPO steps
    assert after > TARGET / 2, after
    plain = _trainer(policy(), tok, train, tmp_path / "plain", [], steps=4)  # the same run without the callback
    plain.train()
    assert callback.measure(plain.model, tok)["entropy"] < TARGET / 2  # stays collapsed
    assert not any("tsopsd/entropy" in h for h in plain.state.log_history)
    assert torch.isfinite(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])).all()

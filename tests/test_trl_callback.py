"""`ReheatCallback` inside a real TRL GRPOTrainer on the CPU: GRPO collapses the demo's SFT model within the test's
budget; the callback sees it on held-out prompts, reheats the policy in place to the entropy at the start, and
training goes on; the same run without it is collapsed at that step. Needs TRL (`make test-slow` installs it)."""

import json

import pytest
import torch

from tsopsd.lab.sumtask import is_correct, parse_target

# (steps of the lr schedule, lr, steps run): each collapses the quick demo's SFT model within the run without the
# callback (a LoRA adapter needs the higher lr, and is stopped early: past that it is unstable on this toy)
RUN = {False: (100, 1e-2, 100), True: (100, 3e-2, 30)}


def _trainer(model, tok, texts, out, callbacks, steps, lr, stop):
    import trl
    from datasets import Dataset

    def reward(prompts, completions, **kwargs):  # the task's verifier: the reward that collapses the toy
        return [float(is_correct(parse_target(p), c)) for p, c in zip(prompts, completions)]

    args = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=8, max_completion_length=8,
                          max_steps=steps, learning_rate=lr, temperature=1.0, beta=0.0, logging_steps=5, report_to="none",
                          save_strategy="no", use_cpu=True, bf16=False, seed=0)
    return trl.GRPOTrainer(model=model, reward_funcs=[reward], args=args, processing_class=tok,
                           callbacks=[*callbacks, StopAt(stop)],
                           train_dataset=Dataset.from_list([{"prompt": t} for t in texts]))


class StopAt:
    """Ends training after `step` steps, the lr schedule still that of the whole run (a TrainerCallback by duck type)."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):  # every other event: nothing to do
        return lambda *args, **kwargs: None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.slow  # needs TRL, which only `make test-slow` installs
@pytest.mark.xdist_group("quick_demo")
@pytest.mark.parametrize("peft,method", [(False, "scale"), (True, "scale"), (False, "distill")])
def test_the_callback_reheats_a_policy_that_collapses_in_the_run(quick_demo, tmp_path, peft, method):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsopsd.integrations.trl import ReheatCallback

    world = quick_demo[0]
    texts = [json.loads(line)["prompt"] for line in (world / "prompts.jsonl").read_text().splitlines()]
    train, held_out = texts[:-12], texts[-12:]
    tok = AutoTokenizer.from_pretrained(world / "sft")
    torch.set_num_threads(1)

    def policy():
        model = AutoModelForCausalLM.from_pretrained(world / "sft")
        if peft:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)  # the adapter's initial weights: the same in both runs
            model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
        return model

    steps = RUN[peft][2]
    from tsopsd.lab.demo import CONFIG  # distill: the demo's reheat settings (full, lr 5e-4, 200 steps at most)

    callback = ReheatCallback(held_out, every=10, ratio=0.5, consecutive=2, cooldown=steps, max_new_tokens=8,
                              samples_per_prompt=8, precision=0.1, method=method, config=str(CONFIG),
                              overrides={"output.eval_prompts": 4, "rollout.prompts_per_step": 8})
    trainer = _trainer(policy(), tok, train, tmp_path / "with", [callback], *RUN[peft])
    trainer.train()
    assert trainer.state.global_step == steps and len(callback.reheats) == 1, callback.reheats
    r, start = callback.reheats[0], callback.start
    assert r["step"] < steps and abs(r["entropy"] - start) <= 0.1 * start, (r, start)  # within 10% of the target
    assert method == "distill" or r["low"] <= start <= r["high"]  # the closed form's solve stops inside the interval
    assert r["parameters_changed"] >= 1 and (peft or r["moments_reset"] >= 1)
    assert callback.train_entropy and callback.train_entropy[0][0] == 5  # GRPO's own logged entropy, every 5 steps
    logged = [h for h in trainer.state.log_history if "tsopsd/entropy" in h]
    assert [h["step"] for h in logged if "tsopsd/tau" in h] == [r["step"]] and logged[-1]["tsopsd/reheats"] == 1
    assert torch.isfinite(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])).all()
    run_steps, lr, _ = RUN[peft]  # the same run without the callback, to the step where the callback reheated:
    plain = _trainer(policy(), tok, train, tmp_path / "without", [], run_steps, lr, r["step"])
    plain.train()
    assert callback.measure(plain.model, tok)["entropy"] < 0.5 * start  # collapsed there, with nothing to reheat it

"""Continued RL out: TRL's GRPOTrainer starts from a reheated output (merged and adapter) and takes a step.

Needs the `bench` extra (TRL); `make test-slow` installs it.
"""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tsopsd.cli import app
from tsopsd.errors import ExitCode
from tsopsd.lab.sumtask import is_correct, parse_target

runner = CliRunner()
TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


@pytest.mark.slow  # ~8 s each on 2 AVX2 cores; slow because it needs TRL, which only `make test-slow` installs
@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_grpo_trainer_continues_from_the_output(collapsed, tmp_path, save):
    import trl
    from datasets import Dataset
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, prompts = collapsed
    out = tmp_path / "out"
    res = runner.invoke(app, ["reheat", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--config", str(TINY),
                              "--steps", "2", "--mode", "lora", "--save", save, "--set", "output.eval_prompts=0",
                              "--quiet"])
    assert res.exit_code == ExitCode.GOAL_NOT_MET, res.output  # 2 steps: OUT written, not converged (exit 4)
    tok = AutoTokenizer.from_pretrained(out)
    if save == "merged":
        model = AutoModelForCausalLM.from_pretrained(out)
    else:  # the adapter on its base, trainable: how a LoRA run continues
        model = AutoPeftModelForCausalLM.from_pretrained(out, is_trainable=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()][:4]

    def reward(prompts, completions, **kwargs):  # the task's verifier...
        return [float(is_correct(parse_target(p), c)) for p, c in zip(prompts, completions)]

    def alternate(prompts, completions, **kwargs):  # ...and a reward that differs within every group, so that
        return [float(i % 2) for i in range(len(completions))]  # the step has a gradient even if samples agree

    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=1, learning_rate=1e-3, temperature=1.0, logging_steps=1,
                          report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward, alternate], args=args, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": t} for t in texts]))
    result = trainer.train()
    assert result.global_step == 1
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and torch.isfinite(torch.tensor(logged[0]["loss"]))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before if n in after)  # it trained

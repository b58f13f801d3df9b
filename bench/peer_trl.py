"""The same job with TRL's DistillationTrainer, for a side-by-side measurement (`pip install '.[bench]'`).

    python bench/peer_trl.py --model bench/out/models/q8x512 --mode lora --prompts-per-step 8 --length 64

Set up to do what `tsopsd reheat` does, as closely as TRL allows:
- fully on-policy (the student generates every completion; TRL's DistillationTrainer always does);
- the teacher is a frozen copy of the same checkpoint;
- beta 0 (forward KL), temperature 1;
- teacher-only temperature tau through the teacher config's `logit_scale = 1/tau`: TRL's `temperature`
  divides *both* sides, which with a self-teacher makes the unchanged model the optimum, so it cannot
  express TS-OPSD otherwise;
- fp32 (bf16 off), gradient checkpointing off, the same batch, EOS suppressed (fixed length);
- LoRA mode: `peft_config` with the same rank as tsopsd's bench (r=16, all linear layers).

Prints one line per step (wall time between step begin and end callbacks) and one JSON line with
medians and peak memory (RSS on CPU, max_memory_allocated on CUDA).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import bench_prompts, job_arguments, peak_memory_mib, set_threads, summarize  # noqa: E402


def main() -> None:
    ap = job_arguments(__doc__)
    args = ap.parse_args()
    set_threads(args.threads)

    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    transformers.utils.logging.set_verbosity_error()
    use_cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    dtype = torch.bfloat16 if use_cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(str(args.model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype)
    teacher.config.logit_scale = 1.0 / args.tau  # teacher-only temperature (see the module docstring)
    n_prompts = args.prompts_per_step * (args.steps + 1)
    texts = bench_prompts(tok, max(16, args.prompts_per_step), args.prompt_tokens)
    k = args.samples_per_prompt  # k samples of a prompt: the prompt k times in a row (one completion each)
    data = Dataset.from_dict({"prompt": [texts[i % len(texts)] for i in range(n_prompts) for _ in range(k)]})
    rows = args.prompts_per_step * k
    batch = args.rollout_batch or rows  # generated together; a step accumulates rows // batch of them
    if rows % batch:
        raise SystemExit(f"--rollout-batch {batch} must divide the step's {rows} rows")
    peft_config = None
    if args.mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DistillationConfig(
            output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=rows // batch,
            max_steps=args.steps + 1, learning_rate=1e-5, beta=0.0, temperature=1.0, bf16=use_cuda,
            gradient_checkpointing=False, max_completion_length=args.length, logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=not use_cuda, shuffle_dataset=False, disable_dropout=True,
            generation_kwargs={} if args.natural_eos else {"min_new_tokens": args.length}, seed=0,
            dataloader_num_workers=0)
        times: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                if use_cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                if use_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.t0)
                print(f"step {len(times) - 1}{' (warm-up)' if len(times) == 1 else ''}: step_s {times[-1]:.3f}",
                      flush=True)

        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                                      processing_class=tok, peft_config=peft_config, callbacks=[Clock()])
        trainer.train()
    dev = torch.device("cuda" if use_cuda else "cpu")
    n = args.prompts_per_step * k * args.length
    measured = [{"step_s": t, "tok_s": n / t} for t in times[1:]]
    summarize("trl", measured, {"mode": args.mode, "model": str(args.model), "prompts": args.prompts_per_step,
                                "samples": k, "length": args.length,
                                "prompt_tokens": len(tok(texts[0])["input_ids"]), "device": dev.type,
                                "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                                "peak_memory_mib": peak_memory_mib(dev), "trl_version": __import__("trl").__version__})


if __name__ == "__main__":
    main()

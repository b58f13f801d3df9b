"""FSDP rollouts decode through the lean decoder on the gathered weights: two CPU ranks (gloo) sample what one
process samples, row for row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from fsdp_rollout import TEXTS, K
from test_rollout import long_tail

from tsopsd.checkpoint import load_checkpoint
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts

HELPER = Path(__file__).parent / "fsdp_rollout.py"


def test_two_fsdp_ranks_sample_through_the_lean_decoder_what_one_process_samples(ckpts, tmp_path):
    ck = long_tail(ckpts["qwen3"])  # rows end at spread-out lengths: the ranks' lock-step matters
    ck.model.save_pretrained(tmp_path / "m")
    ck.tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "rollout.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(HELPER), str(tmp_path / "m"), str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert all(r["sharded"] and r["lean"] for r in ranks), [(r["sharded"], r["lean"]) for r in ranks]
    model = load_checkpoint(tmp_path / "m", device="cpu")
    one = sample_rollouts(model.model, model.tokenizer, [Prompt(t, tuple(model.tokenizer(t)["input_ids"]))
                                                          for t in TEXTS], samples_per_prompt=K, max_new_tokens=24,
                          seed=3, batch_size=4)
    completions = ranks[0]["completions"] + ranks[1]["completions"]
    assert completions == one.completions()
    assert len({len(c) for c in completions}) > 3  # rows ended at different steps, on both ranks
    logprobs = [lp for r in ranks for lp in r["logprobs"]]
    want = [lp[m].tolist() for lp, m in zip(one.sample_logprobs, one.completion_mask)]
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5) for a, b in zip(logprobs, want))

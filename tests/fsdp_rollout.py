"""Run under torchrun by test_fsdp_decode: this rank's share of a rollout from an FSDP-sharded student.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_rollout.py CKPT OUT.json

As the loop samples: the backend gathers the shards for the rollout (`generating`), decoding is in
lock-step (`done_everywhere`), each rank samples its rows at their global indices. OUT.json.RANK gets
the completions, their log-probs, and whether the lean decoder was built on the gathered weights.
"""

import json
import os
import sys

import torch

from tsopsd import decode
from tsopsd.checkpoint import load_checkpoint
from tsopsd.config import TrainConfig
from tsopsd.parallel import join, make_backend
from tsopsd.policy import prepare_policy
from tsopsd.prompts import Prompt
from tsopsd.rollout import sample_rollouts

TEXTS = ("the cat", "one two three four", "a", "red dog sat")
K = 3

def main(ckpt: str, out: str) -> None:
    launch = join("cpu")
    backend = make_backend("fsdp", launch, torch.device("cpu"))
    ck = load_checkpoint(ckpt, device="cpu")
    policy = prepare_policy(ck.model, TrainConfig(mode="full"))
    backend.prepare(policy)
    built = []
    real_build = decode.LeanDecoder.build.__func__

    def build(cls, model, **kwargs):
        built.append(real_build(cls, model, **kwargs))
        return built[-1]

    decode.LeanDecoder.build = classmethod(build)
    share = len(TEXTS) // launch.world_size
    mine = TEXTS[launch.rank * share:(launch.rank + 1) * share]
    prompts = [Prompt(t, tuple(ck.tokenizer(t)["input_ids"])) for t in mine]
    sharded = not all(type(p.data) is torch.Tensor for p in policy.student.parameters())
    with torch.no_grad(), backend.generating(policy), policy.compute():
        r = sample_rollouts(policy.student, ck.tokenizer, prompts, samples_per_prompt=K, max_new_tokens=24, seed=3,
                            batch_size=4, row_offset=launch.rank * share * K, done_everywhere=backend.done_everywhere)
    logprobs = [lp[m].tolist() for lp, m in zip(r.sample_logprobs, r.completion_mask)]
    with open(f"{out}.{launch.rank}", "w") as f:
        json.dump({"completions": r.completions(), "logprobs": logprobs, "sharded": sharded,
                   "lean": bool(built) and all(b is not None for b in built)}, f)
    torch.distributed.barrier()  # every rank's files are written
    # Out without tearing the group down or the interpreter's shutdown: under load a gloo thread still joinable
    # there aborts the process ("terminate called without an active exception", exit -6) after its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

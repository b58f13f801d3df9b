"""`tsopsd demo`: the whole job on a tiny checkpoint built offline.

    tsopsd demo --out runs/demo

Builds a tiny Qwen3-architecture checkpoint and a tokenizer with nothing downloaded, writes a prompt
file, and measures the checkpoint's entropy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tsopsd.toy import build_checkpoint

log = logging.getLogger(__name__)

DEMO_PROMPTS = ["the cat sat on", "give me a number", "one two three", "what is the sum of two and three",
                "a red dog ran", "blue green red", "the answer is", "question: what rhymes with cat"]


def run_demo(out: str | Path = "runs/demo", *, show_progress: bool = True) -> dict:
    """Build the demo checkpoint (cached) and measure it. Returns {name: measure result}."""
    from tsopsd.measure import run_measure

    out = Path(out)
    ckpt = out / "collapsed"
    if not (ckpt / "config.json").is_file():
        log.info("building a tiny collapsed checkpoint in %s", ckpt)
        build_checkpoint(ckpt, arch="qwen3", sharpen=12.0)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEMO_PROMPTS))
    result = run_measure(ckpt, prompts, samples_per_prompt=4, max_new_tokens=24, device="cpu",
                         show_progress=show_progress)
    return {"collapsed": result["metrics"]}

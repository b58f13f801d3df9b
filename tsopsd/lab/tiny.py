"""Tiny checkpoints built offline, for tests, the demo and benchmarks.

    build_tokenizer("runs/tok")                          # a byte-level BPE trained with `tokenizers`
    build_checkpoint("runs/tiny", arch="qwen3", sharpen=20.0)

Nothing is downloaded: the tokenizer is trained on a small synthetic corpus and the model is built
from a config with random weights. `sharpen` multiplies the final norm's gain, which scales every
output logit by that factor: a cheap stand-in for an entropy-collapsed policy (the demo builds a
genuinely RL-collapsed one).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

ARCHS = ("gpt2", "llama", "qwen2", "qwen3", "gemma2", "cohere", "granite", "phi", "olmo")
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("the cat dog sat ran on a mat red blue green one two three four five six seven eight nine ten "
         "sum of and is what plus minus equals number word rhymes with answer question give me").split()


def word_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Short lines of common words and numbers, to train a tokenizer on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        nums = [str(rng.randint(0, 99)) for _ in range(rng.randint(0, 3))]
        lines.append(" ".join(words + nums) + ".")
    return lines


def build_tokenizer(out: str | Path | None = None, *, vocab_size: int = 384, texts: list[str] | None = None,
                    chat_template: bool = True, pad_token: bool = False):
    """Train a byte-level BPE tokenizer offline; save it to `out` when given. Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, "<|user|>", "<|assistant|>", "<|system|>"] + (["<|pad|>"] if pad_token else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or word_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token="<|pad|>" if pad_token else None)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    if out is not None:
        fast.save_pretrained(str(out))
    return fast


def model_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 eos_id: int = 0, max_positions: int = 512):
    """A tiny transformers config of a real architecture (`ARCHS`)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=None)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **common)
    llama_like = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=max_positions, tie_word_embeddings=False, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=hidden // heads, **llama_like)
    # families whose final layers differ (what `--method scale` edits): a Gemma norm (1 + weight) and a soft-capped
    # head, logit scales after the head, a head with a bias, a norm without weight and a tied head
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=hidden // heads, final_logit_softcapping=3.0, **llama_like)
    if arch == "cohere":
        return tf.CohereConfig(logit_scale=0.5, **llama_like)
    if arch == "granite":
        return tf.GraniteConfig(logits_scaling=2.0, **llama_like)
    if arch == "phi":
        return tf.PhiConfig(**llama_like)
    if arch == "olmo":
        return tf.OlmoConfig(**llama_like | {"tie_word_embeddings": True})
    raise ValueError(f"unknown toy architecture '{arch}': use {', '.join(ARCHS)}")


@torch.no_grad()
def sharpen_(model, factor: float) -> None:
    """Scale every output logit by `factor` (lower entropy): the closed form's edit with tau = 1 / factor (the final
    norm's affine part, or the head where the family needs it)."""
    import copy

    from tsopsd.closed_form import scale_logits_

    scale_logits_(model, 1 / factor, copy.deepcopy(model))


def build_checkpoint(out: str | Path, *, arch: str = "qwen3", seed: int = 0, sharpen: float | None = None,
                     tokenizer=None, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_shard_size: str | None = None):
    """Build a random tiny causal LM with a trained tokenizer and save both to `out`.

    Returns:
        (model, tokenizer)
    """
    from transformers import AutoModelForCausalLM

    tok = tokenizer or build_tokenizer()
    cfg = model_config(arch, len(tok), hidden=hidden, layers=layers, heads=heads, eos_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if sharpen:
        sharpen_(model, sharpen)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    tok.save_pretrained(str(out))
    return model, tok

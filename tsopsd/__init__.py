"""tsopsd: reheat entropy-collapsed language-model checkpoints by temperature-scaled on-policy
self-distillation (TS-OPSD).

    import tsopsd
    report = tsopsd.reheat("ckpt/", "prompts.jsonl", "reheated/", config="lora")
    result = tsopsd.measure_entropy("ckpt/", "prompts.jsonl")

(`tsopsd/api.py`; torch is imported on first use, not with the package.)
"""

__version__ = "0.1.0"
__all__ = ["measure_entropy", "reheat"]


def __getattr__(name: str):
    if name in __all__:
        from tsopsd import api

        return getattr(api, name)
    raise AttributeError(f"module 'tsopsd' has no attribute {name!r}")

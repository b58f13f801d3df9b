"""tsopsd: reheat entropy-collapsed language-model checkpoints by temperature-scaled on-policy
self-distillation (TS-OPSD)."""

__version__ = "0.1.0"

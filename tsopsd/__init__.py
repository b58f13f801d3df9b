"""tsopsd: reheat entropy-collapsed language-model checkpoints by temperature-scaled on-policy
self-distillation (TS-OPSD). The Python API is `tsopsd.api` (`from tsopsd.api import reheat, measure_entropy`)."""

__version__ = "0.1.0"

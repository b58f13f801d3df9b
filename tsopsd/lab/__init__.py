"""The lab: the demo, its toy task and GRPO collapse, tiny offline checkpoints, and pictures.

Not the product: `tsopsd reheat` and `measure-entropy` never import it. `tsopsd demo` and the
benchmarks do, and the tests build their tiny checkpoints with `tiny`.
"""

"""What the config's fields say about themselves: each key's help and default, for `configs/default.yaml` (made
here) and the flags' `--help` (`cli/options.py`), so a key's sentence is written once, in its field.

    python -m tsopsd.config_doc > configs/default.yaml
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from tsopsd.config import Config


def help_of(key: str) -> str:
    """The help sentence of a dotted config key (`teacher.temperature`), from its field's metadata."""
    *sections, name = key.split(".")
    holder: Any = Config()
    for section in sections:
        holder = getattr(holder, section)
    return {f.name: f for f in dataclasses.fields(holder)}[name].metadata["help"]


def config_default(key: str) -> Any:
    """The default of a dotted config key, as `Config()` holds it."""
    value: Any = Config()
    for name in key.split("."):
        value = getattr(value, name)
    return value


DEFAULT_YAML_HEADER = """\
# tsopsd reheat CKPT --prompts prompts.jsonl --out reheated/ --config configs/default.yaml
#
# Every key, with its default. Flags override this file; --set key=value overrides anything.
# Made from the config's fields (tsopsd/config.py): python -m tsopsd.config_doc > configs/default.yaml
"""


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def default_yaml(width: int = 118) -> str:
    """configs/default.yaml: every key with its default and its help as the comment, wrapped under itself."""
    import textwrap

    lines = [DEFAULT_YAML_HEADER.rstrip("\n")]

    def emit(indent: str, left: str, help: str) -> None:
        column = max(len(left) + 2, 28)
        wrapped = textwrap.wrap(help, width=max(width - column - 2, 40), break_on_hyphens=False) or [""]
        lines.append(f"{left.ljust(column)}# {wrapped[0]}".rstrip())
        lines.extend(f"{' ' * column}# {more}" for more in wrapped[1:])

    defaults = Config()
    for f in dataclasses.fields(Config):
        value = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(value):
            emit("", f"{f.name}: {_scalar(value)}", f.metadata["help"])
            continue
        emit("", f"{f.name}:", f.metadata["help"])
        for g in dataclasses.fields(value):
            emit("  ", f"  {g.name}: {_scalar(getattr(value, g.name))}", g.metadata["help"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(default_yaml())

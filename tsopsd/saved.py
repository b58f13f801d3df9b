"""Trees of tensors and plain values on disk as safetensors + JSON: nothing a run folder holds is unpickled.

    save_tree({"step": 3, "optimizer": opt.state_dict()}, run_dir, "state")   # state.json + state-*.safetensors
    tree = load_tree(run_dir, "state")                                        # the same tree back

A run folder sits on the user's disk beside OUT, where anyone who can write there can plant a file;
`torch.load(weights_only=False)` (or DCP's pickled metadata) would run what it holds. Here the
tensors go to a safetensors file (a JSON header and raw bytes) and everything else to JSON, with
tuples, non-string dict keys and tensors marked, so the tree comes back as it was: an optimizer's
`state_dict()` loads into `load_state_dict` unchanged. Anything else in the tree is refused on save.

The JSON file is written last and atomically, and names its tensor file, so a save cut short leaves
the previous pair whole; older tensor files of the same name are removed once the new JSON is in place.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from tsopsd.errors import TsopsdError


def map_tensors(fn: Callable[[torch.Tensor], object], tree):
    """The tree with every tensor replaced by `fn(tensor)` (dicts, lists and tuples rebuilt)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return tree


def _encode(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = tree.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: _encode(v, tensors) for k, v in tree.items()}
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in tree):
            raise TypeError(f"cannot save a dict key of type {type(next(iter(tree))).__name__}")
        return {"__items__": [[k, _encode(v, tensors)] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in tree]}
    if isinstance(tree, list):
        return [_encode(v, tensors) for v in tree]
    if tree is None or isinstance(tree, (str, int, float, bool)):
        return tree
    raise TypeError(f"cannot save a value of type {type(tree).__name__}")


def _decode(node, tensors: dict[str, torch.Tensor]):
    if isinstance(node, dict):
        if set(node) == {"__tensor__"}:
            return tensors[node["__tensor__"]]
        if set(node) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in node["__items__"]}
        if set(node) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in node["__tuple__"])
        return {k: _decode(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    return node


def save_tree(tree, folder: str | os.PathLike, name: str) -> None:
    """Write `tree` as `folder/name.json` (last, atomically) and `folder/name-*.safetensors`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    data = f"{name}-{uuid.uuid4().hex[:12]}.safetensors"
    save_file(tensors, str(folder / data))
    tmp = folder / f"{name}.json.tmp"
    tmp.write_text(json.dumps({"format": "tsopsd-tree-1", "tensors": data, "tree": encoded}))
    os.replace(tmp, folder / f"{name}.json")
    for old in folder.glob(f"{name}-*.safetensors"):
        if old.name != data:
            old.unlink(missing_ok=True)


def load_tree(folder: str | os.PathLike, name: str):
    """The tree `save_tree` wrote; a damaged or foreign pair of files is a `TsopsdError` naming it."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.json"
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != "tsopsd-tree-1" or not isinstance(meta.get("tensors"), str) \
                or Path(meta["tensors"]).name != meta["tensors"]:
            raise ValueError("not a tsopsd state file")
        tensors = load_file(str(Path(folder) / meta["tensors"])) if meta["tensors"] else {}
        return _decode(meta["tree"], tensors)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the readers raise
        raise TsopsdError(f"cannot resume: {path} is damaged or was not written by tsopsd ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); rerun with --overwrite to start over") from None

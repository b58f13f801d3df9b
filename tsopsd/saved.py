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

The JSON also holds the SHA-256 of the tensor file and a seal: the SHA-256 of everything else it says.
`load_tree` checks both, so a tensor file from another run or another save, a tensor edited or cast, and
any value edited in the JSON are refused before anything is used. This finds changes and mix-ups, not a
forger who recomputes the hashes (nothing without a secret could). `file_digest` and `folder_digest`
hash in chunks on every core (hashlib releases the GIL); what that costs against the write is measured by
`bench/state_hash.py` (docs/reference.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tsopsd.errors import TsopsdError
from tsopsd.writing import write_file

FORMAT = "tsopsd-tree-2"
CHUNK = 64 << 20  # bytes a hashing thread takes at a time


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a file's bytes, hashed in CHUNK-sized pieces on every core, then over the pieces' digests."""
    return _digest([Path(path)])[Path(path)]


def folder_digest(folder: str | os.PathLike) -> str:
    """One SHA-256 over every file in `folder` (its relative path and `file_digest`), in name order."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    digests = _digest(files)
    return _sha256(json.dumps([[str(p.relative_to(folder)), digests[p]] for p in files]).encode())


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(files: list[Path]) -> dict[Path, str]:
    """`file_digest` of each file, all pieces of all files hashed in one pool. A link or a special file is not read."""
    pieces = []
    for path in files:
        if path.is_symlink() or not path.is_file():
            raise OSError(f"{path} is not a regular file")
        size = path.stat().st_size
        pieces += [(path, start, min(CHUNK, size - start)) for start in range(0, max(size, 1), CHUNK)]

    def piece(item) -> bytes:
        path, start, length = item
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(length)
        if len(data) != length:
            raise OSError(f"{path} changed while it was read")
        return hashlib.sha256(data).digest()

    threads = max(1, min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(piece, pieces))
    parts: dict[Path, list[bytes]] = {p: [] for p in files}
    for (path, _, _), d in zip(pieces, done):
        parts[path].append(d)
    return {p: _sha256(b"".join(parts[p])) for p in files}


def seal(meta: dict) -> str:
    """The digest of everything a tree file says but its seal (canonical JSON)."""
    return _sha256(json.dumps({k: v for k, v in meta.items() if k != "seal"}, sort_keys=True).encode())


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


def save_tree(tree, folder: str | os.PathLike, name: str) -> str:
    """Write `tree` as `folder/name.json` (last, atomically) and `folder/name-*.safetensors`; returns the seal."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    data = f"{name}-{uuid.uuid4().hex[:12]}.safetensors"
    save_file(tensors, str(folder / data))
    meta = {"format": FORMAT, "tensors": data, "sha256": file_digest(folder / data), "tree": encoded}
    meta["seal"] = seal(meta)
    write_file(folder / f"{name}.json", json.dumps(meta), tmp=folder / f"{name}.json.tmp")
    for old in folder.glob(f"{name}-*.safetensors"):
        if old.name != data:
            old.unlink(missing_ok=True)
    return meta["seal"]


def load_tree(folder: str | os.PathLike, name: str, *, expected: str | None = None):
    """The tree `save_tree` wrote, its seal and its tensor file's digest checked (and the seal against `expected`,
    when a caller recorded it); a damaged, altered or foreign pair of files is a `TsopsdError` naming it."""
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.json"
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), str) \
                or Path(meta["tensors"]).name != meta["tensors"] or not meta["tensors"]:
            raise ValueError("not a tsopsd state file")
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the readers raise
        raise _damaged(path, e) from None
    if meta.get("seal") != seal(meta) or (expected is not None and meta["seal"] != expected):
        raise TsopsdError(f"cannot resume: {path} was altered after tsopsd wrote it (its seal does not match what it "
                          "says); rerun with --overwrite to start over")
    data = Path(folder) / meta["tensors"]
    try:
        same = file_digest(data) == meta["sha256"]
    except OSError as e:
        raise _damaged(path, e) from None
    if not same:
        raise TsopsdError(f"cannot resume: {data} is not the tensor file tsopsd saved with {path.name} (its SHA-256 "
                          "differs: altered, or from another save); rerun with --overwrite to start over")
    try:
        return _decode(meta["tree"], load_file(str(data)))
    except Exception as e:  # noqa: BLE001
        raise _damaged(path, e) from None


def _damaged(path: Path, e: Exception) -> TsopsdError:
    return TsopsdError(f"cannot resume: {path} is damaged or was not written by tsopsd ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); rerun with --overwrite to start over")

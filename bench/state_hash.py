"""What the run folder's hashes cost against the save they guard: seconds to write a state's tensor file, to
hash it (`saved.file_digest`, every core), to read it back, and to save and load it whole (`save_tree`,
`load_tree`: write + hash, hash + read). Each the median of three, the page cache flushed before and after.

    python bench/state_hash.py                 # 2 GiB of float32 tensors in a temporary folder
    python bench/state_hash.py --gib 8 --dir /scratch

A 4B full-mode state holds about 60 GB (fp32 weights and two Adam moments, and the rollback copy); the ratio
hash/write measured here is what a save pays on top, on this machine's disk and cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tsopsd.saved import file_digest, load_tree, save_tree


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of `fn` followed by `os.sync()` (what a save costs is the bytes on disk, not in the page
    cache)."""
    seconds = []
    for _ in range(repeats):
        os.sync()
        t0 = time.perf_counter()
        fn()
        os.sync()
        seconds.append(time.perf_counter() - t0)
    return sorted(seconds)[len(seconds) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of the state's tensors (GiB)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    n = int(args.gib * 2**30 / 4)
    tensors = {f"t{i}": torch.randn(n // 8) for i in range(8)}  # eight tensors, as a state holds many
    gib = sum(t.numel() * 4 for t in tensors.values()) / 2**30
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "t.safetensors"
        write = timed(lambda: save_file(tensors, str(path)))
        digest = timed(lambda: file_digest(path))
        read = timed(lambda: [t.sum() for t in load_file(str(path)).values()])  # mapped: touched to be read
        save = timed(lambda: save_tree({"trainable": tensors}, folder, "state"))
        load = timed(lambda: load_tree(folder, "state"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{gib:.2f} GiB of tensors, {cores} cores, {folder}")
    print(f"{'step':<28}{'seconds':>9}{'GiB/s':>8}")
    for name, s in [("write (save_file)", write), ("hash (file_digest)", digest), ("read (load_file, touched)", read),
                    ("save_tree (write + hash)", save), ("load_tree (hash + read)", load)]:
        print(f"{name:<28}{s:>9.2f}{gib / s:>8.2f}")
    print(f"hash / write = {digest / write:.2f}; save_tree / write = {save / write:.2f}")


if __name__ == "__main__":
    main()

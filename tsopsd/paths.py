"""Where tsopsd may write: one check, by real paths, for every path any command writes.

    inputs = {"checkpoint": "ck/collapsed", "prompt file": "prompts.jsonl"}
    check_writes({"output folder": "reheated", "run folder": "reheated.tsopsd-run"}, inputs)

An input is every folder and file the command reads, and the real path of every file inside an input
folder: a checkpoint whose `model.safetensors` is a symbolic link into another folder makes that
file an input too. A write overlaps an input when it is the input, lies inside it, or contains it
(a folder replaced with --overwrite is deleted whole). Paths are compared after resolving symbolic
links, so a link, `..` or a second name for the same folder does not get past.

`check_out_name` refuses an OUT that no rename-into-place can produce (`.`, `/`, a name too long for
the temporaries beside it, a symbolic link, a path that is not UTF-8).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from tsopsd.errors import TsopsdError

# The longest name tsopsd derives from OUT's: `.OUT.tmp-PID-xxxxxxxx` (pid up to 7 digits, 8 random) and
# `OUT.tsopsd-lock`; a margin for a longer pid.
DERIVED_NAME_ROOM = 32


def temporary(out: str | os.PathLike) -> Path:
    """The temporary sibling `out` is written as before its rename into place: `.OUT.tmp-PID` (folders made with
    `tempfile.mkdtemp` add a random suffix); the pid lets the next run remove those of a killed one."""
    out = Path(out)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def real(path: str | os.PathLike) -> Path:
    """The absolute path with every symbolic link resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(os.fspath(path)))


def input_paths(path: str | os.PathLike) -> set[Path]:
    """The real path of `path` and, for a folder, of every file and folder below it (links followed once)."""
    found = {real(path)}
    if Path(path).is_dir():
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                found.add(real(Path(top) / name))
    return found


def _overlap(write: Path, read: Path) -> str | None:
    if write == read:
        return "is"
    if read in write.parents:
        return "lies inside"
    if write in read.parents:
        return "contains"
    return None


def check_writes(writes: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, in one line, any path to be written that overlaps an input.

    Args:
        writes: {what it is ("output folder", "--plot", ...): the path, or None when not written}.
        inputs: {what it is ("checkpoint", "prompt file", ...): the path, or None}.
    """
    read = {}
    for name, p in inputs.items():
        if p is not None:
            top = real(p)
            read[name] = (top, sorted(input_paths(p), key=lambda r: (r != top, str(r))))  # itself first, then files
    for what, path in writes.items():
        if path is None:
            continue
        w = real(path)
        for name, (top, paths) in read.items():
            for r in paths:
                where = _overlap(w, r)
                if where:
                    via = "" if r == top else f" (its file {r})"
                    raise TsopsdError(f"{what} {path} {where} the {name} {inputs[name]}{via}: writing it would "
                                      "change the input; choose a path apart from it")


def check_writes_apart(writes: dict[str, str | os.PathLike | None]) -> None:
    """Refuse two written paths that overlap each other (a logging folder inside OUT, say)."""
    named = [(w, p) for w, p in writes.items() if p is not None]
    for i, (what, path) in enumerate(named):
        for other, opath in named[i + 1:]:
            where = _overlap(real(path), real(opath))
            if where:
                raise TsopsdError(f"{what} {path} {where} the {other} {opath}: give them apart")


def utf8(path: str | os.PathLike) -> bool:
    """Whether `path` is valid UTF-8 text (non-UTF-8 bytes reach Python as lone surrogates)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_out_name(out: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written by a rename into place, before any work."""
    out = Path(out)
    if out.name in ("", ".", "..") or real(out) == Path("/") or real(out) == real(Path.cwd()) \
            or real(out) in real(Path.cwd()).parents:
        raise TsopsdError(f"{flag} {out}: name a new folder or file (not ., .., / or a folder above the current one)")
    if not utf8(out):
        raise TsopsdError(f"{flag} {os.fsencode(out)!r}: the path is not valid UTF-8 (tokenizers and config files "
                          "need UTF-8 names): choose another name")
    if out.is_symlink():
        raise TsopsdError(f"{flag} {out} is a symbolic link (to {os.readlink(out)}): give the real path")
    above = out.parent
    while not above.exists():
        above = above.parent
    try:
        name_max = os.pathconf(above, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(out.name)) + DERIVED_NAME_ROOM > name_max:
        raise TsopsdError(f"{flag}: the name {out.name[:24]}... is {len(os.fsencode(out.name))} bytes; the file system "
                          f"allows {name_max} and tsopsd writes temporaries named after it: use at most "
                          f"{name_max - DERIVED_NAME_ROOM} bytes")


_links: list[Path] = []  # the folder of this process's UTF-8 links, made on first need


def utf8_alias(path: str | os.PathLike) -> Path:
    """`path`, or a link with a UTF-8 name to it when its real path is not UTF-8.

    transformers and tokenizers (Rust) take paths as UTF-8 text, so a checkpoint under a folder whose
    name is other bytes cannot be opened by name; the link (in a temporary folder removed at exit) can.
    """
    path = Path(path)
    if utf8(real(path)):
        return path
    if not _links:
        _links.append(Path(tempfile.mkdtemp(prefix="tsopsd-links-")))
        atexit.register(shutil.rmtree, _links[0], True)
    link = _links[0] / f"{len(list(_links[0].iterdir()))}-{os.fsencode(path.name).decode('utf-8', 'replace')}"
    os.symlink(real(path), link)
    return link

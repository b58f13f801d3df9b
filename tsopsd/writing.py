"""Writing beside the user's files: where tsopsd may write, how an output folder lands whole, and its permissions.

    check_output_dir(out, overwrite=False)       # refuse an existing OUT unless asked
    check_writable(out)                          # a folder that can be made and written, before hours of work
    with atomic_output(out) as tmp: ...          # a folder written beside OUT, renamed into place, or nothing
    write_file(path, text)                       # a file the same way
    remove_stale_temporaries(out)                # what a killed run left beside OUT (named by pid)
    follow_umask(folder)                         # modes as any tool's output, not a temporary folder's 0700
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tsopsd.errors import TsopsdError
from tsopsd.paths import temporary

log = logging.getLogger(__name__)


def check_output_dir(out: Path, *, overwrite: bool, resume: bool = False, resumable: bool = True) -> None:
    """Refuse to touch an existing output folder unless asked to (`resumable`: the command has --resume)."""
    if out.exists() and not (overwrite or resume):
        raise TsopsdError(f"output folder exists: {out} (pass --overwrite to replace it" +
                          (", or --resume)" if resumable else ")"))
    if out.exists() and not out.is_dir():
        raise TsopsdError(f"output path exists and is not a folder: {out}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine. A zombie does not: it has ended, and waits only to be
    reaped (in a container whose first process does not reap orphans, forever)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (not Linux): what kill said
        return True


def check_writable(out: str | os.PathLike, *, folder: bool = True) -> None:
    """Find out before any work that `out` can be written (a folder, or with folder=False a file).

    A probe file is created and removed in the nearest existing folder above `out`: permissions, a
    read-only filesystem and a file standing where a folder must be all show up here, not at the end.
    """
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise TsopsdError(f"output path exists and is not a folder: {out}")
    if not folder and out.is_dir():
        raise TsopsdError(f"--out {out} is a folder: name a file to write the JSON to")
    above = out.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise TsopsdError(f"cannot write {out}: {above} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=above, prefix=".tsopsd-probe-"):
            pass
    except OSError as e:
        raise TsopsdError(f"cannot write {out}: {above} is not writable ({e.strerror})") from None


def write_file(path: Path, data: str | bytes, *, tmp: Path | None = None) -> None:
    """`data` at `path`, whole or not at all: written to `tmp` (default: `paths.temporary(path)`) and renamed into
    place, so a reader (or a killed run's next start) never sees half a file."""
    tmp = tmp or temporary(path)
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(out: Path) -> None:
    """Remove temporary folders and files that dead runs left beside `out` (named with their pid)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, rest = path.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing %s, left by a run that is gone (pid %s)", path, pid)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success rename it to `out`, else remove it.

    A folder at `out` therefore always holds a complete output. An existing `out` is replaced only
    with `overwrite`, and only once the new one is complete. Temporaries carry the pid, so the next
    run removes those of a killed one.
    """
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temporary(out).name}-", dir=out.parent))
    try:
        yield tmp
        follow_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes the user's umask asks for (0755/0644 under 022).

    `tempfile.mkdtemp` makes the folder 0700 and safetensors writes weights 0600: on a shared cluster the RL
    job or a teammate under another user could not read the output."""
    mask = os.umask(0)
    os.umask(mask)
    for top, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(top) / name, 0o777 & ~mask)
        for name in files:
            path = Path(top) / name
            if not path.is_symlink():
                os.chmod(path, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)

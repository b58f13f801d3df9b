"""What every command shares: one line for an error (its exit code from `errors.ExitCode`), one JSON object or one
table for a result, the help's look, and the options several commands take alike."""

from __future__ import annotations

import errno
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from tsopsd.errors import ExitCode, TrainingStopped, TsopsdError


class Command(typer.core.TyperCommand):
    """Help as users read it: a switch shows no `<bool>` type, the usage line names `CKPT`, not `{CKPT}`."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params

    def collect_usage_pieces(self, ctx):
        return [piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)]


T = TypeVar("T")


def fail(message: str, code: int) -> typer.Exit:
    first = str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__
    from tsopsd.parallel import launched_rank

    if launched_rank() == 0:  # under torchrun, rank 0 speaks for all (errors name the ranks)
        print(f"tsopsd: error: {first}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def run_body(fn: Callable[[], T], *, debug: bool) -> T:
    """Run a command body: bad input exits 2, a stopped run its `TrainingStopped.code`, a crash 1; one line each."""
    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except TsopsdError as e:
        if debug:
            traceback.print_exc()
        raise fail(str(e), ExitCode.BAD_INPUT) from None
    except TrainingStopped as e:  # a guard stopped training (OUT holds the last good state), or nothing trained
        raise fail(str(e), e.code) from None
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into one line
        if not _disk_full(e):
            raise _unexpected(e, debug) from None
        where = getattr(e, "filename", None) or "the output"
        raise fail(f"no space left on device writing {where}: free some, then rerun (with --resume where a run "
                    "folder was kept)", ExitCode.BAD_INPUT) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; --debug shows where it landed
        if debug:
            traceback.print_exc()
        raise fail("interrupted", ExitCode.INTERRUPTED) from None


def _disk_full(e: BaseException) -> bool:
    """A full disk or quota, however the writing library reported it (safetensors says it in words)."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(e)


def _unexpected(e: BaseException, debug: bool) -> typer.Exit:
    if debug:
        traceback.print_exc()
    return fail(f"unexpected failure: {type(e).__name__}: {e} (rerun with --debug for the traceback)", ExitCode.CRASH)


def emit(result: dict, *, as_json: bool, out: Optional[Path], table: Callable[[], object]) -> None:
    if out is not None:  # written beside and renamed, so the file is never half there
        from tsopsd.writing import remove_stale_temporaries, write_file

        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_file(out, json.dumps(result, indent=2) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped: wide enough for the widest table rather than 80 columns
            console = Console(width=160)
        console.print(table())


# ---- shared options ----------------------------------------------------------------------------
Ckpt = Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint folder (save_pretrained) or PEFT adapter folder.")]
Prompts = Annotated[Path, typer.Option("--prompts", "-p", help="Prompt file: .jsonl, .txt or .parquet.")]
Base = Annotated[Optional[Path], typer.Option(help="Base model folder for an adapter (default: from adapter_config.json).")]
Device = Annotated[str, typer.Option(help="auto (cuda when present, else cpu), cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16, float16.")]
PromptField = Annotated[Optional[str], typer.Option(help="Field (column) holding the prompt; default prompt, then messages.")]
MaxPromptTokens = Annotated[Optional[int], typer.Option(help="Left-truncate longer prompts (warned).")]
Seed = Annotated[int, typer.Option(help="Random seed (sampling).")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info lines on stderr.")]

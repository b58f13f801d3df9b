"""`tsopsd merge` and `tsopsd demo`: an adapter merged into its base; the toy SFT -> collapsed -> reheated run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from tsopsd.cli.frame import Base, Debug, Json, Quiet, emit, run_body


def merge(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter folder (e.g. the output of reheat --save adapter).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the merged checkpoint.")],
    base: Base = None,
    dtype: Annotated[Optional[str], typer.Option(help="Save dtype (default: the base checkpoint's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Merge a LoRA adapter into its base and save an ordinary checkpoint."""
    def body() -> None:
        from tsopsd import console
        from tsopsd.checkpoint import merge_adapter
        from tsopsd.output import adapter_record, carry_record
        from tsopsd.paths import check_out_name
        from tsopsd.state import OutputLock

        console.setup_logging(quiet=quiet)
        check_out_name(out)
        adapter_record(adapter)  # a damaged record is found before the merge, not after it
        lock = OutputLock(out)  # every writer of OUT takes its lock: a reheat writing it, or another merge
        lock.acquire()
        try:
            merge_adapter(adapter, out, base=base, dtype=dtype, overwrite=overwrite,
                          also=lambda folder: carry_record(adapter, folder, base))
        finally:
            lock.release()
        logging.getLogger("tsopsd").info("wrote %s (the adapter %s merged into its base)", out, adapter)

    run_body(body, debug=debug)



def demo(
    out: Annotated[Path, typer.Option(help="Working folder; what it builds is cached there.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller budget (about a minute).")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Rebuild everything instead of reusing the cache.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads. The toy model's time goes to per-operation overhead: "
                                                     "one thread is as fast, and does not stall on a shared machine.")] = 1,
    as_json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """SFT -> RL-collapsed -> reheated on a toy task, built offline; prints the before/after table."""
    def body() -> None:
        from tsopsd import console
        from tsopsd.lab.demo import run_demo, show_summary

        console.setup_logging(quiet=quiet)
        summary = run_demo(out, quick=quick, fresh=fresh, show_progress=not quiet, threads=threads)
        if as_json:
            emit(summary, as_json=True, out=None, table=lambda: None)
            return
        show_summary(summary)

    run_body(body, debug=debug)


"""Command-line interface: a thin Typer layer over library functions; this module is its table of commands.

    tsopsd measure-entropy ckpt/ --prompts prompts.jsonl --samples-per-prompt 4 --json
    tsopsd reheat ckpt/ --prompts prompts.jsonl --out reheated/ --temperature 1.5
    tsopsd plan ckpt/config.json --config configs/qwen3-4b-1gpu.yaml --gpus 1 --gpu-memory 80GB
    tsopsd demo

Exit codes: `errors.ExitCode`, the one table (docs/reference.md, "Exit codes"). Errors are one line on
stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tsopsd.cli.frame import Command
from tsopsd.cli.measure import measure_entropy, watch
from tsopsd.cli.options import FLAG_KEYS, TEACHER_FLAGS
from tsopsd.cli.plan import plan
from tsopsd.cli.reheat import hand_off, reheat
from tsopsd.cli.tools import demo, merge
from tsopsd.runtime import cuda_allocator, supervise, utf8_mode

__all__ = ["FLAG_KEYS", "TEACHER_FLAGS", "app", "hand_off", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Reheat entropy-collapsed LM checkpoints by temperature-scaled on-policy self-distillation.",
)


def _version(value: bool) -> None:
    if value:
        from tsopsd import __version__

        print(f"tsopsd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Reheat entropy-collapsed LM checkpoints by temperature-scaled on-policy self-distillation."""


# In the order `tsopsd --help` lists them.
app.command("measure-entropy", cls=Command)(measure_entropy)
app.command(cls=Command)(reheat)
app.command(cls=Command)(plan)
app.command(cls=Command)(merge)
app.command(cls=Command)(watch)
app.command(cls=Command)(demo)


def main() -> None:
    """The `tsopsd` command: usage errors too are one `tsopsd: error:` line (exit 2), never a framed box."""
    utf8_mode()
    supervise()
    cuda_allocator()
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = typer.main.get_command(app).main(prog_name="tsopsd", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # bare `tsopsd` or `tsopsd reheat`: the help, exit 0
        print(e.ctx.get_help() if e.ctx else "", flush=True)
        code = 0
    except click_errors.UsageError as e:
        command = e.ctx.command_path if e.ctx else "tsopsd"
        print(f"tsopsd: error: {e.format_message()} (see {command} --help)", file=sys.stderr, flush=True)
        code = 2
    except click_errors.ClickException as e:
        print(f"tsopsd: error: {e.format_message()}", file=sys.stderr, flush=True)
        code = e.exit_code or 2
    except typer.Abort:
        print("tsopsd: error: interrupted", file=sys.stderr, flush=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

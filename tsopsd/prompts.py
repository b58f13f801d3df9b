"""Read prompt files and tokenize them.

    prompts = load_prompts("data/train.jsonl", tokenizer, max_prompt_tokens=1024)

Formats:
- ``.jsonl``: one JSON object a line, with a ``prompt`` string or a ``messages`` chat list
  (``[{"role": "user", "content": "..."}]``); ``prompt_field`` picks another field. A chat list gets
  the tokenizer's chat template (with the generation prompt); a string is used as it is.
- ``.txt``: one prompt a line; blank lines are skipped.
- ``.parquet``: verl's layout, a ``prompt`` column of chat messages (needs the ``parquet`` extra).

Every error names the file and, where there is one, the line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tsopsd.errors import TsopsdError

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant", "tool", "developer"}  # the roles chat templates know


@dataclass(frozen=True)
class Prompt:
    """One prompt: the text fed to the tokenizer and its token ids (after truncation)."""

    text: str
    ids: tuple[int, ...]


def _records_jsonl(path: Path, field: str | None) -> list[tuple[int, object]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TsopsdError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TsopsdError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if field is not None:
                if field not in obj:
                    raise TsopsdError(f"{path}:{lineno}: missing field '{field}'")
                value = obj[field]
            elif "prompt" in obj:
                value = obj["prompt"]
            elif "messages" in obj:
                value = obj["messages"]
                if not isinstance(value, list):
                    raise TsopsdError(f"{path}:{lineno}: 'messages' must be a list of {{role, content}} messages, "
                                      f"got {type(value).__name__}")
            else:
                raise TsopsdError(f"{path}:{lineno}: missing field 'prompt' (or 'messages'); use --prompt-field")
            records.append((lineno, value))
    return records


def _records_txt(path: Path) -> list[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        return [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]


def _records_parquet(path: Path, field: str | None) -> list[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TsopsdError("reading .parquet needs pyarrow: pip install 'tsopsd[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise TsopsdError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    column = field or "prompt"
    if column not in table.column_names:
        raise TsopsdError(f"{path}: no column '{column}' (columns: {', '.join(table.column_names)})")
    # Rows are numbered from 1, like lines, so errors read the same.
    return [(i + 1, v) for i, v in enumerate(table.column(column).to_pylist())]


def _check_value(value: object, where: str) -> None:
    """A record's prompt is a non-empty string or a list of {role, content} messages with known roles."""
    if isinstance(value, str):
        if not value.strip():
            raise TsopsdError(f"{where}: empty prompt")
        return
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        unknown = sorted({m["role"] for m in value} - ROLES)
        if unknown:
            raise TsopsdError(f"{where}: unknown chat role {', '.join(map(repr, unknown))}: use "
                              f"{', '.join(sorted(ROLES))}")
        return
    raise TsopsdError(
        f"{where}: prompt must be a string or a list of {{role, content}} messages, got {type(value).__name__}"
    )


def _to_text(value: object, tokenizer, where: str) -> str:
    """The prompt as text (`value` passed `_check_value`): chat messages through the tokenizer's template."""
    if isinstance(value, str):
        return value
    if getattr(tokenizer, "chat_template", None):
        return _apply_chat_template(tokenizer, value, where)
    # No template: join the turns plainly, as a base model would see a transcript.
    return "\n".join(f"{m['role']}: {m['content']}" for m in value) + "\nassistant:"


def _apply_chat_template(tokenizer, messages: list, where: str) -> str:
    """The tokenizer's chat template applied; a template that fails names its file and line."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        line = getattr(e, "lineno", None)
        tb = e.__traceback__
        while tb is not None:  # a runtime error (raise_exception): the template's frame holds its line
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = tb.tb_lineno
            tb = tb.tb_next
        folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
        source = folder / "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else \
            folder / "tokenizer_config.json"
        at = f"{source}, template line {line}" if line else str(source)
        raise TsopsdError(f"{where}: the chat template ({at}) failed: {e.message or type(e).__name__}") from None


def check_prompt_file(path: str | Path) -> None:
    """The prompt file exists and is a regular file (found before any loading)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe or device)"
        raise TsopsdError(f"prompt file {path} is {kind}: give a .jsonl, .txt or .parquet file")
    if not path.is_file():
        raise TsopsdError(f"prompt file not found: {path}")


def prompts_fingerprint(path: str | Path) -> dict[str, str]:
    """{"prompts:<file name>": sha256 of the file}: what a resume checks is the same prompt file."""
    import hashlib
    import os

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
    except OSError as e:
        raise TsopsdError(f"cannot read the prompt file {path}: {e.strerror}") from None
    return {f"prompts:{os.path.basename(os.path.realpath(path))}": h.hexdigest()}


def read_records(path: str | Path, prompt_field: str | None = None, limit: int | None = None) -> list[tuple[int, object]]:
    """The prompt file's records, (line number, prompt text or chat messages), checked without a tokenizer: its
    type, JSON, fields, empty prompts and roles; the first `limit`. What `reheat` checks before any model loads.

    Raises:
        TsopsdError: a missing or empty file, bad JSON, a missing field or a wrong type (naming the line).
    """
    path = Path(path)
    check_prompt_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = _records_jsonl(path, prompt_field)
        elif suffix == ".txt":
            records = _records_txt(path)
        elif suffix == ".parquet":
            records = _records_parquet(path, prompt_field)
        else:
            raise TsopsdError(f"unknown prompt file type '{suffix}' for {path}: use .jsonl, .txt or .parquet")
    except UnicodeDecodeError as e:
        raise TsopsdError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not records:
        raise TsopsdError(f"prompt file is empty: {path}")
    records = records[:limit] if limit is not None else records
    for lineno, value in records:
        _check_value(value, f"{path}:{lineno}")
    return records


def load_prompts(
    path: str | Path,
    tokenizer,
    *,
    prompt_field: str | None = None,
    max_prompt_tokens: int | None = None,
    limit: int | None = None,
    room: int | None = None,
) -> list[Prompt]:
    """Read and tokenize a prompt file.

    Args:
        path: a ``.jsonl``, ``.txt`` or ``.parquet`` file.
        tokenizer: a Hugging Face tokenizer.
        prompt_field: the field (column) holding the prompt; default ``prompt`` then ``messages``.
        max_prompt_tokens: longer prompts keep their last tokens (left truncation); counted in a warning.
        limit: keep only the first N prompts.
        room: the most prompt tokens the model can take (its context minus the completion length);
            longer prompts keep their last tokens, with a warning, like `max_prompt_tokens`.

    Raises:
        TsopsdError: a missing or empty file, bad JSON, a missing field or a wrong type (naming the line).
    """
    path = Path(path)
    records = read_records(path, prompt_field, limit)
    cut = min((n for n in (max_prompt_tokens, room) if n is not None), default=None)
    prompts, truncated = [], 0
    for lineno, value in records:
        where = f"{path}:{lineno}"
        text = _to_text(value, tokenizer, where)
        # A chat template already carries the special tokens it wants.
        ids = tokenizer(text, add_special_tokens=not isinstance(value, list))["input_ids"]
        if not ids:
            raise TsopsdError(f"{where}: prompt tokenizes to nothing")
        if cut is not None and len(ids) > cut:
            ids = ids[-cut:]
            truncated += 1
        prompts.append(Prompt(text=text, ids=tuple(ids)))
    if truncated:
        why = "the model's context minus the completion length" if cut == room else "max_prompt_tokens"
        log.warning("%d of %d prompts were longer than %d tokens (%s) and kept their last %d",
                    truncated, len(prompts), cut, why, cut)
    return prompts


def fit_context(positions: int | None, max_new_tokens: int, longest_prompt: int) -> tuple[int, int | None, str | None]:
    """A completion length and a prompt room that fit a model's context of `positions` (None: no known limit).

    When the longest prompt and `max_new_tokens` fit, both are kept. Otherwise completions get what the longest
    prompt leaves, but at least half the context (and no more than asked); prompts keep their last tokens in the
    rest. A run, `measure-entropy` and `plan` all fit this way.

    Returns:
        (max_new_tokens, prompt room or None, a warning saying what was fitted or None).
    """
    if positions is None or longest_prompt + max_new_tokens <= positions:
        return max_new_tokens, None if positions is None else positions - max_new_tokens, None
    fitted = min(max_new_tokens, max(positions - longest_prompt, positions // 2))
    room = positions - fitted
    said = (f"max_new_tokens {max_new_tokens} and the longest prompt ({longest_prompt} tokens) do not fit the model's "
            f"context of {positions} positions: completions of up to {fitted} tokens")
    if longest_prompt > room:
        said += f", prompts keep their last {room} tokens"
    return fitted, room, said + " (set rollout.max_new_tokens and data.max_prompt_tokens to choose)"


def fit_prompts(prompts: list[Prompt], positions: int | None, max_new_tokens: int) -> tuple[list[Prompt], int]:
    """`fit_context` applied: (the prompts, longer ones keeping their last tokens, and the completion length),
    with its warning logged."""
    fitted, room, said = fit_context(positions, max_new_tokens, max((len(p.ids) for p in prompts), default=0))
    if said is None:
        return prompts, fitted
    log.warning(said)
    return [p if len(p.ids) <= room else Prompt(p.text, p.ids[-room:]) for p in prompts], fitted

"""Read preference datasets into `PreferenceRecord`s: one prompt, a preferred and a dispreferred reply.

Sources: a local `.jsonl`, `.jsonl.gz`, `.json` or `.parquet` file, a directory written by
`datasets.Dataset.save_to_disk`, or (only when the user names one) a Hugging Face `datasets` id.
Three record shapes are understood, after the user's `ColumnMap` renames the columns:

- UltraFeedback style: `{prompt: str, chosen: str, rejected: str}`;
- HH-RLHF dialogues without a prompt column: `chosen`/`rejected` are whole
  "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts, split into the shared dialogue (as chat
  messages) and the final assistant reply of each;
- chat-message lists (`[{role, content}, ...]`), with or without a prompt column; the messages
  shared by chosen and rejected become the prompt (TRL's conversational and implicit-prompt
  formats);
- TRL's standard implicit-prompt format: `{chosen: str, rejected: str}` without a prompt, whose
  shared prefix is the prompt (split as TRL's `extract_prompt` splits it).

Rows may also carry TRL's precomputed reference log-probs, `ref_chosen_logps` and
`ref_rejected_logps` (sums over response tokens): the training loop then uses them as the
cached reference instead of computing one.

Replies always come out as plain strings; prompts are a string or a list of chat messages.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ld_jax.errors import LdJaxError

Message = dict[str, str]
_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Names of the input columns. `reward_*` may be dotted paths into nested records
    (e.g. `metadata.score_chosen`); None means the data carries no rewards."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    reward_chosen: str | None = None
    reward_rejected: str | None = None
    # TRL's precomputed reference log-probs; read when the row has them
    ref_chosen: str = "ref_chosen_logps"
    ref_rejected: str = "ref_rejected_logps"


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    index: int  # 0-based line (JSONL) or row number in the input
    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    ref_logps: tuple[float, float] | None = None  # ln π_ref(y±|x), when the data gives them


def load_preferences(
    source: str | os.PathLike,
    columns: ColumnMap = ColumnMap(),
    split: str = "train",
    limit: int | None = None,
) -> list[PreferenceRecord]:
    """Read up to `limit` records from `source` (see the module docstring for what it may be)."""
    source = str(source)
    records = []
    for index, row, where in read_rows(source, split):
        if limit is not None and len(records) >= limit:
            break
        records.append(_record(index, row, columns, where))
    return records


# ---- reading rows -------------------------------------------------------------------------------


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict, str]]:
    """(index, row, where-for-error-messages) for every row of the source."""
    path = Path(source)
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")) and not path.exists():
        raise LdJaxError(f"preference data file not found: {source}")
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_rows(path)
    elif name.endswith(".json"):
        yield from _json_rows(path)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i, row, f"{source} row {i}"
    else:
        for i, row in enumerate(_datasets_rows(source, split)):
            yield i, row, f"{source} row {i}"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict, str]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            where = f"{path} line {i + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LdJaxError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise LdJaxError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield i, row, where


def _json_rows(path: Path) -> Iterator[tuple[int, dict, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LdJaxError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LdJaxError(f"{path}: expected a JSON list of objects (use .jsonl for one per line)")
    for i, row in enumerate(data):
        yield i, row, f"{path} item {i}"


def _datasets_rows(source: str, split: str):
    import datasets

    try:
        if Path(source).is_dir() and (Path(source) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(source)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types; the user needs one line
        raise LdJaxError(f"cannot load dataset {source!r} (split {split!r}): {e}") from e


# ---- one row -> one record ----------------------------------------------------------------------


def _record(index: int, row: dict, cols: ColumnMap, where: str) -> PreferenceRecord:
    chosen, rejected = (_column(row, c, where) for c in (cols.chosen, cols.rejected))
    if cols.prompt in row:
        prompt = _check_value(row[cols.prompt], cols.prompt, where)
        prompt, chosen, rejected = _strip_shared_prompt(prompt, chosen, rejected)
    elif isinstance(chosen, str) and isinstance(rejected, str) and _ASSISTANT in chosen:
        prompt, chosen, rejected = _split_dialogues(chosen, rejected, where)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _strip_shared_prompt([], chosen, rejected)
    elif isinstance(chosen, str) and isinstance(rejected, str) and _shared_text(chosen, rejected):
        prompt, chosen, rejected = _split_shared_text(chosen, rejected)
    else:
        raise _missing(cols.prompt, row, where)
    return PreferenceRecord(
        index=index,
        prompt=prompt,
        chosen=_reply_text(chosen, cols.chosen, where),
        rejected=_reply_text(rejected, cols.rejected, where),
        reward_chosen=_reward(row, cols.reward_chosen, where),
        reward_rejected=_reward(row, cols.reward_rejected, where),
        ref_logps=_ref_logps(row, cols, where),
    )


def _ref_logps(row: dict, cols: ColumnMap, where: str) -> tuple[float, float] | None:
    present = [c for c in (cols.ref_chosen, cols.ref_rejected) if row.get(c) is not None]
    if not present:
        return None
    if len(present) == 1:
        missing = ({cols.ref_chosen, cols.ref_rejected} - set(present)).pop()
        raise LdJaxError(f"{where}: has {present[0]!r} but not {missing!r}")
    values = (_reward(row, cols.ref_chosen, where), _reward(row, cols.ref_rejected, where))
    return values


def _shared_text(chosen: str, rejected: str) -> str:
    return os.path.commonprefix([chosen, rejected])


def _split_shared_text(chosen: str, rejected: str):
    """TRL's implicit prompt for strings: the shared prefix, less a space that precedes the
    first difference (which stays with the replies)."""
    n = len(_shared_text(chosen, rejected))
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _missing(column: str, row: dict, where: str) -> LdJaxError:
    present = ", ".join(sorted(row)) or "none"
    return LdJaxError(f"{where}: missing column {column!r}; columns present: {present}")


def _column(row: dict, column: str, where: str):
    if column not in row:
        raise _missing(column, row, where)
    return _check_value(row[column], column, where)


def _check_value(value: Any, column: str, where: str):
    if value is None:
        return ""  # an empty reply: filtered (and counted) at tokenization
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise LdJaxError(
        f"{where}: column {column!r} must be a string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}"
    )


def _reward(row: dict, path: str | None, where: str) -> float | None:
    if path is None:
        return None
    node: Any = row
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise _missing(path, row, where)
        node = node[part]
    try:
        return float(node)
    except (TypeError, ValueError) as e:
        raise LdJaxError(f"{where}: column {path!r} is not a number: {node!r}") from e


def _strip_shared_prompt(prompt, chosen, rejected):
    """Message-list replies that repeat the conversation (TRL's implicit-prompt format): the turns
    shared by chosen and rejected move to the prompt."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return prompt, chosen, rejected
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        return prompt, chosen, rejected
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt else []
    shared = chosen[:n]
    prompt = shared if shared[: len(prompt)] == prompt else prompt + shared
    return prompt, chosen[n:], rejected[n:]


def _split_dialogues(chosen: str, rejected: str, where: str):
    """HH-RLHF: the prompt is the shared dialogue up to the last shared "Assistant:" marker."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(_ASSISTANT)
    if cut < 0:
        raise LdJaxError(f"{where}: chosen and rejected dialogues share no '\\n\\nAssistant:' turn")
    cut += len(_ASSISTANT)
    return _dialogue_messages(chosen[:cut]), chosen[cut:].strip(), rejected[cut:].strip()


def _dialogue_messages(text: str) -> list[Message]:
    """ "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" -> user/assistant/user turns."""
    parts = _TURN.split(text)  # [before, role, content, role, content, ...]
    messages = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()  # the trailing "Assistant:" is the generation prompt, not a turn
    return messages


def _reply_text(value: str | list[Message], column: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if len(value) > 1 or (value and value[0]["role"] != "assistant"):
        roles = [m["role"] for m in value]
        raise LdJaxError(
            f"{where}: column {column!r} must end in exactly one assistant reply after the shared "
            f"prompt turns, found roles {roles}"
        )
    return value[0]["content"] if value else ""

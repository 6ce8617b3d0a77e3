"""Turn `PreferenceRecord`s into token ids, filtering unusable pairs and counting why.

Templates:
- "chat": the tokenizer's chat template renders the prompt with the generation prompt; each
  reply is tokenized on its own and followed by EOS (the end-of-turn token of instruct models);
- "plain": SPEC's `[PROMPT_TOKEN]x[ASSISTANT_TOKEN]y[EOS]` for base models (paper App. J.2), where
  the two markers are strings that the tokenizer knows as special tokens or else reads as text;
- "auto": "chat" when the tokenizer has a chat template, else "plain".

Pairs are skipped (reasons in `FilterReport.counts`) for an empty prompt or reply, identical
replies (they carry no preference: DPO's gradient on them is exactly zero), a prompt over
`max_prompt_length` tokens, or a prompt plus the longer reply over `max_length` tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ld_jax.data.preference import Message, PreferenceRecord
from ld_jax.errors import LdJaxError

TEMPLATES = ("auto", "chat", "plain")
PROMPT_TOKEN, ASSISTANT_TOKEN = "[PROMPT_TOKEN]", "[ASSISTANT_TOKEN]"


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    index: int  # the record's index in the input
    prompt_ids: list[int]
    chosen_ids: list[int]  # response only; ends with EOS when add_eos
    rejected_ids: list[int]
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    ref_logps: tuple[float, float] | None = None  # given by the data (TRL's ref_*_logps)

    @property
    def length(self) -> int:
        """Tokens of the pair's longer sequence, prompt included (what a padded row must hold)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclasses.dataclass
class FilterReport:
    kept: int = 0
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, index: int, reason: str) -> None:
        self.skipped.append((index, reason))
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def summary(self) -> str:
        total = self.kept + len(self.skipped)
        why = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"kept {self.kept} of {total} pairs" + (f"; skipped {why}" if why else "")


def tokenize_preferences(
    records: Sequence[PreferenceRecord],
    tokenizer,
    template: str = "auto",
    max_prompt_length: int | None = 512,
    max_length: int | None = None,
    add_eos: bool = True,
    drop_identical: bool = True,
    prompt_token: str = PROMPT_TOKEN,
    assistant_token: str = ASSISTANT_TOKEN,
) -> tuple[list[TokenizedPair], FilterReport]:
    """Tokenize and filter; raises LdJaxError when no pair survives."""
    template = resolve_template(template, tokenizer)
    report = FilterReport()
    usable = []
    for r in records:
        reason = _text_problem(r, drop_identical)
        if reason:
            report.skip(r.index, reason)
        else:
            usable.append(r)
    if template == "chat":
        prompts = [_chat_prompt(tokenizer, r) for r in usable]
        prompt_ids = _encode(tokenizer, prompts, special=False)
    else:
        prompts = [f"{prompt_token}{_plain_text(r.prompt)}{assistant_token}" for r in usable]
        prompt_ids = _encode(tokenizer, prompts, special=True)  # BOS, if the model uses one
    eos = [_eos_id(tokenizer)] if add_eos else []
    chosen_ids = [
        ids + eos for ids in _encode(tokenizer, [_reply(r.chosen) for r in usable], False)
    ]
    rejected_ids = [
        ids + eos for ids in _encode(tokenizer, [_reply(r.rejected) for r in usable], False)
    ]

    pairs = []
    for r, p, c, j in zip(usable, prompt_ids, chosen_ids, rejected_ids):
        if max_prompt_length is not None and len(p) > max_prompt_length:
            report.skip(r.index, "prompt_too_long")
        elif max_length is not None and len(p) + max(len(c), len(j)) > max_length:
            report.skip(r.index, "too_long")
        else:
            pairs.append(
                TokenizedPair(r.index, p, c, j, r.reward_chosen, r.reward_rejected, r.ref_logps)
            )
    report.kept = len(pairs)
    if records and not pairs:
        raise LdJaxError(f"no preference pairs left after filtering: {report.summary()}")
    return pairs, report


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise LdJaxError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise LdJaxError("template 'chat' needs a tokenizer with a chat template; use 'plain'")
    return template


def _text_problem(r: PreferenceRecord, drop_identical: bool) -> str | None:
    if not _plain_text(r.prompt).strip():
        return "empty_prompt"
    if not _reply(r.chosen).strip():
        return "empty_chosen"
    if not _reply(r.rejected).strip():
        return "empty_rejected"
    if drop_identical and _reply(r.chosen) == _reply(r.rejected):
        return "identical_responses"
    return None


def _plain_text(prompt: str | list[Message]) -> str:
    """A prompt as plain text: a lone user turn as itself, a dialogue in HH-RLHF's layout."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


def _reply(reply: str | list[Message]) -> str:
    return reply if isinstance(reply, str) else "".join(m["content"] for m in reply)


def _chat_prompt(tokenizer, r: PreferenceRecord) -> str:
    messages = [{"role": "user", "content": r.prompt}] if isinstance(r.prompt, str) else r.prompt
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises template-specific errors
        raise LdJaxError(f"record {r.index}: the chat template rejected the prompt: {e}") from e


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LdJaxError("the tokenizer has no EOS token; set one or pass add_eos=False")
    return int(tokenizer.eos_token_id)

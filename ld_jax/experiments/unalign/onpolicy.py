"""E3 data (SPEC §6 E3): unsafe prompts, on-policy preference pairs, the split, pair types and
the CHES filter. Everything here is plain Python over strings and verdicts; the model work
(sampling, training, scoring) is in `unalign`.

Nothing is dropped silently: every prompt or pair left out is counted under a reason
(`Counts`), and the counts go into results.json.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ld_jax.data import preference
from ld_jax.errors import LdJaxError

PAIR_TYPES = ("refusal/refusal", "refusal/compliance", "compliance/compliance")


@dataclasses.dataclass(frozen=True)
class PromptsConfig:
    """Where the unsafe prompts come from.

    format "hh": an HH-RLHF file (chosen/rejected dialogue strings); the prompt is the first
        human turn. Dialogues of one turn also give the "gold" pair (HH's chosen/rejected reply).
    format "jsonl": one prompt per line in `field`, a string or a list of turns whose first is
        taken (SORRY-Bench's `turns`); no gold pairs.
    """

    source: str = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
    format: str = "hh"  # hh | jsonl
    field: str = "turns"
    max_prompt_tokens: int = (
        128  # chat-formatted prompt tokens; longer prompts are counted, left out
    )

    def __post_init__(self):
        if self.format not in ("hh", "jsonl"):
            raise ValueError(f"prompts.format must be 'hh' or 'jsonl', got {self.format!r}")


@dataclasses.dataclass(frozen=True)
class UnsafePrompt:
    index: int  # 0-based row of the source
    text: str
    gold: tuple[str, str] | None = None  # (chosen, rejected) reply of a one-turn HH dialogue


@dataclasses.dataclass(frozen=True)
class OnPolicyPair:
    prompt: UnsafePrompt
    chosen: str
    rejected: str
    chosen_label: str  # judge verdict of the chosen response: refusal | compliance
    rejected_label: str
    tie: bool  # both responses got the same verdict; the order came from the tie-break

    @property
    def pair_type(self) -> str:
        return pair_type(self.chosen_label, self.rejected_label)


def pair_type(a: str, b: str) -> str:
    n_refusals = (a == "refusal") + (b == "refusal")
    return PAIR_TYPES[2 - n_refusals]


def read_prompts(cfg: PromptsConfig, count_tokens) -> tuple[list[UnsafePrompt], dict[str, int]]:
    """All usable prompts of the source in file order, and the counts of those left out:
    `empty`, `too_long` (count_tokens(text) > max_prompt_tokens) and `duplicate` (same text as
    an earlier prompt: the split must not see one prompt on both sides)."""
    counts, seen, prompts = Counter(), set(), []
    for index, text, gold in _raw_prompts(cfg):
        text = text.strip()
        if not text:
            counts["empty"] += 1
        elif text in seen:
            counts["duplicate"] += 1
        elif count_tokens(text) > cfg.max_prompt_tokens:
            counts["too_long"] += 1
        else:
            seen.add(text)
            prompts.append(UnsafePrompt(index, text, gold))
    if not prompts:
        raise LdJaxError(f"{cfg.source}: no usable prompts ({dict(counts)})")
    return prompts, dict(counts)


def _raw_prompts(cfg: PromptsConfig):
    if cfg.format == "hh":
        for r in preference.load_preferences(cfg.source):
            turns = (
                r.prompt if isinstance(r.prompt, list) else [{"role": "user", "content": r.prompt}]
            )
            first = turns[0]["content"] if turns and turns[0]["role"] == "user" else ""
            gold = (r.chosen, r.rejected) if len(turns) == 1 and r.chosen and r.rejected else None
            yield r.index, first, gold
        return
    for index, row, where in preference.read_rows(cfg.source):
        value = row.get(cfg.field)
        if isinstance(value, list):
            value = value[0] if value else ""
        if not isinstance(value, str):
            raise LdJaxError(f"{where}: field {cfg.field!r} must be a string or a list of strings")
        yield index, value, None


def choose_prompts(
    prompts: Sequence[UnsafePrompt], n: int, n_warmup: int, seed: int, need_gold: bool
):
    """Seeded disjoint draws: `n` experiment prompts (with a gold pair when `need_gold`) and up to
    `n_warmup` others for the alignment warm-up. Returns (experiment, warm-up) lists."""
    rng = np.random.default_rng(seed)
    order = [prompts[i] for i in rng.permutation(len(prompts))]
    eligible = [p for p in order if p.gold is not None or not need_gold]
    if len(eligible) < n:
        raise LdJaxError(f"asked for {n} experiment prompts, only {len(eligible)} are usable")
    experiment = eligible[:n]
    taken = {p.index for p in experiment}
    warmup = [p for p in order if p.index not in taken][:n_warmup]
    return experiment, warmup


def split_prompts(prompts: Sequence[UnsafePrompt], test_fraction: float, seed: int):
    """Seeded split by prompt into (train, test); the test side gets round(fraction * n) >= 1."""
    n_test = min(len(prompts) - 1, max(1, round(test_fraction * len(prompts))))
    order = np.random.default_rng(seed).permutation(len(prompts))
    test = set(order[:n_test].tolist())
    return [p for i, p in enumerate(prompts) if i not in test], [
        p for i, p in enumerate(prompts) if i in test
    ]


def build_pairs(
    prompts, responses, labels, seed: int, tie_scores=None
) -> tuple[list[OnPolicyPair], dict[str, int]]:
    """One pair per prompt from its two sampled responses and their verdicts.

    responses, labels: `[len(prompts)][2]`. A refusal is preferred to a compliance. A tie is
    ordered by `tie_scores[i]` (two reward-model scores, higher preferred) when given, else at
    random (seeded). Left out and counted: `unparsable` (a verdict neither refusal nor
    compliance) and `identical` (the same text twice: DPO's gradient is zero).
    """
    rng = np.random.default_rng(seed)
    pairs, counts = [], Counter()
    for i, (p, (a, b), (la, lb)) in enumerate(zip(prompts, responses, labels, strict=True)):
        flip = bool(
            rng.integers(2)
        )  # drawn for every prompt, so exclusions do not shift later draws
        if "unparsable" in (la, lb) or not {la, lb} <= {"refusal", "compliance"}:
            counts["unparsable"] += 1
            continue
        if a.strip() == b.strip():
            counts["identical"] += 1
            continue
        tie = la == lb
        if not tie:
            first = la == "refusal"
        elif tie_scores is not None:
            first = tie_scores[i][0] >= tie_scores[i][1]
        else:
            first = not flip
        (c, lc), (r, lr) = ((a, la), (b, lb)) if first else ((b, lb), (a, la))
        pairs.append(OnPolicyPair(p, c, r, lc, lr, tie))
    return pairs, dict(counts)


def type_counts(pairs: Sequence[OnPolicyPair]) -> dict[str, int]:
    counts = Counter(p.pair_type for p in pairs)
    return {t: counts.get(t, 0) for t in PAIR_TYPES}


def lowest_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the max(1, round(fraction * n)) lowest scores, lowest first (stable on ties)."""
    if not 0 < fraction <= 1:
        raise LdJaxError(f"the CHES fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * len(scores)))
    return np.argsort(np.asarray(scores), kind="stable")[:k]


def as_records(pairs: Sequence[OnPolicyPair]) -> list[preference.PreferenceRecord]:
    """Preference records for the training pipeline (the prompt as one user turn)."""
    return [
        preference.PreferenceRecord(
            p.prompt.index, [{"role": "user", "content": p.prompt.text}], p.chosen, p.rejected
        )
        for p in pairs
    ]


def gold_records(prompts: Sequence[UnsafePrompt]) -> list[preference.PreferenceRecord]:
    return [
        preference.PreferenceRecord(p.index, [{"role": "user", "content": p.text}], *p.gold)
        for p in prompts
        if p.gold is not None
    ]

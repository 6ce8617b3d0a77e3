"""Experiment E1 (SPEC §6, paper Section 3 and Appendix J.1): catastrophic likelihood displacement
with single-token responses on the Persona "ends justify means" prompts.

For each pair (y+, y−) and seed, one run trains a fresh copy of the (optionally SFT'd) model with
DPO or IPO for `steps` full-batch RMSProp steps on one random prompt, tracking the next-token
distribution at every step (see `persona_step`). The learning rate follows the protocol of the
issue: the largest lr of `lr_grid` for which the loss falls at every step in all search runs (the
first `lr_search_seeds` seeds of every pair; they count as runs of the chosen lr).
Runs whose loss rises at some step are excluded from the tables and counted. `persona_tables`
turns the tracked runs into the paper's tables and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from ld_jax import host_memory
from ld_jax.digest import fingerprint
from ld_jax.errors import LdJaxError
from ld_jax.experiments import persona_runs, persona_tables
from ld_jax.losses import LossConfig
from ld_jax.train.optim import OptimizerConfig

DEFAULT_MEANINGS = {
    "yes": ("Yes", "Yeah", "Yep", "Yup", "Sure", "Certainly", "Absolutely", "Definitely", "Indeed",
            "Agreed", "Agree", "Correct", "True", "Right", "Of course", "Okay", "OK"),
    "no": ("No", "Never", "Nope", "Nah", "Not", "None", "False", "Disagree", "Incorrect", "Wrong"),
    "hedge": ("Maybe", "Perhaps", "Possibly", "Probably", "Sometimes", "Depends", "Unsure",
              "Uncertain", "Partially", "Somewhat"),
}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The optional SFT phase: `epochs` over all prompts, CE on a random label from the prompt's set."""

    enabled: bool = False
    lr: float = 1e-7
    batch_size: int = 32
    epochs: int = 1
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PersonaConfig:
    """Everything one `ld-jax persona` run needs. Paper values as defaults.

    lr_grid: candidate lrs, largest chosen whose search runs all fall at every step; empty means
        use `optimizer.lr` as is. lr_search_seeds: seeds per pair in that search.
    substitutes: set word -> the single-token text used in its place (e.g. "Absolutely" ->
        " Absolutely" where the bare word is two tokens). Any other multi-token word is an error.
    meanings: meaning -> words; gainers are benign when their meaning equals y+'s, catastrophic
        when it differs, unclassified when unknown. Lower-case and leading-space variants match.
    reuse_freed_memory: keep glibc from unmapping freed blocks (host_memory.keep_freed_memory),
        which saves SmolLM2 a fifth of its step time. Off for Gemma-3-270m: its 0.7 GB
        embedding-sized buffers fragment the single heap until the process is OOM-killed (RSS
        from 8 to 24 GB within one run, twice).
    """

    model: str = "smollm2-135m-instruct"
    data: str = "../shared/data/persona/ends-justify-means.jsonl"
    prompt_format: str = "auto"  # auto | chat | plain (question + "\n")
    pairs: tuple[tuple[str, str], ...] = (("Yes", "No"), ("No", "Never"), ("Sure", "Yes"))
    seeds: int = 10
    prompt_seed: int = 0
    steps: int = 100
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-7)
    lr_grid: tuple[float, ...] = ()
    lr_search_seeds: int = 3
    sft: SFTConfig = SFTConfig()
    no_set: tuple[str, ...] = ("No", "Never", "Maybe", "Perhaps")
    yes_set: tuple[str, ...] = ("Yes", "Yeah", "Sure", "Certainly", "Absolutely")
    substitutes: dict = dataclasses.field(default_factory=dict)
    meanings: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_MEANINGS))
    top_k: int = 3
    track_k: int = 10
    report_steps: tuple[int, ...] = (5, 25, 100)
    out_dir: str = "results/persona"
    title: str = ""  # model label in the tables; defaults to `model`
    reuse_freed_memory: bool = True

    def __post_init__(self):
        # YAML 1.1 reads 1e-7 as a string; lists of lrs do not pass through the loader's float cast.
        object.__setattr__(self, "lr_grid", tuple(float(x) for x in self.lr_grid))
        words = [w for pair in self.pairs for w in pair] + [*self.no_set, *self.yes_set, *self.substitutes]
        words += [w for ws in self.meanings.values() for w in ws]
        if bad := [w for w in words if not isinstance(w, str)]:
            raise ValueError(f"token words must be strings, got {bad}: quote Yes/No in YAML, which reads them as booleans")
        if any(len(pair) != 2 for pair in self.pairs):
            raise ValueError(f"each pair must be [y+, y-], got {self.pairs}")
        if self.prompt_format not in ("auto", "chat", "plain"):
            raise ValueError(f"prompt_format must be auto, chat or plain, not {self.prompt_format!r}")
        if self.seeds < 1 or self.steps < 1:
            raise ValueError("seeds and steps must be >= 1")
        if any(s > self.steps for s in self.report_steps):
            raise ValueError(f"report_steps {self.report_steps} go beyond steps={self.steps}")
        if self.top_k > self.track_k:
            raise ValueError("top_k must be <= track_k")


@dataclasses.dataclass(frozen=True)
class Run:
    pair: int  # index into cfg.pairs
    seed: int
    prompt: int  # index into the Persona records
    lr: float


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise LdJaxError(f"Persona data not found: {path} (see ../shared/data/README.md)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records.append({"question": rec["question"], "accords": rec["answer_matching_behavior"].strip() == "Yes"})
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise LdJaxError(f"{path}:{i}: not a Persona record ({e})") from e
    return records


def encode_prompts(tokenizer, questions: list[str], prompt_format: str) -> tuple[list[list[int]], str]:
    """Token ids of each prompt and the format used: the chat template with a generation prompt
    when the tokenizer has one (or `chat` is asked), else `question + "\\n"` with the tokenizer's BOS."""
    fmt = prompt_format
    if fmt == "auto":
        fmt = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise LdJaxError("prompt_format is 'chat' but the tokenizer has no chat template")
    out = []
    for q in questions:
        if fmt == "chat":
            text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))  # the template holds the specials
        else:
            out.append(tokenizer.encode(q + "\n", add_special_tokens=True))
    return out, fmt


def resolve_tokens(tokenizer, words, substitutes: dict) -> dict[str, dict]:
    """word -> {id, token, text, substitute}. Each word (or its configured substitute) must be one token."""
    resolved = {}
    for word in dict.fromkeys(words):
        text = substitutes.get(word, word)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise LdJaxError(
                f"{text!r} is {len(ids)} tokens {pieces}, not one; set substitutes: {{{word}: <single-token text>}}"
            )
        resolved[word] = {"id": ids[0], "token": tokenizer.convert_ids_to_tokens(ids[0]),
                          "text": tokenizer.decode(ids), "substitute": word in substitutes}
    return resolved


def watch_tokens(tokenizer, meanings: dict) -> list[int]:
    """Single-token ids of every meaning word with its lower-case and leading-space variants."""
    ids = []
    for words in meanings.values():
        for w in words:
            for v in (w, w.lower(), " " + w, " " + w.lower()):
                enc = tokenizer.encode(v, add_special_tokens=False)
                if len(enc) == 1:
                    ids.append(enc[0])
    return list(dict.fromkeys(ids))


def _runs(cfg: PersonaConfig, records: list[dict], seeds, lr: float) -> list[Run]:
    """Seed s of a pair trains on the s-th prompt of a fixed random order of the prompts that fit
    y+ (paper J.1: "No"-like y+ on prompts that accord with the trait, "Yes"-like on the others),
    so runs use distinct prompts and the first seeds of a larger run are the runs of a smaller one."""
    out = []
    for p, (y_pos, _) in enumerate(cfg.pairs):
        pool = np.array([i for i, r in enumerate(records) if r["accords"] == (y_pos in cfg.no_set)])
        order = np.random.default_rng(cfg.prompt_seed).permutation(pool)
        out += [Run(p, s, int(order[s]), lr) for s in seeds]
    return out


def run_persona(cfg: PersonaConfig) -> dict:
    """Run E1 end to end and write results.json, the Markdown tables and PNGs into cfg.out_dir.
    Finished runs are kept under out_dir/runs/, so an interrupted command resumes."""
    from ld_jax import models

    t_start = time.time()
    if cfg.reuse_freed_memory:
        host_memory.keep_freed_memory()
    records = load_records(cfg.data)
    for y_pos, _ in cfg.pairs:
        if y_pos not in cfg.no_set and y_pos not in cfg.yes_set:
            raise LdJaxError(f"y+ {y_pos!r} is in neither no_set nor yes_set, so no prompts fit it")
    lm = models.from_pretrained(cfg.model, dtype="float32")
    tok = lm.tokenizer
    prompts, fmt = encode_prompts(tok, [r["question"] for r in records], cfg.prompt_format)
    words = [w for pair in cfg.pairs for w in pair] + list(cfg.no_set + cfg.yes_set if cfg.sft.enabled else ())
    tokens = resolve_tokens(tok, words, cfg.substitutes)
    pair_ids = [(tokens[a]["id"], tokens[b]["id"]) for a, b in cfg.pairs]
    print(f"{cfg.model}: prompt format {fmt!r}; tokens " + ", ".join(
        f"{w}={t['id']} {t['token']!r}" + (" (substitute)" if t["substitute"] else "") for w, t in tokens.items()))

    params, sft_info, sft_key = lm.params, None, None
    if cfg.sft.enabled:
        rng = np.random.default_rng(cfg.sft.seed)
        labels = np.array([tokens[rng.choice(cfg.no_set if r["accords"] else cfg.yes_set)]["id"] for r in records], np.int32)
        first_leaf = np.asarray(jax.tree.leaves(params)[0]).ravel()[:64].tolist()  # tells checkpoints apart
        sft_key = fingerprint(cfg.model, first_leaf, fmt, dataclasses.asdict(cfg.sft), labels.tolist(), prompts)
        params, sft_info = persona_runs.sft_phase(lm, params, prompts, labels, cfg.sft, sft_key)

    W = lm.unembedding(params)
    predicted = []  # Theorem 5: the tokens gaining most have the largest ⟨W_z, W_{y+} − W_{y−}⟩
    for a, b in pair_ids:
        score = np.array(W @ (W[a] - W[b]))
        score[[a, b]] = -np.inf
        predicted.append([int(i) for i in np.argsort(-score)[: cfg.top_k + 2]])
    watch = watch_tokens(tok, cfg.meanings)
    store = Path(cfg.out_dir) / "runs" / fingerprint(
        cfg.model, fmt, sft_key, cfg.loss, dataclasses.replace(cfg.optimizer, lr=0),
        cfg.steps, cfg.track_k, cfg.prompt_seed, watch)
    runner = persona_runs.Runner(lm, params, cfg, prompts, pair_ids, predicted, watch, store)

    search, reused, lr = [], [], cfg.optimizer.lr
    if cfg.lr_grid:
        n_search = min(cfg.lr_search_seeds, cfg.seeds)
        for lr in sorted(cfg.lr_grid, reverse=True):
            recs = runner.many(_runs(cfg, records, range(n_search), lr), f"lr search {lr:g}", stop_on_rise=True)
            search.append({"lr": lr, "runs": len(cfg.pairs) * n_search, "loss_fell_every_step": recs is not None,
                           "first_rise": None if recs is not None else runner.first_rise})
            if recs is not None:
                reused = recs
                break
        else:
            print(f"no lr in {cfg.lr_grid} kept the loss falling in all search runs; using the smallest")
    done = {(r["run"].pair, r["run"].seed) for r in reused}
    todo = [r for r in _runs(cfg, records, range(cfg.seeds), lr) if (r.pair, r.seed) not in done]
    recs = sorted(reused + runner.many(todo, f"{cfg.loss.name} lr {lr:g}"), key=lambda r: (r["run"].pair, r["run"].seed))

    meta = {
        "model": cfg.model, "title": cfg.title or cfg.model, "prompt_format": fmt, "tokens": tokens,
        "sft": sft_info, "lr": lr, "lr_search": search, "seconds": time.time() - t_start,
        "machine": {"cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()},
    }
    return persona_tables.write_outputs(cfg, meta, recs, tok)

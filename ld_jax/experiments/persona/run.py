"""Experiment E1 (SPEC §6, paper Section 3 and Appendix J.1): catastrophic likelihood displacement
with single-token responses on the Persona "ends justify means" prompts.

For each pair (y+, y−) and seed, one run trains a fresh copy of the (optionally SFT'd) model with
DPO or IPO for `steps` full-batch RMSProp steps on one random prompt, tracking the next-token
distribution at every step (`persona.step`). The learning rate follows `protocol.lr_search` with
the rule "falls_every_step": the largest lr of `lr_grid` for which the loss falls at every step
in all search runs (the first `lr_search_seeds` seeds of every pair; they count as runs of the
chosen lr). Runs whose loss rises at some step are excluded from the tables and counted.
`persona.report` turns the tracked runs into the paper's tables and plots.

Library calls: `train.loop.train` with the `sft` loss for the optional SFT phase (cached with
`files.cached`), `protocol.RunStore` for the finished runs (a restarted command resumes),
`protocol.lr_search`, `protocol.Stages`/`Log`/`machine`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ld_jax import host_memory, models
from ld_jax.digest import fingerprint
from ld_jax.errors import LdJaxError
from ld_jax.experiments import protocol
from ld_jax.experiments.persona import report as persona_report
from ld_jax.experiments.persona import sft as persona_sft
from ld_jax.experiments.persona import step as persona_step
from ld_jax.experiments.persona.config import PersonaConfig
from ld_jax.experiments.persona.report import loss_rose


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
            records.append(
                {
                    "question": rec["question"],
                    "accords": rec["answer_matching_behavior"].strip() == "Yes",
                }
            )
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise LdJaxError(f"{path}:{i}: not a Persona record ({e})") from e
    return records


def encode_prompts(
    tokenizer, questions: list[str], prompt_format: str
) -> tuple[list[list[int]], str]:
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
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            out.append(
                tokenizer.encode(text, add_special_tokens=False)
            )  # the template holds the specials
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
        resolved[word] = {
            "id": ids[0],
            "token": tokenizer.convert_ids_to_tokens(ids[0]),
            "text": tokenizer.decode(ids),
            "substitute": word in substitutes,
        }
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


def cache_dir() -> Path:
    return Path(os.environ.get("LD_JAX_CACHE") or "~/.cache/ld_jax").expanduser()


def _pad(seq: list[int], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One prompt right-padded to a multiple of 8 (few shapes to compile): ids, mask `[s]` and
    the index of its last token `[]`."""
    ids = np.full(-(-len(seq) // 8) * 8, pad_id, np.int32)
    ids[: len(seq)] = seq
    return ids, (np.arange(len(ids)) < len(seq)).astype(np.int32), np.int32(len(seq) - 1)


class Runner:
    """Tracked runs from shared initial params, each with its own progress bar, kept in a
    `protocol.RunStore` of arrays as they finish.

    pair_ids: (y+, y−) token ids per pair; predicted: per pair, the token ids Theorem 5 ranks
    highest; watch_base: token ids watched in every run. A run's `watch_ids` are
    [y+, y−, *predicted, *watch_base].
    """

    def __init__(
        self, lm, params, cfg, prompts, pair_ids, predicted, watch_base, store: Path, set_ids=None
    ):
        self.lm, self.params, self.cfg, self.prompts = lm, params, cfg, prompts
        self.pair_ids, self.predicted, self.watch_base = pair_ids, predicted, watch_base
        self.set_ids = set_ids  # per pair: the token ids of y+'s label set (set mass at step 0)
        self.store = protocol.RunStore(store, arrays=True)
        self.first_rise: dict | None = None  # where the last stop_on_rise run stopped
        self.opt, self.step, self.measure, self.initial = persona_step.make_run_fns(
            lm, cfg.loss, cfg.optimizer, cfg.track_k
        )
        self.t5 = persona_step.theorem5_fns(lm, cfg.loss)
        W = lm.unembedding(
            params
        )  # [V, d] in the model's dtype (a float64 copy of Gemma's is 1.3 GB)
        self.t5_score = [  # ⟨W_z, W_{y+} − W_{y−}⟩ `[V]`
            np.asarray(W.astype(jnp.float32) @ (W[a] - W[b]).astype(jnp.float32), np.float64)
            for a, b in pair_ids
        ]

    def theorem5(self, run, batch) -> dict:
        """Spearman over z ∉ {y+, y−} between ⟨W_z, W_{y+} − W_{y−}⟩ and the change of ln π(z|x):
        measured after one plain gradient step small enough that no token's ln π moves by more
        than about 0.01 (`theorem5_spearman`), and its autodiff rate (`theorem5_spearman_rate`)."""
        rate = np.asarray(self.t5.rate(self.params, batch), np.float64)
        eta = np.float32(1e-2 / max(np.abs(rate).max(), 1e-30))
        change = np.asarray(self.t5.change(self.params, batch, eta), np.float64)
        score, ex = self.t5_score[run.pair], self.pair_ids[run.pair]
        return {
            "theorem5_spearman": persona_step.spearman_excluding(score, change, ex),
            "theorem5_spearman_rate": persona_step.spearman_excluding(score, rate, ex),
            "theorem5_eta": eta,
        }

    def _batch(self, run) -> dict:
        ids, mask, last = _pad(self.prompts[run.prompt], models.pad_id(self.lm))
        logp0, _ = self.initial(self.params, ids, mask, last)  # [V]: the reference, computed once
        y_pos, y_neg = self.pair_ids[run.pair]
        watch = np.array([y_pos, y_neg, *self.predicted[run.pair], *self.watch_base], np.int32)
        return {
            "ids": ids,
            "mask": mask,
            "last": last,
            "y_pos": y_pos,
            "y_neg": y_neg,
            "ref_pos": logp0[y_pos],
            "ref_neg": logp0[y_neg],
            "p0": jnp.exp(logp0),
            "watch": watch,
            "lr": np.float32(run.lr),
            "logp0": logp0,
        }

    def name(self, run) -> str:
        y_pos, y_neg = self.cfg.pairs[run.pair]
        return f"lr{run.lr:g}_{y_pos}_{y_neg}_seed{run.seed}_prompt{run.prompt}"

    def train(self, run, desc: str, stop_on_rise: bool = False) -> dict | None:
        """The tracked history of one run: `[steps + 1, ...]` arrays (see persona.report); None
        when `stop_on_rise` and its loss stopped falling (the lr search then stops at once)."""
        batch = self._batch(run)
        logp0 = np.asarray(batch.pop("logp0"), np.float64)
        extra = self.theorem5(run, batch)
        if self.set_ids is not None:
            extra["set_mass0"] = float(np.exp(logp0[self.set_ids[run.pair]]).sum())
        params = jax.tree.map(jnp.copy, self.params)  # the step donates its input
        opt_state, hist = self.opt.init(params), []
        y_pos, y_neg = self.cfg.pairs[run.pair]
        y_pos_id, y_neg_id = self.pair_ids[run.pair]
        bar = tqdm(
            range(self.cfg.steps), desc=f"{desc} ({y_pos}, {y_neg}) seed {run.seed}", unit="step"
        )
        for _ in bar:
            params, opt_state, m = self.step(params, opt_state, batch)
            hist.append(jax.device_get(m))
            if len(hist) == 1:  # the run's own first update, against Theorem 5's ranking
                logp1, _ = self.initial(params, batch["ids"], batch["mask"], batch["last"])
                extra["theorem5_spearman_update"] = persona_step.spearman_excluding(
                    self.t5_score[run.pair],
                    np.asarray(logp1, np.float64) - logp0,
                    (y_pos_id, y_neg_id),
                )
            bar.set_postfix(
                loss=f"{hist[-1]['loss']:.4g}",
                p_pos=f"{np.exp(hist[-1]['logp_pos']):.3f}",
                refresh=False,
            )
            if (
                stop_on_rise
                and len(hist) > 1
                and loss_rose(np.array([hist[-2]["loss"], hist[-1]["loss"]]))
            ):
                bar.close()
                self.first_rise = {
                    "pair": [y_pos, y_neg],
                    "seed": run.seed,
                    "step": len(hist) - 1,
                    "loss": [float(hist[-2]["loss"]), float(hist[-1]["loss"])],
                }
                return None
        hist.append(jax.device_get(self.measure(params, batch)))
        host_memory.release_freed_memory()  # the run's params and optimizer state (3 model copies) are garbage now
        return {
            **{k: np.stack([h[k] for h in hist]) for k in hist[0]},
            "watch_ids": batch["watch"],
            **{k: np.asarray(v) for k, v in extra.items()},
        }

    def many(self, runs: list, desc: str, stop_on_rise: bool = False) -> list[dict] | None:
        """Records of `runs` (stored ones read back), each with its `run`; None as soon as one
        run's loss rises under `stop_on_rise`."""
        todo = [
            (
                self.name(r),
                lambda r=r, i=i: self.train(r, f"{desc} run {i + 1}/{len(runs)}", stop_on_rise),
            )
            for i, r in enumerate(runs)
        ]
        recs = self.store.many(todo, desc, progress=False)  # every run has its own step bar
        return None if recs is None else [{**rec, "run": run} for rec, run in zip(recs, runs)]


def run_persona(cfg: PersonaConfig) -> dict:
    """Run E1 end to end and write results.json, the Markdown tables and PNGs into cfg.out_dir.
    Finished runs are kept under out_dir/runs/, so an interrupted command resumes."""
    t_start, log = time.time(), protocol.Log("persona")
    if cfg.reuse_freed_memory:
        host_memory.keep_freed_memory()
    records = load_records(cfg.data)
    for y_pos, _ in cfg.pairs:
        if y_pos not in cfg.no_set and y_pos not in cfg.yes_set:
            raise LdJaxError(f"y+ {y_pos!r} is in neither no_set nor yes_set, so no prompts fit it")
    lm = models.from_pretrained(cfg.model, dtype="float32")
    tok = lm.tokenizer
    prompts, fmt = encode_prompts(tok, [r["question"] for r in records], cfg.prompt_format)
    tokens = resolve_tokens(tok, cfg.token_words(), cfg.substitutes)
    pair_ids = [(tokens[a]["id"], tokens[b]["id"]) for a, b in cfg.pairs]
    logged = [w for pair in cfg.pairs for w in pair] + list(
        cfg.no_set + cfg.yes_set if cfg.sft.enabled else ()
    )
    log(
        f"{cfg.model}: prompt format {fmt!r}; tokens "
        + ", ".join(
            f"{w}={t['id']} {t['token']!r}" + (" (substitute)" if t["substitute"] else "")
            for w, t in ((w, tokens[w]) for w in dict.fromkeys(logged))
        )
    )

    params, sft_info, sft_key = lm.params, None, None
    if cfg.sft.enabled:
        params, sft_info, sft_key = persona_sft.phase(
            cfg, lm, prompts, records, tokens, cache_dir(), log
        )
    set_ids = [
        [tokens[w]["id"] for w in (cfg.no_set if y_pos in cfg.no_set else cfg.yes_set)]
        for y_pos, _ in cfg.pairs
    ]

    W = lm.unembedding(params)
    predicted = []  # Theorem 5: the tokens gaining most have the largest ⟨W_z, W_{y+} − W_{y−}⟩
    for a, b in pair_ids:
        score = np.array(W @ (W[a] - W[b]))
        score[[a, b]] = -np.inf
        predicted.append([int(i) for i in np.argsort(-score)[: cfg.top_k + 2]])
    watch = watch_tokens(tok, cfg.meanings)
    store = (
        Path(cfg.out_dir)
        / "runs"
        / fingerprint(
            cfg.model,
            fmt,
            sft_key,
            cfg.loss,
            dataclasses.replace(cfg.optimizer, lr=0),
            cfg.steps,
            cfg.track_k,
            cfg.prompt_seed,
            watch,
            "theorem5+set_mass",  # what a stored run holds besides the tracked steps
            set_ids,
        )
    )
    runner = Runner(lm, params, cfg, prompts, pair_ids, predicted, watch, store, set_ids)

    n_search, first_rise = min(cfg.lr_search_seeds, cfg.seeds), {}

    def search_runs(lr):
        recs = runner.many(
            _runs(cfg, records, range(n_search), lr), f"lr search {lr:g}", stop_on_rise=True
        )
        first_rise[lr] = None if recs is not None else runner.first_rise
        return recs

    chosen, trials = protocol.lr_search(
        cfg.lr_grid, search_runs, "falls_every_step", curve=lambda rec: rec["loss"]
    )
    search = [
        {
            "lr": lr,
            "runs": len(cfg.pairs) * n_search,
            "loss_fell_every_step": ok,
            "first_rise": first_rise[lr],
        }
        for lr, _, ok in trials
    ]
    if cfg.lr_grid and chosen is None:
        log(f"no lr in {cfg.lr_grid} kept the loss falling in all search runs; using the smallest")
    lr = chosen if chosen is not None else (min(cfg.lr_grid) if cfg.lr_grid else cfg.optimizer.lr)
    reused = next((recs for _, recs, ok in trials if ok), [])
    done = {(r["run"].pair, r["run"].seed) for r in reused}
    todo = [r for r in _runs(cfg, records, range(cfg.seeds), lr) if (r.pair, r.seed) not in done]
    recs = sorted(
        reused + runner.many(todo, f"{cfg.loss.name} lr {lr:g}"),
        key=lambda r: (r["run"].pair, r["run"].seed),
    )

    meta = {
        "model": cfg.model,
        "title": cfg.title or cfg.model,
        "prompt_format": fmt,
        "tokens": tokens,
        "sft": sft_info,
        "lr": lr,
        "lr_search": search,
        "seconds": time.time() - t_start,
        "machine": protocol.machine(),
    }
    return persona_report.write_outputs(cfg, meta, recs, tok)

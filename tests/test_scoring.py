"""Scoring pipeline and the `ches` / `filter` subcommands on a tiny random Llama with a
character-level tokenizer: one line per input sample, skip reasons, truncation, and selections
checked against a plain sort of the scores."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import save_tiny_llama, tiny_tokenizer  # noqa: E402

from ld_jax import ches, cli, models, scoring  # noqa: E402
from ld_jax.data import formatting, preference  # noqa: E402
from ld_jax.errors import LdJaxError  # noqa: E402

MAX_LEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    return str(save_tiny_llama(path, tokenizer=tiny_tokenizer(markers=False)))


ROWS = [
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
    {"prompt": "2+2?", "chosen": "4", "rejected": "It is five, I think."},
    {"prompt": "Same?", "chosen": "Yes, same.", "rejected": "Yes, same."},
    {"prompt": "Empty?", "chosen": "", "rejected": "Not empty."},
    {"prompt": "x" * 80, "chosen": "a", "rejected": "b"},
    {"prompt": "Long?", "chosen": "y" * 70, "rejected": "short"},
    None,  # a blank line: indices stay line numbers
    {"prompt": "Colour?", "chosen": "Blue.", "rejected": "Blue!"},
    {"prompt": "Name?", "chosen": "Ada", "rejected": "I would rather not say."},
]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join((json.dumps(r) if r else "") + "\n" for r in ROWS))
    return path


def read_lines(path):
    return [json.loads(line) for line in open(path)]


def test_ches_cli_scores_every_sample_once(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    argv = [
        "ches",
        "--model",
        model_dir,
        "--data",
        str(data_file),
        "--out",
        str(out),
        "--max-length",
        str(MAX_LEN),
        "--batch-size",
        "2",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept 6 of 8 pairs; skipped empty_chosen=1, prompt_too_long=1; truncated 1" in printed
    assert "Spearman" in printed and "ln_ches" in printed

    lines = {row["index"]: row for row in read_lines(out)}
    assert sorted(lines) == [0, 1, 2, 3, 4, 5, 7, 8]
    assert lines[3] == {"index": 3, "skipped": "empty_chosen"}
    assert lines[4] == {"index": 4, "skipped": "prompt_too_long"}
    assert [i for i, r in lines.items() if r.get("truncated")] == [5]

    # The same pairs through the library API (oracle-tested against PyTorch in test_ches.py).
    lm = models.from_pretrained(model_dir)
    records = preference.load_preferences(data_file)
    pairs, _ = formatting.tokenize_preferences(
        records, lm.tokenizer, drop_identical=False, max_prompt_length=None
    )
    pairs = [p for p in pairs if p.index in lines and "skipped" not in lines[p.index]]
    room = [MAX_LEN - len(p.prompt_ids) for p in pairs]
    want = ches.ches_scores(
        lm,
        [p.prompt_ids for p in pairs],
        [p.chosen_ids[:k] for p, k in zip(pairs, room)],
        [p.rejected_ids[:k] for p, k in zip(pairs, room)],
    )
    for k, p in enumerate(pairs):
        row = lines[p.index]
        assert row["len_chosen"] == min(len(p.chosen_ids), room[k])
        assert row["len_rejected"] == min(len(p.rejected_ids), room[k])
        for key in ches.SCORE_KEYS:
            assert row[key] == pytest.approx(want[key][k], rel=1e-5, abs=1e-5)
    assert lines[5]["len_chosen"] == room[[p.index for p in pairs].index(5)] < 70
    assert lines[2]["edit_distance"] == 0.0 and abs(lines[2]["ln_ches"]) < 1e-5


def test_skip_overflow_skips_long_pairs(model_dir, data_file, tmp_path):
    out = tmp_path / "scores.jsonl"
    cfg = scoring.ScoringConfig(
        model_dir, str(data_file), str(out), max_length=MAX_LEN, overflow="skip"
    )
    summary = scoring.score_file(cfg, progress=False)
    assert "too_long=1" in summary
    lines = {row["index"]: row for row in read_lines(out)}
    assert lines[5] == {"index": 5, "skipped": "too_long"}
    assert not any(r.get("truncated") for r in lines.values())


class Killed(Exception):
    pass


def test_a_killed_scoring_leaves_no_scores_file_and_resume_continues_it(
    model_dir, data_file, tmp_path, monkeypatch
):
    out = tmp_path / "scores.jsonl"
    cfg = scoring.ScoringConfig(
        model_dir, str(data_file), str(out), max_length=MAX_LEN, batch_size=2
    )
    full = scoring.score_file(cfg, progress=False)
    want = {r["index"]: r for r in read_lines(out)}
    out.unlink()

    real, scored = ches.score_batches, []

    def killed_after_one_batch(lm, pairs, *a, **k):
        for i, batch in enumerate(real(lm, pairs, *a, **k)):
            if i == 1:
                raise Killed
            scored.extend(int(x) for x in batch["index"])
            yield batch

    monkeypatch.setattr(ches, "score_batches", killed_after_one_batch)
    with pytest.raises(Killed):
        scoring.score_file(cfg, progress=False)
    assert not out.exists()  # only <out>.partial: `ld-jax filter` cannot take it as complete
    partial = read_lines(str(out) + ".partial")
    assert {r["index"] for r in partial} == set(scored) | {3, 4}  # one batch plus the skipped
    with open(str(out) + ".partial", "a") as f:
        f.write('{"index": 99, "ch')  # the kill tore a line

    resumed_pairs = []
    monkeypatch.setattr(
        ches,
        "score_batches",
        lambda lm, pairs, *a, **k: resumed_pairs.extend(pairs) or real(lm, pairs, *a, **k),
    )
    with pytest.raises(LdJaxError, match="another model, data or settings"):
        scoring.score_file(
            dataclasses.replace(cfg, resume=True, max_length=MAX_LEN - 8), progress=False
        )
    assert (
        cli.main(
            [
                "ches",
                "--model",
                model_dir,
                "--data",
                str(data_file),
                "--out",
                str(out),
                "--max-length",
                str(MAX_LEN),
                "--batch-size",
                "2",
                "--resume",
            ]
        )
        == 0
    )
    assert {p.index for p in resumed_pairs}.isdisjoint(scored) and resumed_pairs
    got = read_lines(out)
    assert len(got) == len(want) and {r["index"] for r in got} == set(want)
    for row in got:  # other batch-mates, other padding: the same scores to float32 round-off
        assert row == {
            k: pytest.approx(v, rel=1e-5, abs=1e-5) for k, v in want[row["index"]].items()
        }
    assert not (tmp_path / "scores.jsonl.partial").exists() and "kept 6 of 8" in full


def test_filter_refuses_a_truncated_scores_file(scored, tmp_path):
    data, scores, _ = scored
    lines = scores.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:5]) + "\n")
    cfg = scoring.FilterConfig(str(data), str(cut), str(tmp_path / "kept.jsonl"), keep_lowest=0.5)
    with pytest.raises(
        LdJaxError, match=r"4 are neither scored nor skipped \(first: index 5\).*--resume"
    ):
        scoring.filter_file(cfg)
    assert not (tmp_path / "kept.jsonl").exists()


# ---------------------------------------------------------------- filter

N = 8


@pytest.fixture()
def scored(tmp_path):
    """A data file with N samples and a scores file with known, distinct values (plus one
    skipped sample): ln_ches ranks are a fixed permutation."""
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}) + "\n"
            for i in range(N + 1)
        )
    )
    ln_ches = np.array([0.3, -2.0, 5.0, 1.0, -0.5, 4.0, 2.5, -1.0])
    rows = [
        dict(
            index=i,
            ches=-float(v),
            ln_ches=float(v),
            edit_distance=0.5,
            last_hidden_ip=1.0,
            len_chosen=2 + i,
            len_rejected=3,
            truncated=False,
        )
        for i, v in enumerate(ln_ches)
    ] + [{"index": N, "skipped": "empty_chosen"}]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, scores, np.argsort(ln_ches)


@pytest.mark.parametrize(
    "flags, ranks",
    [
        (["--keep-lowest", "0.25"], [0, 1]),
        (["--keep-highest", "0.25"], [6, 7]),
        (["--percentile-window", "0", "--size", "3"], [0, 1, 2]),
        (["--percentile-window", "50", "--size", "3"], [3, 4, 5]),
        (["--percentile-window", "100", "--size", "3"], [5, 6, 7]),
    ],
)
def test_filter_selects_by_rank_and_writes_input_records(scored, tmp_path, flags, ranks, capsys):
    data, scores, order = scored
    out = tmp_path / "kept.jsonl"
    assert (
        cli.main(
            ["filter", "--data", str(data), "--scores", str(scores), "--out", str(out), *flags]
        )
        == 0
    )
    assert f"kept {len(ranks)} of {N} scored samples" in capsys.readouterr().out
    kept = read_lines(out)
    assert [r["index"] for r in kept] == sorted(order[ranks].tolist())
    for r in kept:
        i = r["index"]
        assert (r["prompt"], r["chosen"], r["rejected"]) == (f"p{i}", f"c{i}", f"r{i}")
    # The output is itself a preference file the training pipeline reads.
    assert [rec.chosen for rec in preference.load_preferences(out)] == [r["chosen"] for r in kept]


def test_filter_by_another_score(scored, tmp_path):
    data, scores, order = scored
    out = tmp_path / "kept.jsonl"
    scoring.filter_file(
        scoring.FilterConfig(str(data), str(scores), str(out), by="ches", keep_lowest=0.25)
    )
    assert sorted(r["index"] for r in read_lines(out)) == sorted(
        order[-2:].tolist()
    )  # ches = −ln_ches


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep-lowest", "0.1", "--keep-highest", "0.1"], "exactly one"),
        (["--keep-lowest", "1.5"], "in (0, 1]"),
        (["--percentile-window", "50"], "percentile and size go together"),
        (["--percentile-window", "50", "--size", "100"], "exceeds the 8 scored samples"),
    ],
)
def test_filter_rejects_bad_selections(scored, tmp_path, flags, message, capsys):
    data, scores, _ = scored
    argv = [
        "filter",
        "--data",
        str(data),
        "--scores",
        str(scores),
        "--out",
        str(tmp_path / "k.jsonl"),
        *flags,
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ld-jax: error:") and message in err and "\n" not in err


def test_filter_rejects_scores_from_another_file(scored, tmp_path):
    _, scores, _ = scored
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    cfg = scoring.FilterConfig(str(other), str(scores), str(tmp_path / "k.jsonl"), keep_highest=0.5)
    with pytest.raises(LdJaxError, match="does not have"):
        scoring.filter_file(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "ches": 1.0}\nnot json\n')
    with pytest.raises(LdJaxError, match="line 1: sample 0 lacks"):
        scoring.read_scores(str(bad))

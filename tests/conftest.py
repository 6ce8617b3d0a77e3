"""Shared test fixtures and builders: tiny random models saved as Hugging Face checkpoints, the
character-level tokenizer, random tokenized pairs. Test files import the builders with
`from conftest import ...` (pytest puts tests/ on the path); nothing here touches a hub."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite compiles the same tiny programs many times over (a fresh jit per test, per child
# process): XLA's persistent cache, fresh for each run and shared with the child processes,
# compiles each once. Measured on tests/test_train.py: 142 s -> 107 s.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="ld_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

from ld_jax.data.formatting import ASSISTANT_TOKEN, PROMPT_TOKEN, TokenizedPair  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat: bool = True, markers: bool = True):
    """A character-level tokenizer (no hub): specials, then printable ASCII, one id each; with
    `chat`, a ChatML template; with `markers`, the plain template's two marker tokens are
    specials too (they shift the characters' ids by two, which the tiny models' outputs see)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_end|>", "<|im_start|>"] + (
        [PROMPT_TOKEN, ASSISTANT_TOKEN] if markers else []
    )
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[3:],
    )
    if chat:
        out.chat_template = CHATML
    return out


def tiny_llama(seed=0, vocab=128, hidden=32, ff=64, heads=4, kv_heads=2, tied=False):
    """A random 2-layer Llama (transformers, PyTorch, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def save_tiny_llama(path, seed=0, vocab=128, tokenizer="tiny", **save_kwargs):
    """The tiny Llama (d=32, GQA 4/2 heads) saved as a Hugging Face checkpoint directory with
    `tokenizer` ("tiny": `tiny_tokenizer()`; None: none; or a tokenizer object)."""
    tiny_llama(seed, vocab).save_pretrained(path, **save_kwargs)
    if tokenizer is not None:
        (tiny_tokenizer() if tokenizer == "tiny" else tokenizer).save_pretrained(path)
    return path


def save_tiny_gemma3(path, seed=1):
    """A random 2-layer Gemma 3 (one sliding, one full layer, window 4) checkpoint, no tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    return path


def random_pairs(n, vocab=128, seed=0, max_len=12):
    """n TokenizedPairs of random ids in [3, vocab), each part 1..max_len-1 tokens."""
    rng = np.random.default_rng(seed)
    ids = lambda: [int(t) for t in rng.integers(3, vocab, rng.integers(1, max_len))]  # noqa: E731
    return [TokenizedPair(i, ids(), ids(), ids()) for i in range(n)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(checkpoint directory, loaded LanguageModel) of `save_tiny_llama`, shared by the files
    that need just that model."""
    from ld_jax import models

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return path, models.from_pretrained(str(path))

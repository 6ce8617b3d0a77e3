"""Published Hugging Face `config.json` fields of the paper's models, kept as data so that
`ld-jax plan` can size them without their weights on disk (no downloads).

Keys are the checkpoint directory names (the last part of the HF repo id); a config's `model:`
path that does not exist is looked up here by its last path component. Values are read by
`ld_jax.models.from_hf_config` exactly like a downloaded config.json.
"""

from __future__ import annotations

_LLAMA3_8B = dict(
    model_type="llama",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
_GEMMA_2B = dict(
    model_type="gemma",
    hidden_size=2048,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    intermediate_size=16384,
    vocab_size=256000,
    rope_theta=10000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    attention_bias=False,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
_OLMO_1B = dict(
    model_type="olmo",
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=8192,
    vocab_size=50304,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    hidden_act="silu",
    tie_word_embeddings=True,
    clip_qkv=None,
    attention_bias=False,
    eos_token_id=50279,
    pad_token_id=1,
)

ARCHITECTURES: dict[str, dict] = {
    "Meta-Llama-3-8B": _LLAMA3_8B,
    "Meta-Llama-3-8B-Instruct": {**_LLAMA3_8B, "eos_token_id": 128009},
    "gemma-2b": _GEMMA_2B,
    "gemma-2b-it": _GEMMA_2B,
    "OLMo-1B-hf": _OLMO_1B,
}

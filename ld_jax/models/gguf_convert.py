"""A GGUF file -> a float32 Hugging Face checkpoint directory, without torch.

The tensors are dequantized by the `gguf` package's own NumPy dequantizers and renamed from
llama.cpp's names to HF's by the tables below (data, per GGUF architecture). Two layouts differ
from HF's: llama.cpp permutes the rows of Llama's q/k projections (its RoPE pairs adjacent
dimensions, HF's the two halves), which `_unpermute` undoes, and Gemma's GGUF norms hold the
scale 1 + w where HF holds w. The config and the tokenizer come from the file's metadata through
transformers' own GGUF tables and tokenizer builders, which need no torch (its GGUF *reader*
does, so the metadata is read here with `gguf`).

The result equals what `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` followed by
`save_pretrained` writes (tests/test_gguf_convert.py compares them tensor by tensor), at a
fraction of the install: see README's install figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ld_jax import files
from ld_jax.errors import LdJaxError

_L = "model.layers.{i}."
# GGUF tensor name -> HF tensor name, per GGUF `general.architecture`; "{i}" is the layer.
_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": _L + "input_layernorm.weight",
    "blk.{i}.attn_q.weight": _L + "self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": _L + "self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": _L + "self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": _L + "self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": _L + "post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": _L + "mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": _L + "mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": _L + "mlp.down_proj.weight",
}
NAMES = {
    "llama": _LLAMA_NAMES,
    "gemma3": {
        **{k: v for k, v in _LLAMA_NAMES.items() if k != "blk.{i}.ffn_norm.weight"},
        "blk.{i}.post_attention_norm.weight": _L + "post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight": _L + "pre_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": _L + "post_feedforward_layernorm.weight",
        "blk.{i}.attn_q_norm.weight": _L + "self_attn.q_norm.weight",
        "blk.{i}.attn_k_norm.weight": _L + "self_attn.k_norm.weight",
    },
}
# What each architecture's layout needs besides renaming.
_PERMUTED_QK = {"llama"}  # llama.cpp's convert_hf_to_gguf permutes q/k rows for these
_NORM_PLUS_ONE = {"gemma3"}  # GGUF stores 1 + w in every "*norm.weight"
# GGUF architecture -> (HF model_type, the class transformers' conversion names)
_MODEL = {"llama": ("llama", "LlamaForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}


def read_metadata(reader) -> dict:
    """A `gguf.GGUFReader`'s key-value metadata as plain values (str, int, float, bool, lists),
    parsed as transformers parses it."""
    from transformers.integrations.ggml import _gguf_parse_value

    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = [_gguf_parse_value(field.parts[i], field.types) for i in field.data]
        metadata[key] = value[0] if len(value) == 1 and field.types[0] != 9 else value
    return metadata


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order -> HF's: within each head, rows (0, half, 1, half+1, ...) go back
    to (0, 1, ..., half, ...). weight [n_head * head_dim, d_model]."""
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def hf_config_dict(metadata: dict, tensor_names: list[str]) -> dict:
    """The transformers config fields of the file (transformers' own GGUF key table)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    arch = metadata["general.architecture"]
    config = {"tie_word_embeddings": "output.weight" not in tensor_names}
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        target = renames.get(prefix, {}).get(rest)
        if target not in (None, -1):
            config[target] = value
    config["model_type"] = _MODEL[arch][0]
    if "vocab_size" not in config:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config


def convert_tensors(reader, config: dict) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 array [out, in] (torch's layout) of every mapped tensor."""
    from gguf import dequantize

    arch = reader_arch(reader)
    table = NAMES[arch]
    tensors = {}
    for tensor in reader.tensors:
        template, layer = _template(tensor.name)
        if template not in table:
            raise LdJaxError(f"GGUF tensor {tensor.name} ({arch}) has no Hugging Face name here")
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        if arch in _PERMUTED_QK and template == "blk.{i}.attn_q.weight":
            weight = _unpermute(weight, config["num_attention_heads"])
        elif arch in _PERMUTED_QK and template == "blk.{i}.attn_k.weight":
            weight = _unpermute(weight, config["num_key_value_heads"])
        if arch in _NORM_PLUS_ONE and template.endswith("norm.weight"):
            weight = weight - 1
        tensors[table[template].format(i=layer)] = np.ascontiguousarray(weight)
    return tensors


def reader_arch(reader) -> str:
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch not in NAMES:
        raise LdJaxError(f"GGUF architecture {arch!r} not supported; supported: {sorted(NAMES)}")
    return arch


def _template(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        return "blk.{i}." + ".".join(parts[2:]), int(parts[1])
    return name, None


def build_tokenizer(metadata: dict, hf_config):
    """The tokenizer the metadata describes, as transformers' GGUF loading builds it."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    # transformers' get_gguf_tokenizer, on metadata read without torch
    grouped = {
        group: {
            name: metadata[f"tokenizer.{k}"]
            for k, name in table.items()
            if f"tokenizer.{k}" in metadata
        }
        for group, table in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = (
            tokenizer_dict["tokens"][token_id] if token_id is not None else None
        )
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    with tempfile.TemporaryDirectory() as config_only:  # AutoTokenizer picks the class by config
        hf_config.save_pretrained(config_only)
        return AutoTokenizer.from_pretrained(
            config_only, tokenizer_object=backend, **tokenizer_config, **extra
        )


def convert(gguf_path: Path, target: Path) -> None:
    """Write `target`: model.safetensors (float32), config.json and the tokenizer files."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from transformers import AutoConfig, GenerationConfig

    reader = GGUFReader(str(gguf_path))
    arch = reader_arch(reader)
    metadata = read_metadata(reader)
    fields = hf_config_dict(metadata, [t.name for t in reader.tensors])
    hf_config = AutoConfig.for_model(**fields)
    hf_config.architectures = [_MODEL[arch][1]]
    hf_config.dtype = "float32"
    tensors = convert_tensors(reader, fields)
    target.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(target / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    hf_config.save_pretrained(str(target))
    GenerationConfig.from_model_config(hf_config).save_pretrained(str(target))
    build_tokenizer(metadata, hf_config).save_pretrained(str(target))

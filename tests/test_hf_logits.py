"""Hugging Face loading: tiny random GPT-2 and Llama checkpoints give the logits transformers gives.

Each model is built with torch, saved with ``save_pretrained`` (safetensors), loaded with
``kvjax.checkpoints.load`` and run through the dense cache, both as one prefill and token by token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import kvjax.cache  # noqa: E402
import kvjax.checkpoints  # noqa: E402
import kvjax.models  # noqa: E402
from kvjax.checkpoints.hf import load_hf  # noqa: E402

B, S = 2, 12
TOL = 1e-4

CONFIGS = {
    # GPT-2: bos/eos inside the small vocab; n_inner differs from 4E so a d_ff mix-up shows.
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2),
    # GQA, separate head, non-default RoPE theta.
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_theta=100.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2),
    # GQA with the head tied to the embedding.
    "llama_gqa_tied": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2),
    # Plain MHA whose head_dim is not hidden/heads, so H*D != E.
    "llama_mha": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=32, rope_theta=500.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2),
}


def _build(name: str):
    """A tiny HF model in float32 with every parameter perturbed (norm scales, biases included)."""
    torch.manual_seed(sum(map(ord, name)))
    cfg = CONFIGS[name]()
    cls = transformers.GPT2LMHeadModel if name == "gpt2" else transformers.LlamaForCausalLM
    model = cls(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, checkpoint directory); built once per module."""
    out = {}
    for name in CONFIGS:
        model = _build(name)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d, safe_serialization=True)
        out[name] = (model, str(d))
    return out


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


_forward = jax.jit(kvjax.models.forward, static_argnums=(1, 4))


def _tokens(vocab: int, seed: int = 0):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, S), dtype=np.int32)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_logits_match_transformers(saved, name):
    model, d = saved[name]
    loaded = kvjax.checkpoints.load(d)
    cfg, params = loaded.cfg, loaded.params
    assert cfg.arch == ("gpt2" if name == "gpt2" else "llama")
    hf_cfg = model.config
    if name.startswith("llama"):
        assert cfg.n_kv_heads == hf_cfg.num_key_value_heads
        assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings
        assert ("lm_head" in params) == (not hf_cfg.tie_word_embeddings)
    tokens = _tokens(cfg.vocab_size)
    ref = _torch_logits(model, tokens)  # [B, S, V]
    # The reference is far from uniform, so a wrong weight would move it by much more than TOL.
    assert ref.std() > 0.5

    m = kvjax.cache.Dense()
    logits, cache = _forward(params, cfg, jnp.asarray(tokens), m.init(cfg, B, S), m)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [S, S])
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=TOL)

    # One token at a time through the same cache.
    cache = m.init(cfg, B, S)
    steps = []
    for t in range(S):
        step, cache = _forward(params, cfg, jnp.asarray(tokens[:, t:t + 1]), cache, m)
        steps.append(np.asarray(step))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, rtol=0, atol=TOL)

    # A prefill of part of the sequence, then decode steps on the cache it left.
    p = 5
    cache = m.init(cfg, B, S)
    first, cache = _forward(params, cfg, jnp.asarray(tokens[:, :p]), cache, m)
    rest = []
    for t in range(p, S):
        step, cache = _forward(params, cfg, jnp.asarray(tokens[:, t:t + 1]), cache, m)
        rest.append(np.asarray(step))
    np.testing.assert_allclose(np.concatenate([np.asarray(first)] + rest, axis=1), ref, rtol=0, atol=TOL)


def test_rope_theta_matters(saved):
    """The loaded theta is used: the same weights with the default theta give different logits."""
    import dataclasses

    model, d = saved["llama_gqa"]
    loaded = kvjax.checkpoints.load(d)
    assert loaded.cfg.rope_theta == 100.0
    tokens = jnp.asarray(_tokens(loaded.cfg.vocab_size))
    m = kvjax.cache.Dense()
    wrong = dataclasses.replace(loaded.cfg, rope_theta=10000.0)
    logits, _ = _forward(loaded.params, wrong, tokens, m.init(wrong, B, S), m)
    assert np.abs(np.asarray(logits) - _torch_logits(model, np.asarray(tokens))).max() > 100 * TOL


def test_config_and_metadata(saved):
    _, d = saved["gpt2"]
    cfg, params, tok, digest = load_hf(d)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.max_seq_len) == (97, 32, 2, 4, 48, 32)
    assert cfg.tie_embeddings and cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert "lm_head" not in params
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
    assert tok is None  # no tokenizer.json saved
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        assert digest == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_sharded_checkpoint_loads_same_params(saved, tmp_path, name):
    model, d = saved[name]
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 1
    cfg_s, params_s, _, digest_s = load_hf(str(tmp_path))
    cfg, params, _, digest = load_hf(d)
    assert cfg_s == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_s, params)
    h = hashlib.sha256()
    for s in shards:
        h.update((tmp_path / s).read_bytes())
    assert digest_s == h.hexdigest() != digest

    # A shard that the index lists but that is gone.
    os.remove(tmp_path / shards[-1])
    with pytest.raises(ValueError, match=shards[-1]):
        load_hf(str(tmp_path))


@pytest.mark.parametrize("dtype,np_dtype", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_half_precision_checkpoints(saved, tmp_path, dtype, np_dtype):
    model, d = saved["llama_gqa"]
    _build("llama_gqa").to(getattr(torch, dtype)).save_pretrained(tmp_path, safe_serialization=True)
    _, params32, _, _ = load_hf(d)
    cfg, params, _, _ = load_hf(str(tmp_path))
    # torch and ml_dtypes both round to nearest even: the loaded weights are the float32 ones, rounded.
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(a, b.astype(np_dtype).astype(np.float32)), params, params32)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
    # And they still compute nearly the same logits.
    tokens = _tokens(cfg.vocab_size)
    m = kvjax.cache.Dense()
    logits, _ = _forward(kvjax.models.params.to_jax(params), cfg, jnp.asarray(tokens), m.init(cfg, B, S), m)
    ref = _torch_logits(model, tokens)
    assert np.abs(np.asarray(logits) - ref).max() < (0.3 if dtype == "bfloat16" else 0.05) * np.abs(ref).max()


def test_tied_llama_without_head_and_with_redundant_head(saved, tmp_path):
    # A config that says untied but a file with no lm_head.weight: loaded as tied.
    _, d = saved["llama_gqa"]
    d2 = _copy(d, tmp_path / "nohead")
    tensors = load_file(os.path.join(d2, "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, os.path.join(d2, "model.safetensors"), metadata={"format": "pt"})
    cfg, params, _, _ = load_hf(d2)
    assert cfg.tie_embeddings and "lm_head" not in params
    # A tied config whose file also stores the head (equal to the embedding): accepted, head dropped.
    _, d = saved["llama_gqa_tied"]
    d3 = _copy(d, tmp_path / "redundant")
    tensors = load_file(os.path.join(d3, "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, os.path.join(d3, "model.safetensors"), metadata={"format": "pt"})
    cfg, params, _, _ = load_hf(d3)
    assert cfg.tie_embeddings and "lm_head" not in params


# ------------------------------------------------------------------------------------------- errors
def _edit_tensors(directory: str, fn) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config(saved, tmp_path):
    d = _copy(saved["gpt2"][1], tmp_path / "m")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(ValueError, match="config.json"):
        kvjax.checkpoints.load(d)


def test_unknown_model_type(saved, tmp_path):
    d = _copy(saved["gpt2"][1], tmp_path / "m")
    path = os.path.join(d, "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf.update(model_type="bert", architectures=["BertForMaskedLM"])
    with open(path, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match=r"config\.json.*bert"):
        kvjax.checkpoints.load(d)


def test_unsupported_settings(saved, tmp_path):
    d = _copy(saved["llama_gqa"][1], tmp_path / "m")
    path = os.path.join(d, "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}
    with open(path, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match=r"config\.json.*linear"):
        load_hf(d)


@pytest.mark.parametrize("name,tensor", [
    ("llama_gqa", "model.layers.1.self_attn.k_proj.weight"),
    ("gpt2", "transformer.h.0.attn.c_attn.weight"),
])
def test_wrong_shape_names_tensor(saved, tmp_path, name, tensor):
    d = _copy(saved[name][1], tmp_path / "m")

    def edit(t):
        t[tensor] = np.zeros((t[tensor].shape[0], t[tensor].shape[1] + 1), np.float32)

    _edit_tensors(d, edit)
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{tensor}.*shape"):
        kvjax.checkpoints.load(d)


def test_transposed_tensor_is_rejected(saved, tmp_path):
    # A square-free Llama weight stored (in, out) by mistake: the shape check must catch it.
    d = _copy(saved["llama_gqa"][1], tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_tensors(d, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
    with pytest.raises(ValueError, match=name):
        load_hf(d)


def test_unknown_and_missing_tensors(saved, tmp_path):
    d = _copy(saved["llama_gqa"][1], tmp_path / "extra")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(32, np.float32)))
    with pytest.raises(ValueError, match=r"unknown tensors.*model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_hf(d)
    d = _copy(saved["gpt2"][1], tmp_path / "missing")
    _edit_tensors(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing tensors transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_hf(d)


def test_known_buffers_are_ignored(saved, tmp_path):
    d = _copy(saved["gpt2"][1], tmp_path / "m")
    _edit_tensors(d, lambda t: t.update({
        "transformer.h.0.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32)),
        "transformer.h.0.attn.masked_bias": np.array(-1e4, np.float32),
    }))
    cfg, params, _, _ = load_hf(d)
    assert cfg.arch == "gpt2" and len(params["layers"]) == 2


def test_missing_and_corrupt_weights(saved, tmp_path):
    d = _copy(saved["gpt2"][1], tmp_path / "missing")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors"):
        kvjax.checkpoints.load(d)
    d = _copy(saved["gpt2"][1], tmp_path / "corrupt")
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)  # garbage header length and header
    with pytest.raises(ValueError, match="model.safetensors"):
        kvjax.checkpoints.load(d)
    d = _copy(saved["gpt2"][1], tmp_path / "truncated")
    path = os.path.join(d, "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="model.safetensors"):
        kvjax.checkpoints.load(d)


def test_tokenizer_json_is_loaded(saved, tmp_path):
    tokenizer_mod = pytest.importorskip("kvjax.checkpoints.tokenizer")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf_tok = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    hf_tok.pre_tokenizer = Whitespace()
    for name in ("gpt2", "llama_gqa"):
        d = _copy(saved[name][1], tmp_path / name)
        hf_tok.save(os.path.join(d, "tokenizer.json"))
        tok = kvjax.checkpoints.load(d).tokenizer
        assert isinstance(tok, tokenizer_mod.Tokenizer)

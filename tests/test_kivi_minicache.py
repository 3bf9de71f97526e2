"""KIVI (per-channel 2/4-bit keys, full-precision ring) and MiniCache (cross-layer merge): prefill against
decoding (ragged batches included), exact cache contents, accounting, limits that reduce to the dense
cache, and bad settings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import Dense
from kvjax.generate import decode_step, prefill
from kvjax.models import init_params
from conftest import TINY, decode_tokens

SMOLLM2_SHAPE = dict(arch="llama", vocab_size=97, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                     d_ff=64, max_seq_len=2048, norm_eps=1e-5)


@pytest.fixture(scope="module")
def llama():
    """The tiny Llama (GQA, RoPE) only: these tests check method logic, not the families (test_methods does)."""
    cfg = TINY["llama"]
    return cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.3)


def decode_all(params, cfg, tokens, method, s):
    """Token-by-token logits [B, T, V] and the final cache."""
    return decode_tokens(params, cfg, tokens, method.init(cfg, tokens.shape[0], s), method)


def states_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def layer_calls(method, cfg, chunks, b, s, seed=0):
    """Feeds random q/k/v to every layer's write_attend in the given chunk sizes (the same K/V whatever
    the chunking). Returns (per-layer outputs [B, T, H, D] concatenated over chunks, final cache)."""
    t = sum(chunks)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3 * cfg.n_layers)
    shape_kv = (b, t, cfg.n_kv_heads, cfg.head_dim)
    q = jax.random.normal(keys[0], (b, t, cfg.n_heads, cfg.head_dim))
    kv = [(jax.random.normal(keys[3 * l + 1], shape_kv), jax.random.normal(keys[3 * l + 2], shape_kv))
          for l in range(cfg.n_layers)]
    cache = method.init(cfg, b, s)
    outs = [[] for _ in range(cfg.n_layers)]
    pos0 = 0
    for n in chunks:
        sl = slice(pos0, pos0 + n)
        o, cache = _all_layers(method, cfg, cache, q[:, sl], [(k[:, sl], v[:, sl]) for k, v in kv])
        for l in range(cfg.n_layers):
            outs[l].append(o[l])
        pos0 += n
    return [jnp.concatenate(o, 1) for o in outs], cache


def _all_layers_impl(method, cfg, cache, q, kv):
    positions = cache.lengths[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None, :]
    outs = []
    for l in range(cfg.n_layers):
        o, cache = method.write_attend(None, cfg, cache, l, q, kv[l][0], kv[l][1], positions)
        outs.append(o)
    return outs, cache.replace(lengths=cache.lengths + q.shape[1])


_all_layers = jax.jit(_all_layers_impl, static_argnums=(0, 1))


# ---------------------------------------------------------------------------------------------- KIVI
@pytest.mark.parametrize("settings", [dict(bits=2, group=4, value_group=4, residual=4),
                                      pytest.param(dict(bits=4, group=2, value_group=0, residual=0),
                                                   marks=pytest.mark.slow)])
def test_kivi_cache_contents_do_not_depend_on_chunking(settings):
    """Given the same K/V, one prefill, a mix of chunks and single tokens leave bit-identical caches and
    the same attention outputs (each query sees every key in the form it had when its token arrived)."""
    cfg = TINY["llama"]
    m = kvjax.get_method("kivi", **settings)
    out_a, ca = layer_calls(m, cfg, [14], 2, 16)
    out_b, cb = layer_calls(m, cfg, [1, 1, 6, 6], 2, 16)
    out_c, cc = layer_calls(m, cfg, [1] * 14, 2, 16)
    assert states_equal(ca.layers, cb.layers) and states_equal(ca.layers, cc.layers)
    for a, b_, c in zip(out_a, out_b, out_c):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_kivi_ragged_prefill_equals_decoding(llama):
    """Rows of different real lengths in one right-padded prefill, then decoding, against each row decoded
    alone: the same logits and the same stored K/V (padding never enters a group or the ring)."""
    cfg, params = llama
    m = kvjax.get_method("kivi", bits=2, group=4, value_group=4, residual=4)
    b, s, t = 2, 32, 20
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, cfg.vocab_size)
    nxt = jax.random.randint(jax.random.PRNGKey(2), (6, b), 0, cfg.vocab_size)
    lens = jnp.array([t, 9], jnp.int32)
    full, cache = prefill(params, cfg, tokens, m.init(cfg, b, s), method=m, all_logits=True, seq_lens=lens)
    later = []
    for i in range(6):
        lg, cache = decode_step(params, cfg, nxt[i], cache, method=m)
        later.append(lg)
    later = jnp.stack(later, 1)
    for row in range(b):
        n = int(lens[row])
        seq = jnp.concatenate([tokens[row, :n], nxt[:, row]])[None]
        ref, c1 = decode_all(params, cfg, seq, m, s)
        np.testing.assert_allclose(np.asarray(full[row, :n]), np.asarray(ref[0, :n]), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(later[row]), np.asarray(ref[0, n:]), atol=1e-4, rtol=1e-4)
        for layer in range(cfg.n_layers):
            k_b, v_b = m.read_layer(None, cfg, cache, layer)
            k_1, v_1 = m.read_layer(None, cfg, c1, layer)
            np.testing.assert_allclose(np.asarray(k_b[row]), np.asarray(k_1[0]), atol=1e-2)
            np.testing.assert_allclose(np.asarray(v_b[row]), np.asarray(v_1[0]), atol=1e-2)
    assert cache.lengths.tolist() == [t + 6, 9 + 6]


@pytest.mark.slow
def test_kivi_with_a_window_covering_the_cache_is_dense(llama):
    """residual >= max_len and a float32 ring: nothing is ever quantized, the logits are dense ones."""
    cfg, params = llama
    m = kvjax.get_method("kivi", bits=2, group=4, value_group=0, residual=16, residual_dtype="float32")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 14), 0, cfg.vocab_size)
    cache = m.init(cfg, 2, 16)
    assert set(cache.layers[0]) == {"k_res", "v_res"}  # no quantized groups can ever complete
    got, _ = prefill(params, cfg, tokens, cache, method=m, all_logits=True)
    ref, _ = prefill(params, cfg, tokens, Dense().init(cfg, 2, 16), method=Dense(), all_logits=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_kivi_stores_quantized_keys_within_a_step(llama):
    """8-bit, no window: what read_layer returns is the dense K/V within half a step of each group."""
    cfg, params = llama
    m = kvjax.get_method("kivi", bits=8, group=4, value_group=0, residual=0, residual_dtype="float32")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 14), 0, cfg.vocab_size)
    _, cache = prefill(params, cfg, tokens, m.init(cfg, 2, 16), method=m)
    _, dense = prefill(params, cfg, tokens, Dense(layout="bskd").init(cfg, 2, 16), method=Dense(layout="bskd"))
    k, v = m.read_layer(None, cfg, cache, 0)  # layer 0: same inputs as the dense run
    kd, vd = dense.layers[0]["k"], dense.layers[0]["v"]
    kg = kd[:, :12].reshape(2, 3, 4, cfg.n_kv_heads, cfg.head_dim)  # 3 complete groups of 4 tokens
    step = (kg.max(2) - kg.min(2)) / 255
    err = jnp.abs(k[:, :12] - kd[:, :12]).reshape(kg.shape)
    assert float(jnp.max(err / (step[:, :, None] + 1e-6))) <= 0.6
    assert bool(jnp.all(k[:, 12:14] == kd[:, 12:14]))  # the incomplete group is exact (float32 ring)
    assert bool(jnp.all(k[:, 14:] == 0)) and float(jnp.max(jnp.abs(v[:, :14] - vd[:, :14]))) < 0.05


def test_kivi_accounting():
    from kvjax.config import ModelConfig

    cfg = ModelConfig(**SMOLLM2_SHAPE)
    m = kvjax.get_method("kivi", bits=2, residual=32)
    # per kv head and token: K codes 16 B + fp16 scale/min per channel over 32 tokens (8 B), V codes 16 B +
    # fp16 scale/min per 32 channels (8 B)
    assert m.bytes_per_token(cfg) == 30 * 3 * (16 + 8 + 16 + 8) == 4320
    ring = 2 * 64 * 2 * 3 * 64 * 30  # 64 tokens (R + G) of bf16 K and V
    assert m.cache_nbytes(cfg, 1, 512) == 15 * 32 * 4320 + ring  # (512 - 32) / 32 groups
    assert m.kv_bytes_per_token(cfg, 512) == 6930.0
    assert kvjax.get_method("kivi", bits=4, residual=0).bytes_per_token(cfg) == 30 * 3 * (32 + 8 + 32 + 8)
    for settings in (dict(bits=2, group=4, value_group=4, residual=4), dict(bits=4, group=2, residual=0, value_group=0)):
        for max_len in (3, 6, 8, 9, 24):
            m = kvjax.get_method("kivi", **settings)
            tiny = dataclasses.replace(cfg, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)
            assert m.init(tiny, 3, max_len).nbytes == m.cache_nbytes(tiny, 3, max_len)


def test_kivi_refuses_bad_settings():
    cfg = TINY["llama"]
    with pytest.raises(ValueError, match="bits=3"):
        kvjax.get_method("kivi", bits=3)
    with pytest.raises(ValueError, match="residual=48 must be a non-negative multiple of group=32"):
        kvjax.get_method("kivi", residual=48)
    with pytest.raises(ValueError, match="group=0"):
        kvjax.get_method("kivi", group=0)
    with pytest.raises(ValueError, match="value_group=32 must divide head_dim=8"):
        kvjax.get_method("kivi").init(cfg, 1, 8)
    with pytest.raises(NotImplementedError, match="write_attend"):
        m = kvjax.get_method("kivi", value_group=0)
        m.attend(None, cfg, m.init(cfg, 1, 8), 0, None, None)


# ---------------------------------------------------------------------------------------------- MiniCache
def test_minicache_retaining_everything_decodes_like_dense(llama):
    """retain=1: every token's exact vectors stay in the buffer, so decoding equals the dense cache."""
    cfg, params = llama
    m = kvjax.get_method("minicache", start=0, retain=1.0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    got, _ = decode_all(params, cfg, tokens, m, 12)
    ref, _ = decode_all(params, cfg, tokens, Dense(), 12)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)
    # and without retention the merge is lossy on a random model
    lossy, _ = decode_all(params, cfg, tokens, dataclasses.replace(m, retain=0.0), 12)
    assert float(jnp.max(jnp.abs(lossy - ref))) > 1e-2


def test_minicache_merge_and_retention_do_not_depend_on_chunking():
    """Given the same K/V, one prefill and token-by-token writes store the same merged directions,
    magnitudes and retained set (the most distant tokens); restored vectors follow SLERP's end points."""
    cfg = TINY["llama"]
    m = kvjax.get_method("minicache", start=1, retain=0.25)
    _, ca = layer_calls(m, cfg, [12], 2, 16)
    _, cb = layer_calls(m, cfg, [6] + [1] * 6, 2, 16)
    _, cc = layer_calls(m, cfg, [1] * 12, 2, 16)
    for other in (cb, cc):
        for layer in (1, 2):
            for key, a in ca.layers[layer].items():
                b_ = other.layers[layer][key]
                if key.endswith("_pos"):
                    assert np.array_equal(np.sort(np.asarray(a), 1), np.sort(np.asarray(b_), 1)), key
                elif "_ret_" not in key:
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, err_msg=key)
    # 16 slots * 0.25 = 4 retained per row and head; the 12 stored tokens are all real positions
    pos = np.asarray(ca.layers[2]["k_ret_pos"])
    assert pos.shape == (2, 4, cfg.n_kv_heads) and pos.max() < 12
    dist = np.asarray(ca.layers[2]["k_ret_dist"])
    # the retained distances are the 4 largest of the 12 (recomputed from the inputs)
    keys = jax.random.split(jax.random.PRNGKey(0), 3 * cfg.n_layers)
    shape_kv = (2, 12, cfg.n_kv_heads, cfg.head_dim)
    pos_all = jnp.broadcast_to(jnp.arange(12), (2, 12))
    k1 = m.rotate_keys(cfg, jax.random.normal(keys[4], shape_kv), pos_all)
    k2 = m.rotate_keys(cfg, jax.random.normal(keys[7], shape_kv), pos_all)
    cos = jnp.sum(k1 * k2, -1) / (jnp.linalg.norm(k1, axis=-1) * jnp.linalg.norm(k2, axis=-1))
    d = np.sort(np.asarray(jnp.arccos(jnp.clip(cos, -1, 1)) / jnp.pi), axis=1)[:, -4:]
    np.testing.assert_allclose(np.sort(dist, 1), d, atol=1e-5)


@pytest.mark.slow
def test_minicache_slerp_end_points():
    """t=0 keeps the lower layer's directions (it is restored exactly), t=1 the upper layer's."""
    cfg = TINY["llama"]
    for t, exact in ((0.0, 1), (1.0, 2)):
        m = kvjax.get_method("minicache", start=1, retain=0.0, t=t)
        _, cache = layer_calls(m, cfg, [6], 2, 8)
        keys = jax.random.split(jax.random.PRNGKey(0), 3 * cfg.n_layers)
        v_exact = jax.random.normal(keys[3 * exact + 2], (2, 6, cfg.n_kv_heads, cfg.head_dim))
        _, v = m.read_layer(None, cfg, cache, exact)
        np.testing.assert_allclose(np.asarray(v[:, :6]), np.asarray(v_exact), atol=1e-5)


def test_minicache_accounting_and_shrink():
    from kvjax.config import ModelConfig

    cfg = ModelConfig(**SMOLLM2_SHAPE)
    m = kvjax.get_method("minicache", retain=0.05, dtype="bfloat16")
    assert [m.role(cfg, l) for l in (14, 15, 16, 28, 29)] == ["dense", "lower", "upper", "upper", "dense"]
    dense = Dense(dtype="bfloat16").bytes_per_token(cfg)
    # 7 pairs: each stores one direction (K and V) and two magnitudes instead of two vectors, plus
    # retention slots of two exact vectors, a position and a distance (K and V) for 5% of the tokens
    slots = dense - 7 * 2 * (192 * 2 - 2 * 3 * 2)
    retain_slot = 2 * (2 * 192 * 2 + 3 * 8)
    assert m.bytes_per_token(cfg) == pytest.approx(slots + 7 * 0.05 * retain_slot)
    n = 26  # ceil(0.05 * 512)
    assert m.cache_nbytes(cfg, 1, 512) == 512 * slots + 7 * n * retain_slot
    tiny = dataclasses.replace(cfg, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8)
    for settings in (dict(start=1, retain=0.3), dict(start=0, retain=0.0)):
        mm = kvjax.get_method("minicache", **settings)
        for max_len in (1, 7, 20):
            assert mm.init(tiny, 2, max_len).nbytes == mm.cache_nbytes(tiny, 2, max_len)
    assert m.cache_nbytes(cfg, 1, 512) < Dense(dtype="bfloat16").cache_nbytes(cfg, 1, 512)


def test_minicache_refuses_bad_settings():
    cfg = TINY["llama"]
    with pytest.raises(ValueError, match="t=1.5"):
        kvjax.get_method("minicache", t=1.5)
    with pytest.raises(ValueError, match="retain=-0.1"):
        kvjax.get_method("minicache", retain=-0.1)
    with pytest.raises(ValueError, match="start=2: no pair"):
        kvjax.get_method("minicache", start=2).init(cfg, 1, 8)


def test_decode_protocol(llama):
    """Dense: the decode protocol equals one prefill per window. MiniCache: one prefill per window would see
    its own tokens exactly (an uncompressed model), so that protocol is refused; decoding reads merged
    tokens."""
    from eval.perplexity import perplexity

    cfg, params = llama
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (64,), 0, cfg.vocab_size))
    dense = perplexity((params, cfg), ids, Dense(), context=16, batch=2)
    dec = perplexity((params, cfg), ids, Dense(), context=16, batch=2, protocol="decode")
    assert dec["tokens"] == dense["tokens"] and abs(dec["ppl"] - dense["ppl"]) < 1e-4 * dense["ppl"]
    mc = kvjax.get_method("minicache", start=0, retain=0.0)
    with pytest.raises(ValueError, match="protocol decode"):
        perplexity((params, cfg), ids, mc, context=16, batch=2)
    dec = perplexity((params, cfg), ids, mc, context=16, batch=2, protocol="decode")
    assert abs(dec["ppl"] - dense["ppl"]) > 1e-2 * dense["ppl"]  # decoding reads merged tokens

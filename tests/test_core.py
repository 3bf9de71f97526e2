"""Model core: the cache contract, prefill vs decode, generation, sampling, sharding, clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import decode_tokens, prefill_then_decode
from kvjax.cache import Dense
from kvjax.generate import Sampler, decode_step, generate, pad_prompts, prefill
from kvjax.models import forward


def test_cache_is_immutable_pytree(tiny):
    cfg, params = tiny
    m = Dense()
    cache = m.init(cfg, 2, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.lengths = jnp.ones(2, jnp.int32)
    leaves = jax.tree_util.tree_leaves(cache)
    assert len(leaves) == 2 * cfg.n_layers + 1
    tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(cache)]
    _, new = forward(params, cfg, tokens, cache, m)
    # the old cache object still holds its old values; the new one holds the tokens
    for a, b in zip(before, jax.tree_util.tree_leaves(cache)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert new.lengths.tolist() == [3, 3]
    assert float(jnp.abs(new.layers[0]["v"][:, :, :3]).sum()) > 0  # head-major [B, K, S, D]
    assert float(jnp.abs(new.layers[0]["v"][:, :, 3:]).sum()) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nbytes_matches_bytes_per_token(tiny, dtype):
    cfg, _ = tiny
    m = Dense(dtype=dtype)
    cache = m.init(cfg, 3, 20)
    assert cache.nbytes == m.bytes_per_token(cfg) * 3 * 20
    assert m.bytes_per_token(cfg) == cfg.dense_kv_bytes_per_token(jnp.dtype(dtype).itemsize)


def test_prefill_equals_token_by_token_decode(tiny):
    cfg, params = tiny
    m = Dense()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
    full, _ = prefill(params, cfg, tokens, m.init(cfg, 2, 16), method=m, all_logits=True)
    steps, cache = decode_tokens(params, cfg, tokens, m.init(cfg, 2, 16), m)
    np.testing.assert_allclose(steps, np.asarray(full), atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [9, 9]


def test_chunked_prefill_equals_one_prefill(tiny):
    cfg, params = tiny
    m = Dense()
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)
    full, _ = prefill(params, cfg, tokens, m.init(cfg, 2, 16), method=m, all_logits=True)
    cache = m.init(cfg, 2, 16)
    a, cache = prefill(params, cfg, tokens[:, :5], cache, method=m, all_logits=True)
    b, cache = prefill(params, cfg, tokens[:, 5:], cache, method=m, all_logits=True)
    np.testing.assert_allclose(np.concatenate([a, b], 1), np.asarray(full), atol=1e-4, rtol=1e-4)


def test_ragged_batch_never_attends_to_padding(tiny):
    """A short prompt padded with junk gives the same logits as the prompt alone, at prefill and after."""
    cfg, params = tiny
    m = Dense()
    short, long = [5, 6, 7], [9, 10, 11, 12, 13, 14]
    tokens, lens = pad_prompts([short, long], pad_id=42)
    logits, cache = prefill(params, cfg, tokens, m.init(cfg, 2, 16), method=m, seq_lens=lens)
    alone, cache1 = prefill(params, cfg, jnp.array([short]), m.init(cfg, 1, 16), method=m)
    np.testing.assert_allclose(logits[0], alone[0], atol=1e-4)
    assert cache.lengths.tolist() == [3, 6]
    nxt, _ = decode_step(params, cfg, jnp.array([1, 1]), cache, method=m)
    nxt1, _ = decode_step(params, cfg, jnp.array([1]), cache1, method=m)
    np.testing.assert_allclose(nxt[0], nxt1[0], atol=1e-4)


@pytest.mark.parametrize("layout", ["bksd", "bskd"])
def test_decode_kernel_equals_xla_on_a_ragged_batch(tiny, layout):
    """The dense cache's Pallas decode attention (interpreted on CPU) equals the XLA path, prompts of
    different lengths included; "auto" is XLA off the GPU."""
    from kvjax.models.params import init_params

    cfg = dataclasses.replace(tiny[0], head_dim=16)  # the kernel's smallest head_dim
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    tokens = jax.random.randint(jax.random.PRNGKey(7), (3, 6), 0, cfg.vocab_size)
    outs = {k: prefill_then_decode(params, cfg, tokens, Dense(layout=layout, kernel=k)) for k in ("xla", "pallas")}
    np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=1e-4, rtol=1e-4)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    a = generate(params, cfg, prompts, max_new_tokens=4, stop_tokens=(), method=Dense(layout=layout, kernel="pallas"))
    b = generate(params, cfg, prompts, max_new_tokens=4, stop_tokens=(), method=Dense(layout=layout))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert Dense(kernel="auto")._decode_kernel(cfg) == "xla"
    with pytest.raises(ValueError, match="kernel='triton'"):
        Dense(kernel="triton")


def test_batched_generation_equals_one_by_one(tiny):
    cfg, params = tiny
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [2]]
    batch = generate(params, cfg, prompts, max_new_tokens=6, stop_tokens=())
    for i, p in enumerate(prompts):
        one = generate(params, cfg, [p], max_new_tokens=6, stop_tokens=())
        np.testing.assert_array_equal(np.asarray(one.tokens[0]), np.asarray(batch.tokens[i]))
    assert batch.lengths.tolist() == [6, 6, 6]


def test_generation_is_greedy_continuation(tiny):
    """Greedy generate == argmax of prefill logits, step by step."""
    cfg, params = tiny
    prompt = [4, 8, 15, 16]
    gen = generate(params, cfg, [prompt], max_new_tokens=4, stop_tokens=())
    seq = list(prompt)
    for _ in range(4):
        logits, _ = prefill(params, cfg, jnp.array([seq]), Dense().init(cfg, 1, 16))
        seq.append(int(jnp.argmax(logits[0])))
    assert np.asarray(gen.tokens[0]).tolist() == seq[len(prompt):]


def test_stop_tokens_end_rows_separately(tiny):
    cfg, params = tiny
    prompts = [[5, 6, 7], [9, 10]]
    free = generate(params, cfg, prompts, max_new_tokens=8, stop_tokens=())
    first = int(free.tokens[0, 1])  # stop row 0 at its second token
    gen = generate(params, cfg, prompts, max_new_tokens=8, stop_tokens=(first,), pad_id=0)
    assert int(gen.lengths[0]) == 2
    assert np.asarray(gen.tokens[0, 2:]).tolist() == [0] * 6
    row1 = np.asarray(free.tokens[1]).tolist()
    expect1 = row1.index(first) + 1 if first in row1 else 8
    assert int(gen.lengths[1]) == expect1


def test_sampler_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda s: np.array([int(s(logits, k)[0]) for k in keys])  # noqa: E731
    assert set(draw(Sampler(1.0, top_k=2))) == {0, 1}
    assert set(draw(Sampler(1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(Sampler(1.0, top_p=0.4))) == {0}
    assert len(set(draw(Sampler(1.0)))) == 4
    assert int(Sampler()(logits, keys[0])[0]) == 0
    with pytest.raises(ValueError, match="top_p"):
        Sampler(1.0, top_p=0.0)


def test_sharded_batch_equals_single_device(tiny):
    from kvjax.sharding import batch_mesh, replicate, shard_batch

    assert jax.device_count() >= 4, "conftest forces 4 CPU devices"
    cfg, params = tiny
    m = Dense()
    tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 7), 0, cfg.vocab_size)
    ref, _ = prefill(params, cfg, tokens, m.init(cfg, 4, 16), method=m, all_logits=True)
    mesh = batch_mesh()
    p = replicate(params, mesh)
    cache = shard_batch(m.init(cfg, 4, 16), mesh)
    toks = shard_batch(tokens, mesh)
    out, cache = prefill(p, cfg, toks, cache, method=m, all_logits=True)
    assert len(out.sharding.device_set) == 4
    assert cache.layers[0]["k"].sharding.spec[0] == "batch"
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        shard_batch(jnp.zeros((3, 2)), mesh)


def test_clear_errors(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(params, cfg, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(params, cfg, [[1] * 120], max_new_tokens=20)
    with pytest.raises(ValueError, match="does not fit a cache"):
        generate(params, cfg, [[1] * 10], max_new_tokens=10, max_len=12)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(params, cfg, [[1, 500]], max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        kvjax.load("no-such-model")
    with pytest.raises(ValueError, match="unknown cache method 'nope'"):
        kvjax.parse_method("nope")
    with pytest.raises(ValueError, match="has no setting 'bits'"):
        kvjax.parse_method("dense:bits=4")
    with pytest.raises(ValueError, match="max_len=4096 exceeds"):
        Dense().init(cfg, 1, 4096)
    with pytest.raises(ValueError, match="unknown architecture"):
        kvjax.ModelConfig(arch="falcon", vocab_size=1, d_model=1, n_layers=1, n_heads=1, n_kv_heads=1,
                          head_dim=1, d_ff=1, max_seq_len=1, norm_eps=1e-5)


def test_prefill_refuses_what_would_be_clamped(tiny):
    cfg, params = tiny
    m = Dense()
    with pytest.raises(ValueError, match="does not fit a cache of max_len=4"):
        prefill(params, cfg, jnp.ones((1, 5), jnp.int32), m.init(cfg, 1, 4))
    with pytest.raises(ValueError, match="T >= 1"):
        prefill(params, cfg, jnp.ones((1, 0), jnp.int32), m.init(cfg, 1, 4))
    with pytest.raises(ValueError, match="batch 2 != cache batch 1"):
        prefill(params, cfg, jnp.ones((2, 3), jnp.int32), m.init(cfg, 1, 4))

"""Token eviction (kvjax.cache.eviction): which tokens each policy keeps, ragged batches, byte accounting,
settings errors, and the compress-then-continue evaluation. (Exactness when nothing is evicted, and a
prefill's own logits equal to dense, are checked for every eviction method by tests/test_methods.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import TINY
from eval.capacity import plan
from eval.common import kv_record
from eval.perplexity import perplexity, window_nll
from kvjax.cache import Dense
from kvjax.cache.eviction import EMPTY
from kvjax.generate import decode_step, generate, prefill
from kvjax.models import init_params
from kvjax.models.layers import attention

def kept(cache, layer=0):
    """{(row, kv head): sorted kept positions} of one layer."""
    pos = np.asarray(cache.layers[layer]["pos"])  # [B, C, K]
    return {(b, h): sorted(int(p) for p in pos[b, :, h] if p != EMPTY)
            for b in range(pos.shape[0]) for h in range(pos.shape[2])}


def test_streaming_keeps_exactly_the_sinks_and_the_recent_tokens():
    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    method = kvjax.get_method("streaming", budget=5, sinks=2)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 10), 0, cfg.vocab_size)
    # one prefill of 10 tokens, rows of 10 and 6 real tokens
    _, c = prefill(params, cfg, tokens, method.init(cfg, 2, 16), method=method, seq_lens=jnp.asarray([10, 6]))
    for layer in range(cfg.n_layers):
        for (b, _), pos in kept(c, layer).items():
            assert pos == ([0, 1, 7, 8, 9] if b == 0 else [0, 1, 3, 4, 5])
    # token-by-token decoding keeps the same positions
    c = method.init(cfg, 2, 16)
    for i in range(10):
        _, c = decode_step(params, cfg, tokens[:, i], c, method=method)
    assert all(pos == [0, 1, 7, 8, 9] for pos in kept(c, cfg.n_layers - 1).values())


def _constructed(method, t=12, heavy=(2, 5)):
    """One layer of tiny GPT-2 (no RoPE): every query is e0, the keys of ``heavy`` tokens are 20 * e0 and
    the others 0, so each query puts almost all its weight on the heavy tokens it can see."""
    cfg = TINY["gpt2"]
    h, k, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = jnp.zeros((1, t, h, d)).at[..., 0].set(1.0)
    keys = jnp.zeros((1, t, k, d)).at[:, jnp.asarray(heavy), :, 0].set(20.0)
    v = jax.random.normal(jax.random.PRNGKey(0), (1, t, k, d))
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    cache = method.init(cfg, 1, t)
    out, cache = method.write_attend(None, cfg, cache, 0, q, keys, v, positions)
    ref = attention(q, keys, v, positions)  # the chunk attends over itself exactly
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    return kept(cache)


@pytest.mark.parametrize("settings,expect", [
    (("h2o", {"budget": 2, "recent": 0.0}), [2, 5]),  # summed attention: 2 and 5 are the heavy hitters
    (("h2o", {"budget": 2, "recent": 0.0, "normalize": True}), [2, 5]),
    (("h2o", {"budget": 4, "recent": 0.5}), [2, 5, 10, 11]),  # half the slots for the recent tokens
    (("snapkv", {"budget": 4, "window": 2, "kernel": 1}), [2, 5, 10, 11]),  # the window + its top keys
    (("snapkv", {"budget": 2, "window": 3, "kernel": 1}), [10, 11]),  # a window larger than the slots
])
def test_attention_policies_keep_the_most_attended_tokens(settings, expect):
    name, kw = settings
    for pos in _constructed(kvjax.get_method(name, **kw)).values():
        assert pos == expect


def test_snapkv_pooling_follows_positions_not_slots():
    from kvjax.cache.eviction import _pool_by_position

    pos = jnp.asarray([[3, 0, EMPTY, 1, 2]])[..., None]  # slots out of order, one free
    s = jnp.asarray([[0.0, 3.0, 0.0, 0.0, 0.0]])[..., None]  # position 0 scores 3
    pooled = np.asarray(_pool_by_position(s, pos, 3))[0, :, 0]
    np.testing.assert_allclose(pooled, [0.0, 1.0, 0.0, 1.0, 0.0])  # positions 0 and 1 share it, not 2 or 3


def test_ragged_batch_equals_each_row_alone():
    # (streaming's ragged kept positions and snapkv's ragged generation are tested below)
    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    method = kvjax.get_method("h2o", budget=4, bits=8)  # scores carried across calls, quantized slots
    rows = [np.arange(7) % 90 + 5, np.arange(4) % 90 + 30]
    tokens = np.zeros((2, 7), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    nxt = np.asarray([11, 12], np.int32)

    def run(tok, lens, nx):  # prefill + one decode step; the same shapes every time (one compilation)
        c = method.init(cfg, 2, 12)
        lg, c = prefill(params, cfg, jnp.asarray(tok), c, method=method, seq_lens=jnp.asarray(lens))
        dl, c = decode_step(params, cfg, jnp.asarray(nx), c, method=method)
        return lg, dl, c

    lb, db, cb = run(tokens, [7, 4], nxt)
    for i, r in enumerate(rows):  # the row alone: a batch of two copies of it
        l1, d1, c1 = run(tokens[[i, i]], [len(r)] * 2, nxt[[i, i]])
        np.testing.assert_allclose(np.asarray(lb[i]), np.asarray(l1[0]), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(db[i]), np.asarray(d1[0]), atol=1e-5, rtol=1e-5)
        for layer in range(cfg.n_layers):
            alone, both = kept(c1, layer), kept(cb, layer)
            assert all(alone[0, h] == both[i, h] for h in range(cfg.n_kv_heads))


@pytest.mark.parametrize("spec,per_slot_head", [
    ("streaming:ratio=0.5", 2 * 8 * 4 + 4),  # f32 K and V + int32 position
    ("snapkv:ratio=0.75,dtype=bfloat16", 2 * 8 * 2 + 4),
    ("h2o:budget=5", 2 * 8 * 4 + 4 + 4),  # + float32 accumulated score
    ("h2o:budget=5,bits=4,group=4", 2 * (4 + 2 * 2 * 2) + 4 + 4),  # packed int4 + fp16 scale and min per group
    ("snapkv:budget=100,bits=8", 2 * (8 + 2 * 2) + 4),  # budget above max_len: capped at max_len
])
def test_accounting_counts_every_slot_position_and_score(spec, per_slot_head):
    cfg = TINY["llama"]  # 3 layers, 2 kv heads, head_dim 8
    method = kvjax.parse_method(spec)
    batch, max_len = 3, 20
    expect_c = {"ratio=0.5": 10, "ratio=0.75": 5, "budget=5": 5, "budget=100": 20}
    c = next(v for k, v in expect_c.items() if k in spec)
    assert method.capacity(max_len) == c
    cache = method.init(cfg, batch, max_len)
    assert cache.layers[0]["pos"].shape == (batch, c, cfg.n_kv_heads)
    assert cache.nbytes == method.cache_nbytes(cfg, batch, max_len) == 3 * batch * c * 2 * per_slot_head
    rec = kv_record(method, cfg, "float32", context=max_len)  # the bytes of what a max_len context keeps
    assert rec["kv_bytes_per_token"] == pytest.approx(method.cache_nbytes(cfg, 1, max_len) / max_len)
    res = plan(cfg, method, budget_bytes=10 ** 5, seq_len=max_len, batch=2)  # eval.capacity agrees
    assert res["max_batch"] == 10 ** 5 // method.cache_nbytes(cfg, 1, max_len)


def test_a_ratio_keeps_at_least_the_policy_minimum():
    m = kvjax.get_method("streaming", ratio=0.875, sinks=4)
    assert [m.capacity(n) for n in (3, 8, 40, 80)] == [3, 5, 5, 10]


def test_bad_settings_are_clear_errors():
    cfg = TINY["llama"]
    with pytest.raises(ValueError, match="ratio=1.0"):
        kvjax.get_method("snapkv", ratio=1.0)
    with pytest.raises(ValueError, match="not both"):
        kvjax.get_method("h2o", ratio=0.5, budget=8)
    with pytest.raises(ValueError, match="bits=3"):
        kvjax.get_method("streaming", bits=3)
    with pytest.raises(ValueError, match="kernel=4"):
        kvjax.get_method("snapkv", kernel=4)
    with pytest.raises(ValueError, match="recent=2"):
        kvjax.get_method("h2o", recent=2.0)
    with pytest.raises(ValueError, match="needs at least 5"):
        kvjax.get_method("streaming", budget=4, sinks=4).init(cfg, 1, 16)
    with pytest.raises(ValueError, match="group=3"):
        kvjax.get_method("h2o", bits=4, group=3).init(cfg, 1, 16)
    with pytest.raises(ValueError, match="has no setting 'sink'"):
        kvjax.parse_method("streaming:sink=4")
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="protocol continue"):
        perplexity((params, cfg), np.arange(64) % 90, kvjax.get_method("snapkv", ratio=0.5), context=32)
    from eval.zeroshot import loglikelihoods
    with pytest.raises(ValueError, match="per_row=true"):
        loglikelihoods((params, cfg), [([5, 6], [7])], kvjax.get_method("h2o", ratio=0.5))
    with pytest.raises(ValueError, match="at least 2 context tokens"):
        loglikelihoods((params, cfg), [([5], [7])], kvjax.get_method("h2o", ratio=0.5, per_row=True))
    with pytest.raises(ValueError, match="per_row=true applies a ratio"):
        kvjax.get_method("snapkv", budget=8, per_row=True)


@dataclasses.dataclass(frozen=True)
class _Hidden(Dense):
    """Test helper (not registered): dense, except that queries at or after position ``after`` do not see
    the positions in ``hide``: what streaming leaves the continuation of a compressed prefix."""

    hide: tuple = ()
    after: int = 0

    def attend(self, params, cfg, cache, layer, q, positions):
        k, v = self.read_layer(params, cfg, cache, layer)
        k_pos = self.slot_positions(*k.shape[:2])
        gone = jnp.isin(k_pos, jnp.asarray(self.hide)) & (positions[:, :1] >= self.after)
        return attention(q, k, v, positions, jnp.where(gone, EMPTY, k_pos))


def test_continue_protocol_reads_the_compressed_prefix_and_its_own_tokens():
    cfg = TINY["llama"]  # RoPE: kept keys keep their rotation
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    c, p = 16, 12
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, c), 0, cfg.vocab_size)
    w = jnp.ones((2, c - 1))
    stream = kvjax.get_method("streaming", ratio=0.5, sinks=2)  # keeps int(12 * 0.5) = 6: 0, 1, 8..11
    got = window_nll(params, None, tokens, w, cfg=cfg, method=stream, prefix=p)
    ref = window_nll(params, None, tokens, w, cfg=cfg, method=_Hidden(hide=tuple(range(2, 8)), after=p), prefix=p)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_continue_protocol_records_the_bytes_the_prefix_keeps():
    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, 96)
    m = kvjax.get_method("snapkv", ratio=0.75, window=4)
    res = perplexity((params, cfg), ids, m, context=32, protocol="continue", prefix=24)
    assert res["tokens"] == 3 * 8 and res["kv_bytes_at_context"] == 24
    assert res["kv_cache_bytes_per_window"] == m.cache_nbytes(cfg, 1, 24) == m.init(cfg, 1, 24).nbytes
    assert res["kv_bytes_per_token"] == pytest.approx(6 * m.bytes_per_token(cfg) / 24)  # 6 of 24 slots kept
    assert 0.7 < res["kv_saved"] < 0.75  # a quarter of the prefix, positions counted


def test_generate_through_an_eviction_cache():
    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # ragged; 4 slots: both prompts are compressed, decoding evicts
    out = generate(params, cfg, prompts, max_new_tokens=6, stop_tokens=(),
                   method=kvjax.get_method("snapkv", budget=4, window=2))
    assert out.tokens.shape == (2, 6) and np.asarray(out.lengths).tolist() == [6, 6]


def test_full_protocol_in_chunks():
    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, 64)
    whole = perplexity((params, cfg), ids, Dense(), context=32)
    chunked = perplexity((params, cfg), ids, Dense(), context=32, chunk=8)
    assert chunked["nll_sum"] == pytest.approx(whole["nll_sum"], rel=1e-5) and chunked["chunk"] == 8
    # an eviction cache evicts between chunks: more loss than dense, bytes of 16 slots over 32 tokens
    ev = perplexity((params, cfg), ids, kvjax.get_method("streaming", ratio=0.5, sinks=2), context=32, chunk=8)
    assert ev["tokens"] == whole["tokens"] and ev["nll_sum"] != pytest.approx(whole["nll_sum"], rel=1e-4)
    assert ev["kv_cache_bytes_per_window"] == kvjax.get_method("streaming", ratio=0.5).cache_nbytes(cfg, 1, 32)
    with pytest.raises(ValueError, match="chunk=5"):
        perplexity((params, cfg), ids, Dense(), context=32, chunk=5)


@pytest.mark.parametrize("spec", ["streaming:ratio=0.5,sinks=1", "h2o:ratio=0.5", "snapkv:ratio=0.5,window=2"])
def test_per_row_ratio_keeps_a_share_of_each_rows_own_length(spec):
    """A ragged batch with per_row: each row keeps int(n * (1 - ratio)) of its n tokens, as it would alone
    in a cache made for exactly its length."""
    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    method = kvjax.parse_method(spec + ",per_row=true")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    lens = jnp.asarray([12, 6], jnp.int32)
    _, cache = prefill(params, cfg, tokens, method.init(cfg, 2, 12), method=method, seq_lens=lens)
    for row, n in enumerate([12, 6]):
        kept = np.asarray(cache.layers[0]["pos"][row] < EMPTY).sum(axis=0)  # per kv head
        assert (kept == int(n * 0.5)).all(), (row, kept)
        alone_m = kvjax.parse_method(spec)
        _, alone = prefill(params, cfg, tokens[row:row + 1, :n], alone_m.init(cfg, 1, n), method=alone_m)
        for layer in range(cfg.n_layers):
            got = np.sort(np.asarray(cache.layers[layer]["pos"][row]), axis=0)[: int(n * 0.5)]
            want = np.sort(np.asarray(alone.layers[layer]["pos"][0]), axis=0)
            np.testing.assert_array_equal(got, want)


def test_zero_shot_compresses_the_context_before_the_continuation_reads_it():
    from eval.zeroshot import loglikelihoods

    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.5)
    rng = np.random.default_rng(0)
    reqs = [(list(rng.integers(0, cfg.vocab_size, n)), list(rng.integers(0, cfg.vocab_size, m)))
            for n, m in ((20, 3), (9, 1), (14, 5))]
    dense, _, _ = loglikelihoods((params, cfg), reqs, batch=2, bucket=8)
    keep_all, _, _ = loglikelihoods((params, cfg), reqs, kvjax.parse_method("snapkv:budget=64"), batch=2, bucket=8)
    np.testing.assert_allclose(keep_all, dense, rtol=1e-4, atol=1e-4)  # nothing evicted: the dense scores
    half, _, _ = loglikelihoods((params, cfg), reqs, kvjax.parse_method("snapkv:ratio=0.75,window=2,per_row=true"),
                                batch=2, bucket=8)
    assert np.isfinite(half).all() and np.abs(half - dense).max() > 1e-3  # the continuation read less
    merged, _, _ = loglikelihoods((params, cfg), reqs, kvjax.parse_method("minicache:start=0,retain=0"),
                                  batch=2, bucket=8)
    assert np.isfinite(merged).all() and np.abs(merged - dense).max() > 1e-3

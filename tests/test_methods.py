"""One table of every registered cache method, an easy and a hard setting each, run on tiny GPT-2 and Llama:
prefill + decode, finite outputs, shapes, physical bytes below dense, ``nbytes == cache_nbytes`` accounting,
and the order property of the method's kind:

* write-then-read methods (``method.write_then_read``): one prefill equals token-by-token decoding, since
  every query reads back exactly what was written, whatever the order;
* eviction methods (``write_then_read = False``): that equality does not hold once tokens are evicted (a
  prefill attends within its chunk exactly and evicts at its end; decoding evicts at every step, so later
  tokens see fewer keys). What holds instead: a prefill's own logits equal the dense cache's (nothing is
  evicted before the chunk's queries read it), and with every token kept (the easy settings) decoding
  equals dense too. tests/test_eviction.py checks the rest;
* methods listed in ``PREFILL_IS_EXACT`` (MiniCache): a prefill equals the dense cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from conftest import decode_tokens
from kvjax.cache import Dense
from kvjax.cache.autoencoder import Autoencoder
from kvjax.cache.registry import available
from kvjax.compressors.autoencoder import fold_variables, init_layer_variables
from kvjax.generate import decode_step, prefill


def ae_params(cfg, latent, latent_v=0, hidden=0):
    keys = jax.random.split(jax.random.PRNGKey(0), cfg.n_layers)
    return fold_variables({str(l): init_layer_variables(keys[l], cfg.kv_width, latent, hidden, latent_v)
                           for l in range(cfg.n_layers)})


# name -> (easy settings, hard settings, params builder(cfg, settings) or None); a setting may be a
# function of the model config
TABLE = {
    "dense": ({"dtype": "float32"}, {"dtype": "bfloat16"}, None),
    "autoencoder": ({"latent": 12, "latent_v": 16},
                    {"latent": 4, "hidden": 8, "latent_dtype": "int2", "latent_group": 2},
                    lambda cfg, s: ae_params(cfg, s["latent"], s.get("latent_v", 0), s.get("hidden", 0))),
    "quantized": ({"bits": 8}, {"bits": 4, "group": 4}, None),
    # hard: an autoencoder inner in latent mode, layer 2 decoding layer 0's int8 latents along the chain
    "reuse": ({"plan": ((1, 0),)},
              {"plan": lambda cfg: tuple((l, h) for l in (1, 2) for h in range(cfg.n_kv_heads)), "mode": "latent",
               "inner": Autoencoder(latent=4, latent_v=6, latent_dtype="int8")},
              lambda cfg, s: ae_params(cfg, 4, 6) if "inner" in s else None),
    "kivi": ({"bits": 4, "group": 2, "value_group": 4, "residual": 2, "residual_dtype": "float32"},
             {"bits": 2, "group": 4, "value_group": 0, "residual": 0, "residual_dtype": "bfloat16"}),
    "minicache": ({"start": 1, "retain": 0.25}, {"start": 0, "retain": 0.0, "t": 0.3, "dtype": "bfloat16"}),
    # eviction, max_len 12: easy keeps 9 slots (the 8-token prefill and one decode step fit), hard evicts
    "streaming": ({"ratio": 0.25, "sinks": 2}, {"budget": 4, "sinks": 1, "bits": 4, "group": 4}, None),
    "h2o": ({"ratio": 0.25}, {"budget": 4, "recent": 0.25, "normalize": True, "bits": 8}, None),
    "snapkv": ({"ratio": 0.25, "window": 4}, {"budget": 3, "window": 2, "kernel": 3, "dtype": "bfloat16"}, None),
}
TABLE = {name: row if len(row) == 3 else row + (None,) for name, row in TABLE.items()}

# Methods whose prefill does not equal token-by-token decoding, by design: MiniCache merges a token into
# the layer pair only after the step that wrote it (layer l+1's K/V do not exist while layer l attends), so
# every layer attends over its exact K/V for the tokens of the current call. A prefill therefore equals the
# dense cache, and decoding is where the compression shows (eval.perplexity --protocol decode).
PREFILL_IS_EXACT = {"minicache"}


def test_every_registered_method_is_in_the_table():
    assert set(available()) <= set(TABLE), f"add {set(available()) - set(TABLE)} to TABLE"


CASES = [(name, level) for name in sorted(TABLE) for level in ("easy", "hard")]


@pytest.mark.parametrize("name,level", CASES)
def test_method(tiny, name, level):
    cfg, params = tiny
    easy, hard, make = TABLE[name]
    settings = {k: v(cfg) if callable(v) else v for k, v in (easy if level == "easy" else hard).items()}
    method = kvjax.get_method(name, **settings)
    mp = make(cfg, settings) if make else None
    b, s = 2, 12
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, 8), 0, cfg.vocab_size)
    cache = method.init(cfg, b, s, mp)
    dense_bytes = Dense(dtype="float32").init(cfg, b, s).nbytes
    assert cache.nbytes == method.cache_nbytes(cfg, b, s)
    if name != "dense" or settings["dtype"] != "float32":
        assert cache.nbytes < dense_bytes
    full, cache = prefill(params, cfg, tokens, cache, method=method, mparams=mp, all_logits=True)
    assert full.shape == (b, 8, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(full)))
    logits, cache = decode_step(params, cfg, tokens[:, 0], cache, method=method, mparams=mp)
    assert logits.shape == (b, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    assert cache.lengths.tolist() == [9, 9]
    tol = 2e-2 if "bfloat16" in settings.values() else 1e-4
    if name in PREFILL_IS_EXACT:  # prefill attends exactly: it equals the dense cache
        dense = Dense()
        ref, _ = prefill(params, cfg, tokens, dense.init(cfg, b, s), method=dense, all_logits=True)
        np.testing.assert_allclose(np.asarray(full), np.asarray(ref), atol=tol, rtol=tol)
        return
    if not method.write_then_read:
        # eviction: the prefill's queries attend over their own chunk exactly, as with the dense cache; the
        # easy settings keep 9 slots, every token here: the decode step equals dense too
        dense, dc = prefill(params, cfg, tokens, Dense().init(cfg, b, s), all_logits=True)
        np.testing.assert_allclose(np.asarray(full), np.asarray(dense), atol=1e-4, rtol=1e-4)
        if level == "easy":
            assert method.capacity(s) >= 9
            dl, _ = decode_step(params, cfg, tokens[:, 0], dc)
            np.testing.assert_allclose(np.asarray(logits), np.asarray(dl), atol=1e-4, rtol=1e-4)
        return
    # write-then-read: one prefill equals token-by-token decoding through the same cache
    steps, _ = decode_tokens(params, cfg, tokens, method.init(cfg, b, s, mp), method, mp)
    np.testing.assert_allclose(steps, np.asarray(full), atol=tol, rtol=tol)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 4), (2, 0), (2, 4)])
def test_quantization_error_is_bounded(bits, group):
    from kvjax.cache.quantized import dequantize, quantize

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 2, 16)) * 3
    codes, scale, lo = quantize(x, bits, group)
    assert codes.dtype == jnp.uint8 and codes.shape[-1] == 16 * bits // 8
    err = jnp.abs(dequantize(codes, scale, lo, bits, group, 16) - x)
    g = group or 16
    xg = x.reshape(3, 5, 2, 16 // g, g)
    step = ((xg.max(-1) - xg.min(-1)) / (2 ** bits - 1))[..., None]
    assert float(jnp.max(err.reshape(xg.shape) / step)) <= 0.55


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_quantization_error_is_bounded(bits):
    """Groups along the token axis (KIVI's keys): one scale per channel per group of 4 tokens."""
    from kvjax.cache.quantized import dequantize, quantize

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 3, 16)) * jnp.linspace(0.1, 10, 16)  # [B, T, K, D]
    codes, scale, lo = quantize(x, bits, 4, axis=1)
    assert codes.shape == (2, 8, 3, 16 * bits // 8) and scale.shape == lo.shape == (2, 2, 3, 16)
    err = jnp.abs(dequantize(codes, scale, lo, bits, 4, 16, axis=1) - x)
    xg = x.reshape(2, 2, 4, 3, 16)
    step = (xg.max(2) - xg.min(2)) / (2 ** bits - 1)  # [B, T/4, K, D]
    assert float(jnp.max(err.reshape(xg.shape) / step[:, :, None])) <= 0.55
    # per channel beats per token on channel-scaled data (the reason KIVI quantizes keys this way)
    tok = dequantize(*quantize(x, bits, 0), bits, 0, 16)
    assert float(jnp.mean(err)) < float(jnp.mean(jnp.abs(tok - x)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    from kvjax.cache.quantized import pack, unpack

    codes = jax.random.randint(jax.random.PRNGKey(0), (3, 16), 0, 2 ** bits).astype(jnp.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 16 * bits // 8)
    assert bool(jnp.all(unpack(packed, bits, 16) == codes))


def test_quantized_refuses_bad_settings(tiny):
    cfg, _ = tiny
    with pytest.raises(ValueError, match="choose 8 or 4"):
        kvjax.get_method("quantized", bits=3)
    with pytest.raises(ValueError, match="must divide head_dim"):
        kvjax.get_method("quantized", bits=4, group=3).init(cfg, 1, 4)

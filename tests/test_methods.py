"""One table of every registered cache method, an easy and a hard setting each, run on tiny GPT-2 and Llama:
prefill + decode, finite outputs, shapes, physical bytes below dense, ``nbytes == bytes_per_token`` accounting,
and (for these write-then-read methods) one prefill equal to token-by-token decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
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
    "autoencoder": ({"latent": 12, "latent_v": 16}, {"latent": 4, "hidden": 8, "latent_dtype": "int8"},
                    lambda cfg, s: ae_params(cfg, s["latent"], s.get("latent_v", 0), s.get("hidden", 0))),
    "quantized": ({"bits": 8}, {"bits": 4, "group": 4}, None),
    # hard: an autoencoder inner in latent mode, layer 2 decoding layer 0's int8 latents along the chain
    "reuse": ({"plan": ((1, 0),)},
              {"plan": lambda cfg: tuple((l, h) for l in (1, 2) for h in range(cfg.n_kv_heads)), "mode": "latent",
               "inner": Autoencoder(latent=4, latent_v=6, latent_dtype="int8")},
              lambda cfg, s: ae_params(cfg, 4, 6) if "inner" in s else None),
}


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
    # write-then-read: one prefill equals token-by-token decoding through the same cache
    c2 = method.init(cfg, b, s, mp)
    steps = []
    for i in range(8):
        lg, c2 = decode_step(params, cfg, tokens[:, i], c2, method=method, mparams=mp)
        steps.append(lg)
    tol = 2e-2 if "bfloat16" in settings.values() else 1e-4
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), atol=tol, rtol=tol)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 4)])
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


def test_quantized_refuses_bad_settings(tiny):
    cfg, _ = tiny
    with pytest.raises(ValueError, match="choose 8 or 4"):
        kvjax.get_method("quantized", bits=3)
    with pytest.raises(ValueError, match="must divide head_dim"):
        kvjax.get_method("quantized", bits=4, group=3).init(cfg, 1, 4)

"""The parameter pytree of each family: its shapes (the contract every loader checks) and a random init.

All weight matrices are stored (in, out) so that a layer computes ``x @ w``.

llama: {"embed": [V, E], "layers": [ {attn_norm [E], wq [E, H*D], wk [E, K*D], wv [E, K*D], wo [H*D, E],
         mlp_norm [E], w_gate [E, F], w_up [E, F], w_down [F, E]} x n_layers ], "final_norm": [E],
         "lm_head": [E, V] (absent when tied)}
gpt2:  {"embed": [V, E], "pos_embed": [P, E], "layers": [ {ln1_scale, ln1_bias [E], wq, wk, wv [E, E],
         bq, bk, bv [E], wo [E, E], bo [E], ln2_scale, ln2_bias [E], w_fc [E, F], b_fc [F], w_proj [F, E],
         b_proj [E]} x n_layers ], "final_norm": [E], "final_bias": [E]}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, f, q, kv = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.kv_width
    if cfg.arch == "llama":
        return {"attn_norm": (e,), "wq": (e, q), "wk": (e, kv), "wv": (e, kv), "wo": (q, e),
                "mlp_norm": (e,), "w_gate": (e, f), "w_up": (e, f), "w_down": (f, e)}
    return {"ln1_scale": (e,), "ln1_bias": (e,), "wq": (e, q), "wk": (e, kv), "wv": (e, kv),
            "bq": (q,), "bk": (kv,), "bv": (kv,), "wo": (q, e), "bo": (e,), "ln2_scale": (e,), "ln2_bias": (e,),
            "w_fc": (e, f), "b_fc": (f,), "w_proj": (f, e), "b_proj": (e,)}


def top_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, v = cfg.d_model, cfg.vocab_size
    if cfg.arch == "llama":
        shapes = {"embed": (v, e), "final_norm": (e,)}
        if not cfg.tie_embeddings:
            shapes["lm_head"] = (e, v)
        return shapes
    return {"embed": (v, e), "pos_embed": (cfg.max_seq_len, e), "final_norm": (e,), "final_bias": (e,)}


def check_params(params, cfg: ModelConfig, source: str = "params") -> None:
    """Raises ValueError naming the tensor whose shape (or presence) does not match ``cfg``."""
    def check(path, arr, shape):
        if arr is None:
            raise ValueError(f"{source}: missing tensor {path} (expected shape {shape})")
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {path} has shape {tuple(arr.shape)}, expected {tuple(shape)}")

    for name, shape in top_shapes(cfg).items():
        check(name, params.get(name), shape)
    if len(params.get("layers", ())) != cfg.n_layers:
        raise ValueError(f"{source}: {len(params.get('layers', ()))} layers, config says {cfg.n_layers}")
    for i, layer in enumerate(params["layers"]):
        for name, shape in layer_shapes(cfg).items():
            check(f"layers.{i}.{name}", layer.get(name), shape)


def init_params(cfg: ModelConfig, key, dtype=jnp.float32, scale: float = 0.02):
    """Random parameters for tests and tiny experiments (norm scales at 1, biases at 0)."""
    def make(name, shape, k):
        if name.endswith(("norm", "scale")):
            return jnp.ones(shape, dtype)
        if name.startswith("b") or name.endswith("bias"):
            return jnp.zeros(shape, dtype)
        return (scale * jax.random.normal(k, shape)).astype(dtype)

    keys = iter(jax.random.split(key, 1000))
    params = {n: make(n, s, next(keys)) for n, s in top_shapes(cfg).items()}
    params["layers"] = [{n: make(n, s, next(keys)) for n, s in layer_shapes(cfg).items()} for _ in range(cfg.n_layers)]
    return params


def cast_params(params, dtype):
    """Casts every floating array of a parameter pytree to ``dtype``."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def to_jax(params):
    """Moves a numpy parameter pytree to the default device."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), params)

"""The uncompressed cache: K (after RoPE) and V for every layer, token and kv head."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.registry import register


@register("dense")
@dataclasses.dataclass(frozen=True)
class Dense(CacheMethod):
    """Stores K and V as they are, in ``dtype``."""

    name = "dense"
    dtype: str = "float32"

    def init_layer(self, cfg, layer, batch, max_len):
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)  # [B, S, K, D]
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        k = self.rotate_keys(cfg, k, positions)
        return {"k": write_at(state["k"], k, starts), "v": write_at(state["v"], v, starts)}

    def read_layer(self, params, cfg, cache, layer):
        state = cache.layers[layer]
        return state["k"], state["v"]

    def layer_bytes_per_token(self, cfg, layer):
        return 2 * cfg.kv_width * jnp.dtype(self.dtype).itemsize

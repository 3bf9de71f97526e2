"""The uncompressed cache: K (after RoPE) and V for every layer, token and kv head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.registry import register
from kvjax.models.layers import attention

LAYOUTS = ("bksd", "bskd")


@register("dense")
@dataclasses.dataclass(frozen=True)
class Dense(CacheMethod):
    """Stores K and V as they are, in ``dtype``.

    ``layout`` "bksd" (default: head-major [B, K, S, D]) or "bskd" ([B, S, K, D], the layout
    ``read_layer`` returns). Head-major lets XLA's batched attention matmuls over (B, K) read the cache
    where it lies; with "bskd" XLA transposes the whole cache before them. Measured on the H100
    (results/model_bench/), SmolLM2 bf16, jitted decode loop: B=64 x 2048 tokens 2.64 ms/token head-major
    vs 2.98 ms; B=256 x 512 3.29 vs 3.79 ms.
    ``kernel`` picks one-token decode attention: "xla" (einsum - softmax - einsum), "pallas" (head-major:
    kvjax's split-K kernel ``pallas_kernels.decode_attention``; "bskd": jax's own Pallas decode kernel), or
    "auto" (default: "pallas" on a single GPU with the head-major layout and a power-of-two head_dim >= 16,
    "xla" otherwise, including several devices, whose batch sharding a pallas_call would undo). Prefill always runs in XLA. Measured on the H100 (results/model_bench/dense_kernel_*), SmolLM2
    bf16, decode loop at B=64 x 2048: 2.18 ms/token with the kernel vs 2.59 ms with XLA.
    """

    name = "dense"
    dtype: str = "float32"
    layout: str = "bksd"
    kernel: str = "auto"  # decode attention (one new token): "auto", "xla" or "pallas"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"dense layout={self.layout!r}; choose one of {LAYOUTS}")
        if self.kernel not in ("xla", "pallas", "auto"):
            raise ValueError(f"dense kernel={self.kernel!r}; choose xla, pallas or auto")

    def init_layer(self, cfg, layer, batch, max_len):
        k, d = cfg.n_kv_heads, cfg.head_dim
        shape = (batch, k, max_len, d) if self.layout == "bksd" else (batch, max_len, k, d)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        k = self.rotate_keys(cfg, k, positions)
        if self.layout == "bksd":  # new tokens [B, T, K, D] -> [B, K, T, D], written along the slot axis 2
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            return {"k": write_at(state["k"], k, starts, axis=2), "v": write_at(state["v"], v, starts, axis=2)}
        return {"k": write_at(state["k"], k, starts), "v": write_at(state["v"], v, starts)}

    def read_layer(self, params, cfg, cache, layer):
        state = cache.layers[layer]
        if self.layout == "bksd":
            return state["k"].transpose(0, 2, 1, 3), state["v"].transpose(0, 2, 1, 3)
        return state["k"], state["v"]

    def attend(self, params, cfg, cache, layer, q, positions):
        state = cache.layers[layer]
        k, v = state["k"].astype(q.dtype), state["v"].astype(q.dtype)
        if q.shape[1] == 1 and self._decode_kernel(cfg) == "pallas":
            if self.layout == "bksd":
                from pallas_kernels.decode_attention import decode_attend as kernel
            else:
                from pallas_kernels.decompress_attention.api import dense_attend as kernel
            return kernel(q[:, 0], k, v, positions[:, 0] + 1, implementation="pallas")[:, None]
        if self.layout == "bksd" and q.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
            # XLA:CPU sometimes lowers the head-major bf16 x bf16 -> f32 batched dot to a thunk that
            # refuses it ("Unsupported element type for DotThunk"); CPU has no bf16 matmul speed to lose
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
            return attention(q, k, v, positions, kv_layout=self.layout).astype(jnp.bfloat16)
        return attention(q, k, v, positions, kv_layout=self.layout)

    def _decode_kernel(self, cfg) -> str:
        if self.kernel != "auto":
            return self.kernel
        d = cfg.head_dim
        fits = self.layout == "bksd" and d >= 16 and d & (d - 1) == 0  # the kernel's shape limits
        # XLA's SPMD partitioner does not split a pallas_call: with several devices it would gather the
        # batch-sharded cache onto every device, so the sharded XLA path stays the default there
        one_device = jax.device_count() == 1
        return "pallas" if fits and one_device and jax.default_backend() == "gpu" else "xla"

    def layer_bytes_per_token(self, cfg, layer):
        return 2 * cfg.kv_width * jnp.dtype(self.dtype).itemsize

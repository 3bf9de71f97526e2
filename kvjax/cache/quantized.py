"""Quantized cache: K (after RoPE) and V stored as int8 or packed int4 with per-group scales.

Each token's head vector of D values is split into groups of ``group`` values (0: one group per head
vector); a group stores ``bits``-bit codes plus a float16 scale and minimum (asymmetric min/max), so
``x ≈ code * scale + min``. int4 codes are packed two to a byte: the arrays are physically smaller.
This is the plain baseline every learned method should beat at equal bytes (KIVI-style per-channel keys
and a full-precision residual window are a later addition).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.registry import register


def quantize(x, bits: int, group: int):
    """x [..., D] -> (codes uint8 [..., D * bits / 8], scale [..., D/group] fp16, min [..., D/group] fp16)."""
    d = x.shape[-1]
    g = group or d
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], d // g, g)
    lo = jnp.min(xg, axis=-1).astype(jnp.float16)
    levels = 2 ** bits - 1
    scale = ((jnp.max(xg, axis=-1) - lo.astype(jnp.float32)) / levels).astype(jnp.float16)
    s = jnp.maximum(scale.astype(jnp.float32), 1e-8)[..., None]
    codes = jnp.clip(jnp.round((xg - lo.astype(jnp.float32)[..., None]) / s), 0, levels).astype(jnp.uint8)
    codes = codes.reshape(*x.shape[:-1], d)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, lo


def dequantize(codes, scale, lo, bits: int, group: int, d: int):
    """Inverse of :func:`quantize`: returns [..., D] float32."""
    if bits == 4:
        codes = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:-1], d)
    g = group or d
    xg = codes.astype(jnp.float32).reshape(*codes.shape[:-1], d // g, g)
    x = xg * scale.astype(jnp.float32)[..., None] + lo.astype(jnp.float32)[..., None]
    return x.reshape(*codes.shape[:-1], d)


@register("quantized")
@dataclasses.dataclass(frozen=True)
class Quantized(CacheMethod):
    """``bits`` 8 or 4; ``group`` values per scale (0: the whole head vector); ``dtype`` of the K/V it returns."""

    name = "quantized"
    bits: int = 8
    group: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"quantized bits={self.bits}; choose 8 or 4")
        if self.group < 0:
            raise ValueError(f"quantized group={self.group} must be >= 0")

    def validate(self, cfg, params):
        g = self.group or cfg.head_dim
        if cfg.head_dim % g or g % 2:
            raise ValueError(f"quantized group={self.group} must divide head_dim={cfg.head_dim} and be even")

    def _groups(self, cfg) -> int:
        return cfg.head_dim // (self.group or cfg.head_dim)

    def init_layer(self, cfg, layer, batch, max_len):
        b, s, k, d = batch, max_len, cfg.n_kv_heads, cfg.head_dim
        state = {}
        for name in ("k", "v"):
            state[name] = jnp.zeros((b, s, k, d * self.bits // 8), jnp.uint8)
            state[name + "_scale"] = jnp.zeros((b, s, k, self._groups(cfg)), jnp.float16)
            state[name + "_min"] = jnp.zeros((b, s, k, self._groups(cfg)), jnp.float16)
        return state

    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        k = self.rotate_keys(cfg, k, positions)
        new = {}
        for name, x in (("k", k), ("v", v)):
            codes, scale, lo = quantize(x, self.bits, self.group)
            new[name] = write_at(state[name], codes, starts)
            new[name + "_scale"] = write_at(state[name + "_scale"], scale, starts)
            new[name + "_min"] = write_at(state[name + "_min"], lo, starts)
        return new

    def read_layer(self, params, cfg, cache, layer):
        st = cache.layers[layer]
        return tuple(dequantize(st[n], st[n + "_scale"], st[n + "_min"], self.bits, self.group, cfg.head_dim)
                     .astype(self.dtype) for n in ("k", "v"))

    def layer_bytes_per_token(self, cfg, layer):
        per_head = cfg.head_dim * self.bits // 8 + 2 * 2 * self._groups(cfg)  # codes + fp16 scale and min
        return 2 * cfg.n_kv_heads * per_head

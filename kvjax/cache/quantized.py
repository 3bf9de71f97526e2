"""Quantized cache: K (after RoPE) and V stored as int8 or packed int4 with per-group scales.

Each token's head vector of D values is split into groups of ``group`` values (0: one group per head
vector); a group stores ``bits``-bit codes plus a float16 scale and minimum (asymmetric min/max), so
``x ≈ code * scale + min``. int4 codes are packed two to a byte: the arrays are physically smaller.
This is the plain baseline every learned method should beat at equal bytes. Per-channel key groups over
tokens, 2-bit codes and a full-precision residual window are :mod:`kvjax.cache.kivi` (``kivi``, with
``residual=0`` for per-channel int4/int2 keys without a window); both use :func:`quantize` here.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.registry import register


BITS = (2, 4, 8)


def pack(codes, bits: int):
    """codes uint8 [..., N] with values < 2**bits -> [..., N * bits / 8], 8 / bits codes per byte (low first)."""
    per = 8 // bits
    if per == 1:
        return codes
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = c[..., 0]
    for i in range(1, per):
        out = out | (c[..., i] << (i * bits))
    return out


def unpack(packed, bits: int, n: int):
    """Inverse of :func:`pack`: [..., n * bits / 8] uint8 -> [..., n] uint8 codes."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = 2 ** bits - 1
    c = jnp.stack([(packed >> (i * bits)) & mask for i in range(per)], axis=-1)
    return c.reshape(*packed.shape[:-1], n)


def quantize(x, bits: int, group: int, axis: int = -1):
    """Asymmetric min/max quantization in groups of ``group`` consecutive entries along ``axis`` (0: the
    whole axis is one group), codes packed along the last axis.

    x [..., N, ..., D] -> (codes uint8 [..., N, ..., D * bits / 8], scale fp16, min fp16), where scale and
    min have ``axis`` shrunk to N / group (per-token groups: ``axis=-1``; KIVI's per-channel key groups:
    the token axis). ``x ≈ code * scale + min``; codes are computed from the fp16-rounded scale and min,
    so every code is within half a step of its value."""
    axis = axis % x.ndim
    n = x.shape[axis]
    g = group or n
    xg = x.astype(jnp.float32).reshape(*x.shape[:axis], n // g, g, *x.shape[axis + 1:])
    lo = jnp.min(xg, axis=axis + 1).astype(jnp.float16)
    levels = 2 ** bits - 1
    scale = ((jnp.max(xg, axis=axis + 1) - lo.astype(jnp.float32)) / levels).astype(jnp.float16)
    s = jnp.expand_dims(jnp.maximum(scale.astype(jnp.float32), 1e-8), axis + 1)
    codes = jnp.clip(jnp.round((xg - jnp.expand_dims(lo.astype(jnp.float32), axis + 1)) / s), 0, levels)
    return pack(codes.astype(jnp.uint8).reshape(x.shape), bits), scale, lo


def dequantize(codes, scale, lo, bits: int, group: int, d: int, axis: int = -1):
    """Inverse of :func:`quantize` (``d``: the unpacked size of the last axis): returns float32 [..., D]."""
    x = unpack(codes, bits, d).astype(jnp.float32)
    axis = axis % x.ndim
    n = x.shape[axis]
    g = group or n
    xg = x.reshape(*x.shape[:axis], n // g, g, *x.shape[axis + 1:])
    xg = xg * jnp.expand_dims(scale.astype(jnp.float32), axis + 1) + jnp.expand_dims(lo.astype(jnp.float32), axis + 1)
    return xg.reshape(x.shape)


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

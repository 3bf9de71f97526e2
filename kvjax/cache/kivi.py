"""KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys quantized
per channel, values per token, with the most recent tokens kept in full precision.

Storage per layer (``G = group`` tokens per key group, ``W`` = ring size, ``nq`` quantized groups)::

    k        uint8 [B, nq, G, K, D*bits/8]   packed codes (2 bits: four per byte), group-major
    k_scale  fp16  [B, nq, K, D]             one scale and minimum per channel per group of G tokens
    k_min    fp16  [B, nq, K, D]
    v        uint8 [B, nq, G, K, D*bits/8]
    v_scale  fp16  [B, nq, G, K, D/value_group]   per token, groups of value_group channels
    v_min    fp16  [B, nq, G, K, D/value_group]
    k_res    residual_dtype [B, W, K, D]     full-precision ring: position p lives in slot p mod W
    v_res    residual_dtype [B, W, K, D]

When is a token quantized? With ``n`` tokens stored, the first ``q(n) = G * max(0, (n - R) // G)`` are
quantized (R = ``residual``, a multiple of G) and the other ``n - q(n)`` (between R and R + G - 1 once
n >= R) sit in the ring, so ``W = R + G`` slots suffice (``min(R + G, max_len)``). A key group is thus
quantized at the step its G tokens are complete *and* R newer tokens exist: KIVI's per-channel statistics
need the whole group. Values follow the same schedule (KIVI quantizes values one token at a time as they
leave a sliding window of R; flushing them with their key group keeps one ring and one rule, and keeps at
most G - 1 more tokens in full precision). ``residual=0`` is plain per-channel key quantization: only the
incomplete group is in full precision. Keys are quantized after RoPE, as KIVI does and as the cache holds
them; the ring keeps ``residual_dtype`` values (KIVI: fp16), and codes are computed from those values.

Prefill equals token-by-token decoding. A query at position t sees key s in the form it had when token t
was written: quantized iff ``s < q(t + 1)``, exact otherwise. :meth:`Kivi.write_attend` therefore attends
over [quantized groups; the ring as it was before this call; this call's exact K/V] with that rule as an
explicit mask, so a 512-token prefill scores each token as decoding would, and leaves the same cache
contents. Rows of a right-padded batch flush by their real length ``starts + seq_lens``: padding never
enters a quantization group or the ring.

Memory: ``cache_nbytes`` is exact (the ring does not grow with ``max_len``); ``bytes_per_token`` is the
rate of the quantized part alone, which the cache approaches for long contexts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache.base import CacheMethod
from kvjax.cache.quantized import BITS, dequantize, quantize
from kvjax.cache.registry import register
from kvjax.models.layers import attention


def ring_positions(n, w: int):
    """Positions held by the W ring slots when ``n`` tokens are stored (slot j holds the latest position
    below n that is j mod W; negative where none). n: [...] int -> [..., W] int32."""
    j = jnp.arange(w, dtype=jnp.int32)
    n = jnp.asarray(n, jnp.int32)[..., None]
    return n - 1 - jnp.mod(n - 1 - j, w)


@register("kivi")
@dataclasses.dataclass(frozen=True)
class Kivi(CacheMethod):
    """``bits`` 2, 4 or 8; ``group``: tokens per key scale (KIVI: 32); ``value_group``: channels per value
    scale (0: the whole head vector); ``residual``: recent tokens kept in full precision (a multiple of
    ``group``; 0 = per-channel quantization without a window); ``residual_dtype``: the ring's dtype;
    ``dtype``: the dtype of the K/V it returns."""

    name = "kivi"
    bits: int = 2
    group: int = 32
    value_group: int = 32
    residual: int = 32
    residual_dtype: str = "bfloat16"
    dtype: str = "float32"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"kivi bits={self.bits}; choose one of {BITS}")
        if self.group <= 0:
            raise ValueError(f"kivi group={self.group} must be positive (tokens per key group)")
        if self.residual < 0 or self.residual % self.group:
            raise ValueError(f"kivi residual={self.residual} must be a non-negative multiple of group={self.group}")
        if self.value_group < 0:
            raise ValueError(f"kivi value_group={self.value_group} must be >= 0")

    def validate(self, cfg, params):
        d = cfg.head_dim
        gv = self.value_group or d
        if d % gv:
            raise ValueError(f"kivi value_group={self.value_group} must divide head_dim={d}")
        if d % (8 // self.bits):
            raise ValueError(f"kivi bits={self.bits}: head_dim={d} must be a multiple of {8 // self.bits} "
                             f"(codes per byte)")

    # ------------------------------------------------------------------ sizes
    def ring_size(self, max_len: int) -> int:
        return min(self.residual + self.group, max_len)

    def n_groups(self, max_len: int) -> int:
        """Quantized groups a cache of ``max_len`` can ever hold (groups flush once R newer tokens exist)."""
        return max(0, (max_len - self.residual) // self.group)

    def flushed(self, n):
        """Tokens quantized when ``n`` are stored: G * max(0, (n - R) // G) (works on ints and arrays)."""
        if isinstance(n, int):
            return max(0, n - self.residual) // self.group * self.group
        return jnp.maximum(n - self.residual, 0) // self.group * self.group

    def _group_bytes(self, cfg) -> int:
        """Bytes of one quantized group of G tokens (codes, key scales per channel, value scales per token)."""
        k, d, g = cfg.n_kv_heads, cfg.head_dim, self.group
        codes = 2 * g * k * d * self.bits // 8
        key_stats = 2 * 2 * k * d  # fp16 scale and min per channel
        value_stats = 2 * 2 * g * k * (d // (self.value_group or d))
        return codes + key_stats + value_stats

    def layer_bytes_per_token(self, cfg, layer):
        """The quantized part's bytes per token (the ring is a fixed extra: see :meth:`cache_nbytes`)."""
        b = self._group_bytes(cfg)
        return b // self.group if b % self.group == 0 else b / self.group

    def cache_nbytes(self, cfg, batch, max_len):
        ring = 2 * self.ring_size(max_len) * cfg.kv_width * jnp.dtype(self.residual_dtype).itemsize
        return batch * cfg.n_layers * (self.n_groups(max_len) * self._group_bytes(cfg) + ring)

    # ------------------------------------------------------------------ state
    def init_layer(self, cfg, layer, batch, max_len):
        b, k, d, g = batch, cfg.n_kv_heads, cfg.head_dim, self.group
        nq, w = self.n_groups(max_len), self.ring_size(max_len)
        dp, nv = d * self.bits // 8, d // (self.value_group or d)
        state = {"k_res": jnp.zeros((b, w, k, d), self.residual_dtype),
                 "v_res": jnp.zeros((b, w, k, d), self.residual_dtype)}
        if nq:
            state.update({
                "k": jnp.zeros((b, nq, g, k, dp), jnp.uint8),
                "k_scale": jnp.zeros((b, nq, k, d), jnp.float16), "k_min": jnp.zeros((b, nq, k, d), jnp.float16),
                "v": jnp.zeros((b, nq, g, k, dp), jnp.uint8),
                "v_scale": jnp.zeros((b, nq, g, k, nv), jnp.float16),
                "v_min": jnp.zeros((b, nq, g, k, nv), jnp.float16)})
        return state

    # ------------------------------------------------------------------ write
    def _store_row(self, st, k, v, start, n):
        """One row: ``st`` without its batch axis, k, v: [T, K, D] (residual dtype, k after RoPE), start:
        tokens stored before this call, n: real tokens after it. Quantizes the groups that complete (with
        R newer tokens) in this call and refreshes the ring. Returns the new row state."""
        t, kh, d = k.shape
        g, w = self.group, st["k_res"].shape[0]
        new = dict(st)
        if "k" in st:
            nq = st["k"].shape[0]
            mg = min(nq, -(-t // g))  # at most ceil(T / G) groups complete in one call
            base = self.flushed(start)
            p = base + jnp.arange(mg * g, dtype=jnp.int32)  # candidate positions, from the ring or from k
            fresh = (p >= start)[:, None, None]
            ik, ir = jnp.clip(p - start, 0, t - 1), jnp.mod(p, w)
            xk = jnp.where(fresh, k[ik], st["k_res"][ir]).reshape(mg, g, kh, d)
            xv = jnp.where(fresh, v[ik], st["v_res"][ir]).reshape(mg, g, kh, d)
            gi = base // g + jnp.arange(mg, dtype=jnp.int32)
            gi = jnp.where(gi < self.flushed(n) // g, gi, nq)  # not complete yet: index out of range, dropped
            codes, scale, lo = quantize(xk, self.bits, g, axis=1)  # per channel over the group's tokens
            new["k"] = st["k"].at[gi].set(codes, mode="drop")
            new["k_scale"] = st["k_scale"].at[gi].set(scale[:, 0], mode="drop")
            new["k_min"] = st["k_min"].at[gi].set(lo[:, 0], mode="drop")
            codes, scale, lo = quantize(xv, self.bits, self.value_group, axis=-1)  # per token
            new["v"] = st["v"].at[gi].set(codes, mode="drop")
            new["v_scale"] = st["v_scale"].at[gi].set(scale, mode="drop")
            new["v_min"] = st["v_min"].at[gi].set(lo, mode="drop")
        pr = ring_positions(n, w)  # what each slot holds after the call
        take = (pr >= start)[:, None, None]
        ip = jnp.clip(pr - start, 0, t - 1)
        new["k_res"] = jnp.where(take, k[ip], st["k_res"])
        new["v_res"] = jnp.where(take, v[ip], st["v_res"])
        return new

    def _store(self, cfg, state, k, v, positions, seq_lens):
        k = self.rotate_keys(cfg, k, positions).astype(self.residual_dtype)
        v = v.astype(self.residual_dtype)
        start = positions[:, 0]
        return jax.vmap(self._store_row)(state, k, v, start, start + seq_lens), k, v

    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        seq_lens = jnp.full((k.shape[0],), k.shape[1], jnp.int32)
        return self._store(cfg, state, k, v, positions, seq_lens)[0]

    # ------------------------------------------------------------------ read
    def _dequantized(self, cfg, st):
        """(k, v) of the quantized groups: [B, nq * G, K, D] float32 (slot p holds position p)."""
        b, nq, g, kh, _ = st["k"].shape
        d = cfg.head_dim
        k = dequantize(st["k"], st["k_scale"][:, :, None], st["k_min"][:, :, None], self.bits, g, d, axis=2)
        v = dequantize(st["v"], st["v_scale"], st["v_min"], self.bits, self.value_group, d, axis=-1)
        return k.reshape(b, nq * g, kh, d), v.reshape(b, nq * g, kh, d)

    def write_attend(self, params, cfg, cache, layer, q, k, v, positions, seq_lens=None):
        """Stores k, v and attends with each key in the form it had when the query's token was written
        (see the module docstring). Returns (out [B, T, H, D], cache)."""
        b, t = k.shape[:2]
        if seq_lens is None:
            seq_lens = jnp.full((b,), t, jnp.int32)
        old = cache.layers[layer]
        new, k, v = self._store(cfg, old, k, v, positions, seq_lens)
        cache = cache.set_layer(layer, new)

        qf = self.flushed(positions + 1)  # [B, T] tokens quantized when each query's token was written
        # full precision: the ring as it was before this call, then this call's exact K/V
        sf = jnp.concatenate([ring_positions(positions[:, 0], old["k_res"].shape[1]), positions], axis=1)
        mask = ((sf[:, None, :] >= qf[:, :, None]) & (sf[:, None, :] <= positions[:, :, None])
                & (sf[:, None, :] >= 0))  # [B, T, W + T]
        ks = [jnp.concatenate([old["k_res"], k], axis=1)]
        vs = [jnp.concatenate([old["v_res"], v], axis=1)]
        if "k" in new:
            kq, vq = self._dequantized(cfg, new)
            sq = jnp.arange(kq.shape[1], dtype=jnp.int32)
            mask = jnp.concatenate([sq[None, None, :] < qf[:, :, None], mask], axis=2)
            ks.insert(0, kq)
            vs.insert(0, vq)
        kk = jnp.concatenate([x.astype(q.dtype) for x in ks], axis=1)
        vv = jnp.concatenate([x.astype(q.dtype) for x in vs], axis=1)
        return attention(q, kk, vv, positions, mask=mask), cache

    def attend(self, params, cfg, cache, layer, q, positions):
        raise NotImplementedError("kivi attends inside write_attend (it needs the exact K/V of the new tokens)")

    def read_layer(self, params, cfg, cache, layer):
        """(k, v): [B, S, K, D] as stored between steps (``cache.lengths`` tokens): dequantized for the
        first ``q(lengths)`` positions, from the ring for the rest, zeros past the length."""
        st = cache.layers[layer]
        n = cache.lengths
        p = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :]  # [1, S]
        w = st["k_res"].shape[1]
        out = []
        for name in ("k", "v"):
            ring = st[name + "_res"][:, p[0] % w].astype(jnp.float32)  # [B, S, K, D]
            x = jnp.where((p < n[:, None])[..., None, None], ring, 0.0)
            if "k" in st:
                xq = self._dequantized(cfg, st)[0 if name == "k" else 1]
                sq = xq.shape[1]
                xq = jnp.pad(xq, ((0, 0), (0, cache.max_len - sq), (0, 0), (0, 0)))
                x = jnp.where((p < self.flushed(n)[:, None])[..., None, None], xq, x)
            out.append(x.astype(self.dtype))
        return tuple(out)

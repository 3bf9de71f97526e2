"""MiniCache (Liu et al. 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large Language
Models"): from layer ``start`` on, each pair of adjacent layers (l, l+1) stores one merged direction per
token and kv head plus each layer's magnitude, and keeps a fixed share of the least mergeable tokens
unmerged.

Merge. For a token and kv head, with x_l, x_{l+1} the two layers' vectors (keys after RoPE; values), the
pair stores ``e = SLERP(x_l / |x_l|, x_{l+1} / |x_{l+1}|; t)``, ``|x_l|`` and ``|x_{l+1}|``; layer i reads
``|x_i| * e``. Keys and values are merged independently. Keys are merged after RoPE: both layers' keys at
a position are rotated by the same orthogonal matrix, which keeps norms and angles and commutes with
SLERP, so merging before or after RoPE gives the same directions (up to rounding).

Retention. The angular distance ``arccos(cos(x_l, x_{l+1})) / pi`` ranks tokens; per pair, row and kv
head a buffer of ``N = ceil(retain * max_len)`` slots keeps both layers' exact vectors of the N most
distant tokens seen so far, with their positions and distances. New tokens compete with the buffer
(top-N of buffer + new): after any sequence of calls the buffer holds the N most distant tokens, whether
they came in one prefill or one by one. A token pushed out of the buffer falls back to its merged form.

Order (causal, and what this implementation does). Layer l+1's K/V exist only after layer l has
attended, so a token cannot be merged before layer l reads it in the step that produces it:

* layer l writes the exact direction and magnitude of the current tokens into the pair's direction slots
  and attends: current tokens exact, earlier tokens in stored form (merged, or retained and exact);
* layer l+1 reads layer l's exact current vectors back from those slots, merges them with its own,
  overwrites the direction slots with the merged direction, updates the retention buffer, and attends
  the same way (current tokens exact, earlier ones stored).

So every layer sees its own exact K/V for the tokens of the current call and the compressed form for
tokens of earlier calls. In token-by-token decoding that is exactly MiniCache's decode phase (the paper
compresses the cache after prefill; prefill itself attends exactly). A prefill of T tokens therefore sees
all of its own tokens exact: its logits are *not* those of decoding the same tokens one by one, and
nor are the K/V of later layers (they depend on what earlier layers read). Given the same K/V, though, a
prefill and token-by-token writes store the same merged directions, magnitudes and retained set (tested).
Perplexity through this cache must be measured token by token (``eval.perplexity --protocol decode``);
one prefill per window would measure an uncompressed model.

Layers before ``start`` (default: the middle layer, as the paper merges the middle-to-deep half) and an
unpaired last layer are stored dense in ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.registry import register
from kvjax.models.layers import attention

_EPS = 1e-6


def slerp(a, b, t: float):
    """Spherical interpolation of unit vectors a, b [..., D] at fraction t (0: a, 1: b); linear (then
    renormalised) where they are nearly parallel. Returns (unit vectors [..., D], angle [...] radians)."""
    cos = jnp.clip(jnp.sum(a * b, axis=-1), -1.0, 1.0)
    omega = jnp.arccos(cos)
    so = jnp.sin(omega)
    near = so < 1e-4
    so = jnp.where(near, 1.0, so)
    wa = jnp.where(near, 1.0 - t, jnp.sin((1.0 - t) * omega) / so)[..., None]
    wb = jnp.where(near, t, jnp.sin(t * omega) / so)[..., None]
    e = wa * a + wb * b
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), _EPS), omega


def polar(x):
    """x [..., D] -> (unit direction [..., D] float32, magnitude [...] float32)."""
    x = x.astype(jnp.float32)
    mag = jnp.linalg.norm(x, axis=-1)
    return x / jnp.maximum(mag, _EPS)[..., None], mag


def read_slots(buf, starts, t: int):
    """buf [B, S, ...] -> the T slots starting at ``starts`` [B] of each row: [B, T, ...]."""
    def one(b, s):
        return jax.lax.dynamic_slice_in_dim(b, s, t, axis=0)

    return jax.vmap(one)(buf, starts)


@register("minicache")
@dataclasses.dataclass(frozen=True)
class MiniCache(CacheMethod):
    """``start``: first merged layer (-1: ``n_layers // 2``); pairs (start, start+1), (start+2, start+3),
    ...; ``t``: SLERP fraction towards the upper layer (the paper's 0.6); ``retain``: share of ``max_len``
    kept unmerged per pair (buffer of ``ceil(retain * max_len)`` tokens per row and kv head); ``dtype``:
    storage and returned dtype."""

    name = "minicache"
    write_then_read = False  # a call attends its own tokens exactly; later calls read the merged form
    start: int = -1
    t: float = 0.6
    retain: float = 0.05
    dtype: str = "float32"

    def __post_init__(self):
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"minicache t={self.t} must be in [0, 1]")
        if not 0.0 <= self.retain <= 1.0:
            raise ValueError(f"minicache retain={self.retain} must be in [0, 1]")
        if self.start < -1:
            raise ValueError(f"minicache start={self.start} must be a layer index or -1 (the middle layer)")

    def first_layer(self, cfg) -> int:
        return cfg.n_layers // 2 if self.start == -1 else self.start

    def validate(self, cfg, params):
        if self.first_layer(cfg) + 1 >= cfg.n_layers:
            raise ValueError(f"minicache start={self.start}: no pair of layers from layer "
                             f"{self.first_layer(cfg)} in a model of {cfg.n_layers} layers")

    def role(self, cfg, layer: int) -> str:
        """'lower' or 'upper' for the two layers of a merged pair, 'dense' otherwise."""
        s = self.first_layer(cfg)
        if layer < s:
            return "dense"
        if (layer - s) % 2 == 0:
            return "lower" if layer + 1 < cfg.n_layers else "dense"
        return "upper"

    def n_retained(self, max_len: int) -> int:
        return math.ceil(self.retain * max_len - 1e-9)

    # ------------------------------------------------------------------ state and accounting
    def init_layer(self, cfg, layer, batch, max_len):
        b, s, k, d = batch, max_len, cfg.n_kv_heads, cfg.head_dim
        role = self.role(cfg, layer)
        if role == "dense":
            return {"k": jnp.zeros((b, s, k, d), self.dtype), "v": jnp.zeros((b, s, k, d), self.dtype)}
        state = {}
        for x in ("k", "v"):
            state[x + "_mag"] = jnp.zeros((b, s, k), self.dtype)  # this layer's magnitude
            if role == "lower":
                state[x + "_dir"] = jnp.zeros((b, s, k, d), self.dtype)  # the pair's merged direction
            elif self.n_retained(max_len):
                n = self.n_retained(max_len)
                state[x + "_ret_lo"] = jnp.zeros((b, n, k, d), self.dtype)  # exact vectors of layer l
                state[x + "_ret_up"] = jnp.zeros((b, n, k, d), self.dtype)  # ... and of layer l + 1
                state[x + "_ret_pos"] = jnp.full((b, n, k), max_len, jnp.int32)  # max_len: empty slot
                state[x + "_ret_dist"] = jnp.full((b, n, k), -jnp.inf, jnp.float32)
        return state

    def _slot_bytes(self, cfg, layer) -> int:
        """Bytes per token slot of the arrays sized by ``max_len`` (directions, magnitudes, dense layers)."""
        item = jnp.dtype(self.dtype).itemsize
        role = self.role(cfg, layer)
        if role == "dense":
            return 2 * cfg.kv_width * item
        per = 2 * cfg.n_kv_heads * item  # magnitudes
        if role == "lower":
            per += 2 * cfg.kv_width * item  # merged directions
        return per

    def layer_bytes_per_token(self, cfg, layer):
        """Bytes per token slot, the retention buffer counted at ``retain`` slots per token (it holds
        ``ceil(retain * max_len)``; :meth:`cache_nbytes` is exact). A float unless that is whole."""
        per = self._slot_bytes(cfg, layer)
        if self.role(cfg, layer) == "upper":
            per += self.retain * self._retain_bytes(cfg)
        return int(per) if float(per).is_integer() else per

    def _retain_bytes(self, cfg) -> int:
        """Bytes of one retention slot (both streams, all kv heads) of an upper layer."""
        item = jnp.dtype(self.dtype).itemsize
        return 2 * (2 * cfg.kv_width * item + cfg.n_kv_heads * (4 + 4))  # two exact vectors, position, distance

    def cache_nbytes(self, cfg, batch, max_len):
        uppers = sum(self.role(cfg, layer) == "upper" for layer in range(cfg.n_layers))
        slots = sum(self._slot_bytes(cfg, layer) for layer in range(cfg.n_layers))
        return batch * (slots * max_len + uppers * self.n_retained(max_len) * self._retain_bytes(cfg))

    # ------------------------------------------------------------------ write + attend
    def _restore(self, direction, mag, ret=None, pos=None):
        """Stored vectors of one layer: mag * direction, with retained tokens' exact vectors put back.
        direction [B, S, K, D], mag [B, S, K], ret [B, N, K, D], pos [B, N, K]. Returns [B, S, K, D] f32."""
        x = direction.astype(jnp.float32) * mag.astype(jnp.float32)[..., None]
        if ret is not None:
            b, n, k = pos.shape
            bi = jnp.arange(b)[:, None, None]
            ki = jnp.arange(k)[None, None, :]
            x = x.at[bi, pos, ki].set(ret.astype(jnp.float32), mode="drop")  # pos = S (empty): dropped
        return x

    def _attend(self, q, positions, kk, vv, k_new, v_new):
        """Attention over stored K/V [B, S, K, D] with this call's exact K/V written over their slots."""
        starts = positions[:, 0]
        kk = write_at(kk, k_new.astype(kk.dtype), starts).astype(q.dtype)
        vv = write_at(vv, v_new.astype(vv.dtype), starts).astype(q.dtype)
        return attention(q, kk, vv, positions)

    def write_attend(self, params, cfg, cache, layer, q, k, v, positions, seq_lens=None):
        """Stores k, v (merging at the upper layer of a pair) and attends; see the module docstring for the
        order. Returns (out [B, T, H, D], cache)."""
        b, t = k.shape[:2]
        if seq_lens is None:
            seq_lens = jnp.full((b,), t, jnp.int32)
        k = self.rotate_keys(cfg, k, positions)
        starts = positions[:, 0]
        role = self.role(cfg, layer)
        if role == "dense":
            st = {"k": write_at(cache.layers[layer]["k"], k, starts),
                  "v": write_at(cache.layers[layer]["v"], v, starts)}
            cache = cache.set_layer(layer, st)
            return attention(q, st["k"].astype(q.dtype), st["v"].astype(q.dtype), positions), cache
        if role == "lower":
            st = dict(cache.layers[layer])
            up = cache.layers[layer + 1]
            out = {}
            for x, new in (("k", k), ("v", v)):
                direction, mag = polar(new)  # exact for now; the upper layer merges it
                st[x + "_dir"] = write_at(st[x + "_dir"], direction, starts)
                st[x + "_mag"] = write_at(st[x + "_mag"], mag, starts)
                ret = (up[x + "_ret_lo"], up[x + "_ret_pos"]) if x + "_ret_lo" in up else (None, None)
                out[x] = self._restore(st[x + "_dir"], st[x + "_mag"], *ret)
            cache = cache.set_layer(layer, st)
            return self._attend(q, positions, out["k"], out["v"], k, v), cache

        # upper layer: merge with the lower layer's exact vectors of the current tokens
        lo = dict(cache.layers[layer - 1])
        st = dict(cache.layers[layer])
        s = lo["k_dir"].shape[1]
        real = jnp.arange(t)[None, :] < seq_lens[:, None]  # [B, T]
        out = {}
        for x, new in (("k", k), ("v", v)):
            a_dir = read_slots(lo[x + "_dir"], starts, t).astype(jnp.float32)  # [B, T, K, D]
            a_mag = read_slots(lo[x + "_mag"], starts, t).astype(jnp.float32)  # [B, T, K]
            b_dir, b_mag = polar(new)
            merged, omega = slerp(a_dir, b_dir, self.t)
            lo[x + "_dir"] = write_at(lo[x + "_dir"], merged, starts)
            st[x + "_mag"] = write_at(st[x + "_mag"], b_mag, starts)
            if x + "_ret_lo" in st:
                n = st[x + "_ret_pos"].shape[1]
                dist = jnp.where(real[..., None], omega / jnp.pi, -jnp.inf)  # [B, T, K]; padding never kept
                pos = jnp.where(real[..., None], positions[..., None], s)
                pos = jnp.broadcast_to(pos, dist.shape)
                cand_dist = jnp.concatenate([st[x + "_ret_dist"], dist], axis=1)  # [B, N + T, K]
                cand_pos = jnp.concatenate([st[x + "_ret_pos"], pos], axis=1)
                cand_lo = jnp.concatenate([st[x + "_ret_lo"], (a_dir * a_mag[..., None]).astype(self.dtype)], 1)
                cand_up = jnp.concatenate([st[x + "_ret_up"], new.astype(self.dtype)], axis=1)
                _, idx = jax.lax.top_k(jnp.swapaxes(cand_dist, 1, 2), n)  # [B, K, N]
                idx = jnp.swapaxes(idx, 1, 2)  # [B, N, K]
                st[x + "_ret_dist"] = jnp.take_along_axis(cand_dist, idx, axis=1)
                st[x + "_ret_pos"] = jnp.take_along_axis(cand_pos, idx, axis=1)
                st[x + "_ret_lo"] = jnp.take_along_axis(cand_lo, idx[..., None], axis=1)
                st[x + "_ret_up"] = jnp.take_along_axis(cand_up, idx[..., None], axis=1)
                out[x] = self._restore(lo[x + "_dir"], st[x + "_mag"], st[x + "_ret_up"], st[x + "_ret_pos"])
            else:
                out[x] = self._restore(lo[x + "_dir"], st[x + "_mag"])
        cache = cache.set_layer(layer - 1, lo).set_layer(layer, st)
        return self._attend(q, positions, out["k"], out["v"], k, v), cache

    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        raise NotImplementedError("minicache writes inside write_attend (a pair's layers share state)")

    def attend(self, params, cfg, cache, layer, q, positions):
        raise NotImplementedError("minicache attends inside write_attend")

    def read_layer(self, params, cfg, cache, layer):
        """(k, v): [B, S, K, D] as stored between steps (merged and restored, retained tokens exact)."""
        role = self.role(cfg, layer)
        if role == "dense":
            st = cache.layers[layer]
            return st["k"], st["v"]
        lower = layer if role == "lower" else layer - 1
        lo, up = cache.layers[lower], cache.layers[lower + 1]
        mine = cache.layers[layer]
        out = []
        for x in ("k", "v"):
            ret = ((up[x + ("_ret_lo" if role == "lower" else "_ret_up")], up[x + "_ret_pos"])
                   if x + "_ret_lo" in up else (None, None))
            out.append(self._restore(lo[x + "_dir"], mine[x + "_mag"], *ret).astype(self.dtype))
        return tuple(out)

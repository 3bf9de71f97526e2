"""KV-CAR cross-layer KV reuse: a kv head of layer l whose K/V are close to the same head of layer l-1
reads layer l-1's K/V for that head and stores nothing of its own.

``plan`` lists the reusing ``(layer, head)`` pairs. A layer's state holds only the heads it stores (with
the default dense storage ``{"k": [B, S, K_l, D], "v": [B, S, K_l, D]}``, K_l = K minus the layer's
reused heads; an empty dict when every head is reused), so ``cache.nbytes`` shrinks by exactly the
reused share of heads.
Chains resolve: when (l, h) and (l-1, h) are both reused, layer l reads head h from the nearest layer
below that stores it (:meth:`Reuse.source`).

Dense storage keeps keys after RoPE, as :class:`~kvjax.cache.dense.Dense` does: a reused head is compared
and read at the same position, so the rotation is the same on both sides. Reading is correct for prefill
and decode alike because the model writes and attends layer by layer in order 0..L-1: the source layer's
state already holds the new tokens when a later layer reads it.

Plans come from ``python -m train.reuse`` (:mod:`kvjax.reuse`). From the ``--method`` parser a plan is a
flat list ``layer+head+layer+head...``, e.g. ``reuse:plan=1+0+2+1`` reuses (1, 0) and (2, 1).

Composition (``Reuse(plan, inner=method)``, as optax.chain composes transformations): the heads a layer
stores are stored by ``inner`` (default ``Dense(dtype)``); a layer with some heads reused asks ``inner``
for a layer of fewer kv heads (:func:`head_subset`), so per-head methods (dense, quantized) drop the
reused heads physically. With ``inner=Autoencoder(...)`` a compressed layer's latent mixes its heads, so
only whole compressed layers can be reused, in one of two modes:

* ``mode="decoded"``: a reused layer reads its source layer's *decoded* K/V (the source's decoder output),
  exactly what the source layer attends to;
* ``mode="latent"``: a reused layer reads its source layer's *latents* and decodes them with its own
  decoder (``mparams[str(layer)]["k_dec"|"v_dec"]``): a learned map from the source's latent to this
  layer's K/V (fit by :func:`kvjax.reuse.fit_latent_decoders` or trained by ``python -m train.autoencoder
  --reuse-plan``). Its encoders are never used.

Either way the reused layer stores nothing. Layers the autoencoder leaves dense (its ``layers`` setting)
reuse per head as with the dense cache (``mode="decoded"`` only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kvjax.cache.base import CacheMethod
from kvjax.cache.registry import register
from kvjax.models.layers import attention

MODES = ("decoded", "latent")


def normalize_plan(plan) -> tuple[tuple[int, int], ...]:
    """Returns ``plan`` as a sorted tuple of (layer, head) int pairs; refuses malformed entries, layer 0,
    negative indices and duplicates with a message that names the pair. Accepts pairs (tuples or lists,
    e.g. from JSON) or a flat even-length sequence of ints (from the ``--method`` parser)."""
    if isinstance(plan, int):
        plan = (plan,)
    plan = tuple(plan)
    if plan and all(isinstance(x, int) for x in plan):  # flat layer+head+layer+head...
        if len(plan) % 2:
            raise ValueError(f"reuse plan {plan}: a flat plan must list layer, head pairs (even length)")
        plan = tuple(zip(plan[0::2], plan[1::2]))
    pairs, seen = [], set()
    for item in plan:
        try:
            layer, head = item
            if isinstance(layer, bool) or isinstance(head, bool) or int(layer) != layer or int(head) != head:
                raise TypeError
            pair = (int(layer), int(head))
        except (TypeError, ValueError):
            raise ValueError(f"reuse plan entry {item!r} is not a (layer, head) pair of ints") from None
        if pair[0] == 0:
            raise ValueError(f"reuse plan entry (layer {pair[0]}, head {pair[1]}): layer 0 has no layer "
                             f"before it to reuse")
        if pair[0] < 0 or pair[1] < 0:
            raise ValueError(f"reuse plan entry (layer {pair[0]}, head {pair[1]}): negative index")
        if pair in seen:
            raise ValueError(f"reuse plan entry (layer {pair[0]}, head {pair[1]}) is listed twice")
        seen.add(pair)
        pairs.append(pair)
    return tuple(sorted(pairs))


def head_subset(cfg, n: int):
    """``cfg`` with ``n`` kv heads (and ``n`` query heads): the shape of a layer that stores ``n`` of its
    heads, for the inner method's per-layer hooks. Per-head methods lay their state out from it."""
    return cfg if n == cfg.n_kv_heads else dataclasses.replace(cfg, n_kv_heads=n, n_heads=n)


@register("reuse")
@dataclasses.dataclass(frozen=True)
class Reuse(CacheMethod):
    """Settings. ``plan``: (layer, head) pairs whose K/V are read from layer-1's head (resolved down
    chains); ``dtype``: storage dtype of the stored heads when ``inner`` is None; ``inner``: the method that
    stores the heads that are stored (None: ``Dense(dtype)``); ``mode``: "decoded" or "latent" (an
    autoencoder ``inner`` only; see the module docstring). ``mparams`` are the inner method's."""

    name = "reuse"
    plan: tuple = ()
    dtype: str = "float32"
    inner: Any = None
    mode: str = "decoded"

    def __post_init__(self):
        object.__setattr__(self, "plan", normalize_plan(self.plan))
        if self.mode not in MODES:
            raise ValueError(f"reuse mode={self.mode!r}; choose from {MODES}")
        if self.inner is not None and not isinstance(self.inner, CacheMethod):
            raise ValueError(f"reuse inner={self.inner!r} is not a cache method")
        if isinstance(self.inner, Reuse):
            raise ValueError("reuse inner is itself a reuse method: put every pair in one plan")
        if self.mode == "latent" and not self._inner_is_autoencoder():
            raise ValueError("reuse mode='latent' needs inner=Autoencoder(...): only an autoencoder has latents")

    def _inner_is_autoencoder(self) -> bool:
        from kvjax.cache.autoencoder import Autoencoder
        return isinstance(self.inner, Autoencoder)

    @property
    def storage(self) -> CacheMethod:
        """The method that stores the stored heads."""
        if self.inner is not None:
            return self.inner
        from kvjax.cache.dense import Dense
        # [B, S, K, D]: reused heads are gathered from read_layer, which would transpose a head-major cache
        return Dense(dtype=self.dtype, layout="bskd")

    def latent_layer(self, cfg, layer: int) -> bool:
        """Whether ``inner`` stores ``layer`` as an autoencoder latent (heads mixed)."""
        return self._inner_is_autoencoder() and layer in self.inner.compressed_layers(cfg)

    # ------------------------------------------------------------------ the plan resolved against a model
    def validate(self, cfg, params):
        for layer, head in self.plan:
            if layer >= cfg.n_layers:
                raise ValueError(f"reuse plan entry (layer {layer}, head {head}): layer out of range for a "
                                 f"model with {cfg.n_layers} layers")
            if head >= cfg.n_kv_heads:
                raise ValueError(f"reuse plan entry (layer {layer}, head {head}): head out of range for a "
                                 f"model with {cfg.n_kv_heads} kv heads")
        for layer in sorted({l for l, _ in self.plan}):
            whole = len(self.reused_heads(layer)) == cfg.n_kv_heads
            if self.latent_layer(cfg, layer) and not whole:
                raise ValueError(f"reuse plan reuses heads {list(self.reused_heads(layer))} of layer {layer} but not "
                                 f"all {cfg.n_kv_heads}: the autoencoder's latent of layer {layer} mixes its heads, "
                                 f"so only whole compressed layers can be reused")
            if self.mode == "latent":
                src = self.source(cfg, layer, 0)
                if not (whole and self.latent_layer(cfg, layer) and self.latent_layer(cfg, src)):
                    raise ValueError(f"reuse mode='latent': layer {layer} must be reused whole and both it and its "
                                     f"source layer {src} compressed by the autoencoder (it decodes layer {src}'s "
                                     f"latent with its own decoder)")
        self.storage.validate(cfg, params)

    def reused_heads(self, layer: int) -> tuple[int, ...]:
        """Heads of ``layer`` that read a lower layer's K/V."""
        return tuple(h for l, h in self.plan if l == layer)

    def stored_heads(self, cfg, layer: int) -> tuple[int, ...]:
        """Heads of ``layer`` that it stores, in the order of its state's head axis."""
        reused = set(self.reused_heads(layer))
        return tuple(h for h in range(cfg.n_kv_heads) if h not in reused)

    def source(self, cfg, layer: int, head: int) -> int:
        """The layer whose state holds ``head`` for ``layer``: itself, or the nearest layer below it along
        a chain of reuse (l reuses l-1 which reuses l-2: both read l-2)."""
        plan = set(self.plan)
        while (layer, head) in plan:
            layer -= 1
        return layer

    def _layer_cfg(self, cfg, layer: int):
        return head_subset(cfg, len(self.stored_heads(cfg, layer)))

    # ------------------------------------------------------------------ state
    def init_layer(self, cfg, layer, batch, max_len):
        if not self.stored_heads(cfg, layer):
            return {}  # every head reused: the layer stores nothing
        return self.storage.init_layer(self._layer_cfg(cfg, layer), layer, batch, max_len)

    def layer_bytes_per_token(self, cfg, layer):
        if not self.stored_heads(cfg, layer):
            return 0
        return self.storage.layer_bytes_per_token(self._layer_cfg(cfg, layer), layer)

    # ------------------------------------------------------------------ write / read
    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        stored = self.stored_heads(cfg, layer)
        if not stored:
            return state
        if len(stored) < cfg.n_kv_heads:  # drop the reused heads: their K/V are never read
            idx = jnp.asarray(stored)
            k, v = k[:, :, idx], v[:, :, idx]  # [B, T, K_l, D]
        return self.storage.write_layer(params, self._layer_cfg(cfg, layer), state, layer, k, v, positions, starts)

    def _read_stored(self, params, cfg, cache, layer):
        """(k, v): [B, S, K_l, D] of the heads ``layer`` stores, as ``inner`` restores them."""
        return self.storage.read_layer(params, self._layer_cfg(cfg, layer), cache, layer)

    def read_layer(self, params, cfg, cache, layer):
        """Returns (k, v): [B, S, K, D], each head from the state of its source layer."""
        if not self.reused_heads(layer):
            return self._read_stored(params, cfg, cache, layer)
        if self.mode == "latent":  # validated: whole layer, source compressed
            src = self.source(cfg, layer, 0)
            return self.inner.decode(cfg, params[str(layer)], *self.inner.latents(cache.layers[src]))
        ks, vs, read = [], [], {}
        for head in range(cfg.n_kv_heads):
            src = self.source(cfg, layer, head)
            if src not in read:
                read[src] = self._read_stored(params, cfg, cache, src)
            i = self.stored_heads(cfg, src).index(head)
            ks.append(read[src][0][:, :, i:i + 1])
            vs.append(read[src][1][:, :, i:i + 1])
        return jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2)

    def attend(self, params, cfg, cache, layer, q, positions):
        """A layer that reuses nothing attends as ``inner`` does (its fused kernel included); a whole layer
        reused from a compressed layer goes through the kernel too on decode steps; the rest reads, then
        attends."""
        if not self.reused_heads(layer):
            return self.storage.attend(params, self._layer_cfg(cfg, layer), cache, layer, q, positions)
        src = self.source(cfg, layer, 0)
        whole = not self.stored_heads(cfg, layer) and all(
            self.source(cfg, layer, h) == src for h in range(cfg.n_kv_heads))
        if (whole and q.shape[1] == 1 and self.latent_layer(cfg, src) and self.inner.use_kernel()):
            coders = params[str(layer if self.mode == "latent" else src)]
            return self.inner.attend_latents(cfg, cache.layers[src], coders, q, positions)
        k, v = self.read_layer(params, cfg, cache, layer)
        return attention(q, k.astype(q.dtype), v.astype(q.dtype), positions)

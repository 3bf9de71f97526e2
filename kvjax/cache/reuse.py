"""KV-CAR cross-layer KV reuse: a kv head of layer l whose K/V are close to the same head of layer l-1
reads layer l-1's K/V for that head and stores nothing of its own.

``plan`` lists the reusing ``(layer, head)`` pairs. A layer's state holds only the heads it stores:
``{"k": [B, S, K_l, D], "v": [B, S, K_l, D]}`` with K_l = K minus the layer's reused heads (an empty
dict when every head is reused), so ``cache.nbytes`` shrinks by exactly the reused share of heads.
Chains resolve: when (l, h) and (l-1, h) are both reused, layer l reads head h from the nearest layer
below that stores it (:meth:`Reuse.source`).

Keys are stored after RoPE, as :class:`~kvjax.cache.dense.Dense` stores them: a reused head is compared
and read at the same position, so the rotation is the same on both sides. Reading is correct for prefill
and decode alike because the model writes and attends layer by layer in order 0..L-1: the source layer's
state already holds the new tokens when a later layer reads it.

Plans come from ``python -m train.reuse`` (:mod:`kvjax.reuse`). From the ``--method`` parser a plan is a
flat list ``layer+head+layer+head...``, e.g. ``reuse:plan=1+0+2+1`` reuses (1, 0) and (2, 1).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.registry import register


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


@register("reuse")
@dataclasses.dataclass(frozen=True)
class Reuse(CacheMethod):
    """Settings. ``plan``: (layer, head) pairs whose K/V are read from layer-1's head (resolved down
    chains); ``dtype``: storage dtype of the heads that are stored."""

    name = "reuse"
    plan: tuple = ()
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "plan", normalize_plan(self.plan))

    # ------------------------------------------------------------------ the plan resolved against a model
    def validate(self, cfg, params):
        for layer, head in self.plan:
            if layer >= cfg.n_layers:
                raise ValueError(f"reuse plan entry (layer {layer}, head {head}): layer out of range for a "
                                 f"model with {cfg.n_layers} layers")
            if head >= cfg.n_kv_heads:
                raise ValueError(f"reuse plan entry (layer {layer}, head {head}): head out of range for a "
                                 f"model with {cfg.n_kv_heads} kv heads")

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

    # ------------------------------------------------------------------ state
    def init_layer(self, cfg, layer, batch, max_len):
        n = len(self.stored_heads(cfg, layer))
        if n == 0:
            return {}  # every head reused: the layer stores nothing
        shape = (batch, max_len, n, cfg.head_dim)  # [B, S, K_l, D]
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def layer_bytes_per_token(self, cfg, layer):
        return 2 * len(self.stored_heads(cfg, layer)) * cfg.head_dim * jnp.dtype(self.dtype).itemsize

    # ------------------------------------------------------------------ write / read
    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        stored = self.stored_heads(cfg, layer)
        if not stored:
            return state
        k = self.rotate_keys(cfg, k, positions)
        if len(stored) < cfg.n_kv_heads:  # drop the reused heads: their K/V are never read
            idx = jnp.asarray(stored)
            k, v = k[:, :, idx], v[:, :, idx]  # [B, T, K_l, D]
        return {"k": write_at(state["k"], k, starts), "v": write_at(state["v"], v, starts)}

    def read_layer(self, params, cfg, cache, layer):
        """Returns (k, v): [B, S, K, D], each head from the state of its source layer."""
        if not self.reused_heads(layer):
            state = cache.layers[layer]
            return state["k"], state["v"]
        ks, vs = [], []
        for head in range(cfg.n_kv_heads):
            src = self.source(cfg, layer, head)
            i = self.stored_heads(cfg, src).index(head)
            state = cache.layers[src]
            ks.append(state["k"][:, :, i:i + 1])
            vs.append(state["v"][:, :, i:i + 1])
        return jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2)

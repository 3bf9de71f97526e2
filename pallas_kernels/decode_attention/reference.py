"""The specification: masked GQA decode attention over a head-major cache, in float32 ``jnp``.

q [B, H, D] (after RoPE); k, v [B, K, S, D]; lengths [B] (>= 1): slot s of sequence b is attended iff
s < lengths[b]; query head h reads kv head h // (H // K). Returns [B, H, D] float32.
"""

from __future__ import annotations

import jax.numpy as jnp


def decode_attention_reference(q, k, v, lengths):
    b, h, d = q.shape
    kvh = k.shape[1]
    qf = q.astype(jnp.float32).reshape(b, kvh, h // kvh, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", qf, k.astype(jnp.float32), precision="highest")
    scores = scores / jnp.sqrt(jnp.float32(d))
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    p = jnp.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return jnp.einsum("bkgs,bksd->bkgd", p, v.astype(jnp.float32), precision="highest").reshape(b, h, d)

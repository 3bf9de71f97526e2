"""Shared layers: norms, rotary embeddings, MLPs and the attention call.

Dimension letters used throughout kvjax: B batch, T new tokens, S cache length, E model width,
H query heads, K kv heads, G = H / K query heads per kv head, D head dim, F MLP width, V vocab, L latent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, scale, eps):
    """RMSNorm in float32, returned in ``x``'s dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, scale, bias, eps):
    """LayerNorm in float32, returned in ``x``'s dtype."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta):
    """Rotary embedding in the Hugging Face "rotate half" convention.

    x: [B, T, N, D]; positions: [B, T] int. Returns x rotated, same shape and dtype.
    (GGUF q/k weights are un-permuted at load time, so one convention serves both formats.)
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def gelu_new(x):
    """GPT-2's tanh-approximated GELU."""
    return jax.nn.gelu(x, approximate=True)


def attention_probs(q, k, q_pos, k_pos=None, kv_layout: str = "bskd", mask=None):
    """Causal grouped-query attention weights.

    q: [B, T, H, D] (already rotated); k: [B, S, K, D] (``kv_layout="bskd"``) or head-major [B, K, S, D]
    (``"bksd"``); q_pos: [B, T] absolute positions of the queries. k_pos: positions of the keys, [B, S]
    (every kv head holds the same tokens) or [B, S, K] (each kv head its own, as eviction keeps them),
    default ``arange(S)`` (slot s holds position s). A key is seen iff ``k_pos <= q_pos``. mask: [B, T, S]
    bool, when given, replaces that rule (methods whose keys are visible by another rule, e.g. KIVI's
    quantized-or-exact view). Returns float32 [B, K, G, T, S], each query's weights summing to 1.
    """
    if kv_layout not in ("bskd", "bksd"):
        raise ValueError(f"kv_layout must be 'bskd' or 'bksd', got {kv_layout!r}")
    b, t, h, d = q.shape
    s_axis, k_axis = (1, 2) if kv_layout == "bskd" else (2, 1)
    s, kh = k.shape[s_axis], k.shape[k_axis]
    g = h // kh
    if k_pos is None:
        k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    qg = q.reshape(b, t, kh, g, d)
    scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
    if mask is not None:
        mask = mask[:, None, None]  # [B, 1, 1, T, S]
    elif k_pos.ndim == 2:
        mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None, None]  # [B, 1, 1, T, S]
    else:
        mask = (jnp.swapaxes(k_pos, 1, 2)[:, :, None, :] <= q_pos[:, None, :, None])[:, :, None]  # [B, K, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention(q, k, v, q_pos, k_pos=None, kv_layout: str = "bskd", mask=None):
    """Causal grouped-query attention over a cache.

    q: [B, T, H, D] (already rotated); k, v: [B, S, K, D] (``kv_layout="bskd"``) or head-major
    [B, K, S, D] (``"bksd"``: the layout whose (B, K) batch dims lead, so XLA's batched matmuls read the
    cache in place instead of transposing it first); q_pos: [B, T] absolute positions of the queries.
    k_pos: [B, S] (or per kv head [B, S, K]) positions of the keys, default ``arange(S)`` (slot s holds
    position s). A key is seen iff ``k_pos <= q_pos``; slots past a sequence's length hold stale data and
    are never seen, because every query of that sequence sits before them. mask: see
    :func:`attention_probs`. Returns [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    probs = attention_probs(q, k, q_pos, k_pos, kv_layout, mask)
    return attend_values(probs, v, kv_layout).reshape(b, t, h, d).astype(q.dtype)


def attend_values(probs, v, kv_layout: str = "bskd"):
    """probs [B, K, G, T, S] x v [B, S, K, D] (``kv_layout="bksd"``: [B, K, S, D]) -> float32 [B, T, K, G, D]."""
    return jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)

"""The specification: fused decompress-and-attend decode, in plain float32 ``jnp``.

Dimension letters: B batch, S cache slots, H query heads, K kv heads, G = H // K query heads per kv head,
D head dim, L latent width.

The compressed cache of one layer holds per-token latents ``k_lat``, ``v_lat`` [B, S, L] (float, or int8
with per-token asymmetric scales: x = (q + 128) * scale + min). A decoder is a list of linear layers
``{"w": [in, out], "b": [out]}`` with LeakyReLU(0.01) between them; its output row of width K*D is
head-major ([K, D]). With ``pre_rope`` keys were stored before RoPE and slot s is rotated by position s
after decoding (Hugging Face rotate-half). Slot s of sequence b is attended iff s < lengths[b].
"""

from __future__ import annotations

import jax.numpy as jnp

LEAKY_SLOPE = 0.01


def dequantize(lat, scale=None, zmin=None):
    """[B, S, L] latents -> float32; int8 needs ``scale`` and ``zmin`` [B, S]."""
    if jnp.issubdtype(lat.dtype, jnp.integer):
        if scale is None or zmin is None:
            raise ValueError("int8 latents need their per-token scale and min")
        return ((lat.astype(jnp.float32) + 128.0) * scale.astype(jnp.float32)[..., None]
                + zmin.astype(jnp.float32)[..., None])
    return lat.astype(jnp.float32)


def decode(layers, z):
    """Applies a decoder (linear layers, LeakyReLU between) in float32: [..., L] -> [..., out]."""
    x = z.astype(jnp.float32)
    for i, lin in enumerate(layers):
        x = jnp.dot(x, lin["w"].astype(jnp.float32), precision="highest") + lin["b"].astype(jnp.float32)
        if i < len(layers) - 1:
            x = jnp.where(x >= 0, x, LEAKY_SLOPE * x)
    return x


def rope_by_slot(k, theta: float):
    """Rotates k [B, S, K, D] (float32) by slot position s (Hugging Face rotate-half convention)."""
    d = k.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    angles = jnp.arange(k.shape[1], dtype=jnp.float32)[:, None] * inv_freq  # [S, D/2]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = k[..., : d // 2], k[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_reference(q, k, v, lengths):
    """Dense decode attention in float32.

    q: [B, H, D]; k, v: [B, S, K, D]; lengths: [B] int (>= 1). Returns [B, H, D] float32: for query head h
    (kv head h // G), softmax(q.k / sqrt(D) over slots s < lengths[b]) @ v.
    """
    b, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qf = q.astype(jnp.float32).reshape(b, kv, g, d)
    scores = jnp.einsum("bkgd,bskd->bkgs", qf, k.astype(jnp.float32), precision="highest") / jnp.sqrt(
        jnp.float32(d))
    valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    p = jnp.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgs,bskd->bkgd", p, v.astype(jnp.float32), precision="highest")
    return out.reshape(b, h, d)


def decompress(k_lat, v_lat, k_dec, v_dec, *, num_kv_heads: int, k_scale=None, k_min=None, v_scale=None,
               v_min=None, pre_rope: bool = False, rope_theta: float = 10000.0):
    """Decoded cache (k, v): [B, S, K, D] float32, keys rotated when ``pre_rope``."""
    bsz, s = k_lat.shape[:2]
    k = decode(k_dec, dequantize(k_lat, k_scale, k_min)).reshape(bsz, s, num_kv_heads, -1)
    v = decode(v_dec, dequantize(v_lat, v_scale, v_min)).reshape(bsz, s, num_kv_heads, -1)
    if pre_rope:
        k = rope_by_slot(k, rope_theta)
    return k, v


def decompress_attention_reference(q, k_lat, v_lat, lengths, k_dec, v_dec, *, k_scale=None, k_min=None,
                                   v_scale=None, v_min=None, pre_rope: bool = False,
                                   rope_theta: float = 10000.0):
    """Attention of q [B, H, D] over the compressed cache; returns [B, H, D] float32.

    Dequantizes, decodes every slot's K and V, rotates keys when ``pre_rope``, then runs masked GQA
    decode attention (``attention_reference``).
    """
    d = q.shape[-1]
    num_kv_heads = k_dec[-1]["w"].shape[-1] // d
    k, v = decompress(k_lat, v_lat, k_dec, v_dec, num_kv_heads=num_kv_heads, k_scale=k_scale, k_min=k_min,
                      v_scale=v_scale, v_min=v_min, pre_rope=pre_rope, rope_theta=rope_theta)
    return attention_reference(q, k, v, lengths)

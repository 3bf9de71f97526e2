"""GPT-2 family: learned positions, LayerNorm, multi-head attention with biases, GELU MLP, tied head."""

from __future__ import annotations

import jax.numpy as jnp

from kvjax.models.layers import gelu_new, layer_norm


def embed(params, cfg, tokens, positions):
    return params["embed"][tokens] + params["pos_embed"][positions]  # [B, T, E]


def qkv(p, cfg, x, positions):
    """Returns q [B, T, H, D], k [B, T, K, D], v [B, T, K, D] (no rotation in GPT-2)."""
    b, t, _ = x.shape
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"], cfg.norm_eps)
    q = (h @ p["wq"] + p["bq"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = (h @ p["wk"] + p["bk"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = (h @ p["wv"] + p["bv"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    return q, k, v


def attn_out(p, cfg, x, o):
    b, t = o.shape[:2]
    return x + o.reshape(b, t, -1) @ p["wo"] + p["bo"]


def mlp(p, cfg, x):
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"], cfg.norm_eps)
    return x + gelu_new(h @ p["w_fc"] + p["b_fc"]) @ p["w_proj"] + p["b_proj"]


def unembed(params, cfg, x):
    x = layer_norm(x, params["final_norm"], params["final_bias"], cfg.norm_eps)
    return jnp.dot(x, params["embed"].T, preferred_element_type=jnp.float32)  # [B, T, V] float32

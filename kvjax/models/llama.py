"""Llama family (TinyLlama, Llama-2/3, SmolLM2): RMSNorm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.models.layers import rms_norm, rope


def embed(params, cfg, tokens, positions):
    return params["embed"][tokens]  # [B, T, E]


def qkv(p, cfg, x, positions):
    """Returns q [B, T, H, D] after RoPE, k [B, T, K, D] before RoPE, v [B, T, K, D]."""
    b, t, _ = x.shape
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = (h @ p["wq"]).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = (h @ p["wk"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = (h @ p["wv"]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    return rope(q, positions, cfg.rope_theta), k, v


def attn_out(p, cfg, x, o):
    b, t = o.shape[:2]
    return x + o.reshape(b, t, -1) @ p["wo"]


def mlp(p, cfg, x):
    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    return x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]


def unembed(params, cfg, x):
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.dot(x, head, preferred_element_type=jnp.float32)  # [B, T, V] float32

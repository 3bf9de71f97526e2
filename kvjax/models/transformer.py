"""One forward pass of a decoder-only transformer through a cache method.

``tokens -> embed -> for each layer: q, k, v -> method.write_and_attend -> o-proj -> MLP -> logits``.
The model never looks inside the cache; the method sees only the shapes in ``ModelConfig``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.models import gpt2, llama

FAMILIES = {"llama": llama, "gpt2": gpt2}


def forward(params, cfg: ModelConfig, tokens, cache, method, mparams=None,
            seq_lens=None, return_hidden: bool = False):
    """Runs ``tokens`` [B, T] after what ``cache`` already holds.

    seq_lens: [B] number of real tokens in each row (right padding beyond it); default T for every row.
    Returns (logits [B, T, V] float32, new cache) — or (final hidden states [B, T, E], new cache) when
    ``return_hidden`` — where ``cache.lengths`` grew by ``seq_lens``.
    """
    fam = FAMILIES[cfg.arch]
    b, t = tokens.shape
    if seq_lens is None:
        seq_lens = jnp.full((b,), t, jnp.int32)
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    x = fam.embed(params, cfg, tokens, positions)
    for layer, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{layer}"):
            q, k, v = fam.qkv(p, cfg, x, positions)
            o, cache = method.write_and_attend(mparams, cfg, cache, layer, q, k, v, positions, seq_lens)
            x = fam.attn_out(p, cfg, x, o)
            x = fam.mlp(p, cfg, x)
    cache = cache.replace(lengths=cache.lengths + seq_lens.astype(jnp.int32))
    if return_hidden:
        return x, cache
    return fam.unembed(params, cfg, x), cache


def unembed(params, cfg: ModelConfig, hidden):
    """Final norm and output head: hidden [B, T, E] -> logits [B, T, V] float32."""
    return FAMILIES[cfg.arch].unembed(params, cfg, hidden)

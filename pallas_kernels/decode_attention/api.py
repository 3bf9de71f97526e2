"""``decode_attend``: one-token decode attention over a head-major [B, K, S, D] cache, with an
``implementation=`` switch.

implementation:
  "pallas"  the split-K Pallas kernel (Triton backend; interpreted when not on a GPU).
  "xla"     einsum - masked softmax - einsum.
  None      "pallas" on a GPU, "xla" elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.config import DecodeConfig
from pallas_kernels.decompress_attention.api import Implementation, _precision, _resolve


@jax.jit
def decode_attend_xla(q, k, v, lengths):
    b, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, d)
    prec = _precision(q.dtype)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32,
                        precision=prec) * (1.0 / math.sqrt(d))
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
    p = jax.nn.softmax(jnp.where(valid[:, None, None, :], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", p.astype(q.dtype), v.astype(q.dtype), preferred_element_type=jnp.float32,
                     precision=prec)
    return out.reshape(b, h, d).astype(q.dtype)


def decode_attend(q, k, v, lengths, *, implementation: Implementation | None = None,
                  config: DecodeConfig | None = None, interpret: bool | None = None):
    """Decode attention of one new token per sequence: q [B, H, D] (after RoPE), k, v [B, K, S, D],
    lengths [B] int32 >= 1 (slot s of sequence b is attended iff s < lengths[b]). Returns [B, H, D] in
    q.dtype. ``config`` (Pallas tiling) defaults to ``config.default_config``."""
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
        raise ValueError(f"decode_attend: q {q.shape} must be [B, H, D] and k, v {k.shape}, {v.shape} "
                         "[B, K, S, D] with the same B and D")
    implementation, interpret = _resolve(implementation, interpret)
    if implementation == "xla":
        return decode_attend_xla(q, k, v, lengths)
    from pallas_kernels.decode_attention import pallas_triton
    return pallas_triton.decode_attend(q, k, v, lengths, config=config, interpret=interpret)

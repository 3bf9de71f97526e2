"""``decode_attend``: one-token decode attention over a head-major [B, K, S, D] cache, with an
``implementation=`` switch.

implementation:
  "pallas"  the split-K Pallas kernel (Triton backend; interpreted when not on a GPU).
  "xla"     einsum - masked softmax - einsum.
  None      "pallas" on a GPU, "xla" elsewhere.
"""

from __future__ import annotations

from pallas_kernels.decode_attention.config import DecodeConfig
from pallas_kernels.decompress_attention.api import Implementation, _gqa_xla_jit, _resolve


def decode_attend_xla(q, k, v, lengths):
    """einsum - masked softmax - einsum over the head-major cache (``decompress_attention``'s XLA path)."""
    return _gqa_xla_jit(q, k, v.astype(q.dtype), lengths, layout="bksd")


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

"""Decode attention of one new token per sequence over an uncompressed, head-major KV cache.

``decode_attend(q, k, v, lengths)`` with k, v [B, K, S, D] (the layout ``kvjax``'s dense cache keeps):
``reference`` is the float32 specification, ``pallas_triton`` a split-K flash-decoding kernel (all query
heads of a kv group in one program, ragged lengths, log-sum-exp combine), ``api`` the ``implementation=``
switch, ``bench`` the block-size sweep against XLA and the roofline.
"""

from pallas_kernels.decode_attention.api import decode_attend
from pallas_kernels.decode_attention.config import DecodeConfig, default_config

__all__ = ["DecodeConfig", "decode_attend", "default_config"]

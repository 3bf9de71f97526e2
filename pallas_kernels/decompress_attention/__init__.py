"""Fused decompress-and-attend decode over the KV-CAR compressed (latent) cache.

``decompress_attend`` runs decode attention directly on per-token latents: each tile of latents is
decoded on chip (Linear or Linear-LeakyReLU-Linear), rotated when keys were stored before RoPE, and
attended with online softmax, so the decoded K/V never reach HBM. ``reference`` is the float32
specification; ``pallas_triton`` the portable Pallas kernel; ``bench`` the roofline benchmark.
"""

from pallas_kernels.decompress_attention.api import decompress_attend, dense_attend
from pallas_kernels.decompress_attention.config import Config, default_config

__all__ = ["Config", "decompress_attend", "default_config", "dense_attend"]

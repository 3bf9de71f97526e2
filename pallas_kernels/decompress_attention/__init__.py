"""Fused decompress-and-attend decode over the KV-CAR compressed (latent) cache.

``decompress_attend`` runs decode attention directly on per-token latents: each tile of latents is
decoded on chip (Linear or Linear-LeakyReLU-Linear), rotated when keys were stored before RoPE, and
attended with online softmax, so the decoded K/V never reach HBM. ``reference`` is the float32
specification; ``pallas_triton`` the portable Pallas kernel (Triton backend, every decoder variant);
``pallas_mosaic`` the Mosaic GPU (Hopper) kernel for linear latents with keys stored after RoPE;
``bench`` the roofline benchmark.
"""

from pallas_kernels.decompress_attention.api import decompress_attend, dense_attend
from pallas_kernels.decompress_attention.config import Config, MosaicConfig, default_config, default_mosaic_config

__all__ = ["Config", "MosaicConfig", "decompress_attend", "default_config", "default_mosaic_config", "dense_attend"]

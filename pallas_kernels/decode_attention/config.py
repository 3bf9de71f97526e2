"""Tiling of the dense decode-attention kernel: a frozen, self-validating config and its heuristic."""

from __future__ import annotations

import dataclasses

from pallas_kernels.decompress_attention.config import _is_pow2


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """block_s: cache slots per tile; num_splits: splits of S run by separate programs and combined by
    log-sum-exp (flash decoding); num_warps, num_stages: Triton launch parameters (stages > 1 pipeline
    the tile loads)."""

    block_s: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if not isinstance(self.block_s, int) or not _is_pow2(self.block_s) or self.block_s < 16:
            raise ValueError(f"DecodeConfig.block_s={self.block_s!r} must be a power of two >= 16")
        if not isinstance(self.num_splits, int) or self.num_splits < 1:
            raise ValueError(f"DecodeConfig.num_splits={self.num_splits!r} must be a positive int")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages={self.num_stages!r} must be a positive int")


def default_config(batch: int, num_kv_heads: int, seq_len: int, *, num_sms: int = 132) -> DecodeConfig:
    """64-slot tiles, 3 stages. One split (the kernel then normalizes and writes the output itself, no
    combine pass) once the (batch, kv head) programs fill the SMs; otherwise splits until about two waves,
    keeping at least 4 tiles per split. From ``bench --sweep`` on one H100 (jax 0.11.2, SmolLM2 layer):
    the tilings within 5% of the best were all 64-slot tiles at B=64 x 2048, B=256 x 512, B=64 x 512."""
    block_s = 64
    programs = batch * num_kv_heads
    if programs >= num_sms:
        return DecodeConfig(block_s=block_s, num_splits=1)
    max_splits = max(1, -(-seq_len // (4 * block_s)))
    return DecodeConfig(block_s=block_s, num_splits=max(1, min(max_splits, -(-2 * num_sms // programs))))

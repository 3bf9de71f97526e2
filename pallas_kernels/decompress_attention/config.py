"""Block sizes of the fused decompress-and-attend kernel: a frozen, self-validating ``Config`` and the
heuristic that picks one."""

from __future__ import annotations

import dataclasses
import math

# Triton tensors must have power-of-two sizes and `tl.dot` needs every dimension >= 16.
_MIN_DOT = 16


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int, minimum: int = _MIN_DOT) -> int:
    """Smallest power of two >= max(x, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of one ``decompress_attend`` call.

    block_s: cache slots per tile of the inner loop.
    num_splits: splits of S processed by separate programs (flash-decoding), combined by log-sum-exp.
    num_warps, num_stages: Triton launch parameters.
    block_l: latent columns per dot (latent-space scores, first decoder layer); None = the whole padded latent.
    block_hidden: hidden units per step of a two-layer decoder; None = the whole padded hidden width.
    block_v: columns of the absorbed value space per program; None = all.
    kv_heads_per_program: kv heads sharing one program when keys/values are decoded on chip (a two-layer
      decoder then computes its hidden layer once per tile for all of them); must divide K.
    absorb_values: attend values in the space before the value decoder's last layer (the latent for a
      linear decoder, the hidden layer for a two-layer one) and apply that layer once after the weighted
      sum; None = ``choose_absorption``'s rule. Keys are absorbed too when exact (no ``pre_rope``).
    """

    block_s: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    block_l: int | None = None
    block_hidden: int | None = None
    block_v: int | None = None
    kv_heads_per_program: int = 1
    absorb_values: bool | None = None

    def __post_init__(self):
        for name in ("block_s", "block_l", "block_hidden", "block_v"):
            value = getattr(self, name)
            if value is None and name != "block_s":
                continue
            if not isinstance(value, int) or not _is_pow2(value) or value < _MIN_DOT:
                raise ValueError(f"Config.{name}={value!r} must be a power of two >= {_MIN_DOT}")
        if not isinstance(self.num_splits, int) or self.num_splits < 1:
            raise ValueError(f"Config.num_splits={self.num_splits!r} must be a positive int")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Config.num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Config.num_stages={self.num_stages!r} must be a positive int")
        if not isinstance(self.kv_heads_per_program, int) or self.kv_heads_per_program < 1:
            raise ValueError(f"Config.kv_heads_per_program={self.kv_heads_per_program!r} must be a positive int")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def choose_absorption(*, k_layers: int, v_layers: int, hidden_k: int, hidden_v: int, pre_rope: bool,
                      absorb_values: bool | None = None) -> tuple[bool, bool]:
    """(keys_absorbed, values_absorbed): which sides are attended in the space before their decoder's last
    (linear) layer, that layer being folded into the query (keys) or applied after the weighted sum (values).

    Values: sum_s p_s (h_s W + b) = (sum_s p_s h_s) W + b, always exact; the default absorbs them unless the
    pre-last space is wide (a hidden layer over 512 wide). Keys: q.(h_s W_h + b_h) = h_s.(W_h q) + const,
    exact only without RoPE after decoding, and only with values absorbed too (all query heads then share
    one program); the same width rule applies.
    """
    def narrow(layers, hidden):
        return layers == 1 or next_pow2(hidden) <= 512

    values = narrow(v_layers, hidden_v) if absorb_values is None else bool(absorb_values)
    keys = values and not pre_rope and narrow(k_layers, hidden_k)
    return keys, values


def default_config(
    batch: int,
    seq_len: int,
    *,
    num_kv_heads: int = 1,
    latent_k: int = 0,
    latent_v: int = 0,
    hidden_k: int = 0,
    hidden_v: int = 0,
    pre_rope: bool = False,
    num_sms: int = 132,
) -> Config:
    """A heuristic tiling for one decode call (``hidden_*`` 0: linear decoder).

    Absorbed keys (see ``choose_absorption``): one program per (batch, value block, split) serves every
    query head; otherwise one per (batch, kv-head group, split). Splits are added until about two waves of
    programs cover the machine, keeping at least 4 tiles per split.
    """
    keys_abs, values_abs = choose_absorption(k_layers=2 if hidden_k else 1, v_layers=2 if hidden_v else 1,
                                             hidden_k=hidden_k, hidden_v=hidden_v, pre_rope=pre_rope)
    two_layer = bool(hidden_k or hidden_v)
    lat = next_pow2(max(latent_k, latent_v, 1))
    hid = next_pow2(max(hidden_k, hidden_v, 1))
    wide = lat > 256 or (two_layer and hid > 512)  # Llama-sized: small tiles, or shared memory overflows
    num_warps = 8 if wide else 4
    num_stages = 1 if (two_layer and wide) else 2
    block_l = min(lat, 256)
    block_hidden = (16 if wide else min(hid, 64)) if two_layer else None
    if values_abs:
        width_v = next_pow2(hidden_v if hidden_v else latent_v)
        block_v = min(width_v, 512 if (keys_abs and wide and not two_layer) else 256)
        v_blocks = width_v // block_v
    else:
        block_v, v_blocks = None, 1
    # Tile choices below were the fastest of a block-size sweep on one H100 (jax 0.11.2), ``bench --sweep``:
    # SmolLM2 layer at B=128, S=4096; Llama-7B layer at B=8, S=4096.
    if keys_abs:
        if wide:  # linear Llama: 64-slot tiles, latent in 128-column chunks, 512-column value blocks
            block_s, block_l = 64, min(lat, 128)
        elif two_layer:  # the hidden tile [block_s, block_hidden] limits the tile; deeper pipelining pays
            block_s, num_stages = 32, 3
        else:
            block_s = 64
        hpp, groups = 1, v_blocks
    else:
        block_s = 16 if wide else 32
        # A two-layer decoder's hidden layer (and every latent tile) is shared by the kv heads: compute it
        # once per tile when the heads are few; with many heads the per-head state would not fit.
        hpp = num_kv_heads if (two_layer and num_kv_heads <= 4) else 1
        groups = (num_kv_heads // hpp) * v_blocks
    programs = batch * groups
    target = 2 * num_sms
    max_splits = max(1, -(-seq_len // (4 * block_s)))
    num_splits = max(1, min(max_splits, -(-target // programs)))
    return Config(block_s=block_s, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                  block_l=block_l, block_hidden=block_hidden, block_v=block_v, kv_heads_per_program=hpp,
                  absorb_values=values_abs)


SMEM_BYTES = 227 * 1024  # shared memory one H100 block may use


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiling of one Mosaic GPU ``decompress_attend`` call (``pallas_mosaic``).

    block_s: cache slots per pipeline step (the N of the scores wgmma, the K of the values wgmma).
    num_splits: splits of S processed by separate programs, combined by log-sum-exp.
    max_concurrent_steps: TMA pipeline depth (tiles in flight).
    block_v: value-latent columns per program (<= 256, the widest wgmma N); None = the whole latent.
    p_in_registers: feed the softmax weights to the values wgmma from registers (False: through shared
      memory, as jax's Mosaic GPU interpreter always does).
    """

    block_s: int = 64
    num_splits: int = 1
    max_concurrent_steps: int = 2
    block_v: int | None = None
    p_in_registers: bool = True

    def __post_init__(self):
        if self.block_s not in (64, 128, 256):
            raise ValueError(f"MosaicConfig.block_s={self.block_s!r} must be 64, 128 or 256")
        if not isinstance(self.num_splits, int) or self.num_splits < 1:
            raise ValueError(f"MosaicConfig.num_splits={self.num_splits!r} must be a positive int")
        if not isinstance(self.max_concurrent_steps, int) or not 1 <= self.max_concurrent_steps <= 8:
            raise ValueError(f"MosaicConfig.max_concurrent_steps={self.max_concurrent_steps!r} must be 1..8")
        if self.block_v is not None and (not isinstance(self.block_v, int) or self.block_v % 32
                                         or not 32 <= self.block_v <= 256):
            raise ValueError(f"MosaicConfig.block_v={self.block_v!r} must be a multiple of 32 in 32..256")

    def smem_bytes(self, *, latent_k: int, latent_v: int, itemsize: int = 2, rows: int = 64) -> int:
        """Shared memory one program uses: the queries, p, the output staging (float32), the running max
        and sum, and ``max_concurrent_steps`` key and value tiles."""
        bv = self.block_v or latent_v
        tiles = self.max_concurrent_steps * self.block_s * (latent_k + bv) * itemsize
        return rows * latent_k * itemsize + rows * self.block_s * itemsize + rows * bv * 4 + 2 * rows * 4 + tiles

    def check(self, *, latent_k: int, latent_v: int, itemsize: int = 2) -> None:
        """Errors that depend on the call's shapes."""
        bv = self.block_v or latent_v
        if latent_v % bv or bv > 256:
            raise ValueError(f"MosaicConfig.block_v={self.block_v!r} must divide the value latent width {latent_v} "
                             "and be <= 256")
        need = self.smem_bytes(latent_k=latent_k, latent_v=latent_v, itemsize=itemsize)
        if need > SMEM_BYTES:
            raise ValueError(f"{self!r} needs {need} B of shared memory for latents {latent_k}/{latent_v}, over the "
                             f"H100's {SMEM_BYTES} B: lower max_concurrent_steps, block_s or block_v (a key latent "
                             "this wide does not fit one program; the absorbed XLA path serves it)")

    def replace(self, **changes) -> "MosaicConfig":
        return dataclasses.replace(self, **changes)


def default_mosaic_config(batch: int, seq_len: int, *, latent_k: int, latent_v: int,
                          num_sms: int = 132) -> MosaicConfig:
    """A heuristic Mosaic tiling: the value latent in as few <= 256-wide blocks as divide it, 64-slot tiles
    two deep (two programs then fit one SM's shared memory at SmolLM2 widths), and splits of S until about
    one wave of programs covers the machine (>= 4 tiles a split). From the tiling sweep on the H100
    (results/kernels/mosaic-2026-11-25), 64-slot tiles: pipeline depth 2-4 moved times by under 5%; about one
    wave beat two (B=128 x 4096: 2 splits 109 us, 1 split 112-115 us, 3 splits at depth 4 118 us; B=8 x 4096:
    8-16 splits 17-19 us, 32 splits 20 us)."""
    block_v = next((w for w in range(min(latent_v, 256), 31, -32) if latent_v % w == 0), latent_v)
    programs = batch * (latent_v // block_v)
    block_s = 64
    max_splits = max(1, -(-seq_len // (4 * block_s)))
    num_splits = max(1, min(max_splits, -(-num_sms // programs)))
    cfg = MosaicConfig(block_s=block_s, num_splits=num_splits, max_concurrent_steps=2, block_v=block_v)
    if cfg.smem_bytes(latent_k=latent_k, latent_v=latent_v) > SMEM_BYTES:
        cfg = cfg.replace(max_concurrent_steps=1)
    return cfg

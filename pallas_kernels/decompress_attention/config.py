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

"""Split-K flash-decoding attention over a head-major cache: Pallas, Triton backend (``interpret=True`` on
CPU).

One program per (batch b, kv head k, split j). It walks its split of sequence b's slots in tiles of
``block_s`` (the head-major layout makes each tile of K and V one contiguous [block_s, D] block), scores
the G query heads of kv head k against the tile (rows padded to 16 for the dot), and keeps an online
softmax. Splits are combined outside by log-sum-exp. Loads past the sequence's length are masked: the
cache is never padded or copied.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode_attention.config import DecodeConfig, default_config
from pallas_kernels.decompress_attention.config import next_pow2
from pallas_kernels.decompress_attention.pallas_triton import _NEG_INIT, _mm, _mm_t, _triton, combine_splits


def _kernel(len_ref, q_ref, k_ref, v_ref, *out_refs, block_s: int, split_len: int, g: int, rows: int):
    """lengths [] int32; q [H, D] (this sequence, every query head); k, v [S, D] (this sequence and kv head).
    Loads query rows k*G .. k*G+G-1 (padded to ``rows`` for the dot) and scales them. One split: writes the
    normalized output rows into o [H, D]. Several: writes o [R, D] (unnormalized) and the running max and
    sum m, l [R] of this split for the log-sum-exp combine."""
    plgpu = _triton()
    f32 = jnp.float32
    start = pl.program_id(2) * split_len
    end = jnp.minimum(start + split_len, len_ref[()])
    n_tiles = (jnp.maximum(end - start, 0) + block_s - 1) // block_s
    d = q_ref.shape[-1]
    row_ok = jnp.arange(rows) < g
    q_rows = pl.ds(pl.program_id(1) * g, rows)
    q = plgpu.load(q_ref.at[q_rows, :], mask=row_ok[:, None], other=0)
    q = (q.astype(f32) * (1.0 / math.sqrt(d))).astype(q_ref.dtype)

    def body(t, carry):
        m_prev, l_prev, acc = carry
        s0 = start + t * block_s
        valid = s0 + jnp.arange(block_s) < end
        k = plgpu.load(k_ref.at[pl.ds(s0, block_s), :], mask=valid[:, None], other=0)
        v = plgpu.load(v_ref.at[pl.ds(s0, block_s), :], mask=valid[:, None], other=0)
        s = jnp.where(valid[None, :], _mm_t(q, k.astype(q.dtype)), -jnp.inf)  # [R, bs]
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        l_next = alpha * l_prev + p.sum(axis=1)
        acc = alpha[:, None] * acc + _mm(p.astype(q.dtype), v.astype(q.dtype))
        return m_next, l_next, acc

    init = (jnp.full((rows,), _NEG_INIT, f32), jnp.zeros((rows,), f32), jnp.zeros((rows, d), f32))
    m_i, l_i, acc = lax.fori_loop(0, n_tiles, body, init)
    if len(out_refs) == 1:  # one split: lengths >= 1 make l > 0 on the real rows
        out = acc / jnp.where(row_ok, l_i, 1.0)[:, None]
        plgpu.store(out_refs[0].at[q_rows, :], out.astype(out_refs[0].dtype), mask=row_ok[:, None])
        return
    o_ref, m_ref, l_ref = out_refs
    o_ref[...] = acc
    m_ref[...] = m_i
    l_ref[...] = l_i


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_attend(q, k, v, lengths, *, config: DecodeConfig | None = None, interpret: bool = False):
    """q [B, H, D]; k, v [B, K, S, D] (any float dtype; the dots run in q's dtype with float32
    accumulation); lengths [B] int32 >= 1. Returns [B, H, D] in q.dtype."""
    plgpu = _triton()
    f32 = jnp.float32
    bsz, n_heads, d = q.shape
    _, kvh, s_len, _ = k.shape
    if n_heads % kvh:
        raise ValueError(f"query heads H={n_heads} must be a multiple of kv heads K={kvh}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Pallas decode kernel needs a power-of-two head_dim >= 16, got {d}")
    g = n_heads // kvh
    cfg = config or default_config(bsz, kvh, s_len)
    bs = cfg.block_s
    split_len = -(-(-(-s_len // cfg.num_splits)) // bs) * bs
    n_splits = -(-s_len // split_len)
    rows = next_pow2(g)
    grid = (bsz, kvh, n_splits)
    in_specs = [
        pl.BlockSpec((None,), lambda b, h, j: (b,)),
        pl.BlockSpec((None, n_heads, d), lambda b, h, j: (b, 0, 0)),
        pl.BlockSpec((None, None, s_len, d), lambda b, h, j: (b, h, 0, 0)),
        pl.BlockSpec((None, None, s_len, d), lambda b, h, j: (b, h, 0, 0)),
    ]
    if n_splits == 1:  # the kernel normalizes and writes [B, H, D] itself: no combine pass
        out_specs = pl.BlockSpec((None, n_heads, d), lambda b, h, j: (b, 0, 0))
        out_shape = jax.ShapeDtypeStruct((bsz, n_heads, d), q.dtype)
    else:
        out_specs = (
            pl.BlockSpec((None, None, None, rows, d), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
        )
        out_shape = (
            jax.ShapeDtypeStruct((bsz, kvh, n_splits, rows, d), f32),
            jax.ShapeDtypeStruct((bsz, kvh, n_splits, rows), f32),
            jax.ShapeDtypeStruct((bsz, kvh, n_splits, rows), f32),
        )
    res = pl.pallas_call(
        functools.partial(_kernel, block_s=bs, split_len=split_len, g=g, rows=rows),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="decode_attend",
    )(lengths.astype(jnp.int32), q, k, v)
    if n_splits == 1:
        return res
    o, m, l = res  # only the G real query rows are combined
    out = combine_splits(o[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g])
    return out.reshape(bsz, n_heads, d).astype(q.dtype)

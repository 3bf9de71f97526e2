"""Fused decode attention over linear latents: Pallas with the Mosaic GPU (Hopper) backend.

The case it covers is the one the benchmark's linear-decoder targets are about: one linear layer per
decoder, keys stored after RoPE, bf16/fp16 latents. Attention then runs in latent space
(``pallas_triton``'s module docstring has the algebra): every query head h gets q_h W_k,h, so all H heads
share one stream of key latents, and p @ v_lat is decoded once per head after the weighted sum.

One program (one warpgroup, 128 threads) per (value block, sequence, split of S). It keeps the H absorbed
queries, padded to the 64 rows of a wgmma tile, in shared memory and walks its split in tiles of
``block_s`` slots through a TMA pipeline ``max_concurrent_steps`` deep:

  scores [64, T] = wgmma(q_abs [64, Lk], k_tile^T)      (float32 accumulator in registers)
  online softmax over the slots < length                  (registers)
  acc    [64, Lvb] += wgmma(p [64, T] in registers, v_tile [T, Lvb])

and writes the split's unnormalized acc with its running max and sum; ``pallas_triton.combine_splits``
merges the splits. Tiles past a sequence's length are clamped to its last tile in the pipeline's index
map, so a ragged batch re-reads one tile (from L2) instead of streaming padding from HBM, and the slot mask
(computed from the unclamped index) gives them weight 0.

Interpret mode on CPU runs the kernel through jax's Mosaic GPU interpreter
(``jax._src.pallas.mosaic_gpu.interpret``, jax >= 0.10), which simulates shared memory, TMA copies,
barriers and wgmma: that is how CI tests it. The interpreter forces three differences, each the same
function: the keys are handed over transposed (its wgmma takes no transposed operand), p is staged in
shared memory (its wgmma reads refs only), and products land in a fresh accumulator that is then added
(it has no ``run_state``). CI also lowers the compiled kernel for CUDA (``MosaicLoweringTest``), which checks
its layouts, swizzles and TMA shapes without a GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decompress_attention.config import MosaicConfig, default_mosaic_config

ROWS = 64  # one wgmma tile of query rows: every query head of the sequence (H <= 64)
_NEG_INIT = -1e30  # finite start of the running max: an empty split stays finite and gets weight 0


def _mosaic():
    """The Mosaic GPU Pallas module, imported only when a kernel is built."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


def interpret_params():
    """jax's Mosaic GPU interpreter parameters (runs the kernel on CPU), or None where this jax lacks it."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        return None
    # A TMA load of a tile that overhangs the array fills the overhang with zeros; the interpreter does the
    # same with these two settings (by default it raises on any out-of-bounds read).
    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


def supported(q, k_lat, v_lat, k_dec, v_dec, pre_rope: bool, config: MosaicConfig | None = None) -> str | None:
    """None if this kernel covers the call with ``config`` (None: the default tiling), else why not (a
    sentence naming the tensor, flag or tiling)."""
    if len(k_dec) != 1 or len(v_dec) != 1:
        return f"the Mosaic GPU kernel needs linear decoders (got {len(k_dec)}/{len(v_dec)} layers)"
    if pre_rope:
        return "the Mosaic GPU kernel needs keys stored after RoPE (pre_rope=True)"
    for name, lat in (("k_lat", k_lat), ("v_lat", v_lat)):
        if jnp.dtype(lat.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"the Mosaic GPU kernel needs bf16/fp16 latents, {name} is {lat.dtype}"
        if lat.shape[-1] % 32:
            return f"the Mosaic GPU kernel needs latent widths that are multiples of 32, {name} is {lat.shape[-1]}"
    if k_lat.dtype != v_lat.dtype:
        return f"k_lat ({k_lat.dtype}) and v_lat ({v_lat.dtype}) must share a dtype"
    if q.shape[1] > ROWS:
        return f"the Mosaic GPU kernel holds at most {ROWS} query heads, q has {q.shape[1]}"
    cfg = config or default_mosaic_config(k_lat.shape[0], k_lat.shape[1], latent_k=k_lat.shape[2],
                                          latent_v=v_lat.shape[2])
    try:
        cfg.check(latent_k=k_lat.shape[2], latent_v=v_lat.shape[2], itemsize=jnp.dtype(k_lat.dtype).itemsize)
    except ValueError as e:
        return str(e)
    return None


def _swizzle(widths, itemsize: int) -> int:
    """Largest shared-memory swizzle (bytes) whose row of elements divides every width in ``widths`` (the two
    operands of one wgmma must share it)."""
    for sw in (128, 64, 32):
        if all(w % (sw // itemsize) == 0 for w in widths):
            return sw
    raise ValueError(f"widths {widths} are not multiples of {32 // itemsize} elements")


def _transforms(plgpu, widths, itemsize: int):
    sw = _swizzle(widths, itemsize)
    return (plgpu.TilingTransform((8, sw // itemsize)), plgpu.SwizzleTransform(sw))


def _mma_into(plgpu, acc, a, b, interpret: bool):
    """acc + a @ b through wgmma. Compiled, the product accumulates in place (``run_state`` on an initialized
    accumulator); jax's Mosaic GPU interpreter has no ``run_state``, so there it lands in a fresh
    accumulator that is then added: the same function."""
    if interpret:
        def fresh(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]
        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

    def into(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(into)(plgpu.ACC.init(acc))


def _head_kv(n_heads: int, kvh: int, rows: int):
    """[rows, K] bool: row h is query head h and belongs to kv head h // G (rows past H belong to none)."""
    return (jnp.arange(rows) // (n_heads // kvh))[:, None] == jnp.arange(kvh)[None, :]


def absorb_queries(q, w_k, dtype):
    """W_k,h q_h / sqrt(D) for every query head h (operands in ``dtype``, accumulated in float32, returned in
    ``dtype``): q [B, H, D], w_k [Lk, K*D] -> [B, 64, Lk] (rows past H are zero).

    One plain matrix product, no batch dimension (a batched einsum over kv heads compiled to a transpose, a
    product and a pad): each head's scaled query sits in its kv head's D columns of a [64, K*D] row block."""
    bsz, n_heads, d = q.shape
    lk, kvh = w_k.shape[0], w_k.shape[1] // d
    qs = jnp.pad(q.astype(jnp.float32) * (1.0 / math.sqrt(d)), ((0, 0), (0, ROWS - n_heads), (0, 0)))
    q_bd = jnp.where(_head_kv(n_heads, kvh, ROWS)[None, :, :, None], qs[:, :, None, :], 0.0).astype(dtype)
    q_abs = lax.dot_general(q_bd.reshape(bsz * ROWS, kvh * d), w_k.astype(dtype), (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return q_abs.reshape(bsz, ROWS, lk).astype(dtype)


def output_rows(n_heads: int) -> int:
    """Accumulator rows a program writes back: the real heads, in whole 8-row tiles."""
    return min(ROWS, -(-n_heads // 8) * 8)


@functools.partial(jax.jit, static_argnames=("n_heads", "config", "interpret"))
def latent_attention(q_abs, k_lat, v_lat, lengths, *, n_heads: int, config: MosaicConfig | None = None,
                     interpret: bool = False):
    """The kernel: attention of the absorbed queries over the latents, per split of S.

    q_abs: [B, 64, Lk] (``absorb_queries``); k_lat: [B, S, Lk], v_lat: [B, S, Lv] in q_abs's dtype;
    lengths: [B]. Returns o [B, NS, NV, RO, bv] (each split's unnormalized p @ v_lat, value block by value
    block, RO = ``output_rows(n_heads)``) and ml [B, NS, NV, 2, 64] (each split's running max and sum).
    """
    plgpu = _mosaic()
    f32 = jnp.float32
    bsz, s_len, lk = k_lat.shape
    lv = v_lat.shape[2]
    cdt = jnp.dtype(k_lat.dtype)
    itemsize = cdt.itemsize
    cfg = config or default_mosaic_config(bsz, s_len, latent_k=lk, latent_v=lv)
    cfg.check(latent_k=lk, latent_v=lv, itemsize=itemsize)
    bs, bv = cfg.block_s, cfg.block_v or lv
    n_tiles = -(-s_len // bs)
    tiles_per_split = -(-n_tiles // min(cfg.num_splits, n_tiles))
    n_splits = -(-n_tiles // tiles_per_split)
    n_vblocks = lv // bv
    steps = max(1, min(cfg.max_concurrent_steps, tiles_per_split))
    rows_out = output_rows(n_heads)
    p_from_registers = cfg.p_in_registers and not interpret  # the interpreter's wgmma reads refs only
    qk_tf = _transforms(plgpu, (lk,), itemsize)  # q_abs and key tiles: operands of the scores wgmma
    pv_tf = _transforms(plgpu, (bs, bv), itemsize)  # p and value tiles: operands of the values wgmma

    # The TMA copies see the cache in tiles of 8 rows, so S must be a multiple of 8 (or below it): pad
    # otherwise. That copies the cache; caches of a capacity that is a multiple of 8 are read in place.
    if s_len > 8 and s_len % 8:
        pad = ((0, 0), (0, 8 - s_len % 8), (0, 0))
        k_lat, v_lat = jnp.pad(k_lat, pad), jnp.pad(v_lat, pad)

    # jax's Mosaic GPU interpreter has no layouts and cannot feed a transposed shared-memory ref to wgmma:
    # there the arrays are plain and the keys are handed over transposed ([B, Lk, S], one XLA transpose),
    # so that the key tile is the wgmma operand as it stands. Everything else is the compiled kernel.
    if interpret:
        k_in = jnp.swapaxes(k_lat, 1, 2)
        k_block, k_index, k_tf = (lk, bs), (lambda i: (0, i)), _transforms(plgpu, (bs,), itemsize)

        def k_operand(ref):
            return ref

        def layout(x, _):
            return x

        def iota(shape, dim):
            return lax.broadcasted_iota(jnp.int32, shape, dim)
    else:
        k_in = k_lat
        k_block, k_index, k_tf = (bs, lk), (lambda i: (i, 0)), qk_tf

        def k_operand(ref):
            return ref.transpose((1, 0))

        layout = plgpu.layout_cast

        def iota(shape, dim):
            return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def kernel(q_gmem, k_gmem, v_gmem, len_gmem, o_gmem, ml_gmem, q_smem, p_smem, o_smem, ml_smem, bar):
        vb = lax.axis_index("v")
        b = lax.axis_index("b")
        j = lax.axis_index("j")
        length = len_gmem[b]
        last_tile = jnp.maximum(length - 1, 0) // bs
        first = j * tiles_per_split

        plgpu.copy_gmem_to_smem(q_gmem.at[b], q_smem, bar)
        plgpu.barrier_wait(bar)

        def tile_index(t):  # tiles past the length re-read the last one (from L2); the mask zeroes them
            return jnp.minimum(first + t, last_tile)

        def body(idx, k_smem, v_smem, carry):
            m_i, l_i, acc = carry
            (t,) = idx

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_operand(k_smem))
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((ROWS, bs), f32))
            slot = (first + t) * bs + iota((ROWS, bs), 1)
            s = jnp.where(slot < length, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp(m_i - m_new)
            p = jnp.exp(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_new = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            if p_from_registers:
                return m_new, l_new, _mma_into(plgpu, acc, p.astype(cdt), v_smem, interpret)
            p_smem[...] = p.astype(cdt)
            plgpu.commit_smem()  # make the stores visible to the tensor cores' (async) reads
            return m_new, l_new, _mma_into(plgpu, acc, p_smem, v_smem, interpret)

        rows_layout = plgpu.Layout.WGMMA.reduce(1)
        init = (layout(jnp.full((ROWS,), _NEG_INIT, f32), rows_layout), layout(jnp.zeros((ROWS,), f32), rows_layout),
                layout(jnp.zeros((ROWS, bv), f32), plgpu.Layout.WGMMA))
        m_i, l_i, acc = plgpu.emit_pipeline(
            body,
            grid=(tiles_per_split,),
            in_specs=[plgpu.BlockSpec(k_block, lambda t: k_index(tile_index(t)), transforms=k_tf),
                      plgpu.BlockSpec((bs, bv), lambda t: (tile_index(t), vb), transforms=pv_tf)],
            max_concurrent_steps=steps,
            init_carry=init,
        )(k_gmem.at[b], v_gmem.at[b])

        o_smem[...] = acc
        ml_smem[0] = m_i
        ml_smem[1] = l_i
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows_out)], o_gmem.at[b, j, vb])
        plgpu.copy_smem_to_gmem(ml_smem, ml_gmem.at[b, j, vb])
        plgpu.wait_smem_to_gmem(0)

    def entry(q_gmem, k_gmem, v_gmem, len_gmem, o_gmem, ml_gmem):
        pl.run_scoped(
            functools.partial(kernel, q_gmem, k_gmem, v_gmem, len_gmem, o_gmem, ml_gmem),
            plgpu.SMEM((ROWS, lk), cdt, transforms=qk_tf),
            plgpu.SMEM((ROWS, bs), cdt, transforms=pv_tf),
            plgpu.SMEM((ROWS, bv), f32),
            plgpu.SMEM((2, ROWS), f32),
            plgpu.Barrier(num_barriers=1),
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((bsz, n_splits, n_vblocks, rows_out, bv), f32),
                  jax.ShapeDtypeStruct((bsz, n_splits, n_vblocks, 2, ROWS), f32)),
        grid=(n_vblocks, bsz, n_splits),
        grid_names=("v", "b", "j"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q_abs, k_in, v_lat, lengths.astype(jnp.int32))


def finish(o, ml, v_dec, *, n_heads: int, head_dim: int, dtype):
    """Merges the splits of ``latent_attention`` by log-sum-exp and decodes the weighted value latents once
    per query head (operands in ``dtype``, the latents' dtype, accumulated in float32): -> [B, H, D] float32.

    The value decoder runs as one plain product over all K*D outputs, of which each head keeps its kv head's
    D columns (as in ``absorb_queries``: no batched einsum, so no transposes around it)."""
    from pallas_kernels.decompress_attention.pallas_triton import combine_splits

    bsz, _, n_vblocks, rows_out, bv = o.shape
    lv = n_vblocks * bv
    kvh = v_dec[0]["w"].shape[1] // head_dim
    m, l = (jnp.broadcast_to(ml[:, None, :, 0, i, :rows_out], (bsz, n_vblocks) + ml.shape[1:2] + (rows_out,))
            for i in (0, 1))  # [B, NV, NS, RO]: every value block computed the same statistics
    out = combine_splits(jnp.transpose(o, (0, 2, 1, 3, 4)), m, l)  # [B, NV, RO, bv]
    out = jnp.transpose(out, (0, 2, 1, 3)).reshape(bsz * rows_out, lv).astype(dtype)
    full = jnp.dot(out, v_dec[0]["w"].astype(dtype), preferred_element_type=jnp.float32)
    full = full.reshape(bsz, rows_out, kvh, head_dim) + v_dec[0]["b"].astype(jnp.float32).reshape(kvh, head_dim)
    mine = _head_kv(n_heads, kvh, rows_out)[None, :, :, None]
    return jnp.where(mine, full, 0.0).sum(axis=2)[:, :n_heads]


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decompress_attend(q, k_lat, v_lat, lengths, k_dec, v_dec, *, config: MosaicConfig | None = None,
                      interpret: bool = False):
    """Decode attention over linear post-RoPE latents (semantics of ``reference``, ``pre_rope=False``):
    ``absorb_queries``, ``latent_attention`` (the kernel), ``finish``.

    q: [B, H, D]; k_lat: [B, S, Lk], v_lat: [B, S, Lv] (bf16/fp16); lengths: [B] int32 (>= 1);
    k_dec, v_dec: ``[{"w": [L, K*D], "b": [K*D]}]``. Returns [B, H, D] in q.dtype.
    """
    why = supported(q, k_lat, v_lat, k_dec, v_dec, pre_rope=False, config=config)
    if why:
        raise ValueError(why)
    n_heads, d = q.shape[1:]
    kvh = k_dec[0]["w"].shape[1] // d
    if kvh * d != k_dec[0]["w"].shape[1] or n_heads % kvh:
        raise ValueError(f"decoder width {k_dec[0]['w'].shape[1]} is not K*D with K dividing H={n_heads}")
    q_abs = absorb_queries(q, k_dec[0]["w"], k_lat.dtype)
    o, ml = latent_attention(q_abs, k_lat, v_lat, lengths, n_heads=n_heads, config=config, interpret=interpret)
    return finish(o, ml, v_dec, n_heads=n_heads, head_dim=d, dtype=k_lat.dtype).astype(q.dtype)

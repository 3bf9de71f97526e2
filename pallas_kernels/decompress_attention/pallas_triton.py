"""Fused decompress-and-attend decode: Pallas with the Triton backend (``interpret=True`` on CPU).

One program per (value block v, kv-head group g, batch b, split j of S). It walks its split of the cache
in tiles of ``block_s`` slots; per tile it loads the latents [block_s, L] (int8 dequantized in registers),
decodes them on chip with the decoder weights (Linear, or Linear-LeakyReLU-Linear with the hidden layer
in chunks) into this group's keys/values [block_s, D], rotates keys by slot when ``pre_rope``, and runs
online-softmax attention for the group's G query heads. Splits are combined outside by log-sum-exp.

Absorbing a decoder's last (linear) layer (W, b), the algebra of ``config.choose_absorption``:
* values: sum_s p_s (h_s W + b) = (sum_s p_s h_s) W + b, since the weights sum to 1. The kernel
  accumulates p @ h (h = the latent for a linear decoder, the hidden layer for a two-layer one) and the
  wrapper applies W, b once per query head.
* keys (no RoPE after decoding): q.(h_s W_h + b_h) = h_s.(W_h q) + q.b_h; the last term is constant over
  slots, so softmax drops it. All H query heads then share one tile of h: one program serves every head
  and reads each latent once.

Triton needs power-of-two tensor sizes and dot dims >= 16: query rows are padded to >= 16, latent and
hidden widths to powers of two (weights zero-padded, loads masked); the cache arrays are never copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decompress_attention.config import Config, choose_absorption, default_config, next_pow2

LEAKY_SLOPE = 0.01
_NEG_INIT = -1e30  # finite start of the running max: an empty split stays finite and gets weight 0


def _triton():
    """The Triton-specific Pallas module, imported only when a kernel is built."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu


@dataclasses.dataclass(frozen=True)
class _Side:
    """How the kernel treats K or V (static)."""

    absorbed: bool  # attended in the space before the decoder's last layer
    chip_layers: int  # decoder layers run on chip: all of them (decoded) or all but the last (absorbed)
    lat: int  # latent width L and its padded width
    lat_p: int
    bl: int  # latent columns per chunk
    hidden: int  # width of the on-chip hidden layer (0: none)
    bh: int  # hidden columns per chunk
    int8: bool


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one kernel instance (hashable, closed over by the kernel)."""

    k: _Side
    v: _Side
    rope: bool
    parts: int  # P: decoded keys handled as 2 halves of D when rope, else 1
    units: int  # U: kv heads per program (1 with absorbed keys: one unit holding all query heads)
    rows: int  # R: padded query rows per unit
    block_s: int
    split_len: int
    dq: int  # query width per part: D / P, or the padded absorbed key width
    dv_block: int  # output columns per program: D, or a block of the absorbed value width
    cdt: str  # dtype fed to the dots (accumulation is float32)


def _precision(a):
    # Triton lowers DEFAULT float32 dots to TF32; float32 inputs ask for full precision explicitly.
    return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _mm(a, b):
    """a [m, k] @ b [k, n] -> float32."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=_precision(a))


def _mm_t(a, b):
    """a [m, k] @ b[n, k]^T -> float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=_precision(a))


_UNROLL = 4  # chunk loops of at most this many steps are unrolled


def _chunk_loop(n, fn, init):
    """acc = fn(i, acc) for i < n: unrolled (i static) for a few chunks, a loop (i traced) otherwise."""
    if n <= _UNROLL:
        acc = init
        for i in range(n):
            acc = fn(i, acc)
        return acc
    return lax.fori_loop(0, n, fn, init)


def _kernel(*refs, names, plan: _Plan):
    """One (value block, kv-head group, batch, split) program. Refs by name (blocks as the kernel sees them;
    U units, P parts, R rows, Wk/Wv the absorbed widths, *p = padded to a power of two):

      lengths   []                       int32, this sequence's length
      q         [U, P, R, D/P]           scaled queries (decoded keys), or
                [1, 1, R, Wkp]           W_h q for every query head (absorbed keys)
      k_lat     [S, Lk]                  this sequence's key latents (any float dtype, or int8)
      k_scale   [S], k_min [S]           int8 only: x = (q + 128) * scale + min
      v_lat, v_scale, v_min              the same for values
      {k,v}_w1  [Lp, Hp], {k,v}_b1 [Hp]  first layer of a two-layer decoder (on chip)
      {k,v}_w2  [U, P, Hp, D/P]          last layer, this group's heads (decoded side of a two-layer decoder)
      {k,v}_b2  [U, P, D/P]
      {k,v}_w   [U, P, Lp, D/P]          the only layer (decoded side of a linear decoder)
      {k,v}_b   [U, P, D/P]
      inv_freq  [D/2]                    RoPE frequencies (pre_rope only)
      o         [U, R, dv_block]         out: unnormalized accumulator of this split
      m, l      [U, R]                   out: running max and sum of this split
    """
    plgpu = _triton()
    r = dict(zip(names, refs))
    f32 = jnp.float32
    cdt = jnp.dtype(plan.cdt)
    bs = plan.block_s
    vblk = pl.program_id(0)
    split = pl.program_id(3)
    sides = {"k": plan.k, "v": plan.v}

    # Column offsets into the latents are kept symbolic: a static slice that overhangs the (unpadded)
    # latent width would be rejected at trace time, while a masked load past it is exactly what is wanted.
    col0 = pl.program_id(0) * 0
    length = r["lengths"][()]
    start = split * plan.split_len
    end = jnp.minimum(start + plan.split_len, length)
    n_tiles = (jnp.maximum(end - start, 0) + bs - 1) // bs

    def load_latent(side, s0, valid, c0, width):
        """Latent tile [bs, width] of columns c0.. (rows >= end and columns >= L read as 0), in cdt."""
        sd = sides[side]
        c0 = col0 + c0
        cols = c0 + jnp.arange(width)
        mask = valid[:, None] & (cols < sd.lat)[None, :]
        x = plgpu.load(r[side + "_lat"].at[pl.ds(s0, bs), pl.ds(c0, width)], mask=mask, other=0)
        if sd.int8:
            scale = plgpu.load(r[side + "_scale"].at[pl.ds(s0, bs)], mask=valid, other=0).astype(f32)
            zmin = plgpu.load(r[side + "_min"].at[pl.ds(s0, bs)], mask=valid, other=0).astype(f32)
            # Padded columns dequantize to nonzero values; they meet zero weight rows / query columns.
            x = (x.astype(f32) + 128.0) * scale[:, None] + zmin[:, None]
        return x.astype(cdt)

    def latent_chunks(side, s0, valid):
        """(n, get): the latent tile in n chunks [bs, bl], chunk i = get(i). A few chunks are loaded once and
        kept in registers (i static); many (wide latents) are loaded inside a loop (i traced), so that only
        one chunk and its weights are live at a time. Chunks wholly in the padding are skipped."""
        sd = sides[side]
        n = -(-sd.lat // sd.bl)
        if n <= _UNROLL:
            xs = [load_latent(side, s0, valid, c * sd.bl, sd.bl) for c in range(n)]
            return n, xs.__getitem__
        return n, lambda i: load_latent(side, s0, valid, i * sd.bl, sd.bl)

    def hidden_block(side, src, h0, width):
        """LeakyReLU(x @ W1[:, h0:h0+width] + b1[h0:h0+width]) -> [bs, width] in cdt."""
        bl = sides[side].bl
        n, get = src
        w1, b1 = r[side + "_w1"], r[side + "_b1"]  # [Lp, Hp], [Hp]
        h = _chunk_loop(n, lambda c, h: h + _mm(get(c), w1[pl.ds(c * bl, bl), pl.ds(h0, width)]),
                        jnp.zeros((bs, width), f32))
        h = h + b1[pl.ds(h0, width)].astype(f32)[None, :]
        return jnp.where(h >= 0, h, LEAKY_SLOPE * h).astype(cdt)

    def decode_tile(side, src, parts):
        """Decoded rows for every unit and part: [U][P] float32 [bs, D / P]."""
        sd = sides[side]
        units = range(plan.units)
        if sd.chip_layers == 1:
            w, b = r[side + "_w"], r[side + "_b"]  # [U, P, Lp, D/P], [U, P, D/P]
            n, get = src

            def step(c, ys):
                x = get(c)
                return tuple(tuple(ys[u][p] + _mm(x, w[u, p, pl.ds(c * sd.bl, sd.bl), :]) for p in range(parts))
                             for u in units)

            ys = tuple(tuple(b[u, p, :].astype(f32)[None, :] + jnp.zeros((bs, w.shape[-1]), f32)
                             for p in range(parts)) for u in units)
            return _chunk_loop(n, step, ys)
        w2, b2 = r[side + "_w2"], r[side + "_b2"]  # [U, P, Hp, D/P], [U, P, D/P]
        width = w2.shape[-1]

        def step(i, ys):
            h0 = i * sd.bh
            h = hidden_block(side, src, h0, sd.bh)  # [bs, bh]
            return tuple(tuple(ys[u][p] + _mm(h, w2[u, p, pl.ds(h0, sd.bh), :]) for p in range(parts))
                         for u in units)

        ys = tuple(tuple(b2[u, p, :].astype(f32)[None, :] + jnp.zeros((bs, width), f32) for p in range(parts))
                   for u in units)
        return _chunk_loop(-(-sd.hidden // sd.bh), step, ys)  # hidden blocks wholly in the padding skipped

    if not plan.k.absorbed:  # small per-head queries stay in registers
        q = tuple(tuple(r["q"][u, p] for p in range(plan.parts)) for u in range(plan.units))  # [R, D/P]
    inv_freq = r["inv_freq"][...].astype(f32) if plan.rope else None  # [D/2]

    def body(t, carry):
        s0 = start + t * bs
        slot = s0 + jnp.arange(bs)  # [bs]
        valid = slot < end

        # ---- scores [R, bs] per unit
        if plan.k.absorbed:
            qref = r["q"]  # [1, 1, R, Wkp]: W_h q for every query head, in the absorbed key space
            if plan.k.chip_layers == 0:
                n, cw = -(-plan.k.lat // plan.k.bl), plan.k.bl

                def step(i, s):
                    return s + _mm_t(qref[0, 0, :, pl.ds(i * cw, cw)], load_latent("k", s0, valid, i * cw, cw))
            else:
                src = latent_chunks("k", s0, valid)
                n, cw = -(-plan.k.hidden // plan.k.bh), plan.k.bh

                def step(i, s):
                    return s + _mm_t(qref[0, 0, :, pl.ds(i * cw, cw)], hidden_block("k", src, i * cw, cw))
            scores = (_chunk_loop(n, step, jnp.zeros((plan.rows, bs), f32)),)
        else:
            keys = decode_tile("k", latent_chunks("k", s0, valid), plan.parts)
            if plan.rope:
                angle = slot.astype(f32)[:, None] * inv_freq[None, :]  # [bs, D/2]
                cos, sin = jnp.cos(angle), jnp.sin(angle)
                keys = tuple((k1 * cos - k2 * sin, k2 * cos + k1 * sin) for k1, k2 in keys)
            scores = []
            for u in range(plan.units):
                s = jnp.zeros((plan.rows, bs), f32)
                for p in range(plan.parts):
                    s = s + _mm_t(q[u][p], keys[u][p].astype(cdt))
                scores.append(s)

        # ---- values [bs, dv_block] per unit
        if plan.v.absorbed:
            c0 = vblk * plan.dv_block
            if plan.v.chip_layers == 0:
                xv = load_latent("v", s0, valid, c0, plan.dv_block)
            else:
                xv = hidden_block("v", latent_chunks("v", s0, valid), c0, plan.dv_block)
            values = (xv,) * plan.units
        else:
            values = tuple(y[0].astype(cdt) for y in decode_tile("v", latent_chunks("v", s0, valid), 1))

        # ---- online softmax
        new = []
        for u in range(plan.units):
            m_prev, l_prev, acc = carry[u]
            s = jnp.where(valid[None, :], scores[u], -jnp.inf)
            m_next = jnp.maximum(m_prev, s.max(axis=1))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - m_next[:, None])  # [R, bs]
            l_next = alpha * l_prev + p.sum(axis=1)
            acc = alpha[:, None] * acc + _mm(p.astype(cdt), values[u])
            new.append((m_next, l_next, acc))
        return tuple(new)

    init = tuple((jnp.full((plan.rows,), _NEG_INIT, f32), jnp.zeros((plan.rows,), f32),
                  jnp.zeros((plan.rows, plan.dv_block), f32)) for _ in range(plan.units))
    final = lax.fori_loop(0, n_tiles, body, init)
    for u, (m_i, l_i, acc) in enumerate(final):
        r["o"][u] = acc
        r["m"][u] = m_i
        r["l"][u] = l_i


def combine_splits(o, m, l):
    """Log-sum-exp combination of flash-decoding splits along axis 2: o [B, U, NS, R, D] (unnormalized),
    m, l [B, U, NS, R] (running max and sum per split) -> [B, U, R, D]. An empty split (m at its finite
    start, l = 0) gets weight 0."""
    w = jnp.exp(m - m.max(axis=2, keepdims=True))  # [B, U, NS, R]
    return (o * w[..., None]).sum(axis=2) / (l * w).sum(axis=2)[..., None]


def _pad_to(x, axis, size):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _compute_dtype(q, lat):
    if jnp.issubdtype(lat.dtype, jnp.floating):
        return jnp.dtype(lat.dtype)
    return jnp.dtype(q.dtype) if jnp.dtype(q.dtype) in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.float32)


def _last_layer(w, b, *, num_kv_heads, parts, lead_pad, cdt):
    """Final decoder layer w [in, K*D], b [K*D] -> per-head blocks [K, P, in_p, D/P], [K, P, D/P]."""
    n_in = w.shape[0]
    d = w.shape[1] // num_kv_heads
    w = w.astype(jnp.float32).reshape(n_in, num_kv_heads, parts, d // parts)
    w = _pad_to(jnp.transpose(w, (1, 2, 0, 3)), 2, lead_pad).astype(cdt)
    b = b.astype(jnp.float32).reshape(num_kv_heads, parts, d // parts)
    return w, b


@functools.partial(jax.jit, static_argnames=("pre_rope", "rope_theta", "config", "interpret"))
def decompress_attend(q, k_lat, v_lat, lengths, k_dec, v_dec, *, k_scale=None, k_min=None, v_scale=None,
                      v_min=None, pre_rope: bool = False, rope_theta: float = 10000.0,
                      config: Config | None = None, interpret: bool = False):
    """Fused decode attention over the compressed cache (semantics of ``reference``).

    q: [B, H, D]; k_lat: [B, S, Lk]; v_lat: [B, S, Lv]; lengths: [B] int32 (>= 1); k_dec, v_dec: one or
    two linear layers ``[{"w": [in, out], "b": [out]}, ...]``. Returns [B, H, D] in q.dtype.
    """
    plgpu = _triton()
    f32 = jnp.float32
    bsz, n_heads, d = q.shape
    _, s_len, lk = k_lat.shape
    lv = v_lat.shape[2]
    if len(k_dec) not in (1, 2) or len(v_dec) not in (1, 2):
        raise NotImplementedError("the Pallas kernel supports decoders of one or two linear layers")
    kvh = k_dec[-1]["w"].shape[1] // d
    if kvh * d != k_dec[-1]["w"].shape[1] or n_heads % kvh:
        raise ValueError(f"decoder width {k_dec[-1]['w'].shape[1]} is not K*D with K dividing H={n_heads}")
    g = n_heads // kvh
    if d < 16 or d & (d - 1) or (pre_rope and d < 32):
        raise ValueError(f"the Pallas kernel needs a power-of-two head_dim >= 16 (>= 32 with pre_rope), got {d}")
    hk = k_dec[0]["w"].shape[1] if len(k_dec) == 2 else 0
    hv = v_dec[0]["w"].shape[1] if len(v_dec) == 2 else 0
    cfg = config or default_config(bsz, s_len, num_kv_heads=kvh, latent_k=lk, latent_v=lv, hidden_k=hk,
                                   hidden_v=hv, pre_rope=pre_rope)
    keys_abs, values_abs = choose_absorption(k_layers=len(k_dec), v_layers=len(v_dec), hidden_k=hk, hidden_v=hv,
                                             pre_rope=pre_rope, absorb_values=cfg.absorb_values)
    cdt = _compute_dtype(q, k_lat)

    def side(lat, n_layers, hidden, absorbed, int8):
        lat_p = next_pow2(lat)
        hid_p = next_pow2(hidden) if hidden else 0
        return _Side(absorbed=absorbed, chip_layers=n_layers - int(absorbed), lat=lat, lat_p=lat_p,
                     bl=min(cfg.block_l or lat_p, lat_p), hidden=hidden,
                     bh=min(cfg.block_hidden or hid_p, hid_p) if hidden else 0, int8=int8)

    ks = side(lk, len(k_dec), hk, keys_abs, not jnp.issubdtype(k_lat.dtype, jnp.floating))
    vs = side(lv, len(v_dec), hv, values_abs, not jnp.issubdtype(v_lat.dtype, jnp.floating))
    bs = cfg.block_s
    split_len = -(-(-(-s_len // cfg.num_splits)) // bs) * bs
    n_splits = -(-s_len // split_len)
    qf = q.astype(f32).reshape(bsz, kvh, g, d) * (1.0 / math.sqrt(d))

    names, args, specs = [], [], []

    def add(name, arr, block, index_map):
        names.append(name)
        args.append(arr)
        specs.append(pl.BlockSpec(block, index_map))

    add("lengths", lengths.astype(jnp.int32), (None,), lambda vi, gi, b, j: (b,))

    # ---- queries
    if keys_abs:
        units, rows, parts, n_groups = 1, next_pow2(n_heads), 1, 1
        wk, wk_p = (hk, next_pow2(hk)) if hk else (lk, ks.lat_p)
        w_last = k_dec[-1]["w"].astype(f32).reshape(wk, kvh, d)
        q_abs = jnp.einsum("bkgd,wkd->bkgw", qf, w_last, precision="highest").reshape(bsz, n_heads, wk)
        q_abs = _pad_to(_pad_to(q_abs, 1, rows), 2, wk_p).astype(cdt)
        add("q", q_abs[:, None, None], (None, 1, 1, rows, wk_p), lambda vi, gi, b, j: (b, 0, 0, 0, 0))
        dq = wk_p
    else:
        units = cfg.kv_heads_per_program
        if kvh % units:
            raise ValueError(f"Config.kv_heads_per_program={units} must divide K={kvh}")
        rows, parts = next_pow2(g), (2 if pre_rope else 1)
        n_groups = kvh // units
        dq = d // parts
        qp = _pad_to(qf, 2, rows).reshape(bsz, kvh, rows, parts, dq).transpose(0, 1, 3, 2, 4).astype(cdt)
        add("q", qp, (None, units, parts, rows, dq), lambda vi, gi, b, j: (b, gi, 0, 0, 0))

    # ---- latents (never copied: loads are masked)
    for name, lat, sd, sc, mn in (("k", k_lat, ks, k_scale, k_min), ("v", v_lat, vs, v_scale, v_min)):
        add(name + "_lat", lat, (None, s_len, lat.shape[2]), lambda vi, gi, b, j: (b, 0, 0))
        if sd.int8:
            add(name + "_scale", sc, (None, s_len), lambda vi, gi, b, j: (b, 0))
            add(name + "_min", mn, (None, s_len), lambda vi, gi, b, j: (b, 0))

    # ---- decoder weights for the on-chip layers (zero-padded to powers of two, in cdt)
    for name, layers, sd, parts_ in (("k", k_dec, ks, parts), ("v", v_dec, vs, 1)):
        if sd.hidden and (not sd.absorbed or sd.chip_layers == 1):
            hid_p = next_pow2(sd.hidden)
            w1 = _pad_to(_pad_to(layers[0]["w"].astype(f32), 0, sd.lat_p), 1, hid_p).astype(cdt)
            b1 = _pad_to(layers[0]["b"].astype(f32), 0, hid_p)
            add(name + "_w1", w1, w1.shape, lambda vi, gi, b_, j: (0, 0))
            add(name + "_b1", b1, b1.shape, lambda vi, gi, b_, j: (0,))
        if not sd.absorbed:
            w, b = _last_layer(layers[-1]["w"], layers[-1]["b"], num_kv_heads=kvh, parts=parts_,
                               lead_pad=next_pow2(sd.hidden) if sd.hidden else sd.lat_p, cdt=cdt)
            suffix = "_w2" if sd.hidden else "_w"
            add(name + suffix, w, (units,) + w.shape[1:], lambda vi, gi, b_, j: (gi, 0, 0, 0))
            add(name + suffix.replace("w", "b"), b, (units,) + b.shape[1:], lambda vi, gi, b_, j: (gi, 0, 0))
    if pre_rope:
        inv_freq = 1.0 / (rope_theta ** (jnp.arange(0, d, 2, dtype=f32) / d))  # [D/2], as the reference
        add("inv_freq", inv_freq, (d // 2,), lambda vi, gi, b, j: (0,))

    if values_abs:
        wv, wv_p = (hv, next_pow2(hv)) if hv else (lv, vs.lat_p)
        dv_total = wv_p
        dv_block = min(cfg.block_v or wv_p, wv_p)
    else:
        dv_total = dv_block = d

    plan = _Plan(k=ks, v=vs, rope=pre_rope, parts=parts, units=units, rows=rows, block_s=bs, split_len=split_len,
                 dq=dq, dv_block=dv_block, cdt=cdt.name)
    n_units_total = n_groups * units
    n_vblocks = dv_total // dv_block
    # Triton folds the leading grid dims into its x axis with the first fastest: programs that share a
    # latent tile (value blocks, then kv-head groups of one sequence and split) run side by side, so the
    # tile is read from HBM about once and then hit in L2.
    grid = (n_vblocks, n_groups, bsz, n_splits)
    out_shape = (
        jax.ShapeDtypeStruct((bsz, n_units_total, n_splits, rows, dv_total), f32),  # o (unnormalized)
        jax.ShapeDtypeStruct((bsz, n_units_total, n_vblocks, n_splits, rows), f32),  # m
        jax.ShapeDtypeStruct((bsz, n_units_total, n_vblocks, n_splits, rows), f32),  # l
    )
    out_specs = (
        pl.BlockSpec((None, units, None, rows, dv_block), lambda vi, gi, b, j: (b, gi, j, 0, vi)),
        pl.BlockSpec((None, units, None, None, rows), lambda vi, gi, b, j: (b, gi, vi, j, 0)),
        pl.BlockSpec((None, units, None, None, rows), lambda vi, gi, b, j: (b, gi, vi, j, 0)),
    )
    names += ["o", "m", "l"]
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, names=tuple(names), plan=plan),
        grid=grid,
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="decompress_attend",
    )(*args)

    # [B, U_total, NS, R, Dv] -> [B, U_total, R, Dv]; every value block computed the same statistics
    out = combine_splits(o, m[:, :, 0], l[:, :, 0])

    if keys_abs:  # [B, 1, R, Wvp] -> [B, K, G, Wvp]
        out = out[:, 0, :n_heads].reshape(bsz, kvh, g, dv_total)
    else:  # [B, K, R, Dv] -> [B, K, G, Dv]
        out = out[:, :, :g, :]
    if values_abs:  # the value decoder's last layer, once per query head
        w_last = v_dec[-1]["w"].astype(f32).reshape(wv, kvh, d)
        out = jnp.einsum("bkgw,wkd->bkgd", out[..., :wv], w_last, precision="highest")
        out = out + v_dec[-1]["b"].astype(f32).reshape(kvh, d)[None, :, None, :]
    return out.reshape(bsz, n_heads, d).astype(q.dtype)

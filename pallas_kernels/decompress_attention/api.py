"""Public entry points: ``decompress_attend`` (attention over the KV-CAR latent cache) and
``dense_attend`` (the same decode attention over an uncompressed cache, the baseline), each with an
``implementation=`` switch.

implementation:
  "pallas"        the fused Pallas kernel (Triton backend; interpreted when not on a GPU).
  "xla"           plain XLA: dequantize, decode every slot, rotate, attend (decode-then-attend).
  "xla_absorbed"  linear decoders with keys stored after RoPE only: XLA attention in latent space.
  "mosaic"        linear decoders, keys stored after RoPE, bf16/fp16 latents of at most ~224 columns: the
                  Pallas Mosaic GPU (Hopper) kernel, TMA-pipelined, wgmma in latent space
                  (``pallas_mosaic``; interpreted by jax's Mosaic GPU interpreter when not on a GPU).
  None            on a GPU: "xla_absorbed" where it applies and the latents are wide (K + V latent
                  >= ABSORB_MIN_WIDTH); else "mosaic" where that kernel covers the call; else "pallas".
                  "xla" elsewhere. Measured on the H100: at Llama-7B shape (latents 2048 + 2048) the
                  absorbed XLA path is 1.6-3.9x faster than the Triton kernel (results/kernels/sweep-2026-11-25;
                  the Mosaic kernel cannot hold latents that wide); at SmolLM2 shape (96 + 96) the Mosaic kernel
                  took less time than the Triton kernel in 14 of 16 cells (2-38% less below B=128; at B=128
                  12% / 3% less at 1k / 4k, 5% / 1% more at 16k / 32k; results/kernels/mosaic-2026-11-25).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.decompress_attention import reference
from pallas_kernels.decompress_attention.config import Config, MosaicConfig

Implementation = Literal["xla", "xla_absorbed", "pallas", "mosaic"]
ABSORB_MIN_WIDTH = 1024  # K + V latent width from which the absorbed XLA path beats the fused kernel


def on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def absorbable(k_dec, v_dec, pre_rope: bool) -> bool:
    """Whether attention can run in latent space: linear decoders, keys stored after RoPE."""
    return len(k_dec) == 1 and len(v_dec) == 1 and not pre_rope


def choose_implementation(k_dec, v_dec, pre_rope: bool, latent_width: int, gpu: bool,
                          mosaic_covers: bool = False) -> str:
    """What ``implementation=None`` runs for decoders ``k_dec``/``v_dec``, K + V latent width ``latent_width``
    and whether the Mosaic kernel covers the call (see the module docstring)."""
    if not gpu:
        return "xla"
    if absorbable(k_dec, v_dec, pre_rope) and latent_width >= ABSORB_MIN_WIDTH:
        return "xla_absorbed"
    return "mosaic" if mosaic_covers else "pallas"


def _resolve(implementation, interpret, choices=("xla", "pallas")):
    if implementation is None:
        implementation = "pallas" if on_gpu() else "xla"
    if implementation not in choices:
        raise ValueError(f"implementation={implementation!r}; choose from {choices}")
    if interpret is None:
        interpret = not on_gpu()
    return implementation, interpret


# ----------------------------------------------------------------------------------- XLA paths
def _precision(dtype):
    # XLA's default float32 matmul on recent GPUs is TF32; float32 inputs get full precision.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _leaky(x):
    return jnp.where(x >= 0, x, reference.LEAKY_SLOPE * x)


def _decode_xla(layers, z, cdt):
    """Decoder in the compute dtype with float32 accumulation: [B, S, L] -> [B, S, out] (cdt)."""
    x = z.astype(cdt)
    for i, lin in enumerate(layers):
        x = jnp.dot(x, lin["w"].astype(cdt), preferred_element_type=jnp.float32, precision=_precision(cdt))
        x = x + lin["b"].astype(jnp.float32)
        if i < len(layers) - 1:
            x = _leaky(x)
        x = x.astype(cdt)
    return x


def _dequant_xla(lat, scale, zmin, cdt):
    if jnp.issubdtype(lat.dtype, jnp.floating):
        return lat
    return reference.dequantize(lat, scale, zmin).astype(cdt)


def _gqa_xla(q, k, v, lengths, layout: str = "bskd"):
    """Masked GQA decode attention in XLA: q [B, H, D], k, v [B, S, K, D] (``layout="bskd"``) or head-major
    [B, K, S, D] (``"bksd"``) -> [B, H, D] (q.dtype)."""
    b, h, d = q.shape
    kvh, s_axis = (k.shape[2], 1) if layout == "bskd" else (k.shape[1], 2)
    qg = q.reshape(b, kvh, h // kvh, d)
    prec = _precision(q.dtype)
    scores = jnp.einsum(f"bkgd,{layout}->bkgs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32,
                        precision=prec)
    scores = scores * (1.0 / math.sqrt(d))
    valid = jnp.arange(k.shape[s_axis])[None, :] < lengths[:, None]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(f"bkgs,{layout}->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
    return out.reshape(b, h, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("pre_rope", "rope_theta"))
def decompress_attend_xla(q, k_lat, v_lat, lengths, k_dec, v_dec, *, k_scale=None, k_min=None, v_scale=None,
                          v_min=None, pre_rope=False, rope_theta=10000.0):
    """Decode-then-attend in XLA: materializes K, V [B, S, K, D] in the compute dtype."""
    cdt = q.dtype if jnp.issubdtype(k_lat.dtype, jnp.integer) else k_lat.dtype
    b, s = k_lat.shape[:2]
    d = q.shape[-1]
    kvh = k_dec[-1]["w"].shape[-1] // d
    k = _decode_xla(k_dec, _dequant_xla(k_lat, k_scale, k_min, cdt), cdt).reshape(b, s, kvh, d)
    v = _decode_xla(v_dec, _dequant_xla(v_lat, v_scale, v_min, cdt), cdt).reshape(b, s, kvh, d)
    if pre_rope:
        k = reference.rope_by_slot(k.astype(jnp.float32), rope_theta).astype(cdt)
    return _gqa_xla(q, k, v, lengths)


@jax.jit
def decompress_attend_xla_absorbed(q, k_lat, v_lat, lengths, k_dec, v_dec, *, k_scale=None, k_min=None,
                                   v_scale=None, v_min=None):
    """Linear decoders, keys stored after RoPE, in XLA: attention in latent space (the baseline the fused
    linear kernel must beat). q_lat = W_k,h q; scores = k_lat q_lat (the q.b_k term is constant over
    slots); out = (p @ v_lat) W_v,h + b_v."""
    if len(k_dec) != 1 or len(v_dec) != 1:
        raise ValueError("the absorbed XLA path needs linear decoders")
    cdt = q.dtype if jnp.issubdtype(k_lat.dtype, jnp.integer) else k_lat.dtype
    b, h, d = q.shape
    lk, lv = k_lat.shape[-1], v_lat.shape[-1]
    kvh = k_dec[0]["w"].shape[-1] // d
    g = h // kvh
    qg = q.astype(jnp.float32).reshape(b, kvh, g, d) * (1.0 / math.sqrt(d))
    prec = _precision(cdt)
    q_lat = jnp.einsum("bkgd,lkd->bkgl", qg, k_dec[0]["w"].astype(jnp.float32).reshape(lk, kvh, d),
                       precision="highest").astype(cdt)
    zk = _dequant_xla(k_lat, k_scale, k_min, cdt)
    zv = _dequant_xla(v_lat, v_scale, v_min, cdt)
    scores = jnp.einsum("bkgl,bsl->bkgs", q_lat, zk, preferred_element_type=jnp.float32, precision=prec)
    valid = jnp.arange(k_lat.shape[1])[None, :] < lengths[:, None]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    o_lat = jnp.einsum("bkgs,bsl->bkgl", p.astype(cdt), zv, preferred_element_type=jnp.float32, precision=prec)
    out = jnp.einsum("bkgl,lkd->bkgd", o_lat, v_dec[0]["w"].astype(jnp.float32).reshape(lv, kvh, d),
                     precision="highest")
    out = out + v_dec[0]["b"].astype(jnp.float32).reshape(kvh, d)[None, :, None, :]
    return out.reshape(b, h, d).astype(q.dtype)


_gqa_xla_jit = jax.jit(_gqa_xla, static_argnames=("layout",))


# ----------------------------------------------------------------------------------- public API
def decompress_attend(q, k_lat, v_lat, lengths, k_dec, v_dec, *, k_scale=None, k_min=None, v_scale=None,
                      v_min=None, pre_rope: bool = False, rope_theta: float = 10000.0,
                      implementation: Implementation | None = None, config: Config | MosaicConfig | None = None,
                      interpret: bool | None = None):
    """Decode attention of one new token per sequence over the KV-CAR compressed cache of one layer.

    q: [B, H, D] (after RoPE); k_lat: [B, S, Lk], v_lat: [B, S, Lv] (bf16/fp16/fp32, or int8 with
    k_scale/k_min, v_scale/v_min [B, S]: x = (q + 128) * scale + min); lengths: [B] int32 >= 1 (slot s of
    sequence b is attended iff s < lengths[b]); k_dec, v_dec: decoders ``[{"w": [in, out], "b": [out]},
    ...]`` with LeakyReLU(0.01) between layers, output width K*D head-major. ``pre_rope``: keys were
    stored before RoPE; slot s is rotated by position s after decoding.

    Returns [B, H, D] in q.dtype. ``config``: the kernel's tiling, a ``Config`` for "pallas" (default
    ``config.default_config``) or a ``MosaicConfig`` for "mosaic" (default ``config.default_mosaic_config``);
    ``interpret`` (Pallas) defaults to True off GPU.
    """
    if implementation is None:
        gpu = on_gpu()
        covers = False
        if gpu:
            from pallas_kernels.decompress_attention import pallas_mosaic
            covers = pallas_mosaic.supported(q, k_lat, v_lat, k_dec, v_dec, pre_rope) is None
        implementation = choose_implementation(k_dec, v_dec, pre_rope, k_lat.shape[-1] + v_lat.shape[-1], gpu,
                                               mosaic_covers=covers)
    implementation, interpret = _resolve(implementation, interpret, ("xla", "xla_absorbed", "pallas", "mosaic"))
    quant = dict(k_scale=k_scale, k_min=k_min, v_scale=v_scale, v_min=v_min)
    for side, lat in (("k", k_lat), ("v", v_lat)):
        if not jnp.issubdtype(lat.dtype, jnp.floating) and (quant[side + "_scale"] is None
                                                             or quant[side + "_min"] is None):
            raise ValueError(f"{side}_lat is {lat.dtype}: pass {side}_scale and {side}_min")
    if implementation == "xla":
        return decompress_attend_xla(q, k_lat, v_lat, lengths, k_dec, v_dec, pre_rope=pre_rope,
                                     rope_theta=rope_theta, **quant)
    if implementation == "xla_absorbed":
        if not absorbable(k_dec, v_dec, pre_rope):
            raise ValueError("implementation='xla_absorbed' needs linear decoders and keys stored after RoPE "
                             f"(got {len(k_dec)}/{len(v_dec)} decoder layers, pre_rope={pre_rope})")
        return decompress_attend_xla_absorbed(q, k_lat, v_lat, lengths, k_dec, v_dec, **quant)
    want = {"pallas": Config, "mosaic": MosaicConfig}.get(implementation)
    if config is not None and (want is None or not isinstance(config, want)):
        raise ValueError(f"config={config!r} does not fit implementation={implementation!r}"
                         + (f" (it takes a {want.__name__})" if want else " (it takes none)"))
    if implementation == "mosaic":
        if pre_rope:  # the kernel's own checks cover the rest; it takes no pre_rope argument
            raise ValueError("implementation='mosaic' needs keys stored after RoPE (pre_rope=True)")
        from pallas_kernels.decompress_attention import pallas_mosaic
        return pallas_mosaic.decompress_attend(q, k_lat, v_lat, lengths, k_dec, v_dec, config=config,
                                               interpret=interpret)
    from pallas_kernels.decompress_attention import pallas_triton
    return pallas_triton.decompress_attend(q, k_lat, v_lat, lengths, k_dec, v_dec, pre_rope=pre_rope,
                                           rope_theta=rope_theta, config=config, interpret=interpret, **quant)


def _jax_decode_attention():
    """jax's own Pallas (Triton) decode attention module, or None where it cannot be imported."""
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention
    except Exception:  # noqa: BLE001 - moved or removed upstream: fall back to XLA
        return None
    return decode_attention if hasattr(decode_attention, "gqa") else None


def _dense_splits(s: int, max_splits: int, max_block: int) -> tuple[int, int]:
    """(k_splits, block_k) for jax's decode kernel on S slots: each split a whole number of blocks and,
    where S allows, k_splits * block dividing S exactly (no padding copy of the cache); otherwise the
    smallest padding."""
    best = None
    for block in (b for b in (128, 64, 32, 16) if b <= max_block):
        n_blocks = -(-s // block)
        for splits in range(min(max_splits, n_blocks), 0, -1):
            if n_blocks % splits == 0:
                pad = n_blocks * block - s
                key = (pad, -splits * (block >= 64), -block)
                if best is None or key < best[0]:
                    best = (key, splits, block)
                break
    return best[1], best[2]


def dense_attend(q, k, v, lengths, *, implementation: Implementation | None = None,
                 interpret: bool | None = None, k_splits: int = 16, block_k: int = 128):
    """Decode attention over an uncompressed cache: q [B, H, D], k, v [B, S, K, D], lengths [B].

    "pallas" calls jax's ``jax.experimental.pallas.ops.gpu.decode_attention.gqa`` (split-K flash decoding;
    S is zero-padded to its split constraints when needed), "xla" an einsum-softmax-einsum. Returns
    [B, H, D] in q.dtype.
    """
    implementation, interpret = _resolve(implementation, interpret)
    mod = _jax_decode_attention() if implementation == "pallas" else None
    if mod is None:
        return _gqa_xla_jit(q, k, v, lengths)
    s = k.shape[1]
    k_splits, block = _dense_splits(s, k_splits, block_k)
    s_pad = -(-s // (k_splits * block)) * k_splits * block
    if s_pad != s:  # costs a copy of the cache: only when S is not a multiple of 16
        k = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    return mod.gqa(q, k, v, kv_seq_len=lengths.astype(jnp.int32), k_splits=k_splits, block_k=block,
                   interpret=interpret)

"""KV-CAR compressed cache: chosen layers store per-token autoencoder latents instead of K and V.

A compressed layer's state is ``{"k": [B, S, Lk], "v": [B, S, Lv]}`` in ``latent_dtype`` (for int8 also
``k_scale``, ``k_min``, ``v_scale``, ``v_min``: [B, S] float16; for int4 / int2 the latents are packed two /
four codes to a byte, ``k``: uint8 [B, S, Lk*bits/8], with float16 scale and minimum per group of
``latent_group`` latents, [B, S, Lk/latent_group], through :func:`kvjax.cache.quantized.quantize`).
:meth:`Autoencoder.round_trip` is what storage does to a latent; training (quantization-aware, with a
straight-through gradient) and the least-squares reuse fits go through it too. New K/V are encoded once when written;
attention reads decoded K/V. Other layers are stored densely. Keys are compressed *before* RoPE by
default (``pre_rope``) and rotated after decoding: pre-RoPE keys of a head share one subspace at every
position, while RoPE spreads them over position-dependent rotations that a fixed linear map cannot
follow (measured in results/autoencoder: see the README).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.registry import register
from kvjax.cache.quantized import dequantize, quantize
from kvjax.compressors.autoencoder import apply_coder, dequantize_int8, quantize_int8

LATENT_DTYPES = ("", "float32", "bfloat16", "float16", "int8", "int4", "int2")
PACKED_BITS = {"int4": 4, "int2": 2}  # latents packed below a byte, with per-group scales


@register("autoencoder")
@dataclasses.dataclass(frozen=True)
class Autoencoder(CacheMethod):
    """Settings. ``latent`` (keys) 0 means half of K*D; ``latent_v`` 0 means the same as the keys';
    ``hidden`` 0 means the linear variant; ``layers`` () means every layer; ``latent_dtype`` "" means ``dtype``;
    ``latent_group``: latents per int4 / int2 scale (0: the whole latent vector; int4 / int2 only)."""

    name = "autoencoder"
    latent: int = 0
    hidden: int = 0
    layers: tuple = ()
    latent_dtype: str = ""
    pre_rope: bool = True
    dtype: str = "float32"
    latent_v: int = 0
    kernel: str = "auto"  # decode attention: "auto" (fused Pallas kernel on GPU), "pallas" (Triton), "mosaic", "xla"
    latent_group: int = 0

    def __post_init__(self):
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"autoencoder latent_dtype={self.latent_dtype!r}; choose from {LATENT_DTYPES[1:]}")
        if self.kernel not in ("auto", "pallas", "mosaic", "xla"):
            raise ValueError(f"autoencoder kernel={self.kernel!r}; choose auto, pallas, mosaic or xla")
        if self.latent_group < 0 or (self.latent_group and self.latent_dtype not in PACKED_BITS):
            raise ValueError(f"autoencoder latent_group={self.latent_group} applies to latent_dtype int4 or int2 "
                             f"only and must be >= 0")
        if isinstance(self.layers, int):  # a single layer from the CLI parser
            object.__setattr__(self, "layers", (self.layers,))

    # ------------------------------------------------------------------ settings resolved against a model
    def latent_dim(self, cfg) -> int:
        """Latent width of K."""
        return self.latent or cfg.kv_width // 2

    def latent_v_dim(self, cfg) -> int:
        """Latent width of V."""
        return self.latent_v or self.latent_dim(cfg)

    def compressed_layers(self, cfg) -> tuple[int, ...]:
        return tuple(self.layers) if self.layers else tuple(range(cfg.n_layers))

    @property
    def storage_dtype(self) -> str:
        return self.latent_dtype or self.dtype

    @property
    def integer_latents(self) -> bool:
        """Latents stored as integer codes with scales (int8, int4, int2): training goes through the quantizer."""
        return bool(self.packed_bits) or self.storage_dtype == "int8"

    @property
    def packed_bits(self) -> int:
        """Bits per latent code when latents are packed below a byte (int4: 4, int2: 2), else 0."""
        return PACKED_BITS.get(self.storage_dtype, 0)

    def validate(self, cfg, params):
        layers = self.compressed_layers(cfg)
        bad = [l for l in layers if not 0 <= l < cfg.n_layers]
        if bad:
            raise ValueError(f"autoencoder layers {bad} out of range for a model with {cfg.n_layers} layers")
        for name, dim in (("latent", self.latent_dim(cfg)), ("latent_v", self.latent_v_dim(cfg))):
            if not 0 < dim <= cfg.kv_width:
                raise ValueError(f"autoencoder {name}={dim} must be in [1, K*D={cfg.kv_width}]")
            per_byte = 8 // self.packed_bits if self.packed_bits else 1
            if self.packed_bits and (dim % per_byte or dim % (self.latent_group or dim)):
                raise ValueError(f"autoencoder latent_dtype={self.storage_dtype}: {name}={dim} must be a multiple of "
                                 f"{per_byte} (codes per byte) and of latent_group={self.latent_group}")
        if params is None:
            raise ValueError("the autoencoder method needs trained compressor parameters (mparams); "
                             "train them with `python -m train.autoencoder` and load with kvjax.compressors.load_compressor")
        for l in layers:
            if str(l) not in params:
                raise ValueError(f"compressor parameters have no autoencoder for layer {l} "
                                 f"(they cover layers {sorted(int(k) for k in params)})")
            p = params[str(l)]
            for part, want in (("k", self.latent_dim(cfg)), ("v", self.latent_v_dim(cfg))):
                w_in, w_lat = p[part + "_enc"][0]["w"].shape[0], p[part + "_enc"][-1]["w"].shape[1]
                if w_in != cfg.kv_width or w_lat != want or p[part + "_dec"][-1]["w"].shape[1] != cfg.kv_width:
                    raise ValueError(f"compressor for layer {l} maps {part.upper()} {w_in} -> {w_lat}, but this model "
                                     f"has K*D={cfg.kv_width} and the method asks for latent {want}")

    # ------------------------------------------------------------------ state
    def init_layer(self, cfg, layer, batch, max_len):
        if layer not in self.compressed_layers(cfg):
            shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
            return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
        if self.packed_bits:
            state = {}
            for name, dim in (("k", self.latent_dim(cfg)), ("v", self.latent_v_dim(cfg))):
                n = dim // (self.latent_group or dim)
                state[name] = jnp.zeros((batch, max_len, dim * self.packed_bits // 8), jnp.uint8)
                state[name + "_scale"] = jnp.zeros((batch, max_len, n), jnp.float16)
                state[name + "_min"] = jnp.zeros((batch, max_len, n), jnp.float16)
            return state
        state = {"k": jnp.zeros((batch, max_len, self.latent_dim(cfg)), self.storage_dtype),
                 "v": jnp.zeros((batch, max_len, self.latent_v_dim(cfg)), self.storage_dtype)}
        if self.storage_dtype == "int8":
            for name in ("k_scale", "k_min", "v_scale", "v_min"):
                state[name] = jnp.zeros((batch, max_len), jnp.float16)
        return state

    def layer_bytes_per_token(self, cfg, layer):
        if layer not in self.compressed_layers(cfg):
            return 2 * cfg.kv_width * jnp.dtype(self.dtype).itemsize
        if self.packed_bits:
            dims = (self.latent_dim(cfg), self.latent_v_dim(cfg))  # codes, then a float16 scale + min per group
            return sum(d * self.packed_bits // 8 + 2 * 2 * (d // (self.latent_group or d)) for d in dims)
        per = (self.latent_dim(cfg) + self.latent_v_dim(cfg)) * jnp.dtype(self.storage_dtype).itemsize
        if self.storage_dtype == "int8":
            per += 2 * 2 * 2  # float16 scale and minimum, for K and for V
        return per

    # ------------------------------------------------------------------ write / read
    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        if layer not in self.compressed_layers(cfg):
            k = self.rotate_keys(cfg, k, positions)
            return {"k": write_at(state["k"], k, starts), "v": write_at(state["v"], v, starts)}
        if not self.pre_rope:
            k = self.rotate_keys(cfg, k, positions)
        b, t = k.shape[:2]
        p = params[str(layer)]
        zk = apply_coder(p["k_enc"], k.reshape(b, t, -1))
        zv = apply_coder(p["v_enc"], v.reshape(b, t, -1))
        new = dict(state)
        for name, z in (("k", zk), ("v", zv)):
            for suffix, x in self.store_latent(z).items():
                new[name + suffix] = write_at(state[name + suffix], x, starts)
        return new

    def store_latent(self, z) -> dict:
        """What the cache stores for latents z [..., L]: {"": latents or codes} plus, when quantized,
        {"_scale", "_min"} (float16)."""
        if self.packed_bits:
            q, scale, zmin = quantize(z, self.packed_bits, self.latent_group)
            return {"": q, "_scale": scale, "_min": zmin}
        if self.storage_dtype == "int8":
            q, scale, zmin = quantize_int8(z)
            return {"": q, "_scale": scale, "_min": zmin}
        return {"": z.astype(self.storage_dtype)}

    def load_latent(self, stored: dict):
        """Inverse of :meth:`store_latent`: float32 latents [..., L]."""
        if self.packed_bits:
            q = stored[""]
            return dequantize(q, stored["_scale"], stored["_min"], self.packed_bits, self.latent_group,
                              q.shape[-1] * 8 // self.packed_bits)
        if self.storage_dtype == "int8":
            return dequantize_int8(stored[""], stored["_scale"], stored["_min"])
        return stored[""].astype(jnp.float32)

    def round_trip(self, z):
        """Latents z [..., L] as attention reads them back from this cache (float32)."""
        return self.load_latent(self.store_latent(z))

    def latents(self, state):
        """Dequantized latents (zk, zv): [B, S, L] float32."""
        return tuple(self.load_latent({s: state[n + s] for s in ("", "_scale", "_min") if n + s in state})
                     for n in ("k", "v"))

    def use_kernel(self) -> bool:
        if self.kernel == "auto":
            import jax
            return jax.default_backend() == "gpu"
        return self.kernel in ("pallas", "mosaic")

    def attend(self, params, cfg, cache, layer, q, positions):
        """Decode steps (one new token) of compressed layers go through the fused decompress-and-attend
        kernel when ``use_kernel()``: it reads only latents. Everything else decodes, then attends."""
        if (q.shape[1] != 1 or layer not in self.compressed_layers(cfg) or not self.use_kernel()
                or self.packed_bits):  # the fused kernel reads float or int8 latents
            return super().attend(params, cfg, cache, layer, q, positions)
        return self.attend_latents(cfg, cache.layers[layer], params[str(layer)], q, positions)

    def attend_latents(self, cfg, state, p, q, positions):
        """One decode step of q: [B, 1, H, D] over the latents in ``state`` (a compressed layer's state),
        decoded by the coders ``p`` (one layer's), through a fused kernel. ``kernel="auto"`` takes the measured
        default of ``pallas_kernels.decompress_attention.api``: for linear decoders with keys stored after
        RoPE, the Mosaic GPU kernel on narrow bf16/fp16 latents and attention in latent space in XLA on wide
        ones; the Triton kernel otherwise. Returns [B, 1, H, D]."""
        from pallas_kernels.decompress_attention.api import decompress_attend

        quant = {}
        if self.storage_dtype == "int8":
            quant = {"k_scale": state["k_scale"], "k_min": state["k_min"],
                     "v_scale": state["v_scale"], "v_min": state["v_min"]}
        out = decompress_attend(q[:, 0], state["k"], state["v"], positions[:, 0] + 1, p["k_dec"], p["v_dec"],
                                pre_rope=self.pre_rope and cfg.uses_rope, rope_theta=cfg.rope_theta,
                                implementation=None if self.kernel == "auto" else self.kernel, **quant)
        return out[:, None].astype(q.dtype)

    def decode(self, cfg, p, zk, zv):
        """(k, v): [B, S, K, D] decoded from latents zk, zv: [B, S, L] by one layer's coders ``p``; keys
        after RoPE (rotated here when stored pre-RoPE; slot s holds position s)."""
        b, s = zk.shape[:2]
        k = apply_coder(p["k_dec"], zk).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        v = apply_coder(p["v_dec"], zv).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        if self.pre_rope:
            k = self.rotate_keys(cfg, k, self.slot_positions(b, s))
        return k, v

    def read_layer(self, params, cfg, cache, layer):
        state = cache.layers[layer]
        if layer not in self.compressed_layers(cfg):
            return state["k"], state["v"]
        return self.decode(cfg, params[str(layer)], *self.latents(state))

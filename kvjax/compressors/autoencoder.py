"""KV-CAR autoencoders: per layer, one for K and one for V, over the layer's K (or V) row of width K*D.

Training form (Flax): encoder ``Dense(hidden) -> BatchNorm -> LeakyReLU -> Dense(latent)``, decoder the
mirror image; ``hidden=0`` gives the linear variant ``Dense(latent)`` / ``Dense(K*D)``.
Inference form: BatchNorm folded into the Dense before it, so each coder is a list of ``{"w", "b"}``
linear layers with LeakyReLU between them — a plain pytree that the cache method and the kernels read.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LEAKY_SLOPE = 0.01  # PyTorch's LeakyReLU default, as in the paper's modules
BN_EPS = 1e-5
PARTS = ("k_enc", "k_dec", "v_enc", "v_dec")


class Coder(nn.Module):
    """One encoder or decoder: Dense layers of widths ``features``, BatchNorm + LeakyReLU between them."""

    features: Sequence[int]
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.features):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                if self.batch_norm:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=BN_EPS, name=f"bn_{i}")(x)
                x = nn.leaky_relu(x, LEAKY_SLOPE)
        return x


class LayerAutoencoders(nn.Module):
    """The four coders of one transformer layer."""

    width: int  # K * D
    latent: int  # latent width of K
    hidden: int = 0  # 0: linear variant
    latent_v: int = 0  # latent width of V (0: same as K)

    def setup(self):
        def widths(out):
            return (self.hidden, out) if self.hidden else (out,)

        self.k_enc = Coder(widths(self.latent), name="k_enc")
        self.v_enc = Coder(widths(self.latent_v or self.latent), name="v_enc")
        self.k_dec, self.v_dec = Coder(widths(self.width), name="k_dec"), Coder(widths(self.width), name="v_dec")

    def __call__(self, k, v, train: bool = False):
        """Round trip of k, v: [..., width]; returns (k_rec, v_rec, k_lat, v_lat)."""
        zk, zv = self.k_enc(k, train), self.v_enc(v, train)
        return self.k_dec(zk, train), self.v_dec(zv, train), zk, zv

    def encode(self, k, v, train: bool = False):
        return self.k_enc(k, train), self.v_enc(v, train)

    def decode(self, zk, zv, train: bool = False):
        return self.k_dec(zk, train), self.v_dec(zv, train)


def init_layer_variables(key, width: int, latent: int, hidden: int = 0, latent_v: int = 0):
    """Flax variables ({"params", "batch_stats"}) of one layer's four coders."""
    module = LayerAutoencoders(width, latent, hidden, latent_v)
    x = jnp.zeros((2, width), jnp.float32)
    return module.init(key, x, x, train=False)


# ------------------------------------------------------------------------------------- inference form
def fold_coder(params, batch_stats) -> list[dict]:
    """Folds BatchNorm into the preceding Dense: returns [{"w": [in, out], "b": [out]}, ...]."""
    layers, i = [], 0
    while f"dense_{i}" in params:
        w = jnp.asarray(params[f"dense_{i}"]["kernel"], jnp.float32)
        b = jnp.asarray(params[f"dense_{i}"]["bias"], jnp.float32)
        bn = f"bn_{i}"
        if bn in params:
            scale = params[bn]["scale"] * jax.lax.rsqrt(batch_stats[bn]["var"] + BN_EPS)
            w = w * scale[None, :]
            b = (b - batch_stats[bn]["mean"]) * scale + params[bn]["bias"]
        layers.append({"w": w, "b": b})
        i += 1
    return layers


def fold_variables(variables_by_layer: dict) -> dict:
    """{layer: flax variables} -> inference params {layer: {"k_enc": [...], "k_dec": [...], ...}}."""
    out = {}
    for layer, var in variables_by_layer.items():
        stats = var.get("batch_stats", {})
        out[layer] = {part: fold_coder(var["params"][part], stats.get(part, {})) for part in PARTS}
    return out


def apply_coder(layers: list[dict], x):
    """Linear layers with LeakyReLU between them; computes in float32, returns float32."""
    x = x.astype(jnp.float32)
    for i, lin in enumerate(layers):
        x = jnp.dot(x, lin["w"].astype(jnp.float32), preferred_element_type=jnp.float32) + lin["b"].astype(jnp.float32)
        if i < len(layers) - 1:
            x = jnp.where(x >= 0, x, LEAKY_SLOPE * x)
    return x


# ------------------------------------------------------------------------------------- quantized latents
def quantize_int8(z, scale_dtype=jnp.float16):
    """Asymmetric per-vector int8: z [..., L] -> (q int8 [..., L], scale [...], zmin [...]).

    z ≈ (q + 128) * scale + zmin. Scale and minimum are rounded to ``scale_dtype`` *before* quantizing,
    so dequantization uses exactly the stored values.
    """
    z = z.astype(jnp.float32)
    zmin = jnp.min(z, axis=-1).astype(scale_dtype)
    zmax = jnp.max(z, axis=-1)
    scale = ((zmax - zmin.astype(jnp.float32)) / 255.0).astype(scale_dtype)
    s = jnp.maximum(scale.astype(jnp.float32), 1e-8)[..., None]
    q = jnp.clip(jnp.round((z - zmin.astype(jnp.float32)[..., None]) / s), 0, 255) - 128
    return q.astype(jnp.int8), scale, zmin


def dequantize_int8(q, scale, zmin):
    return (q.astype(jnp.float32) + 128.0) * scale.astype(jnp.float32)[..., None] + zmin.astype(jnp.float32)[..., None]


def straight_through(round_trip, z):
    """``round_trip(z)`` in the forward pass, identity in the backward pass (quantization-aware training:
    ``round_trip`` is the cache's quantize-dequantize, e.g. ``Autoencoder.round_trip``)."""
    return z + jax.lax.stop_gradient(round_trip(z) - z)


# ------------------------------------------------------------------------------------- PCA init
def pca_linear_variables(variables, k_rows: np.ndarray, v_rows: np.ndarray, latent: int, latent_v: int = 0):
    """Sets a linear layer-autoencoder to the PCA of sample rows (encoder = top components, decoder =
    their transpose, mean folded into the biases). k_rows, v_rows: [N, width] float."""
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    for name, rows, latent in (("k", k_rows, latent), ("v", v_rows, latent_v or latent)):
        rows = np.asarray(rows, np.float64)
        mu = rows.mean(0)
        _, _, vt = np.linalg.svd(rows - mu, full_matrices=False)
        comp = vt[:latent].T  # [width, latent]
        params[f"{name}_enc"]["dense_0"] = {"kernel": jnp.asarray(comp, jnp.float32),
                                            "bias": jnp.asarray(-mu @ comp, jnp.float32)}
        params[f"{name}_dec"]["dense_0"] = {"kernel": jnp.asarray(comp.T, jnp.float32),
                                            "bias": jnp.asarray(mu, jnp.float32)}
    return {**variables, "params": params}

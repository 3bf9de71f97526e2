"""The one cache interface that every compression method implements.

A *method* is a frozen, hashable dataclass of settings (a static jit argument). Its learned parameters
(if any) are a separate pytree passed beside the model parameters. Per-sequence state lives in a
:class:`Cache`, an immutable pytree returned from every step.

The model talks to a method through one call per layer and never looks inside the cache::

    out, cache = method.write_attend(mparams, cfg, cache, layer, q, k, v, positions, seq_lens)

(q after RoPE, k before RoPE). Its default is the write-then-read order every storing method uses::

    cache = method.write(mparams, cfg, cache, layer, k, v, positions)   # k before RoPE
    out   = method.attend(mparams, cfg, cache, layer, q, positions)     # q after RoPE

so such a method overrides only the per-layer hooks (and ``attend`` when it reads differently).
Methods whose stored form of a token depends on when it arrived (KIVI's full-precision residual window,
MiniCache's cross-layer merge) override ``write_attend``: they need the exact K/V of the current tokens
beside the stored ones, and the real lengths ``seq_lens`` of right-padded rows (padding must not enter a
quantization group). Methods whose storage depends on the attention itself (eviction: which tokens to
keep) override ``write_attend`` and set ``write_then_read = False``.

``write`` receives keys *before* RoPE so that a method may store pre-RoPE keys (more compressible)
and rotate them when they are read; :meth:`CacheMethod.rotate_keys` is the helper for that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.config import ModelConfig
from kvjax.models.layers import attention, rope

Params = Any  # a method's learned parameters (pytree) or None


@struct.dataclass
class Cache:
    """Immutable KV cache: per-layer method state plus per-sequence lengths.

    layers:  tuple with one pytree per layer, laid out by the method.
    lengths: [B] int32, tokens already stored for each sequence (the next token's position).
    max_len: static sequence length the cache was made for (token slots for growing methods; eviction
             methods allocate fewer slots than this and may run past it).
    """

    layers: tuple
    lengths: jax.Array
    max_len: int = struct.field(pytree_node=False)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def nbytes(self) -> int:
        """Physical bytes of the stored K/V state (all layers; the lengths vector is not counted)."""
        return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.layers)))

    def set_layer(self, layer: int, state) -> "Cache":
        layers = list(self.layers)
        layers[layer] = state
        return self.replace(layers=tuple(layers))


def write_at(buf, new, starts, axis: int = 1):
    """Writes ``new`` [B, ..., T, ...] into ``buf`` [B, ..., S, ...] at per-sequence slot offsets
    ``starts`` [B] along ``axis`` (the slot axis of both; 1 by default)."""
    def one(b, n, s):
        idx = [0] * b.ndim
        idx[axis - 1] = s
        return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), tuple(idx))

    return jax.vmap(one)(buf, new, starts)


@dataclasses.dataclass(frozen=True)
class CacheMethod:
    """Base class: settings only. Subclasses override ``init_layer``, ``write_layer``, ``read_layer``
    and ``layer_bytes_per_token``; methods that read differently (fused kernels) override ``attend``;
    methods whose storage depends on the attention (eviction) override ``write_attend``."""

    name: ClassVar[str] = "base"
    # True when attention reads back exactly what was written, so one prefill over T tokens equals T
    # decode steps. False for order-dependent methods (eviction, MiniCache): a call attends its own
    # tokens exactly and only later calls read their stored form, so evaluators must compress a prefix
    # first (perplexity --protocol continue / decode; zero-shot in two calls).
    write_then_read: ClassVar[bool] = True
    # True when the cache holds a fixed number of slots and accepts any number of tokens (eviction):
    # evaluators size it by the prefix it compresses.
    fixed_capacity: ClassVar[bool] = False

    # --- lifecycle --------------------------------------------------------------------------------
    def init(self, cfg: ModelConfig, batch: int, max_len: int, params: Params = None) -> Cache:
        """Returns an empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"cache batch and max_len must be positive, got batch={batch}, max_len={max_len}")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        self.validate(cfg, params)
        layers = tuple(self.init_layer(cfg, layer, batch, max_len) for layer in range(cfg.n_layers))
        return Cache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32), max_len=max_len)

    def validate(self, cfg: ModelConfig, params: Params) -> None:
        """Raises a clear error when the settings or params do not fit ``cfg``."""

    # --- per-layer hooks (override) ---------------------------------------------------------------
    def init_layer(self, cfg: ModelConfig, layer: int, batch: int, max_len: int):
        raise NotImplementedError

    def write_layer(self, params: Params, cfg: ModelConfig, state, layer: int, k, v, positions, starts):
        """Returns the layer's new state after storing k, v: [B, T, K, D] (k before RoPE)."""
        raise NotImplementedError

    def read_layer(self, params: Params, cfg: ModelConfig, cache: Cache, layer: int):
        """Returns (k, v): [B, S, K, D], k after RoPE, in a float dtype attention can use."""
        raise NotImplementedError

    def layer_bytes_per_token(self, cfg: ModelConfig, layer: int) -> int:
        raise NotImplementedError

    # --- the interface the model calls ------------------------------------------------------------
    def write(self, params: Params, cfg: ModelConfig, cache: Cache, layer: int, k, v, positions) -> Cache:
        """Stores new K/V of ``layer``. k, v: [B, T, K, D] (k before RoPE); positions: [B, T]."""
        state = self.write_layer(params, cfg, cache.layers[layer], layer, k, v, positions, positions[:, 0])
        return cache.set_layer(layer, state)

    def write_attend(self, params: Params, cfg: ModelConfig, cache: Cache, layer: int, q, k, v, positions,
                     seq_lens=None):
        """Stores the new K/V of ``layer`` and attends over the layer's cache: the one call the model makes.

        q: [B, T, H, D] (after RoPE); k, v: [B, T, K, D] (k before RoPE); positions: [B, T];
        seq_lens: [B] real tokens of each row (right padding beyond it), default T.
        Returns (out [B, T, H, D], cache). The default is :meth:`write` then :meth:`attend`."""
        cache = self.write(params, cfg, cache, layer, k, v, positions)
        return self.attend(params, cfg, cache, layer, q, positions), cache

    def attend(self, params: Params, cfg: ModelConfig, cache: Cache, layer: int, q, positions):
        """Attention of q: [B, T, H, D] (after RoPE) over what ``layer`` has stored. Returns [B, T, H, D]."""
        k, v = self.read_layer(params, cfg, cache, layer)
        return attention(q, k.astype(q.dtype), v.astype(q.dtype), positions)

    # --- accounting -------------------------------------------------------------------------------
    def bytes_per_token(self, cfg: ModelConfig) -> int:
        """Bytes stored per token slot over all layers (for methods whose cache grows with ``max_len``,
        ``cache.nbytes == bytes_per_token * B * max_len``)."""
        return sum(self.layer_bytes_per_token(cfg, layer) for layer in range(cfg.n_layers))

    def cache_nbytes(self, cfg: ModelConfig, batch: int, max_len: int) -> int:
        """Exact physical bytes of ``init(cfg, batch, max_len)``: the accounting every report uses.

        The default is ``bytes_per_token * batch * max_len``; methods with a fixed budget (eviction) or
        fixed-size extra buffers (a full-precision residual window) override it."""
        return self.bytes_per_token(cfg) * batch * max_len

    def kv_bytes_per_token(self, cfg: ModelConfig, context: int) -> float:
        """Bytes per token of context when ``context`` tokens are cached (``cache_nbytes / context``)."""
        return self.cache_nbytes(cfg, 1, context) / context

    @staticmethod
    def rotate_keys(cfg: ModelConfig, k, positions):
        """Applies the model's positional rotation to keys (identity for GPT-2)."""
        return rope(k, positions, cfg.rope_theta) if cfg.uses_rope else k

    @staticmethod
    def slot_positions(batch: int, max_len: int):
        """[B, S] positions of the cache slots (slot s holds position s)."""
        return jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))

"""Token eviction: a fixed number of slots per (sequence, kv head), filled with the tokens a policy keeps.

Three policies behind one mechanism:

* ``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``sinks`` tokens and the most recent ones.
  Kept keys keep their original positions (as kvpress does); the paper's re-indexing of positions within
  the cache, which matters only past the model's trained context, is not done.
* ``h2o`` (Heavy-Hitter Oracle, Zhang et al. 2023): the tokens with the largest attention accumulated over
  every query that has seen them ("heavy hitters"), plus a share ``recent`` of the slots for the most
  recent tokens.
* ``snapkv`` (Li et al. 2024): the tokens most attended by an observation window of the last ``window``
  queries, scores pooled over ``kernel`` neighbouring positions, plus the window itself.

Memory. Every layer's state holds ``C`` slots per (sequence, kv head), C = the capacity::

    k, v   [B, C, K, D]   keys after RoPE and values (``dtype``; or ``bits`` 8/4 codes [B, C, K, D*bits/8]
                          with fp16 scale and minimum [B, C, K, D/group], quantize / dequantize of
                          :mod:`kvjax.cache.quantized`)
    pos    [B, C, K]      int32 absolute position of the token in each slot (EMPTY for a free slot)
    score  [B, C, K]      float32 accumulated attention (h2o only)

C is ``min(budget, max_len)``, or ``int(max_len * (1 - ratio))``: ``ratio`` is the share of a
``max_len``-token context that is evicted (kvpress's ``compression_ratio``, which keeps
``int(n * (1 - ratio))`` of an n-token prompt). With ``per_row=true`` the ratio applies to each row's own
length: after a call, a row that has seen n tokens keeps at most ``int(n * (1 - ratio))`` of them (at least
the policy's minimum, at most C); the other slots are freed. That is kvpress's count for a batch of prompts
of different lengths (zero-shot scoring), where C alone would compress short prompts less. Positions and scores are real memory and are counted in
``cache_nbytes``. Keys are stored after RoPE with their positions, so attention masks causally by position
(slot order is irrelevant) and a kept key keeps its rotation.

Order. Each call of :meth:`Eviction.write_attend` with T new tokens (a prefill chunk, or one decode
token) does, per layer:

1. the T queries attend over the kept slots *and* the chunk's own T keys, causally by position, exactly
   (nothing of the chunk is evicted before its own queries have read it: the papers' "prompt in full, then
   compress" for a prefill, and "attend, then evict" for a decode step);
2. every candidate (the C kept slots and the chunk's real tokens; right padding never is one) gets the
   policy's score, computed from that attention where the policy needs it;
3. the C best candidates stay (per sequence and kv head), the rest are dropped.

So a prefill of T <= C tokens followed by decoding equals the dense cache exactly; a prefill of T > C
tokens compresses at its end. Consequence for evaluation: a forward's own predictions are never affected
by what it evicts; only later calls are (``eval.perplexity --protocol continue``).

Decode-time policy of snapkv (the paper compresses only the prompt): at every call the observation window
is the last ``window`` positions of the sequence, the scores come from the queries of the current call that
lie in it (one query per decode step), and the window's tokens are always kept; i.e. during decoding the
token the current query attends to least, among those older than the window, is evicted.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.cache.base import CacheMethod
from kvjax.cache.quantized import dequantize, quantize
from kvjax.cache.registry import register
from kvjax.models.layers import attend_values, attention_probs

EMPTY = 2 ** 30  # position of a free slot or a padding token: after every query, so never attended
_PROTECT = 1e7  # protected candidates score _PROTECT + position (exact in float32 below ~6.7M positions)


def _take(x, idx):
    """x [B, S, K, ...] gathered along S with per-(B, K) indices idx [B, C, K] -> [B, C, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=1)


def _pool_by_position(scores, pos, kernel: int):
    """Average of ``scores`` [B, S, K] over ``kernel`` neighbours in position order (zero padded at the
    ends, like ``avg_pool1d``), per (B, K); free slots (position EMPTY) sort last and score 0."""
    if kernel <= 1:
        return scores
    order = jnp.argsort(pos, axis=1)  # [B, S, K]
    s = jnp.take_along_axis(scores, order, axis=1)
    half = kernel // 2
    padded = jnp.pad(s, ((0, 0), (half, half), (0, 0)))
    pooled = sum(padded[:, i:i + s.shape[1]] for i in range(kernel)) / kernel
    return jnp.take_along_axis(pooled, jnp.argsort(order, axis=1), axis=1)


@dataclasses.dataclass(frozen=True)
class Eviction(CacheMethod):
    """Shared settings and mechanism; subclasses define :meth:`scores`.

    ratio:  share of a ``max_len`` context evicted, 0 <= ratio < 1 (capacity ``int(max_len * (1 - ratio))``);
    budget: slots per (sequence, kv head), instead of ``ratio`` (capacity ``min(budget, max_len)``);
    bits:   0 keeps K/V in ``dtype``; 8 or 4 stores the kept tokens quantized (per-group fp16 scale and min);
    group:  values per quantization group (0: the whole head vector);
    dtype:  storage dtype of K/V when ``bits`` is 0, and the dtype they are read in;
    per_row: ``ratio`` of each row's own length instead of ``max_len`` (see the module docstring).
    """

    name: ClassVar[str] = "eviction"
    write_then_read: ClassVar[bool] = False
    fixed_capacity: ClassVar[bool] = True
    keeps_scores: ClassVar[bool] = False  # an accumulated score per slot is part of the state

    ratio: float = 0.0
    budget: int = 0
    bits: int = 0
    group: int = 0
    dtype: str = "float32"
    per_row: bool = False

    def __post_init__(self):
        n = self.name
        if self.per_row and not self.ratio:
            raise ValueError(f"{n} per_row=true applies a ratio to each row's length: set ratio > 0")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"{n} ratio={self.ratio}: the share of the context evicted must be in [0, 1)")
        if self.budget < 0:
            raise ValueError(f"{n} budget={self.budget} must be a positive number of slots")
        if self.budget and self.ratio:
            raise ValueError(f"{n}: set ratio={self.ratio} or budget={self.budget}, not both")
        if self.bits not in (0, 4, 8):
            raise ValueError(f"{n} bits={self.bits}; choose 0 (no quantization), 8 or 4")
        if self.group < 0:
            raise ValueError(f"{n} group={self.group} must be >= 0")

    # ------------------------------------------------------------------ capacity and accounting
    def capacity(self, max_len: int) -> int:
        """Slots per (sequence, kv head) of a cache made for ``max_len`` tokens: ``min(budget, max_len)``, or
        ``int(max_len * (1 - ratio))`` raised to the policy's minimum (e.g. the sinks and one more token) where
        a short ``max_len`` would leave fewer. An explicit budget below the minimum is an error."""
        if self.budget:
            c = min(self.budget, max_len)
        else:
            c = max(int(max_len * (1.0 - self.ratio)), min(self.min_capacity(), max_len))
        if c < min(self.min_capacity(), max_len) or c < 1:
            raise ValueError(f"{self.name} keeps {c} slots of max_len={max_len} (ratio={self.ratio}, "
                             f"budget={self.budget}); it needs at least {self.min_capacity()}")
        return c

    def min_capacity(self) -> int:
        return 1

    def row_capacity(self, last, c: int):
        """Slots each row may keep after a call: [B] int32. ``last`` [B]: the row's last position (it has
        seen ``last + 1`` tokens); C for every row unless ``per_row``."""
        if not self.per_row:
            return jnp.full(last.shape, c, jnp.int32)
        keep = jnp.floor((last + 1).astype(jnp.float32) * (1.0 - self.ratio)).astype(jnp.int32)
        return jnp.clip(keep, min(self.min_capacity(), c), c)

    def validate(self, cfg, params):
        if self.bits:
            g = self.group or cfg.head_dim
            if cfg.head_dim % g or g % 2:
                raise ValueError(f"{self.name} group={self.group} must divide head_dim={cfg.head_dim} and be even")

    def _groups(self, cfg) -> int:
        return cfg.head_dim // (self.group or cfg.head_dim)

    def layer_bytes_per_token(self, cfg, layer):
        """Bytes of one slot (one token kept for every kv head), positions and scores included."""
        if self.bits:
            kv = 2 * (cfg.head_dim * self.bits // 8 + 2 * 2 * self._groups(cfg))
        else:
            kv = 2 * cfg.head_dim * jnp.dtype(self.dtype).itemsize
        return cfg.n_kv_heads * (kv + 4 + (4 if self.keeps_scores else 0))

    def cache_nbytes(self, cfg, batch, max_len):
        return self.bytes_per_token(cfg) * batch * self.capacity(max_len)

    # ------------------------------------------------------------------ state
    def init_layer(self, cfg, layer, batch, max_len):
        b, c, k, d = batch, self.capacity(max_len), cfg.n_kv_heads, cfg.head_dim
        state = {"pos": jnp.full((b, c, k), EMPTY, jnp.int32)}
        for name in ("k", "v"):
            if self.bits:
                state[name] = jnp.zeros((b, c, k, d * self.bits // 8), jnp.uint8)
                state[name + "_scale"] = jnp.zeros((b, c, k, self._groups(cfg)), jnp.float16)
                state[name + "_min"] = jnp.zeros((b, c, k, self._groups(cfg)), jnp.float16)
            else:
                state[name] = jnp.zeros((b, c, k, d), self.dtype)
        if self.keeps_scores:
            state["score"] = jnp.zeros((b, c, k), jnp.float32)
        return state

    def _encode(self, x):
        """[B, T, K, D] -> the stored leaves of one of k / v (a dict without the name prefix)."""
        if self.bits:
            codes, scale, lo = quantize(x, self.bits, self.group)
            return {"": codes, "_scale": scale, "_min": lo}
        return {"": x.astype(self.dtype)}

    def _decode(self, cfg, state, name):
        if self.bits:
            return dequantize(state[name], state[name + "_scale"], state[name + "_min"], self.bits, self.group,
                              cfg.head_dim).astype(self.dtype)
        return state[name]

    def read_layer(self, params, cfg, cache, layer):
        """Returns the kept (k, v): [B, C, K, D]; their positions are ``cache.layers[layer]["pos"]`` [B, C, K]."""
        state = cache.layers[layer]
        return self._decode(cfg, state, "k"), self._decode(cfg, state, "v")

    def write(self, params, cfg, cache, layer, k, v, positions):
        raise NotImplementedError(f"{self.name} stores what attention selects: call write_attend")

    def attend(self, params, cfg, cache, layer, q, positions):
        raise NotImplementedError(f"{self.name} stores what attention selects: call write_attend")

    # ------------------------------------------------------------------ the step
    def scores(self, probs, q_valid, pos, last, state, cap):
        """The policy: float32 [B, S, K] (higher is kept) over the S = C + T candidates.

        probs: [B, K, G, T, S] attention of the chunk's queries; q_valid: [B, T] real queries;
        pos: [B, S, K] candidate positions (EMPTY for none); last: [B] the last real position after the
        chunk; state: the layer's state before the chunk; cap: [B] slots each row keeps
        (:meth:`row_capacity`). Candidates scoring ``_PROTECT + position`` are kept first, newest first.
        Returns (scores, new per-slot score or None)."""
        raise NotImplementedError

    def write_attend(self, params, cfg, cache, layer, q, k, v, positions, seq_lens=None):
        """Attends the chunk's queries over the kept slots plus the chunk's own keys (exactly, causally by
        position), then keeps the policy's best C of those candidates. Shapes as in
        :meth:`CacheMethod.write_attend`; padding tokens (at or past ``seq_lens``) are never kept."""
        b, t, h, d = q.shape
        state = cache.layers[layer]
        if seq_lens is None:
            seq_lens = jnp.full((b,), t, jnp.int32)
        q_valid = jnp.arange(t)[None, :] < seq_lens[:, None]  # [B, T]
        k = self.rotate_keys(cfg, k, positions)
        new_pos = jnp.broadcast_to(jnp.where(q_valid, positions, EMPTY)[:, :, None], (b, t, cfg.n_kv_heads))
        pos = jnp.concatenate([state["pos"], new_pos], axis=1)  # [B, S, K], S = C + T
        old_k, old_v = self.read_layer(params, cfg, cache, layer)
        keys = jnp.concatenate([old_k.astype(q.dtype), k.astype(q.dtype)], axis=1)  # [B, S, K, D]
        vals = jnp.concatenate([old_v.astype(q.dtype), v.astype(q.dtype)], axis=1)
        probs = attention_probs(q, keys, positions, pos)  # [B, K, G, T, S]
        out = attend_values(probs, vals).reshape(b, t, h, d).astype(q.dtype)

        last = positions[:, 0] + seq_lens - 1  # [B]
        c = state["pos"].shape[1]
        cap = self.row_capacity(last, c)
        score, slot_score = self.scores(probs, q_valid, pos, last, state, cap)
        score = jnp.where(pos == EMPTY, -jnp.inf, score)
        idx = jnp.swapaxes(jax.lax.top_k(jnp.swapaxes(score, 1, 2), c)[1], 1, 2)  # [B, C, K], best first
        kept = jnp.arange(c)[None, :, None] < cap[:, None, None]  # a row's slots past its capacity are freed
        new = {"pos": jnp.where(kept, _take(pos, idx), EMPTY)}
        for name, x in (("k", k), ("v", v)):
            for suffix, leaf in self._encode(x).items():
                new[name + suffix] = _take(jnp.concatenate([state[name + suffix], leaf], axis=1), idx)
        if self.keeps_scores:
            new["score"] = _take(slot_score, idx)
        return out, cache.set_layer(layer, new)


def _received(probs, q_valid):
    """Attention each candidate received from the real queries of the chunk, summed over the G query
    heads of its kv head: [B, K, G, T, S] -> float32 [B, S, K]."""
    return jnp.einsum("bkgts,bt->bsk", probs, q_valid.astype(jnp.float32))


def _protect(score, protected, pos):
    return jnp.where(protected, _PROTECT + pos.astype(jnp.float32), score)


@register("streaming")
@dataclasses.dataclass(frozen=True)
class Streaming(Eviction):
    """StreamingLLM: keeps the first ``sinks`` tokens (attention sinks) and the most recent others."""

    name: ClassVar[str] = "streaming"
    sinks: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"streaming sinks={self.sinks} must be >= 0")

    def min_capacity(self):
        return self.sinks + 1  # room for the sinks and at least the newest token

    def scores(self, probs, q_valid, pos, last, state, cap):
        return _protect(pos.astype(jnp.float32), pos < self.sinks, pos), None


@register("h2o")
@dataclasses.dataclass(frozen=True)
class H2O(Eviction):
    """Heavy-Hitter Oracle: each slot accumulates the attention it receives from every later query (summed
    over the query heads of its kv head); ``recent`` (a share of the capacity) is reserved for the most
    recent tokens, the other slots go to the largest accumulated scores. ``normalize`` ranks by the mean
    instead of the sum (divides by the number of queries that have seen the token: kvpress's
    ObservedAttention; the plain sum favours old tokens, which more queries have seen)."""

    name: ClassVar[str] = "h2o"
    keeps_scores: ClassVar[bool] = True
    recent: float = 0.5
    normalize: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"h2o recent={self.recent}: the share of slots kept for recent tokens must be in [0, 1]")

    def scores(self, probs, q_valid, pos, last, state, cap):
        c = state["pos"].shape[1]
        acc = _received(probs, q_valid)
        acc = acc.at[:, :c].add(state["score"])  # [B, S, K] accumulated over every query so far
        rank = acc
        if self.normalize:
            seen = jnp.maximum(last[:, None, None] - pos + 1, 1).astype(jnp.float32)
            rank = acc / seen
        n_recent = jnp.floor(self.recent * cap.astype(jnp.float32)).astype(jnp.int32)  # [B]: of each row's slots
        return _protect(rank, pos > (last - n_recent)[:, None, None], pos), acc


@register("snapkv")
@dataclasses.dataclass(frozen=True)
class SnapKV(Eviction):
    """SnapKV: the last ``window`` positions are the observation window; every older candidate scores the
    attention it receives from the window's queries (of this call), averaged over ``kernel`` neighbouring
    positions (odd; 1 switches pooling off; the window's keys count as 0 there); the window's own tokens
    are always kept (the newest first when the window is larger than the capacity)."""

    name: ClassVar[str] = "snapkv"
    window: int = 64
    kernel: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"snapkv window={self.window} must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv kernel={self.kernel} must be odd and >= 1")

    def scores(self, probs, q_valid, pos, last, state, cap):
        q_pos = pos[:, state["pos"].shape[1]:, 0]  # [B, T] the chunk's positions (EMPTY on padding)
        observe = q_valid & (q_pos > last[:, None] - self.window)  # [B, T]
        in_window = pos > last[:, None, None] - self.window  # [B, S, K]
        # the window's keys are kept anyway and, as in the paper, take no part in the pooling
        s = jnp.where(in_window, 0.0, _received(probs, observe))
        s = _pool_by_position(s, pos, self.kernel)
        return _protect(s, in_window, pos), None

"""Prefill, decode and generation: jit-compiled, the cache threaded through and donated.

``prefill(params, cfg, tokens, cache) -> (logits, cache)`` and ``decode_step(params, cfg, tokens, cache)``
are thin jitted wrappers of :func:`kvjax.models.forward`; ``generate`` runs prefill and then one
``lax.while_loop`` of decode steps over a small state dataclass.

Command line: ``python -m kvjax.generate --model smollm2-135m --prompt "The capital of France is"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.base import Cache, CacheMethod
from kvjax.cache.dense import Dense
from kvjax.config import ModelConfig
from kvjax.models.transformer import forward, unembed


def _last_valid(logits, seq_lens):
    """[B, T, ...] (logits or hidden states) -> [B, ...] at each row's last real token."""
    idx = jnp.clip(seq_lens - 1, 0, logits.shape[1] - 1)
    return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]


def _prefill(params, cfg: ModelConfig, tokens, cache: Cache, *, method: CacheMethod = Dense(), mparams=None,
            seq_lens=None, all_logits: bool = False):
    """Writes a (right-padded) batch of prompts into the cache.

    tokens: [B, T] int; seq_lens: [B] real prompt lengths (default T). Returns (logits, cache): logits
    [B, V] at each row's last real token, or [B, T, V] when ``all_logits``.
    """
    b, t = tokens.shape
    if seq_lens is None:
        seq_lens = jnp.full((b,), t, jnp.int32)
    if all_logits:
        return forward(params, cfg, tokens, cache, method, mparams, seq_lens=seq_lens)
    # only the last real token's logits: unembed one position per row, not [B, T, V] (at B=256, T=2048
    # the full float32 logits of a 49k vocabulary would take 103 GB)
    hidden, cache = forward(params, cfg, tokens, cache, method, mparams, seq_lens=seq_lens, return_hidden=True)
    return unembed(params, cfg, _last_valid(hidden, seq_lens)[:, None])[:, 0], cache


def _decode_step(params, cfg: ModelConfig, tokens, cache: Cache, *, method: CacheMethod = Dense(), mparams=None):
    """One token per sequence. tokens: [B] int. Returns (logits [B, V] float32, cache)."""
    logits, cache = forward(params, cfg, tokens[:, None], cache, method, mparams)
    return logits[:, 0], cache


_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "method", "all_logits"), donate_argnames=("cache",))
decode_step = jax.jit(_decode_step, static_argnames=("cfg", "method"), donate_argnames=("cache",))


def prefill(params, cfg: ModelConfig, tokens, cache: Cache, **kwargs):
    """Jitted :func:`_prefill` behind checks of what is known before tracing (a window longer than the
    cache would otherwise be clamped silently by the slot writes; eviction methods take any length)."""
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill tokens must be [batch, T] with T >= 1, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > cache.max_len and not kwargs.get("method", Dense()).fixed_capacity:
        raise ValueError(f"prefill of {tokens.shape[1]} tokens does not fit a cache of max_len={cache.max_len}")
    if tokens.shape[0] != cache.batch:
        raise ValueError(f"prefill batch {tokens.shape[0]} != cache batch {cache.batch}")
    return _prefill_jit(params, cfg, tokens, cache, **kwargs)


prefill.__doc__ = _prefill.__doc__


# ---------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class Sampler:
    """Sampling settings: temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits, key):
        """logits [B, V] -> token ids [B] int32."""
        if self.temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
        neg = jnp.finfo(jnp.float32).min
        if self.top_k:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, neg, logits)
        if self.top_p < 1.0:
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < self.top_p
            cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < cutoff, neg, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@struct.dataclass
class _LoopState:
    step: jax.Array  # [] tokens generated so far
    done: jax.Array  # [B] bool
    last: jax.Array  # [B] the token to feed next
    out: jax.Array  # [B, N] generated tokens (pad after stop)
    n_out: jax.Array  # [B] generated tokens per row, stop token included
    cache: Cache
    key: jax.Array


@struct.dataclass
class Generation:
    tokens: jax.Array  # [B, max_new_tokens] generated ids; positions >= lengths hold pad_id
    lengths: jax.Array  # [B] number of generated tokens per row (a stop token counts)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "sampler", "stop_tokens", "pad_id",
                                             "max_len"))
def _generate(params, cfg, tokens, seq_lens, key, mparams, *, method, max_new_tokens, sampler, stop_tokens, pad_id,
              max_len):
    b = tokens.shape[0]
    cache = method.init(cfg, b, max_len, mparams)  # allocated inside the jit: no host round trip
    logits, cache = _prefill(params, cfg, tokens, cache, method=method, mparams=mparams, seq_lens=seq_lens)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def emit(state, logits):
        key, sub = jax.random.split(state.key)
        tok = sampler(logits, sub)
        tok = jnp.where(state.done, pad_id, tok)
        out = state.out.at[:, state.step].set(tok)
        n_out = state.n_out + (~state.done).astype(jnp.int32)
        done = state.done | jnp.isin(tok, stops)
        return state.replace(step=state.step + 1, done=done, last=tok, out=out, n_out=n_out, key=key)

    state = _LoopState(step=jnp.int32(0), done=jnp.zeros((b,), bool), last=jnp.zeros((b,), jnp.int32),
                       out=jnp.full((b, max_new_tokens), pad_id, jnp.int32), n_out=jnp.zeros((b,), jnp.int32),
                       cache=cache, key=key)
    state = emit(state, logits)

    def cond(s):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s):
        logits, cache = _decode_step(params, cfg, s.last, s.cache, method=method, mparams=mparams)
        return emit(s.replace(cache=cache), logits)

    state = jax.lax.while_loop(cond, body, state)
    return Generation(tokens=state.out, lengths=state.n_out)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-pads prompts into (tokens [B, T] int32, seq_lens [B] int32); empty prompts are an error."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
    t = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = np.asarray(p, np.int32)
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             method: CacheMethod = Dense(), mparams=None, sampler: Sampler = Sampler(),
             stop_tokens: Sequence[int] | None = None, seed: int = 0, max_len: int | None = None,
             pad_id: int = 0) -> Generation:
    """Generates up to ``max_new_tokens`` for each prompt (lists of token ids of any lengths).

    The cache holds ``max_len`` tokens (default: longest prompt + max_new_tokens). Rows stop at a stop
    token (default: the model's eos ids). Returns a :class:`Generation`.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    tokens, seq_lens = pad_prompts(prompts, pad_id)
    need = tokens.shape[1] + max_new_tokens
    max_len = max_len or need
    if need > max_len:
        raise ValueError(f"prompt of {tokens.shape[1]} tokens + {max_new_tokens} new tokens does not fit a cache "
                         f"of max_len={max_len}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"prompt of {tokens.shape[1]} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"context of {cfg.max_seq_len} tokens")
    bad = [(i, t) for i, p in enumerate(prompts) for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt {bad[0][0]} has token id {bad[0][1]} outside the vocabulary [0, {cfg.vocab_size})")
    stop = tuple(cfg.eos_token_ids if stop_tokens is None else stop_tokens)
    method.validate(cfg, mparams)
    return _generate(params, cfg, tokens, seq_lens, jax.random.PRNGKey(seed), mparams, method=method,
                     max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop, pad_id=pad_id, max_len=max_len)


def generate_text(model, prompts: Sequence[str], max_new_tokens: int = 32, **kwargs) -> list[str]:
    """Convenience over a :class:`kvjax.checkpoints.LoadedModel`: strings in, continuations out."""
    if model.tokenizer is None:
        raise ValueError(f"{model.source}: this checkpoint has no tokenizer; pass token ids to generate()")
    ids = [model.tokenizer.encode(p) for p in prompts]
    for i, (p, t) in enumerate(zip(prompts, ids)):
        if not t:
            raise ValueError(f"prompt {i} ({p!r}) is empty after tokenization")
    gen = generate(model.params, model.cfg, ids, max_new_tokens=max_new_tokens, **kwargs)
    toks, lens = np.asarray(gen.tokens), np.asarray(gen.lengths)
    return [model.tokenizer.decode(toks[i, : lens[i]].tolist(), skip_special=True) for i in range(len(prompts))]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kvjax.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="named model, .gguf file, or HF directory")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--method", default="dense", help="cache method, e.g. 'dense' or 'autoencoder:...'")
    ap.add_argument("--compressor", default=None, help="trained compressor checkpoint for the method")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)

    from kvjax.cache.registry import parse_method
    from kvjax.checkpoints import load

    t0 = time.perf_counter()
    model = load(args.model, dtype=args.dtype)
    method = parse_method(args.method)
    mparams = None
    if args.compressor:
        from kvjax.compressors import load_compressor
        method, mparams = load_compressor(args.compressor, model)
    t1 = time.perf_counter()
    outs = generate_text(model, args.prompt, args.max_new_tokens, method=method, mparams=mparams,
                         sampler=Sampler(args.temperature, args.top_k, args.top_p), seed=args.seed)
    t2 = time.perf_counter()
    for p, o in zip(args.prompt, outs):
        print(f"{p}\033[1m{o}\033[0m" if sys.stdout.isatty() else f"{p}{o}")
    n = max(len(model.tokenizer.encode(p)) for p in args.prompt) + args.max_new_tokens  # the cache's max_len
    cache_bytes = round(method.kv_bytes_per_token(model.cfg, n), 1)  # eviction: fewer slots than tokens
    dense_bytes = Dense(dtype=args.dtype).bytes_per_token(model.cfg)
    print(f"[kvjax] model={args.model} method={method.name} KV bytes/token={cache_bytes} "
          f"(dense {dense_bytes}, saved {100 * (1 - cache_bytes / dense_bytes):.1f}%) "
          f"load {t1 - t0:.1f}s generate {t2 - t1:.1f}s (includes compilation)", file=sys.stderr)


if __name__ == "__main__":
    main()

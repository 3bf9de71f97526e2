"""Perplexity measured through the cache, the way inference runs it.

The text is tokenized once, with no BOS, and cut into windows of ``context`` tokens. Every window starts
from an empty cache of the method under test (``method.init(cfg, B, context, mparams)``), and its logits
come from the model reading K/V back *through that method*: a lossy method's error shows up in the
perplexity exactly as it would at inference. Only full windows are scored; the tail shorter than one
window is dropped (its size is recorded).

Protocols:

* ``full`` (default): one prefill per window. Without ``--stride`` the windows do not overlap and every
  prediction inside a window is scored (``context - 1`` per window: the first token of a window has no
  context). With ``--stride S < context`` the windows slide by S; the first window scores all its
  predictions, every later one only its last S tokens (each then sees at least ``context - S`` tokens of
  context): the Hugging Face "perplexity of fixed-length models" convention, restricted to full windows.
* ``continue --prefix P`` (compress-then-continue, the kvpress protocol of ``shared/PEERS.md``):
  non-overlapping windows; the first P tokens are prefilled through the method, then the other
  ``context - P`` tokens are teacher-forced in one second forward call over that cache, and only those
  ``context - P`` tokens are scored (the first of them is predicted by the prefill's last logit).
* ``decode``: ``full`` fed one token per forward (``--chunk 1``): every token goes through the cache
  as one decode step (a ``lax.scan`` of single-token forward calls). For write-then-read methods and for
  KIVI this equals ``full``; methods that treat the tokens of one call differently from earlier ones
  (MiniCache merges a token only after the step that wrote it) must be measured this way.

The negative log-likelihood of every scored prediction is computed inside the jitted function (no
[B, T, V] logits come back to the host) and summed on the host in float64. With several devices the
window batch is sharded over them (kvjax.sharding); the last batch is padded and the pad rows masked out.

Eviction methods (``streaming``, ``h2o``, ``snapkv``: ``write_then_read = False``) depend on the order
tokens arrive in: a forward attends over what is kept *plus its own tokens exactly*, and evicts at its end.
One prefill of a whole window would therefore score nothing compressed, so protocol ``full`` takes them
only in chunks (``--chunk N``: each window is fed N tokens per forward, 1 being token-by-token decoding;
every chunk attends over what the earlier ones left plus itself). Their main protocol is ``continue``:
the prefix is prefilled and compressed at the end of prefill (the papers' and kvpress's order), then the
continuation attends over the compressed prefix plus its own tokens causally (kept exactly within that
forward, as kvpress does). Their cache is made for the prefix
(``method.init(cfg, B, P)``): ``ratio`` r keeps ``int(P * (1 - r))`` slots, kvpress's count, and the bytes
reported (``kv_bytes_at_context`` = P) are those slots, positions and scores included, over P tokens.

Command line::

    python -m eval.perplexity --model smollm2-135m --method dense --dataset wikitext2 --context 512 \\
        --json results/ppl_dense.json
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import Batcher, Model, device_record, kv_record, now
from kvjax.cache.dense import Dense
from kvjax.models.transformer import forward

PROTOCOLS = ("full", "continue", "decode")


def plan_windows(n_tokens: int, context: int, stride: int | None = None, protocol: str = "full",
                 prefix: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (starts [W] int, weights [W, context-1] float32): window w covers tokens
    ``starts[w] : starts[w] + context`` and ``weights[w, t]`` is 1 where the prediction of the window's
    token t+1 (from position t) is scored."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    stride = context if stride is None else int(stride)
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if n_tokens < context:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of {context}")
    if protocol == "continue":
        if prefix is None or not 1 <= prefix < context:
            raise ValueError(f"protocol continue needs 1 <= prefix < context={context}, got prefix={prefix}")
        if stride != context:
            raise ValueError("protocol continue uses non-overlapping windows; leave --stride unset")
        starts = np.arange(n_tokens // context) * context
        weights = np.zeros((len(starts), context - 1), np.float32)
        weights[:, prefix - 1:] = 1.0  # predictions of tokens prefix .. context-1
        return starts, weights
    if prefix is not None:
        raise ValueError("--prefix belongs to --protocol continue")
    if protocol == "decode" and stride != context:
        raise ValueError("protocol decode uses non-overlapping windows; leave --stride unset")
    starts = np.arange(1 + (n_tokens - context) // stride) * stride
    weights = np.zeros((len(starts), context - 1), np.float32)
    weights[0] = 1.0
    weights[1:, context - 1 - min(stride, context - 1):] = 1.0
    return starts, weights


def cache_len(method, context: int, prefix: int = 0) -> int:
    """max_len of the cache a window runs through: the window, or for an eviction method under the
    continue protocol the prefix it compresses (its slots are what the prefix keeps)."""
    return prefix if prefix and method.fixed_capacity else context


@functools.partial(jax.jit, static_argnames=("cfg", "method", "prefix", "chunk"))
def window_nll(params, mparams, tokens, weights, *, cfg, method, prefix: int = 0, chunk: int = 0):
    """NLL of each scored prediction. tokens: [B, C] int32; weights: [B, C-1]. Returns [B, C-1] float32
    (zero where not scored). ``prefix`` > 0 runs the window as prefill(tokens[:, :prefix]) and then one
    teacher-forced forward of the rest over that cache (for eviction methods: over the compressed prefix
    plus the rest's own tokens, causally; see :func:`cache_len` for the cache's size). ``chunk`` > 0 (with
    no prefix; C a multiple of it) feeds the window ``chunk`` tokens per forward instead of all at once."""
    b, c = tokens.shape
    cache = method.init(cfg, b, cache_len(method, c, prefix), mparams)
    if prefix:
        head, cache = forward(params, cfg, tokens[:, :prefix], cache, method, mparams)
        tail, _ = forward(params, cfg, tokens[:, prefix:], cache, method, mparams)
        logits = jnp.concatenate([head, tail], axis=1)[:, :-1]  # [B, C-1, V]
    elif chunk:
        def step(cache, tok):  # tok [B, chunk]
            lg, cache = forward(params, cfg, tok, cache, method, mparams)
            return cache, lg

        _, logits = jax.lax.scan(step, cache, jnp.swapaxes(tokens.reshape(b, c // chunk, chunk), 0, 1))
        logits = jnp.swapaxes(logits, 0, 1).reshape(b, c, -1)[:, :-1]
    else:
        logits, _ = forward(params, cfg, tokens, cache, method, mparams)
        logits = logits[:, :-1]
    targets = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (lse - picked) * weights


def perplexity(model, token_ids, method=None, mparams=None, *, context: int = 512, stride: int | None = None,
               batch: int = 8, protocol: str = "full", prefix: int | None = None, chunk: int | None = None,
               max_tokens: int | None = None,
               progress: bool = False, devices=None) -> dict:
    """Perplexity of ``token_ids`` (a 1-D sequence, no BOS) through ``method`` (default dense float32).

    model: a LoadedModel or (params, cfg). Returns a dict with ppl, nll (mean), nll_sum, tokens (scored),
    windows, the settings, KV bytes per token (method and dense in the model's dtype), kv_saved, wall_s
    and the device; see the module docstring for the protocols.
    """
    m = Model.of(model)
    cfg = m.cfg
    method = Dense() if method is None else method
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    n_input = int(ids.size)
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    if ids.size == 0:
        raise ValueError("no tokens to score (the text is empty)")
    if context > cfg.max_seq_len:
        raise ValueError(f"context {context} exceeds the model's max_seq_len of {cfg.max_seq_len}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids outside the vocabulary [0, {cfg.vocab_size})")
    starts, weights = plan_windows(int(ids.size), context, stride, protocol, prefix)
    if chunk is not None:
        if protocol != "full" or not 1 <= chunk < context or context % chunk:
            raise ValueError(f"chunk={chunk} needs protocol full and a divisor of context={context} below it")
    elif protocol == "full" and not method.write_then_read:
        raise ValueError(f"{method.name} attends the tokens of a forward exactly and compresses them for later "
                         f"calls, so one prefill per window scores nothing compressed: use protocol continue with "
                         f"a prefix, protocol decode, or protocol full with a chunk")
    method.validate(cfg, mparams)

    t0 = time.perf_counter()
    batcher = Batcher(batch, devices)
    bsz = batcher.batch
    params = batcher.params(m.params)
    mp = batcher.params(mparams)
    ids32 = ids.astype(np.int32)
    nll_sum, count = 0.0, 0.0
    from tqdm import tqdm
    bar = tqdm(total=len(starts), unit="win", desc=f"ppl {method.name}", disable=not progress, file=sys.stderr)
    for i in range(0, len(starts), bsz):
        s = starts[i: i + bsz]
        tok = np.zeros((bsz, context), np.int32)
        w = np.zeros((bsz, context - 1), np.float32)  # pad rows keep weight 0
        tok[: len(s)] = ids32[s[:, None] + np.arange(context)[None, :]]
        w[: len(s)] = weights[i: i + bsz]
        tok_d, w_d = batcher.shard((tok, w))
        nll = window_nll(params, mp, tok_d, w_d, cfg=cfg, method=method, prefix=prefix or 0,
                         chunk=1 if protocol == "decode" else (chunk or 0))
        nll_sum += float(np.asarray(nll, np.float64).sum())
        count += float(w.sum(dtype=np.float64))
        bar.update(len(s))
        if progress:
            bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    bar.close()
    wall = time.perf_counter() - t0

    per_window = jax.eval_shape(lambda p: method.init(cfg, 1, cache_len(method, context, prefix), p), mparams).nbytes
    mean = nll_sum / count
    out = {
        "ppl": math.exp(mean), "nll": mean, "nll_sum": nll_sum, "tokens": int(count), "windows": int(len(starts)),
        "input_tokens": n_input, "used_tokens": int(ids.size),
        "dropped_tail_tokens": int(ids.size - (starts[-1] + context)),
        "context": context, "stride": context if stride is None else int(stride), "protocol": protocol,
        "prefix": prefix if protocol == "continue" else None, "chunk": chunk, "batch": bsz,
        **kv_record(method, cfg, m.dtype, context=prefix if protocol == "continue" else context),
        "kv_cache_bytes_per_window": int(per_window),
        **m.record(), **device_record(), "wall_s": wall, "date": now(),
    }
    return out


def main(argv=None):
    from eval import data
    from eval.common import add_model_args, encode_no_bos, load_method, load_model, write_json

    ap = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "c4"])
    ap.add_argument("--split", default="test", choices=["test", "valid"], help="wikitext2 split")
    ap.add_argument("--text-file", default=None, help="score this UTF-8 file instead of --dataset")
    ap.add_argument("--context", type=int, default=512, help="window length in tokens")
    ap.add_argument("--stride", type=int, default=None, help="sliding windows: score the last S tokens of each")
    ap.add_argument("--protocol", default="full", choices=PROTOCOLS)
    ap.add_argument("--prefix", type=int, default=None, help="protocol continue: tokens prefilled per window")
    ap.add_argument("--chunk", type=int, default=None,
                    help="protocol full: feed each window N tokens per forward (needed by eviction methods)")
    ap.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward call")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    text = data.load_text(args.dataset, args.split, args.text_file, args.data_dir)
    model = load_model(args.model, args.dtype)
    if model.tokenizer is None:
        ap.error(f"{model.source} ships no tokenizer")
    method, mparams, spec = load_method(args.method, args.compressor, model)
    ids = encode_no_bos(model.tokenizer, text.text)
    res = perplexity(model, ids, method, mparams, context=args.context, stride=args.stride, batch=args.batch,
                     protocol=args.protocol, prefix=args.prefix, chunk=args.chunk, max_tokens=args.max_tokens,
                     progress=not args.no_progress)
    res.update(text.record())
    res.update({"method_arg": spec, "compressor": args.compressor, "library": "kvjax",
                "task": "perplexity", "total_wall_s": time.perf_counter() - t0})
    if args.json:
        write_json(args.json, res)
    print(f"[eval.perplexity] {res['model']} {spec} {res['dataset']} ctx={res['context']} stride={res['stride']} "
          f"{res['protocol']}{'' if res['prefix'] is None else ' prefix=%d' % res['prefix']}"
          f"{'' if res['chunk'] is None else ' chunk=%d' % res['chunk']}: "
          f"ppl {res['ppl']:.4f} over {res['tokens']:,} tokens ({res['windows']} windows); "
          f"KV {res['kv_bytes_per_token']} B/token, saved {100 * res['kv_saved']:.1f}%; "
          f"{res['wall_s']:.1f}s on {res['device_count']}x {res['device_kind']}")
    return res


if __name__ == "__main__":
    main()

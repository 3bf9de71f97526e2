"""Zero-shot multiple choice (PIQA, WinoGrande, user jsonl) scored through the cache method.

Conventions follow lm-evaluation-harness:

* Every option is a request ``(context, continuation)``; its score is the sum of the log-probabilities of
  the continuation's tokens given everything before them. ``acc`` picks the option with the highest sum;
  ``acc_norm`` divides each sum by the UTF-8 byte length of the choice text (without the delimiter; the
  harness divides by the character length, the same for ASCII text).
* PIQA: context ``"Question: {goal}\\nAnswer:"``, continuation ``" {sol}"``.
* WinoGrande (partial scoring): the sentence is split at ``_``; context_i = prefix + option_i and the
  shared continuation ``" " + (text after the blank, stripped)``; only the continuation is scored, so
  only ``acc`` is reported (``acc_norm`` is null: every option scores the same text).
* Tokenization (the harness's ``_encode_pair``): trailing whitespace of the context moves to the front of
  the continuation; ``whole = encode(context + continuation)``, ``n = len(encode(context))``; the model
  reads ``encode(context) + whole[n:]`` and exactly the tokens ``whole[n:]`` are scored. No BOS is added.

Requests run through a fresh cache of the method per batch (``method.init`` + one prefill with per-row
``seq_lens``). Rows are right-padded; lengths are rounded up to a multiple of ``bucket`` (default 32) so
that one compilation serves many batches; requests are sorted by length so batches are tight. With
several devices the batch is sharded over them (pad rows masked out). Eviction methods are refused: a
single prefill attends within itself exactly and would score nothing compressed.

Command line::

    python -m eval.zeroshot --model smollm2-135m --method dense --task piqa --limit 200 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval.common import Batcher, Model, device_record, encode_no_bos, kv_record, now
from eval.data import MultipleChoice, PartialChoice
from kvjax.cache.dense import Dense
from kvjax.models.transformer import forward


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids (context, continuation) as the harness splits them (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_no_bos(tokenizer, context + continuation)
    ctx = encode_no_bos(tokenizer, context)
    cont = whole[len(ctx):]
    if not ctx:
        raise ValueError(f"context {context!r} is empty after tokenization")
    if not cont:
        raise ValueError(f"continuation {continuation!r} has no tokens of its own after context {context!r}")
    return ctx, cont


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _score(params, mparams, inputs, targets, weights, seq_lens, *, cfg, method):
    """Log-probabilities of ``targets`` where ``weights`` is 1. inputs, targets, weights: [B, T];
    seq_lens: [B]. Returns (logprob [B, T] float32, zero elsewhere; greedy [B] bool: every scored target
    is the argmax)."""
    b, t = inputs.shape
    cache = method.init(cfg, b, t, mparams)
    logits, _ = forward(params, cfg, inputs, cache, method, mparams, seq_lens=seq_lens)
    return _scored(logits, targets, weights)


def _scored(logits, targets, weights):
    """(log-probability of each target where weights is 1, zero elsewhere [B, T]; greedy [B]: every scored
    target is the argmax)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return picked * weights, jnp.all(hit, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _score_two_phase(params, mparams, head, head_lens, tail, targets, weights, tail_lens, *, cfg, method):
    """For methods that attend a call's own tokens exactly (eviction, MiniCache: ``write_then_read`` False):
    the context but its last token in one prefill (compressed at its end, as kvpress compresses a prompt),
    then the last context token and the continuation but its last token in a second call over that cache,
    whose predictions are the scored ones. head [B, Th], tail/targets/weights [B, Tt], lengths [B]."""
    b = head.shape[0]
    cache = method.init(cfg, b, head.shape[1] + tail.shape[1], mparams)
    _, cache = forward(params, cfg, head, cache, method, mparams, seq_lens=head_lens)
    logits, _ = forward(params, cfg, tail, cache, method, mparams, seq_lens=tail_lens)
    return _scored(logits, targets, weights)


def check_two_phase(method):
    """Refuses what zero-shot through a prefix-compressing method cannot measure fairly."""
    if method.fixed_capacity and getattr(method, "ratio", 0) and not getattr(method, "per_row", False):
        raise ValueError(f"{method.name} ratio={method.ratio}: zero-shot requests differ in length; set "
                         f"per_row=true so that each request keeps int(n * (1 - ratio)) of its own tokens "
                         f"(kvpress's count) instead of a share of the longest request in its batch")


def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], method=None, mparams=None, *,
                   batch: int = 16, bucket: int = 32, progress: bool = False, devices=None):
    """Scores token-level requests ``(context_ids, continuation_ids)``.

    Returns (logprob float64 [N], n_scored int [N], greedy bool [N]) in the order of ``requests``.
    A request longer than the model's max_seq_len (context + continuation - 1 tokens read) is an error.
    Methods with ``write_then_read`` False (eviction, MiniCache) score in two calls per batch
    (:func:`_score_two_phase`): the context is compressed before the continuation reads it.
    """
    m = Model.of(model)
    cfg = m.cfg
    method = Dense() if method is None else method
    two_phase = not method.write_then_read
    if two_phase:
        check_two_phase(method)
    method.validate(cfg, mparams)
    n = len(requests)
    lens = np.array([len(c) + len(x) - 1 for c, x in requests], np.int64)
    for i, (c, x) in enumerate(requests):
        if not c or not x:
            raise ValueError(f"request {i} has an empty context or continuation")
        if lens[i] > cfg.max_seq_len:
            raise ValueError(f"request {i} reads {lens[i]} tokens, more than the model's max_seq_len "
                             f"{cfg.max_seq_len}")
        if min(min(c), min(x)) < 0 or max(max(c), max(x)) >= cfg.vocab_size:
            raise ValueError(f"request {i} has token ids outside the vocabulary [0, {cfg.vocab_size})")
        if two_phase and len(c) < 2:
            raise ValueError(f"request {i}: zero-shot through {method.name} compresses the context but its last "
                             f"token, so it needs at least 2 context tokens (got {len(c)})")
    batcher = Batcher(batch, devices)
    bsz = batcher.batch
    params, mp = batcher.params(m.params), batcher.params(mparams)
    order = np.argsort(-lens, kind="stable")  # longest first: tight batches, the largest compile first
    logprob = np.zeros(n, np.float64)
    greedy = np.zeros(n, bool)
    n_scored = np.array([len(x) for _, x in requests], np.int64)
    from tqdm import tqdm
    bar = tqdm(total=n, unit="req", desc=f"zeroshot {method.name}", disable=not progress, file=sys.stderr)
    score_batch = _two_phase_batch if two_phase else _one_phase_batch
    for i in range(0, n, bsz):
        idx = order[i: i + bsz]
        lp, gr = score_batch(params, mp, [requests[j] for j in idx], bsz, bucket, cfg, method, batcher)
        logprob[idx] = np.asarray(lp, np.float64).sum(axis=1)[: len(idx)]
        greedy[idx] = np.asarray(gr)[: len(idx)]
        bar.update(len(idx))
    bar.close()
    return logprob, n_scored, greedy


def _one_phase_batch(params, mp, reqs, bsz, bucket, cfg, method, batcher):
    """One padded batch of :func:`_score`: (logprob [bsz, T], greedy [bsz])."""
    t = min(-(-max(len(c) + len(x) - 1 for c, x in reqs) // bucket) * bucket, cfg.max_seq_len)
    inputs = np.zeros((bsz, t), np.int32)
    targets = np.zeros((bsz, t), np.int32)
    weights = np.zeros((bsz, t), np.float32)
    seq_lens = np.ones((bsz,), np.int32)
    for r, (ctx, cont) in enumerate(reqs):
        seq = np.asarray(list(ctx) + list(cont), np.int32)
        n = len(seq) - 1
        inputs[r, :n] = seq[:-1]
        targets[r, :n] = seq[1:]
        weights[r, len(ctx) - 1: n] = 1.0
        seq_lens[r] = n
    return _score(params, mp, *batcher.shard((inputs, targets, weights, seq_lens)), cfg=cfg, method=method)


def _two_phase_batch(params, mp, reqs, bsz, bucket, cfg, method, batcher):
    """One padded batch of :func:`_score_two_phase`: (logprob [bsz, Tt], greedy [bsz])."""
    def up(n):
        return -(-n // bucket) * bucket

    th, tt = max(len(c) - 1 for c, _ in reqs), max(len(x) for _, x in reqs)
    if up(th) + up(tt) <= cfg.max_seq_len:  # padded to buckets: fewer shapes to compile
        th, tt = up(th), up(tt)
    head = np.zeros((bsz, th), np.int32)
    tail = np.zeros((bsz, tt), np.int32)
    targets = np.zeros((bsz, tt), np.int32)
    weights = np.zeros((bsz, tt), np.float32)
    head_lens = np.ones((bsz,), np.int32)  # pad rows: one token, unscored
    tail_lens = np.ones((bsz,), np.int32)
    for r, (ctx, cont) in enumerate(reqs):
        head[r, :len(ctx) - 1] = ctx[:-1]
        tail[r, :len(cont)] = [ctx[-1]] + list(cont[:-1])
        targets[r, :len(cont)] = cont
        weights[r, :len(cont)] = 1.0
        head_lens[r], tail_lens[r] = len(ctx) - 1, len(cont)
    return _score_two_phase(params, mp, *batcher.shard((head, head_lens, tail, targets, weights, tail_lens)),
                            cfg=cfg, method=method)


def mean_request_tokens(reqs) -> int:
    """Mean tokens cached per request (context + continuation): the length at which zero-shot KV bytes are
    counted, so that methods with fixed-size parts (KIVI's full-precision window) are charged for them."""
    return max(1, round(sum(len(c) + len(x) for c, x in reqs) / max(len(reqs), 1)))


def build_requests(tokenizer, items) -> tuple[list[tuple[list[int], list[int]]], list[tuple[int, int]]]:
    """Token requests for ``items`` and, per item, the (start, count) of its requests in that list."""
    reqs, spans = [], []
    for it in items:
        start = len(reqs)
        if isinstance(it, MultipleChoice):
            for cont in it.continuations():
                reqs.append(encode_pair(tokenizer, it.context, cont))
        elif isinstance(it, PartialChoice):
            for ctx in it.contexts:
                reqs.append(encode_pair(tokenizer, ctx, it.continuation))
        else:
            raise TypeError(f"not a MultipleChoice or PartialChoice item: {it!r}")
        spans.append((start, len(reqs) - start))
    return reqs, spans


def evaluate(model, items, method=None, mparams=None, *, batch: int = 16, bucket: int = 32,
             progress: bool = False, devices=None, tokenizer=None) -> dict:
    """Accuracy of ``model`` through ``method`` on multiple-choice / partial-scoring ``items``.

    Returns a dict: acc, acc_stderr, acc_norm (None when any item is partial-scored), n, requests,
    predictions (chosen index per item), the KV record, device, wall_s.
    """
    m = Model.of(model)
    tok = tokenizer or m.tokenizer
    if tok is None:
        raise ValueError("zero-shot scoring needs a tokenizer")
    if not items:
        raise ValueError("no items to score")
    method = Dense() if method is None else method
    t0 = time.perf_counter()
    reqs, spans = build_requests(tok, items)
    ll, n_scored, greedy = loglikelihoods(m, reqs, method, mparams, batch=batch, bucket=bucket,
                                          progress=progress, devices=devices)
    correct, correct_norm, preds, partial = 0, 0, [], False
    for it, (s, k) in zip(items, spans):
        scores = ll[s: s + k]
        pred = int(np.argmax(scores))
        preds.append(pred)
        correct += pred == it.label
        if isinstance(it, MultipleChoice):
            nbytes = np.array([len(c.encode("utf-8")) for c in it.choices], np.float64)
            correct_norm += int(np.argmax(scores / nbytes)) == it.label
        else:
            partial = True
    n = len(items)
    acc = correct / n
    return {
        "acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None,
        "acc_norm": None if partial else correct_norm / n, "n": n, "requests": len(reqs),
        "scored_tokens": int(n_scored.sum()), "predictions": preds, "batch": Batcher(batch, devices).batch,
        "bucket": bucket, **kv_record(method, m.cfg, m.dtype, context=mean_request_tokens(reqs)), **m.record(),
        **device_record(),
        "wall_s": time.perf_counter() - t0, "date": now(),
    }


def main(argv=None):
    from eval import data
    from eval.common import add_model_args, load_method, load_model, write_json

    ap = argparse.ArgumentParser(prog="python -m eval.zeroshot", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--task", default="piqa", choices=["piqa", "winogrande"])
    ap.add_argument("--jsonl", default=None, help="score this multiple-choice jsonl instead of --task")
    ap.add_argument("--source", default="files", choices=["files", "tfds"], help="where piqa/winogrande come from")
    ap.add_argument("--limit", type=int, default=None, help="first N items only")
    ap.add_argument("--batch", type=int, default=16, help="requests per forward call")
    ap.add_argument("--bucket", type=int, default=32, help="round padded lengths up to a multiple of this")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ds = data.load_choices(args.task, args.jsonl, args.limit, args.data_dir, args.source)
    model = load_model(args.model, args.dtype)
    method, mparams, spec = load_method(args.method, args.compressor, model)
    res = evaluate(model, ds.items, method, mparams, batch=args.batch, bucket=args.bucket,
                   progress=not args.no_progress)
    res.update(ds.record())
    res.update({"method_arg": spec, "compressor": args.compressor, "limit": args.limit, "library": "kvjax",
                "total_wall_s": time.perf_counter() - t0})
    if args.json:
        write_json(args.json, res)
    norm = "n/a" if res["acc_norm"] is None else f"{res['acc_norm']:.4f}"
    print(f"[eval.zeroshot] {res['model']} {spec} {res['task']}: acc {res['acc']:.4f} "
          f"(± {res['acc_stderr'] or 0:.4f}) acc_norm {norm} over {res['n']} items; "
          f"KV {res['kv_bytes_per_token']} B/token, saved {100 * res['kv_saved']:.1f}%; {res['wall_s']:.1f}s")
    return res


if __name__ == "__main__":
    main()

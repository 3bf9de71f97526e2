"""Where a SmolLM2 decode step spends its time: cache layouts, one call vs a jitted loop, the XLA program.

``python -m bench.decode_profile --out DIR`` builds a SmolLM2-135M-shaped model with random bf16 weights
(the time of a decode step does not depend on the weight values, so no checkpoint is needed) and, for each
(batch, context) and each dense cache ``layout``:

* ``step``: one jitted ``decode_step`` call, timed from dispatch to ``block_until_ready`` (what
  bench/model_bench.py reports);
* ``loop``: ``n`` decode steps inside one jitted ``lax.fori_loop`` (as ``generate`` runs them), the time
  per token; the difference to ``step`` is host dispatch;
* the compiled program at one size: the number of kernels XLA launches per step and how many of them are
  transposes/copies of cache-sized arrays (written to DIR/hlo_*.txt);
* with ``--trace``, a perfetto trace of a few loop steps per layout, summarised per kernel name
  (DIR/kernels_*.json), so the time lost per kernel kind is visible.

Roofline per step = (weight bytes + KV bytes read) / 2.96 TB/s. Writes DIR/decode_profile.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

HBM_BYTES_PER_S = 2.96e12


def smollm2_config():
    from kvjax.config import ModelConfig

    return ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                       head_dim=64, d_ff=1536, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0,
                       tie_embeddings=True, name="smollm2-135m-shaped-random")


def decode_loop(params, cfg, tokens, cache, mparams=None, *, method, n: int):
    """``n`` greedy decode steps in one fori_loop; returns the last tokens and the final cache."""
    from kvjax.generate import _decode_step

    def body(_, carry):
        tok, c = carry
        logits, c = _decode_step(params, cfg, tok, c, method=method, mparams=mparams)
        return jnp.argmax(logits, -1).astype(jnp.int32), c

    return jax.lax.fori_loop(0, n, body, (tokens, cache))


decode_loop_jit = jax.jit(decode_loop, static_argnames=("cfg", "method", "n"), donate_argnames=("cache",))


def filled_cache(method, cfg, b, ctx, n):
    cache = method.init(cfg, b, ctx + n + 1)
    # slots hold zeros; the step time depends on the lengths, not on the values
    return cache.replace(lengths=jnp.full((b,), ctx, jnp.int32))


def hlo_summary(text: str) -> dict:
    """Counts the launched ops of the entry computation and the while body of a compiled program."""
    kinds = collections.Counter()
    big_copies = 0
    # the launched ops live in the ENTRY computation and in while bodies, not inside fused computations
    blocks, cur, name = {}, [], None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            name, cur = (("ENTRY" if head.group(1) else head.group(2)), [])
        elif line.startswith("}") and name:
            blocks[name] = cur
            name = None
        elif name:
            cur.append(line)
    launched = [l for n, b in blocks.items() if n == "ENTRY" or "body" in n or "region" in n for l in b]
    for line in launched:
        m = re.match(r"\s*(ROOT )?%?[\w.\-]+ = (\S+) (\w[\w\-]*)\(", line)
        if not m:
            continue
        shape, op = m.group(2), m.group(3)
        if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        kinds[op] += 1
        if op in ("copy", "transpose") and re.search(r"\[\d+,\d+,\d+,\d+\]", shape):
            dims = [int(x) for x in re.search(r"\[([\d,]+)\]", shape).group(1).split(",")]
            if np.prod(dims) >= 1 << 20:
                big_copies += 1
    fusion_kinds = collections.Counter(re.findall(r"kind=(k\w+)", text))
    return {"ops": dict(kinds.most_common()), "fusion_kinds": dict(fusion_kinds), "big_4d_copies": big_copies}


def trace_kernels(trace_dir: str) -> dict:
    """Sums device kernel time by name from a perfetto trace (jax.profiler create_perfetto_trace)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return {"error": "no perfetto trace written"}
    with gzip.open(files[0], "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events)
    pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if "gpu" not in pids.get(e["pid"], "").lower() and "/device:" not in pids.get(e["pid"], ""):
            continue
        name = re.sub(r"[._]\d+$", "", e.get("name", "?"))
        tot[name] += float(e["dur"])
        cnt[name] += 1
    top = [{"kernel": k, "total_us": round(v, 1), "count": cnt[k]} for k, v in tot.most_common(40)]
    return {"device_total_us": round(sum(tot.values()), 1), "top": top}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.decode_profile")
    ap.add_argument("--sizes", default="1x2048,16x2048,64x512,64x2048", help="BATCHxCONTEXT,...")
    ap.add_argument("--layouts", default="bskd,bksd")
    ap.add_argument("--n", type=int, default=16, help="decode steps per jitted loop")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--hlo-size", default="64x2048")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import kvjax
    from kvjax.generate import decode_step
    from kvjax.models.params import cast_params, init_params

    cfg = smollm2_config()
    params = cast_params(init_params(cfg, jax.random.PRNGKey(0)), jnp.bfloat16)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        b, ctx = (int(x) for x in size.split("x"))
        for layout in args.layouts.split(","):
            method = kvjax.get_method("dense", dtype="bfloat16", layout=layout)
            tokens = jnp.zeros((b,), jnp.int32)
            row = {"batch": b, "context": ctx, "layout": layout}
            try:
                # one decode_step call per timing (fresh copy of the cache each time: it is donated)
                base = filled_cache(method, cfg, b, ctx, args.n)
                ts = []
                for i in range(args.reps + 2):
                    c = jax.tree_util.tree_map(jnp.copy, base)
                    jax.block_until_ready(c)
                    t0 = time.perf_counter()
                    logits, c = decode_step(params, cfg, tokens, c, method=method)
                    jax.block_until_ready(logits)
                    if i >= 2:
                        ts.append(time.perf_counter() - t0)
                    del c
                row["step_s"] = statistics.median(ts)
                # n steps in one jitted loop
                ts = []
                for i in range(args.reps + 1):
                    c = jax.tree_util.tree_map(jnp.copy, base)
                    jax.block_until_ready(c)
                    t0 = time.perf_counter()
                    tok, c = decode_loop_jit(params, cfg, tokens, c, method=method, n=args.n)
                    jax.block_until_ready(tok)
                    if i >= 1:
                        ts.append((time.perf_counter() - t0) / args.n)
                    del c
                row["loop_step_s"] = statistics.median(ts)
                if size == args.hlo_size:
                    comp = decode_step.lower(params, cfg, tokens, base, method=method).compile()
                    text = comp.as_text()
                    row["hlo"] = hlo_summary(text)
                    if args.out:
                        with open(os.path.join(args.out, f"hlo_{layout}.txt"), "w") as f:
                            f.write(text)
                    if args.trace and args.out:
                        tdir = os.path.join("/tmp", f"trace_{layout}")
                        c = jax.tree_util.tree_map(jnp.copy, base)
                        jax.block_until_ready(c)
                        with jax.profiler.trace(tdir, create_perfetto_trace=True):
                            tok, c = decode_loop_jit(params, cfg, tokens, c, method=method, n=args.n)
                            jax.block_until_ready(tok)
                        summary = trace_kernels(tdir)
                        summary["steps"] = args.n
                        with open(os.path.join(args.out, f"kernels_{layout}.json"), "w") as f:
                            json.dump(summary, f, indent=1)
                        row["trace_device_us_per_step"] = summary.get("device_total_us", 0) / args.n
                del base
            except Exception as e:  # record and go on (out of memory at large sizes)
                if os.environ.get("KVJAX_DEBUG"):
                    raise
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            kv_bytes = method.bytes_per_token(cfg) * b * ctx
            row["roofline_s"] = (weight_bytes + kv_bytes) / HBM_BYTES_PER_S
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "hlo"}), flush=True)
            if "hlo" in row:
                print(json.dumps(row["hlo"]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps_per_loop": args.n,
            "weights": "random bf16, SmolLM2-135M shapes", "hbm_bytes_per_s": HBM_BYTES_PER_S}
    lines = ["# Decode-step profile (SmolLM2-135M shapes, dense bf16 cache)", "",
             f"{meta['date']}, {meta['device']}, jax {meta['jax']}, XLA_FLAGS='{meta['xla_flags']}'. "
             f"step = one decode_step call; loop = per token of {args.n} steps in one jitted fori_loop.", "",
             "| batch | context | layout | step ms | loop ms/token | roofline ms | loop / roofline | kernels/step | big copies |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['context']} | {r['layout']} | {r['error'][:60]} | | | | | |")
            continue
        h = r.get("hlo", {})
        nk = sum(v for k, v in h.get("ops", {}).items()) if h else ""
        lines.append(f"| {r['batch']} | {r['context']} | {r['layout']} | {1e3 * r['step_s']:.2f} | "
                     f"{1e3 * r['loop_step_s']:.3f} | {1e3 * r['roofline_s']:.3f} | "
                     f"{r['loop_step_s'] / r['roofline_s']:.1f}x | {nk} | {h.get('big_4d_copies', '')} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "decode_profile.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

"""SmolLM2 prefill and decode throughput against the HBM roofline.

``python -m bench.model_bench --out results/model_bench`` sweeps batch {1, 16, 64, 256} x context
{512, 2048}: prefill tokens/s (one jitted prefill of the whole context) and decode tokens/s (jitted
decode_step on a cache filled to the context), with the roofline of a decode step = (weight bytes +
KV bytes read) / measured HBM bandwidth. Writes JSON + a markdown table with date and device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

HBM_BYTES_PER_S = 2.96e12  # measured on the lent H100 (../shared/GPU.md)


def timeit(fn, reps: int):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.model_bench")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="dense", help="cache method spec (see kvjax.parse_method)")
    ap.add_argument("--compressor", default=None)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--loop-steps", type=int, default=16,
                    help="decode steps per jitted fori_loop for the loop columns (generate's way of decoding)")
    ap.add_argument("--kernel", default=None, help="override the method's decode kernel setting (e.g. xla, auto)")
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-135M shapes with random weights")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prefill in chunks of this many tokens (0: the whole context at once); the attention "
                         "scores of one chunk take B x H x chunk x S x 4 bytes")
    ap.add_argument("--align", type=int, default=256, help="round the cache length up to a multiple of this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import kvjax
    from bench.decode_profile import decode_loop_jit
    from kvjax.generate import decode_step, prefill

    if args.random_weights:  # decode speed does not depend on weight values: no checkpoint needed
        from bench.decode_profile import smollm2_config
        from kvjax.checkpoints import LoadedModel
        from kvjax.models.params import cast_params, init_params

        cfg = smollm2_config()
        model = LoadedModel(cfg=cfg, params=cast_params(init_params(cfg, jax.random.PRNGKey(0)), args.dtype),
                            tokenizer=None, source="random")
    else:
        model = kvjax.load(args.model, dtype=args.dtype)
    cfg, params = model.cfg, model.params
    method, mparams = kvjax.parse_method(args.method), None
    if args.compressor:
        from kvjax.compressors import load_compressor
        method, mparams = load_compressor(args.compressor, model, dtype=args.dtype)
    elif hasattr(method, "dtype"):
        import dataclasses
        method = dataclasses.replace(method, dtype=args.dtype)
    if args.kernel:
        import dataclasses
        if not any(f.name == "kernel" for f in dataclasses.fields(method)):
            raise SystemExit(f"--kernel: method {method.name!r} has no kernel setting")
        method = dataclasses.replace(method, kernel=args.kernel)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    rows = []
    for ctx in [int(x) for x in args.contexts.split(",")]:
        for b in [int(x) for x in args.batches.split(",")]:
            rng = np.random.default_rng(0)
            tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, ctx)), jnp.int32)
            try:
                chunk = args.prefill_chunk or ctx

                def run_prefill():
                    max_len = -(-(ctx + 1 + args.loop_steps) // args.align) * args.align
                    cache = method.init(cfg, b, max_len, mparams)
                    for i in range(0, ctx, chunk):  # chunks bound the [B, T, S] attention scores' memory
                        logits, cache = prefill(params, cfg, tokens[:, i:i + chunk], cache, method=method,
                                                mparams=mparams)
                    jax.block_until_ready(logits)
                    return cache

                t_pre = timeit(run_prefill, max(2, args.reps // 3))
                cache = run_prefill()
                nxt = tokens[:, -1]
                state = {"cache": cache}

                def run_decode():
                    # decode one token at position ctx (the cache is donated, so reset it from a copy)
                    c = jax.tree_util.tree_map(jnp.copy, cache)
                    jax.block_until_ready(c)
                    t0 = time.perf_counter()
                    logits, c = decode_step(params, cfg, nxt, c, method=method, mparams=mparams)
                    jax.block_until_ready(logits)
                    state["t"] = time.perf_counter() - t0

                ts = []
                run_decode()
                for _ in range(args.reps):
                    run_decode()
                    ts.append(state["t"])
                t_dec = statistics.median(ts)
                # the same steps as generate runs them: ``loop_steps`` tokens inside one jitted fori_loop
                ts = []
                for i in range(max(2, args.reps // 3) + 1):
                    c = jax.tree_util.tree_map(jnp.copy, cache)
                    jax.block_until_ready(c)
                    t0 = time.perf_counter()
                    tok, c = decode_loop_jit(params, cfg, nxt, c, method=method, mparams=mparams, n=args.loop_steps)
                    jax.block_until_ready(tok)
                    if i:
                        ts.append((time.perf_counter() - t0) / args.loop_steps)
                    del c
                t_loop = statistics.median(ts)
            except Exception as e:  # out of memory at the largest sizes: record and go on
                rows.append({"batch": b, "context": ctx, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(rows[-1], flush=True)
                continue
            kv_bytes = method.bytes_per_token(cfg) * b * ctx
            roof = (weight_bytes + kv_bytes) / HBM_BYTES_PER_S
            rows.append({"batch": b, "context": ctx, "prefill_tok_s": b * ctx / t_pre, "prefill_s": t_pre,
                         "decode_tok_s": b / t_dec, "decode_step_s": t_dec, "weight_bytes": weight_bytes,
                         "loop_decode_tok_s": b / t_loop, "loop_step_s": t_loop,
                         "kv_bytes_read": kv_bytes, "roofline_step_s": roof, "decode_vs_roofline": t_dec / roof,
                         "loop_vs_roofline": t_loop / roof})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "model": args.model + (" (random weights)" if args.random_weights else ""), "method": args.method if not args.compressor else f"compressor {args.compressor}", "kernel": args.kernel,
            "dtype": args.dtype,
            "prefill_chunk": args.prefill_chunk or None,
            "hbm_bytes_per_s": HBM_BYTES_PER_S}
    lines = [f"# Model throughput ({meta['model']}, {meta['method']}, {meta['dtype']})", "",
             f"{meta['date']}, {meta['device']}, jax {meta['jax']}. Roofline of a decode step = (weights + KV read) "
             f"/ {HBM_BYTES_PER_S / 1e12:.2f} TB/s.", "",
             "step = one decode_step call from the host; loop = per token of "
             f"{args.loop_steps} steps in one jitted fori_loop (as generate runs them).", "",
             "| batch | context | prefill tok/s | decode tok/s (step) | step ms | decode tok/s (loop) | loop ms | "
             "roofline ms | step / roofline | loop / roofline |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['context']} | {r['error'][:40]} | | | | | | | |")
        else:
            lines.append(f"| {r['batch']} | {r['context']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
                         f"{1e3 * r['decode_step_s']:.2f} | {r['loop_decode_tok_s']:,.0f} | "
                         f"{1e3 * r['loop_step_s']:.2f} | {1e3 * r['roofline_step_s']:.3f} | "
                         f"{r['decode_vs_roofline']:.1f}x | {r['loop_vs_roofline']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "model_bench.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "model_bench.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

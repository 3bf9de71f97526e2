"""How many tokens of KV cache fit in a memory budget, per method: computed exactly, optionally confirmed.

Budget = memory - parameter bytes (model + compressor, in the dtype loaded) - a stated reserve (for
activations, logits, the XLA workspace). Memory sizes are GiB (2**30 bytes). For each method:

* ``max_batch`` at ``--seq-len`` = floor(budget / bytes of one sequence of seq_len tokens), and
* ``max_seq_len`` at ``--batch`` = the longest length whose cache fits (also shown capped at the
  model's context length),

from ``method.cache_nbytes(cfg, batch, len)`` (= bytes_per_token * batch * len for methods that store
every token), which is checked against the ``nbytes`` of the cache that
``method.init`` would allocate (traced with ``jax.eval_shape``, nothing allocated): they must agree.

``--verify`` then allocates a cache of that size on the device, fills its lengths to the end and runs
jitted ``decode_step``s at that batch, timing decode tokens/s (median of several steps after warm-up,
``block_until_ready``). On CPU only a tiny size is run (it confirms the code path, not the capacity). The
JSON says, per method, what was confirmed on the device and what was only computed.

The device may not offer the whole budget: XLA's allocator gets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the GPU
(jax's default 0.75; ``--verify`` sets 0.95 unless the variable is set). Before allocating, the plan is checked
against the allocator's ``bytes_limit``: a cache that cannot fit there is not attempted (asking for more than
the limit made XLA's allocator retry for minutes), and the largest batch that does fit, with the same
reserve, is run instead and recorded as such (``verify.batch`` < ``max_batch``, ``confirmed`` false,
``confirmed_batch``).

Command line::

    python -m eval.capacity --model smollm2-135m --methods dense,dense:dtype=bfloat16 --memory-gb 80 \\
        --seq-len 4096 --batch 64 --verify --json results/capacity.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__" and "--verify" in sys.argv:  # before jax starts: let XLA's allocator use the GPU
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from eval.common import device_record, kv_record, method_spec, now, tree_bytes  # noqa: E402

GIB = 1 << 30


def cache_nbytes(method, cfg, batch: int, seq_len: int, mparams=None) -> int:
    """Bytes of the cache ``method.init`` would allocate, from shapes only (nothing is allocated)."""
    return int(jax.eval_shape(lambda p: method.init(cfg, batch, seq_len, p), mparams).nbytes)


def plan(cfg, method, budget_bytes: int, seq_len: int, batch: int, mparams=None) -> dict:
    """Exact capacity of one method in ``budget_bytes``; raises if ``method.cache_nbytes`` and the
    ``nbytes`` of the cache ``method.init`` builds disagree."""
    probe_len = min(seq_len, cfg.max_seq_len)
    probe = cache_nbytes(method, cfg, 2, probe_len, mparams)
    if probe != method.cache_nbytes(cfg, 2, probe_len):
        raise AssertionError(f"{method_spec(method)}: cache.nbytes={probe} for batch 2 x {probe_len} tokens, but "
                             f"method.cache_nbytes gives {method.cache_nbytes(cfg, 2, probe_len)}")
    budget = max(int(budget_bytes), 0)
    per_seq = method.cache_nbytes(cfg, 1, seq_len)
    max_batch = budget // per_seq
    # longest sequence at ``batch``: bytes grow monotonically with the length (binary search; methods
    # with a fixed budget stop growing, so the search is capped at 2**31 tokens)
    lo, hi = 0, 1
    while hi < 2 ** 31 and method.cache_nbytes(cfg, batch, hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if method.cache_nbytes(cfg, batch, mid) <= budget else (lo, mid)
    max_seq = lo
    bpt = method.bytes_per_token(cfg)
    return {"bytes_per_token": bpt, "bytes_per_sequence_at_seq_len": int(per_seq), "max_batch": int(max_batch),
            "at_seq_len": seq_len, "max_seq_len": int(max_seq), "max_seq_len_capped": int(min(max_seq, cfg.max_seq_len)),
            "model_max_seq_len": cfg.max_seq_len,
            "at_batch": batch, "tokens_in_budget": int(budget // bpt) if bpt else None,
            "cache_bytes_at_max_batch": int(max_batch * per_seq)}


def verify(params, cfg, method, batch: int, seq_len: int, mparams=None, steps: int = 5, warmup: int = 2) -> dict:
    """Allocates a [batch, seq_len] cache, fills its lengths to ``seq_len - steps - warmup`` and times
    ``steps`` jitted decode steps after ``warmup``. Returns bytes allocated and decode tokens/s."""
    from kvjax.generate import decode_step

    if seq_len < steps + warmup + 1:
        raise ValueError(f"seq_len {seq_len} too short to time {warmup}+{steps} decode steps")
    cache = method.init(cfg, batch, seq_len, mparams)
    nbytes = cache.nbytes
    cache = cache.replace(lengths=jnp.full((batch,), seq_len - steps - warmup, jnp.int32))
    tokens = jnp.zeros((batch,), jnp.int32)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits, cache = decode_step(params, cfg, tokens, cache, method=method, mparams=mparams)
        logits.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    finite = bool(jnp.all(jnp.isfinite(logits)))
    med = statistics.median(times)
    stats = {}
    try:
        ms = jax.devices()[0].memory_stats() or {}
        stats = {k: int(ms[k]) for k in ("bytes_limit", "peak_bytes_in_use") if k in ms}
    except Exception:  # memory_stats is not available on every backend
        pass
    return {"batch": batch, "seq_len": seq_len, "cache_nbytes": int(nbytes), "decode_step_s_median": med,
            "decode_tokens_per_s": batch / med, "logits_finite": finite, **stats}


def device_bytes_limit() -> int | None:
    """The allocator's limit on device 0 (None where the backend reports none, e.g. CPU)."""
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - memory_stats is not available on every backend
        return None
    return int(limit) if limit else None


def verify_batch(row: dict, *, limit: int | None, param_bytes: int, mp_bytes: int, reserve: int) -> tuple[int, str | None]:
    """The batch to run for ``row``'s plan: its ``max_batch`` when that fits the allocator's ``limit`` (with
    the parameters and the reserve), else the largest that does, with the reason."""
    b = row["max_batch"]
    if limit is None:
        return b, None
    per_seq = row["bytes_per_sequence_at_seq_len"]
    fits = max((limit - param_bytes - mp_bytes - reserve) // per_seq, 0)
    if b <= fits:
        return b, None
    return int(fits), (f"the device allocator allows {limit / GIB:.2f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION="
                       f"{os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 'default 0.75')}): the computed "
                       f"{b} sequences need {(b * per_seq + param_bytes + mp_bytes + reserve) / GIB:.2f} GiB with "
                       f"parameters and reserve; ran the largest batch that fits, {fits}")


def verify_with_backoff(run, batch: int, *, retries: int, backoff: float):
    """``run(batch)``; after an out-of-memory error (RuntimeError / MemoryError) tries again at ``backoff`` x
    the batch, at most ``retries`` times. Returns (result or None, the batch of the result, the failures
    [{"batch", "error"}] in order)."""
    failed = []
    for _ in range(1 + retries):
        try:
            return run(batch), batch, failed
        except (RuntimeError, MemoryError) as e:
            failed.append({"batch": batch, "error": str(e).splitlines()[0][:300]})
            batch = int(batch * backoff)
            if batch < 1:
                break
    return None, batch, failed


def capacity(cfg, methods, *, memory_gb: float, seq_len: int, batch: int, param_bytes: int = 0,
             reserve_gb: float = 2.0, mparams: dict | None = None, params=None, do_verify: bool = False,
             cpu_verify_batch: int = 2, cpu_verify_seq: int = 64, dense_dtype: str = "float32",
             bytes_limit: int | None = None, retries: int = 4, backoff: float = 0.85) -> dict:
    """Capacity of each method (a list of method objects) in ``memory_gb`` GiB.

    ``mparams`` maps a method's spec to its learned parameters (their bytes leave the budget too).
    With ``do_verify`` (needs ``params``) each plan is run on the device (on CPU at a tiny size), capped by
    the allocator's limit (``bytes_limit``, default: what device 0 reports; see the module docstring). A
    decode step that runs out of memory at that batch (its transient buffers do not fit the reserve) is
    retried up to ``retries`` times at ``backoff`` x the batch; the largest batch that ran is
    ``confirmed_batch`` and ``confirmed`` stays false.
    Returns {"budget": ..., "methods": [per-method dict]}.
    """
    mparams = mparams or {}
    if seq_len <= 0 or batch <= 0:
        raise ValueError(f"seq_len and batch must be positive, got {seq_len}, {batch}")
    memory = int(memory_gb * GIB)
    reserve = int(reserve_gb * GIB)
    on_cpu = jax.devices()[0].platform == "cpu"
    limit = None if on_cpu else (bytes_limit or device_bytes_limit())
    rows = []
    for method in methods:
        spec = method_spec(method)
        mp = mparams.get(spec)
        mp_bytes = tree_bytes(mp) if mp is not None else 0
        budget = memory - param_bytes - mp_bytes - reserve
        row = {**kv_record(method, cfg, dense_dtype), "compressor_param_bytes": mp_bytes, "budget_bytes": budget,
               **plan(cfg, method, budget, seq_len, batch, mp)}
        if budget <= 0:
            row["note"] = "parameters and reserve exceed the memory: nothing fits"
        row["confirmed"] = False
        if do_verify:
            if params is None:
                raise ValueError("verify needs the model parameters")
            if on_cpu:
                b, s = min(cpu_verify_batch, max(row["max_batch"], 1)), min(cpu_verify_seq, cfg.max_seq_len, seq_len)
                capped = None
            else:
                s = seq_len
                b, capped = verify_batch(row, limit=limit, param_bytes=param_bytes, mp_bytes=mp_bytes,
                                         reserve=reserve)
            if b < 1:
                row["verify"] = {"error": capped or "max_batch is 0: nothing to verify"}
            else:
                res, b, failed = verify_with_backoff(lambda n: verify(params, cfg, method, n, s, mp), b,
                                                     retries=0 if on_cpu else retries, backoff=backoff)
                if res is None:
                    row["verify"] = {"batch": failed[-1]["batch"], "seq_len": s, "error": failed[-1]["error"],
                                     "failed": failed}
                else:
                    row["verify"] = res
                    if res["cache_nbytes"] != method.cache_nbytes(cfg, b, s):
                        raise AssertionError(f"{spec}: allocated cache {res['cache_nbytes']} B "
                                             f"!= method.cache_nbytes(cfg, {b}, {s})")
                    ok = (not on_cpu) and res["logits_finite"]
                    row["confirmed"] = ok and capped is None and not failed
                    if ok:
                        row["confirmed_batch"] = b
                    notes = [capped] if capped else []
                    if failed:
                        res["failed"] = failed
                        notes.append(f"the decode step ran out of memory at batch {failed[0]['batch']} (its "
                                     f"transient buffers, e.g. a layer's dequantized K/V, exceed the reserve); "
                                     f"ran at {b}")
                    if notes:
                        res["note"] = "; ".join(notes)
            if on_cpu and "error" not in row["verify"] and "note" not in row["verify"]:
                row["verify"]["note"] = "CPU: ran a tiny size to check the code path; capacity not confirmed"
        rows.append(row)
    return {"memory_gb": memory_gb, "memory_bytes": memory, "param_bytes": param_bytes, "reserve_gb": reserve_gb,
            "device_bytes_limit": limit,
            "reserve_bytes": reserve, "seq_len": seq_len, "batch": batch, "methods": rows,
            **device_record(), "date": now()}


def main(argv=None):
    from eval.common import load_model, write_json
    from kvjax.cache.registry import parse_method

    ap = argparse.ArgumentParser(prog="python -m eval.capacity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="dense", help="method specs, e.g. 'dense,dense:dtype=bfloat16'")
    ap.add_argument("--compressor", action="append", default=[], help="trained compressor checkpoint (repeatable)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--memory-gb", type=float, default=80.0, help="device memory in GiB")
    ap.add_argument("--reserve-gb", type=float, default=2.0, help="kept back for activations and workspace")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--verify", action="store_true", help="allocate and run decode at the computed size")
    ap.add_argument("--json", default=None, help="results JSON (a .md table and .png bars are written beside it)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only write the .md / .png of an existing JSON")
    args = ap.parse_args(argv)
    if args.render:
        render(args.render)
        return None

    model = load_model(args.model, args.dtype)
    specs = split_specs(args.methods)
    methods = [parse_method(s) for s in specs]
    mparams = {}
    if args.compressor:
        from kvjax.compressors import load_compressor
        for path in args.compressor:
            m, mp = load_compressor(path, model)
            methods.append(m)
            mparams[method_spec(m)] = mp
    param_bytes = tree_bytes(model.params)
    res = capacity(model.cfg, methods, memory_gb=args.memory_gb, seq_len=args.seq_len, batch=args.batch,
                   param_bytes=param_bytes, reserve_gb=args.reserve_gb, mparams=mparams, params=model.params,
                   do_verify=args.verify, dense_dtype=args.dtype)
    res.update({"model": model.cfg.name or model.source, "model_sha256": model.sha256, "dtype": args.dtype,
                "library": "kvjax", "task": "capacity"})
    if args.json:
        write_json(args.json, res)
        render(args.json)
    def state(r):
        if r["confirmed"]:
            return f" (confirmed, {r['verify']['decode_tokens_per_s']:,.0f} tok/s)"
        if "confirmed_batch" in r:
            return f" (ran batch {r['confirmed_batch']}: {r['verify'].get('note', '')})"
        return f" (verify: {r['verify']['error']})" if "error" in r.get("verify", {}) else ""

    parts = [f"{r['method']}: batch {r['max_batch']} @ {args.seq_len}, seq {r['max_seq_len_capped']} @ {args.batch}"
             + state(r) for r in res["methods"]]
    print(f"[eval.capacity] {res['model']} in {args.memory_gb:g} GiB (params {param_bytes / GIB:.2f} GiB, reserve "
          f"{args.reserve_gb:g} GiB): " + "; ".join(parts))
    return res


def markdown(res: dict) -> str:
    """The capacity table of one run."""
    gb = res["memory_gb"]
    lines = [f"# KV capacity of {res.get('model', '?')} in {gb:g} GiB ({res.get('dtype', '')} weights)", "",
             f"{res['date']}, {res.get('device_count', 1)}x {res.get('device_kind', '?')}, jax {res.get('jax_version', '?')}; "
             f"parameters {res['param_bytes'] / GIB:.2f} GiB, reserve {res['reserve_gb']:g} GiB"
             + (f", device allocator limit {res['device_bytes_limit'] / GIB:.2f} GiB" if res.get("device_bytes_limit") else "")
             + ". max batch: sequences of the given length whose cache fits (exact bytes); confirmed = the cache was "
             "allocated on the device and decode steps ran at that batch.", "",
             f"| method | KV bytes/token | max batch @ {res['seq_len']} | ran on device at batch | decode tok/s there | "
             f"max tokens @ batch {res['batch']} | note |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["methods"]:
        v = r.get("verify", {})
        ran = r.get("confirmed_batch", "")
        tps = f"{v['decode_tokens_per_s']:,.0f}" if "decode_tokens_per_s" in v else ""
        note = "confirmed at max batch" if r["confirmed"] else (v.get("note") or v.get("error") or "computed only")
        lines.append(f"| {r['method']} | {r['kv_bytes_per_token']:g} | {r['max_batch']} | {ran} | {tps} | "
                     f"{r['max_seq_len']:,} | {note} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    """Bars of max batch (computed) and the batch that ran on the device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["methods"]
    labels = [r["method"].replace(",dtype=bfloat16", "").replace("dtype=bfloat16", "bf16")[:28] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["max_batch"] for r in rows], 0.4, label="computed max batch", color="tab:gray")
    ax.bar([i + 0.2 for i in x], [r.get("confirmed_batch", 0) for r in rows], 0.4, label="ran on the device",
           color="tab:green")
    ax.set_xticks(list(x), labels, rotation=25, ha="right", fontsize=7)
    ax.set_ylabel(f"sequences of {res['seq_len']} tokens")
    ax.set_title(f"KV capacity in {res['memory_gb']:g} GiB, {res.get('device_kind', '')} ({res['date'][:10]})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(json_path) -> None:
    """Writes the .md table and .png bars beside a capacity JSON."""
    import json
    import pathlib

    p = pathlib.Path(json_path)
    res = json.loads(p.read_text())
    p.with_suffix(".md").write_text(markdown(res))
    plot(res, p.with_suffix(".png"))


def split_specs(text: str) -> list[str]:
    """Method specs from ``--methods``: ``"dense,dense:dtype=bfloat16,autoencoder:a=1,b=2"`` gives
    ["dense", "dense:dtype=bfloat16", "autoencoder:a=1,b=2"] (a ``key=value`` item continues the spec
    before it, since method names hold no '='); ';' separates specs explicitly."""
    specs: list[str] = []
    for part in (p.strip() for chunk in text.split(";") for p in chunk.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and specs and ":" in specs[-1]:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs

if __name__ == "__main__":
    main()

"""Benchmark of decode attention over the KV-CAR compressed cache, as a fraction of the roofline.

    python -m pallas_kernels.decompress_attention.bench --out DIR            # the sweep (GPU)
    python -m pallas_kernels.decompress_attention.bench --check              # GPU test suite, pass/fail
    python -m pallas_kernels.decompress_attention.bench --sweep --out DIR    # block-size sweep, one shape

One attention layer at decode (one new token per sequence, every sequence of length S), bf16, for a
SmolLM2-135M-like layer (K=3, D=64, H=9, latent 96, hidden 192) and a Llama-7B-like layer (K=32, D=128,
H=32, latent K*D/2 = 2048, hidden K*D = 4096), B in {1, 8, 32, 128}, S in {1k, 4k, 16k, 32k}:
  (a) dense_xla          dense GQA attention on the uncompressed bf16 cache, XLA
  (c) dense_pallas_jax   jax's Pallas decode attention (ops.gpu.decode_attention.gqa) on the same cache
  (b) mlp_xla            decode-then-attend in XLA, Linear-LeakyReLU-Linear decoders, keys pre-RoPE
  (d) mlp_fused          the fused kernel, same decoders (keys decoded and rotated on chip, values
                         attended in the hidden space: their last layer applied once after the sum)
  (d) mlp_postrope_fused the fused kernel, same decoders, keys stored after RoPE: both last layers
                         absorbed (scores in the hidden space); compare with mlp_xla
  (b) linear_xla         decode-then-attend in XLA, linear decoders, keys post-RoPE
  (b') linear_xla_absorbed  linear decoders absorbed into query/output, attention on latents, XLA
  (d) linear_fused       the fused kernel, linear decoders, attention in latent space
  (d) linear_mosaic      the Mosaic GPU (Hopper) kernel, linear decoders, attention in latent space (TMA
                         pipeline, wgmma); latents up to ~224 wide, so SmolLM2-like layers only
  (d) linear_mosaic_kernel  (``--methods`` only) the Mosaic kernel's share of linear_mosaic: its launch
                         and one input fusion, without the split combine and the value projection
  (d) linear_rope_fused  (``--methods`` only) linear decoders with pre-RoPE keys: keys decoded on chip

Roofline time = max(bytes / 2.96 TB/s, FLOPs / 989 TFLOP/s) with each method's own minimal bytes (the
arrays it must read and write once) and useful FLOPs; ``fraction`` = roofline / measured. Timing: one
jitted ``fori_loop`` runs the op over several input sets in turn (rotating sets larger than L2 where
memory allows; the query depends on the loop counter so nothing is hoisted), median of repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.decompress_attention import api
from pallas_kernels.decompress_attention.config import (Config, MosaicConfig, choose_absorption, default_config,
                                                         default_mosaic_config, next_pow2)

PEAK_BW = 2.96e12  # B/s, measured elementwise copy on the H100 (shared/GPU.md)
PEAK_FLOPS = 989e12  # FLOP/s, H100 SXM bf16 dense tensor cores
L2_BYTES = 50e6


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    kv_heads: int
    head_dim: int
    heads: int
    latent: int
    hidden: int


LAYERS = {
    "smollm2": Layer("smollm2", kv_heads=3, head_dim=64, heads=9, latent=96, hidden=192),
    "llama7b": Layer("llama7b", kv_heads=32, head_dim=128, heads=32, latent=2048, hidden=4096),
}
DEFAULT_METHODS = ("dense_xla", "dense_pallas_jax", "mlp_xla", "mlp_fused", "mlp_postrope_fused", "linear_xla",
                   "linear_xla_absorbed", "linear_fused", "linear_mosaic")
ALL_METHODS = DEFAULT_METHODS + ("linear_rope_fused", "linear_mosaic_kernel")
BF16 = 2


# ------------------------------------------------------------------------------------- cost model
FUSED = {  # method -> (decoder variant, pre_rope)
    "mlp_fused": ("mlp", True),
    "mlp_postrope_fused": ("mlp", False),
    "linear_fused": ("linear", False),
    "linear_rope_fused": ("linear", True),
}


def fused_config(layer: Layer, b: int, s: int, method: str, config: Config | None = None) -> Config:
    variant, pre_rope = FUSED[method]
    hid = layer.hidden if variant == "mlp" else 0
    return config or default_config(b, s, num_kv_heads=layer.kv_heads, latent_k=layer.latent,
                                    latent_v=layer.latent, hidden_k=hid, hidden_v=hid, pre_rope=pre_rope)


def _fused_flops(layer: Layer, b: int, s: int, method: str, config: Config | None) -> tuple[float, float]:
    """(useful, executed) FLOPs of the fused kernel: useful counts the algorithm it runs (absorbed layers
    skipped), executed adds padding (rows to >= 16, widths to powers of two) and per-program recomputation."""
    variant, pre_rope = FUSED[method]
    cfg = fused_config(layer, b, s, method, config)
    k, d, h, lat = layer.kv_heads, layer.head_dim, layer.heads, layer.latent
    g = h // k
    hid = layer.hidden if variant == "mlp" else 0
    keys_abs, values_abs = choose_absorption(k_layers=2 if hid else 1, v_layers=2 if hid else 1, hidden_k=hid,
                                             hidden_v=hid, pre_rope=pre_rope, absorb_values=cfg.absorb_values)
    lat_p, hid_p = next_pow2(lat), next_pow2(hid) if hid else 0
    tokens = b * s
    width = hid or lat  # the absorbed space
    width_p = hid_p or lat_p
    n_v = width_p // min(cfg.block_v or width_p, width_p) if values_abs else 1
    groups = 1 if keys_abs else k // cfg.kv_heads_per_program  # programs sharing one latent tile
    rows = max(16, next_pow2(h if keys_abs else g))

    def first(pad):  # first layer of a two-layer decoder, per token
        return 2 * (lat_p if pad else lat) * (hid_p if pad else hid) if hid else 0

    def full(pad):  # whole decoder per token, all kv heads
        return first(pad) + 2 * ((hid_p if pad else hid) if hid else (lat_p if pad else lat)) * k * d

    useful = exe = 0.0
    # keys
    if keys_abs:
        useful += tokens * (first(False) + 2 * h * width)
        exe += tokens * n_v * (first(True) + 2 * rows * width_p)
    else:
        useful += tokens * (full(False) + 2 * h * d)
        exe += tokens * n_v * (groups * first(True) + full(True) - first(True) + 2 * k * rows * d)
    # values
    n_units = 1 if keys_abs else k  # query-row groups: all heads together, or one per kv head
    if values_abs:
        useful += tokens * (first(False) + 2 * h * width) + 2 * b * h * width * d
        exe += tokens * (groups * first(True) + 2 * n_units * rows * width_p)
    else:
        useful += tokens * (full(False) + 2 * h * d)
        exe += tokens * (groups * first(True) + full(True) - first(True) + 2 * k * rows * d)
    if keys_abs:
        useful += 2 * b * h * d * width  # W_h q
    return useful, exe


def cost(method: str, layer: Layer, b: int, s: int, config: Config | None = None) -> dict:
    """Minimal bytes, useful FLOPs, executed FLOPs (fused kernels: with padding and recomputation) and
    peak device memory (one input set plus intermediates) of one call."""
    k, d, h, lat, hid = layer.kv_heads, layer.head_dim, layer.heads, layer.latent, layer.hidden
    g = h // k
    tokens = b * s
    qo = 2 * b * h * d * BF16
    attn = 4 * b * h * s * d
    dense_set = 2 * tokens * k * d * BF16
    latent_set = 2 * tokens * lat * BF16
    w_mlp = 2 * (lat * hid + hid * k * d) * BF16
    w_lin = 2 * lat * k * d * BF16
    dec_mlp = 2 * 2 * tokens * (lat * hid + hid * k * d)
    dec_lin = 2 * 2 * tokens * lat * k * d
    scores = b * h * s * 4
    if method.startswith("dense"):
        out = dict(bytes=dense_set + qo, flops=attn, set_bytes=dense_set, temp=2 * scores)
        out["flops_exec"] = attn * (max(16, next_pow2(g)) / g if method == "dense_pallas_jax" else 1)
        return out
    if method == "mlp_xla":
        temp = dense_set + 2 * tokens * hid * 4 + 2 * scores
        return dict(bytes=latent_set + w_mlp + qo, flops=dec_mlp + attn, flops_exec=dec_mlp + attn,
                    set_bytes=latent_set, temp=temp)
    if method == "linear_xla":
        temp = dense_set + tokens * k * d * 4 + 2 * scores
        return dict(bytes=latent_set + w_lin + qo, flops=dec_lin + attn, flops_exec=dec_lin + attn,
                    set_bytes=latent_set, temp=temp)
    if method in ("linear_xla_absorbed", "linear_mosaic", "linear_mosaic_kernel"):
        absorbed = 2 * b * h * s * 2 * lat + 2 * 2 * b * h * d * lat
        # the Mosaic kernel runs the scores and values products on 64 query rows (a wgmma tile)
        exe = absorbed * (1 if method == "linear_xla_absorbed" else 64 / h)
        return dict(bytes=latent_set + w_lin + qo, flops=absorbed, flops_exec=exe, set_bytes=latent_set,
                    temp=2 * scores if method == "linear_xla_absorbed" else 0)
    useful, exe = _fused_flops(layer, b, s, method, config)
    weights = w_mlp if FUSED[method][0] == "mlp" else w_lin
    return dict(bytes=latent_set + weights + qo, flops=useful, flops_exec=exe, set_bytes=latent_set, temp=0)


def roofline_s(c: dict) -> float:
    return max(c["bytes"] / PEAK_BW, c["flops"] / PEAK_FLOPS)


# ------------------------------------------------------------------------------------- inputs and ops
def _randn(key, shape, dtype=jnp.bfloat16):
    """Random array built from a small block tiled along axis 1 (timing does not depend on values; this
    keeps generation of multi-GB caches cheap in memory)."""
    if len(shape) >= 2 and shape[1] > 1024:
        base = jax.random.normal(key, (shape[0], 1024) + tuple(shape[2:]), jnp.float32).astype(dtype)
        reps = -(-shape[1] // 1024)
        return jnp.tile(base, (1, reps) + (1,) * (len(shape) - 2))[:, : shape[1]]
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _decoder(key, n_in, hidden, width):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if not hidden:
        return [{"w": (jax.random.normal(k1, (n_in, width)) / math.sqrt(n_in)).astype(jnp.bfloat16),
                 "b": 0.1 * jax.random.normal(k2, (width,))}]
    return [{"w": (jax.random.normal(k1, (n_in, hidden)) / math.sqrt(n_in)).astype(jnp.bfloat16),
             "b": 0.1 * jax.random.normal(k2, (hidden,))},
            {"w": (jax.random.normal(k3, (hidden, width)) / math.sqrt(hidden)).astype(jnp.bfloat16),
             "b": 0.1 * jax.random.normal(k4, (width,))}]


def layer_weights(layer: Layer) -> dict:
    """The benchmark's decoders of ``layer``, by variant: {"mlp" | "linear": {"k": [...], "v": [...]}}."""
    kk, kv = jax.random.split(jax.random.PRNGKey(7))
    width = layer.kv_heads * layer.head_dim
    return {variant: {"k": _decoder(kk, layer.latent, hidden, width), "v": _decoder(kv, layer.latent, hidden, width)}
            for variant, hidden in (("mlp", layer.hidden), ("linear", 0))}


def make_sets(kind: str, layer: Layer, b: int, s: int, n_sets: int, seed: int = 0):
    """n_sets independent input sets: "dense" (q, k, v, lengths) or "latent" (q, k_lat, v_lat, lengths)."""
    sets = []
    for i in range(n_sets):
        keys = jax.random.split(jax.random.PRNGKey(seed * 1000 + i), 3)
        q = _randn(keys[0], (b, layer.heads, layer.head_dim))
        lengths = jnp.full((b,), s, jnp.int32)
        if kind == "dense":
            shape = (b, s, layer.kv_heads, layer.head_dim)
            sets.append({"q": q, "k": _randn(keys[1], shape), "v": _randn(keys[2], shape), "lengths": lengths})
        else:
            shape = (b, s, layer.latent)
            sets.append({"q": q, "k_lat": _randn(keys[1], shape), "v_lat": _randn(keys[2], shape),
                         "lengths": lengths})
    return sets


def make_op(method: str, config: Config | None = None):
    """(input kind, decoder variant, op(set, weights) -> [B, H, D]). Pallas ops are interpreted off GPU
    (a smoke test of this script, not a measurement)."""
    interpret = not api.on_gpu()
    if method == "dense_xla":
        return "dense", None, lambda st, w: api.dense_attend(st["q"], st["k"], st["v"], st["lengths"],
                                                             implementation="xla")
    if method == "dense_pallas_jax":
        return "dense", None, lambda st, w: api.dense_attend(st["q"], st["k"], st["v"], st["lengths"],
                                                             implementation="pallas", interpret=interpret)
    variant = "mlp" if method.startswith("mlp") else "linear"
    pre_rope = method == "mlp_xla" or (method in FUSED and FUSED[method][1])

    def args(st):
        return st["q"], st["k_lat"], st["v_lat"], st["lengths"]

    if method in ("mlp_xla", "linear_xla"):
        return "latent", variant, lambda st, w: api.decompress_attend_xla(*args(st), w["k"], w["v"],
                                                                          pre_rope=pre_rope)
    if method == "linear_xla_absorbed":
        return "latent", variant, lambda st, w: api.decompress_attend_xla_absorbed(*args(st), w["k"], w["v"])
    mcfg = config if isinstance(config, MosaicConfig) else None
    if method == "linear_mosaic":
        return "latent", variant, lambda st, w: api.decompress_attend(
            *args(st), w["k"], w["v"], implementation="mosaic", config=mcfg, interpret=interpret)
    if method == "linear_mosaic_kernel":
        from pallas_kernels.decompress_attention import pallas_mosaic

        def kernel_only(st, w):  # queries placed in a [B, 64, Lk] block: one small fusion, then the kernel
            b, h, d = st["q"].shape
            q_abs = jnp.zeros((b, pallas_mosaic.ROWS, st["k_lat"].shape[2]), st["k_lat"].dtype)
            q_abs = q_abs.at[:, :h, :d].set(st["q"].astype(q_abs.dtype))
            o, _ = pallas_mosaic.latent_attention(q_abs, st["k_lat"], st["v_lat"], st["lengths"], n_heads=h,
                                                  config=mcfg, interpret=interpret)
            return o[:, 0, 0]
        return "latent", variant, kernel_only
    return "latent", variant, lambda st, w: api.decompress_attend(
        *args(st), w["k"], w["v"], pre_rope=pre_rope, implementation="pallas", config=config, interpret=interpret)


def time_op(op, sets, weights, *, target_s: float = 0.03, repeats: int = 7) -> dict:
    """Median seconds per op call: a jitted fori_loop over iterations x input sets."""

    @jax.jit
    def run(sets, weights, iters):
        def body(i, acc):
            bump = i.astype(jnp.float32) * 0.0  # not foldable: keeps every call inside the loop
            for st in sets:
                st = dict(st, q=st["q"] + bump.astype(st["q"].dtype))
                out = op(st, weights)
                acc = acc + out[0, 0, 0].astype(jnp.float32)
            return acc
        return lax.fori_loop(0, iters, body, jnp.float32(0))

    t0 = time.perf_counter()
    run(sets, weights, 1).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(sets, weights, 1).block_until_ready()
    one = time.perf_counter() - t0
    iters = int(max(1, min(2000, round(target_s / max(one, 1e-6)))))
    reps = repeats if one * iters < 0.2 else 3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(sets, weights, iters).block_until_ready()
        times.append((time.perf_counter() - t0) / (iters * len(sets)))
    return dict(time_s=float(np.median(times)), time_min_s=float(np.min(times)), iters=iters, reps=reps,
                compile_s=compile_s)


def _device_memory_limit() -> float:
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return float(stats.get("bytes_limit", 60e9))
    except Exception:  # noqa: BLE001 - CPU devices have no stats
        return 16e9


def device_name() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', '?')}"


# ------------------------------------------------------------------------------------- the sweep
def bench(layers, batches, seqs, methods, *, out_dir=None, max_call_s=0.25, rotate_bytes=128e6, max_sets=8,
          time_budget_s=None, verbose=True, config=None):
    mem_limit = 0.8 * _device_memory_limit()
    results = []
    t_start = time.perf_counter()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(), jax=jax.__version__, python=platform.python_version(),
                peak_bw=PEAK_BW, peak_flops=PEAK_FLOPS, mem_limit=mem_limit)
    for layer_name in layers:
        layer = LAYERS[layer_name]
        for s in seqs:
            for b in batches:
                weights = layer_weights(layer)
                cached = {}
                for method in methods:
                    row = dict(layer=layer_name, B=b, S=s, method=method)
                    c = cost(method, layer, b, s, config if isinstance(config, Config) else None)
                    row.update(bytes=c["bytes"], flops=c["flops"], flops_exec=c["flops_exec"],
                               roofline_us=roofline_s(c) * 1e6)
                    # Expected time: fused kernels ran their executed FLOPs at ~10% of peak on the H100
                    # (small per-tile dots), XLA's GEMMs at ~50%.
                    eff = 0.1 if method in FUSED else 0.3 if method.startswith("linear_mosaic") else 0.5
                    est = max(c["bytes"] / PEAK_BW, c["flops_exec"] / (eff * PEAK_FLOPS))
                    n_sets = int(max(1, min(max_sets, math.ceil(rotate_bytes / max(c["set_bytes"], 1)))))
                    while n_sets > 1 and n_sets * c["set_bytes"] + c["temp"] > mem_limit / 2:
                        n_sets -= 1
                    if c["set_bytes"] + c["temp"] > mem_limit:
                        row["skipped"] = f"memory: needs ~{(c['set_bytes'] + c['temp']) / 1e9:.0f} GB"
                    elif est > max_call_s:
                        row["skipped"] = f"time: expected {est * 1e3:.0f} ms per call > {max_call_s * 1e3:.0f} ms"
                    elif time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                        row["skipped"] = "time budget of the run spent"
                    if "skipped" in row:
                        results.append(row)
                        if verbose:
                            print(f"  {layer_name} B={b} S={s} {method}: skipped ({row['skipped']})", flush=True)
                        continue
                    kind, variant, op = make_op(method, config)
                    try:
                        if cached.get(kind, (None, 0))[1] < n_sets:
                            cached.clear()
                            gc.collect()
                            cached[kind] = (make_sets(kind, layer, b, s, n_sets), n_sets)
                        sets = cached[kind][0][:n_sets]
                        w = weights[variant] if variant else {}
                        t = time_op(op, sets, w)
                        row.update(t)
                        row["n_sets"] = n_sets
                        row["rotated_bytes"] = n_sets * c["set_bytes"]
                        row["l2_resident"] = n_sets * c["set_bytes"] < L2_BYTES
                        row["time_us"] = t["time_s"] * 1e6
                        row["fraction"] = roofline_s(c) / t["time_s"]
                        row["tb_per_s"] = c["bytes"] / t["time_s"] / 1e12
                        row["tflop_per_s"] = c["flops"] / t["time_s"] / 1e12
                    except Exception as e:  # noqa: BLE001 - record and go on with the sweep
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    results.append(row)
                    if verbose:
                        if "time_us" in row:
                            print(f"  {layer_name} B={b} S={s} {method}: {row['time_us']:.1f} us, "
                                  f"{row['fraction'] * 100:.0f}% of roofline ({row['roofline_us']:.1f} us)",
                                  flush=True)
                        else:
                            print(f"  {layer_name} B={b} S={s} {method}: ERROR {row['error']}", flush=True)
                cached.clear()
                gc.collect()
                if out_dir is not None:
                    _write(out_dir, meta, results, final=False)
    return meta, results


def _dense_time(results, row):
    for r in results:
        if (r["layer"], r["B"], r["S"], r["method"]) == (row["layer"], row["B"], row["S"], "dense_xla"):
            return r.get("time_us")
    return None


def markdown(meta, results) -> str:
    lines = [f"# Decode attention over the KV-CAR latent cache ({meta['date']}, {meta['device']}, jax {meta['jax']})",
             "",
             f"Roofline = max(bytes / {PEAK_BW / 1e12:.2f} TB/s, FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s), each "
             "method's own minimal bytes and useful FLOPs; fraction = roofline / measured; vs dense = "
             "dense_xla time / this time. L2 = the rotated inputs fit in L2 (50 MB).",
             "",
             "| layer | B | S | method | time (us) | roofline (us) | fraction | TB/s | TFLOP/s | MB moved | GFLOP | vs dense | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        note = r.get("skipped") or r.get("error") or ("L2" if r.get("l2_resident") else "")
        if "time_us" in r:
            dense = _dense_time(results, r)
            vs = f"{dense / r['time_us']:.2f}x" if dense else ""
            lines.append(f"| {r['layer']} | {r['B']} | {r['S']} | {r['method']} | {r['time_us']:.1f} | "
                         f"{r['roofline_us']:.1f} | {r['fraction'] * 100:.0f}% | {r['tb_per_s']:.2f} | "
                         f"{r['tflop_per_s']:.1f} | {r['bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | {vs} | {note} |")
        else:
            lines.append(f"| {r['layer']} | {r['B']} | {r['S']} | {r['method']} | - | {r['roofline_us']:.1f} | - | - | - | "
                         f"{r['bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | | {note} |")
    return "\n".join(lines) + "\n"


def _write(out_dir, meta, results, final=True, stem="decompress_attention"):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, results))
    if final and any("time_us" in r for r in results) and not stem.startswith("sweep"):
        plot(meta, results, out / f"{stem}.png")


def plot(meta, results, path, methods=None):
    """PNG: per layer, each method's speed-up over dense XLA (top) and fraction of its roofline (bottom)
    for every measured (B, S) cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in results})
    fig, axes = plt.subplots(2, len(layers), figsize=(7.5 * len(layers), 7), squeeze=False)
    for col, layer in enumerate(layers):
        rows = [r for r in results if r["layer"] == layer and "time_us" in r]
        cells = sorted({(r["S"], r["B"]) for r in rows})
        names = [m for m in (methods or dict.fromkeys(r["method"] for r in rows)) if m != "dense_xla"]
        x = np.arange(len(cells))
        width = 0.8 / max(1, len(names))
        for i, m in enumerate(names):
            by_cell = {(r["S"], r["B"]): r for r in rows if r["method"] == m}
            speed = [(_dense_time(results, by_cell[c]) or np.nan) / by_cell[c]["time_us"] if c in by_cell else np.nan
                     for c in cells]
            frac = [by_cell[c]["fraction"] * 100 if c in by_cell else np.nan for c in cells]
            axes[0, col].bar(x + i * width, speed, width, label=m)
            axes[1, col].bar(x + i * width, frac, width, label=m)
        labels = [f"B{b}\nS{s // 1024}k" for s, b in cells]
        for ax, ylabel in ((axes[0, col], "speed-up over dense XLA"), (axes[1, col], "% of own roofline")):
            ax.set_xticks(x + 0.4 - width / 2, labels, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[0, col].axhline(1.0, color="k", lw=0.8)
        axes[1, col].axhline(70, color="k", lw=0.8, ls="--")
        axes[0, col].set_title(f"{layer}: one decode-attention layer, bf16")
        axes[0, col].legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, jax {meta['jax']}, {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- sweep, check
def _overrides(keys, rows):
    return [dict(zip(keys, r)) for r in rows]


# Block-size sweep: overrides of the default config, per layer and fused method.
SWEEP = {
    "smollm2": {
        "mlp_fused": _overrides(
            ("block_s", "block_hidden", "kv_heads_per_program", "num_warps", "num_stages"),
            [(32, 64, 3, 4, 2), (32, 64, 3, 4, 1), (64, 64, 3, 8, 1), (64, 32, 3, 8, 1), (32, 64, 1, 4, 2),
             (64, 64, 1, 4, 1), (64, 128, 1, 8, 1), (128, 64, 1, 8, 1), (16, 64, 3, 4, 2), (32, 128, 3, 8, 1)]),
        "mlp_postrope_fused": _overrides(
            ("block_s", "block_hidden", "block_v", "num_warps", "num_stages", "num_splits"),
            [(32, 64, 256, 4, 2, 1), (32, 64, 256, 4, 3, 1), (32, 32, 256, 4, 2, 1), (64, 64, 256, 8, 1, 1),
             (128, 64, 256, 8, 1, 1), (64, 128, 256, 8, 1, 1), (32, 64, 256, 8, 2, 1), (32, 64, 256, 4, 2, 2)]),
        "linear_fused": _overrides(
            ("block_s", "num_warps", "num_stages", "num_splits"),
            [(64, 4, 2, 4), (64, 4, 3, 4), (64, 4, 2, 2), (128, 4, 3, 2), (128, 8, 3, 1), (64, 8, 4, 4)]),
        "linear_mosaic": _overrides(
            ("block_s", "max_concurrent_steps", "num_splits", "p_in_registers"),
            [(64, 2, 1, True), (64, 2, 2, True), (64, 3, 1, True), (128, 2, 1, True), (128, 3, 1, True),
             (64, 2, 4, True), (64, 4, 8, True), (64, 2, 16, True), (64, 4, 16, True), (64, 2, 32, True),
             (64, 2, 1, False), (64, 4, 16, False)]),
    },
    "llama7b": {
        "linear_fused": _overrides(
            ("block_s", "block_l", "block_v", "num_warps", "num_stages"),
            [(16, 256, 256, 8, 2), (32, 128, 256, 8, 1), (32, 256, 512, 8, 1), (64, 128, 256, 8, 1),
             (16, 256, 512, 8, 2), (32, 128, 512, 8, 2), (64, 64, 512, 8, 1), (32, 64, 256, 4, 2),
             (64, 128, 512, 8, 2), (128, 64, 256, 8, 1)]),
    },
}


def sweep(layer_name, b, s, out_dir=None, methods=None):
    """Times the default config and each override of SWEEP[layer_name] (``methods``: a subset) at one shape."""
    layer = LAYERS[layer_name]
    rows = []
    meta = None
    for method, overrides in SWEEP[layer_name].items():
        if methods and method not in methods:
            continue
        if method == "linear_mosaic":
            base = default_mosaic_config(b, s, latent_k=layer.latent, latent_v=layer.latent)
        else:
            base = fused_config(layer, b, s, method)
        for ov in [{}] + overrides:
            try:
                cfg = base.replace(**ov)
            except ValueError as e:
                print(f"{method:18s} {ov}: invalid ({e})")
                continue
            meta, res = bench([layer_name], [b], [s], [method], config=cfg, verbose=False)
            row = res[0]
            row["config"] = "default " + repr(cfg) if not ov else repr(ov)
            rows.append(row)
            t = f"{row['time_us']:.1f} us ({row['fraction'] * 100:.0f}%)" if "time_us" in row else row.get(
                "error", row.get("skipped"))
            print(f"{method:18s} {row['config']}: {t}", flush=True)
    if out_dir is not None and meta is not None:
        _write(out_dir, meta, rows, stem=f"sweep_{layer_name}_B{b}_S{s}")
    return rows


_NOT_LAUNCHED = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def launches(method: str, layer_name: str, b: int, s: int) -> list[str]:
    """The device work one call of ``method`` compiles to: the opcodes (fusion, custom-call, ...) of the
    optimized entry computation, one per kernel launch; what each fusion is named after is kept."""
    import re

    layer = LAYERS[layer_name]
    kind, variant, op = make_op(method)
    st = make_sets(kind, layer, b, s, 1)[0]
    w = layer_weights(layer)[variant] if variant else {}
    text = jax.jit(op).lower(st, w).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[: entry.index("\n}")]
    ops = []
    for line in entry.splitlines()[1:]:
        m = re.search(r"\s([a-z][a-z0-9-]*)\(%", line)  # the opcode, followed by its operands
        if m and m.group(1) not in _NOT_LAUNCHED:
            name = re.search(r"calls=%?([\w.-]+)|custom_call_target=\"([^\"]+)\"", line)
            ops.append(m.group(1) + (f":{name.group(1) or name.group(2)}" if name else ""))
    return ops


def check() -> bool:
    """Runs the compiled test suites (Triton and Mosaic GPU kernels) and prints pass/fail per test."""
    import unittest

    from pallas_kernels.decompress_attention import test_decompress_attention as t
    if not api.on_gpu():
        print("check: no GPU, running the interpreter suites instead")
        classes = (t.DecompressAttentionInterpretTest, t.MosaicInterpretTest)
    else:
        classes = (t.DecompressAttentionGpuTest, t.MosaicGpuTest)
    suite = unittest.TestSuite()
    for cls in classes:
        suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(cls))
    suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(t.ConfigTest))
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
    ok = result.wasSuccessful()
    for kind, items in (("FAIL", result.failures), ("ERROR", result.errors)):
        for test, trace in items:
            last = [ln for ln in trace.strip().splitlines() if ln.strip()][-1]
            print(f"check: {kind} {test.id().rsplit('.', 1)[-1]}: {last[:300]}")
    print(f"check: {'PASS' if ok else 'FAIL'} ({result.testsRun} run, {len(result.failures)} failures, "
          f"{len(result.errors)} errors, {len(result.skipped)} skipped)")
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for decompress_attention.json / .md")
    p.add_argument("--check", action="store_true", help="run the compiled test suite and print pass/fail")
    p.add_argument("--sweep", action="store_true", help="block-size sweep of the fused kernels at one shape")
    p.add_argument("--layers", default="smollm2,llama7b")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--seqs", default="1024,4096,16384,32768")
    p.add_argument("--methods", default=None, help=f"subset of {','.join(ALL_METHODS)} (--sweep: of its fused "
                   "methods; default all)")
    p.add_argument("--max-call-ms", type=float, default=250.0,
                   help="skip a measurement expected to take longer than this per call")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop starting new measurements after this")
    p.add_argument("--sweep-shape", default="smollm2,128,4096;llama7b,8,4096",
                   help="layer,B,S[;layer,B,S...] of --sweep")
    p.add_argument("--plot", default=None, metavar="JSON", help="redraw the PNG beside a results JSON and exit")
    p.add_argument("--launches", default=None, metavar="LAYER,B,S",
                   help="print the kernels one call of each of --methods compiles to, at that shape")
    a = p.parse_args(argv)
    chosen = [m for m in (a.methods or "").split(",") if m]  # empty: each mode's default
    if a.check:
        ok = check()
        if not (a.sweep or a.out):
            sys.exit(0 if ok else 1)
    if a.plot:
        data = json.loads(pathlib.Path(a.plot).read_text())
        plot(data["meta"], data["results"], pathlib.Path(a.plot).with_suffix(".png"))
        return
    if a.launches:
        name, b, s = a.launches.split(",")
        for m in chosen or DEFAULT_METHODS:
            ops = launches(m, name, int(b), int(s))
            print(f"{m}: {len(ops)} launches: {' '.join(ops)}")
        return
    if a.sweep:
        for shape in a.sweep_shape.split(";"):
            name, b, s = shape.split(",")
            sweep(name, int(b), int(s), a.out, methods=chosen or None)
        return
    methods = chosen or list(DEFAULT_METHODS)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        p.error(f"unknown methods {bad}")
    meta, results = bench(a.layers.split(","), [int(x) for x in a.batches.split(",")],
                          [int(x) for x in a.seqs.split(",")], methods, out_dir=a.out,
                          max_call_s=a.max_call_ms / 1e3, time_budget_s=a.time_budget_s)
    if a.out:
        _write(a.out, meta, results)
    print()
    print(markdown(meta, results))


if __name__ == "__main__":
    main()

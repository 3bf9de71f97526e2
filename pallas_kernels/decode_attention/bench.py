"""Dense decode attention over a head-major cache: XLA vs jax's Pallas decode kernel vs kvjax's kernel
(default tiling and a block-size sweep), with the bandwidth roofline.

    python -m pallas_kernels.decode_attention.bench --shapes 64x2048,256x512 --sweep --out DIR

Each shape is one SmolLM2 layer (3 kv heads x 64, 9 query heads) or, with --layer llama7b, one Llama-7B
layer (32 x 128); bf16 cache, every sequence full. Writes decode_attention.json / .md to --out.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import api
from pallas_kernels.decode_attention.config import DecodeConfig, default_config
from pallas_kernels.decompress_attention.api import dense_attend, on_gpu
from pallas_kernels.decompress_attention.bench import PEAK_BW, _randn, device_name, time_op

LAYERS = {"smollm2": (3, 3, 64), "llama7b": (32, 1, 128)}  # kv heads, query heads per kv head, head dim
SWEEP = dict(block_s=(64, 128, 256), num_splits=(1, 2, 4, 8), num_warps=(4, 8), num_stages=(2, 3, 4))


def _sets(b, s, kvh, g, d, layout, rotate_bytes=128e6):
    per = 2 * b * s * kvh * d * 2
    n = max(1, min(8, int(-(-rotate_bytes // per))))
    shape = (b, kvh, s, d) if layout == "bksd" else (b, s, kvh, d)
    out = []
    for i in range(n):
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(i), 3)
        out.append({"q": _randn(k1, (b, kvh * g, d)), "k": _randn(k2, shape), "v": _randn(k3, shape),
                    "lengths": jnp.full((b,), s, jnp.int32)})
    return out


def run(layer, shapes, sweep, out_dir=None):
    kvh, g, d = LAYERS[layer]
    interpret = not on_gpu()
    rows = []
    for b, s in shapes:
        nbytes = 2 * b * s * kvh * d * 2 + 2 * b * kvh * g * d * 2
        roof = nbytes / PEAK_BW
        head, seq = _sets(b, s, kvh, g, d, "bksd"), None
        cands = [("xla", None), ("pallas", default_config(b, kvh, s))]
        if sweep:
            cands += [("pallas", DecodeConfig(**dict(zip(SWEEP, v)))) for v in itertools.product(*SWEEP.values())]
        cands.append(("pallas_jax_bskd", None))
        for impl, cfg in cands:
            try:
                if impl == "pallas_jax_bskd":
                    seq = seq or _sets(b, s, kvh, g, d, "bskd")
                    t = time_op(lambda st, w: dense_attend(st["q"], st["k"], st["v"], st["lengths"],
                                                           implementation="pallas", interpret=interpret), seq, {})
                else:
                    t = time_op(lambda st, w, impl=impl, cfg=cfg: api.decode_attend(
                        st["q"], st["k"], st["v"], st["lengths"], implementation=impl, config=cfg,
                        interpret=interpret), head, {})
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                rows.append(dict(layer=layer, b=b, s=s, impl=impl, config=repr(cfg), error=str(e)[:200]))
                continue
            row = dict(layer=layer, b=b, s=s, impl=impl, config=repr(cfg), time_us=t["time_s"] * 1e6,
                       roofline_us=roof * 1e6, fraction=roof / t["time_s"], tb_s=nbytes / t["time_s"] / 1e12)
            rows.append(row)
            print(f"B={b:4d} S={s:6d} {impl:16s} {row['time_us']:8.1f} us {row['fraction'] * 100:4.0f}% "
                  f"{row['config']}", flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device_name(), jax=jax.__version__, peak_bw=PEAK_BW, layer=layer, sweep=sweep)
    if out_dir:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_attention.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        (out / "decode_attention.md").write_text(markdown(meta, rows))
    return meta, rows


def markdown(meta, rows) -> str:
    """Per shape: XLA, jax's kernel, kvjax's default tiling and the best tiling of the sweep."""
    lines = [f"# Dense decode attention, {meta['layer']} layer ({meta['date']}, {meta['device']}, jax {meta['jax']})",
             "", f"Roofline = bytes of K, V and q / {meta['peak_bw'] / 1e12:.2f} TB/s; bf16 cache, full sequences.", "",
             "| B | S | method | time (us) | roofline (us) | fraction | TB/s | config |", "|---:|---:|---|---:|---:|---:|---:|---|"]
    for (b, s), group in itertools.groupby(rows, key=lambda r: (r["b"], r["s"])):
        group = [r for r in group if "time_us" in r]
        pallas = [r for r in group if r["impl"] == "pallas"]
        pick = [r for r in group if r["impl"] != "pallas"] + pallas[:1]
        if len(pallas) > 1:
            best = min(pallas[1:], key=lambda r: r["time_us"])
            pick.append(dict(best, impl="pallas (best of sweep)"))
        for r in pick:
            name = r["impl"] + (" (default)" if r is pallas[0] else "")
            lines.append(f"| {b} | {s} | {name} | {r['time_us']:.1f} | {r['roofline_us']:.1f} | "
                         f"{r['fraction'] * 100:.0f}% | {r['tb_s']:.2f} | {r['config']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", default="smollm2", choices=sorted(LAYERS))
    p.add_argument("--shapes", default="64x2048,16x2048,256x512,64x512,1x2048,128x4096", help="BxS,...")
    p.add_argument("--sweep", action="store_true", help=f"also time every tiling of {SWEEP}")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    shapes = [tuple(int(x) for x in sh.split("x")) for sh in a.shapes.split(",") if sh]
    meta, rows = run(a.layer, shapes, a.sweep, a.out)
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()

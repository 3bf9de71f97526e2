"""Token eviction (streaming, h2o, snapkv) beside kvpress on the same slice, on CPU, compress-then-continue:
``python -m bench.eviction_slice --out results/smollm2/eviction-cpu`` (first 8 windows of WikiText-2 test,
512 tokens each, the first 384 prefilled and compressed, the last 128 scored; one JSON per method, skipped
when present, then a markdown table; token-by-token runs of ``eval.perplexity --chunk 1`` found in
OUT/decode are tabulated too). kvpress's figures for the same protocol and tokens are read from
``--reference`` (a JSON file of measured peer figures with its source), never computed here.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

RATIOS = (0.5, 0.75, 0.875)
# (label, method spec without the ratio, kvpress press it corresponds to)
POLICIES = (
    ("StreamingLLM", "streaming", "StreamingLLM"),
    ("H2O (paper: sum, half recent)", "h2o", None),
    ("H2O as kvpress (mean, no recent)", "h2o:recent=0,normalize=true", "ObservedAttention (H2O)"),
    ("SnapKV", "snapkv", "SnapKV"),
)
EXTRA = (  # kept tokens stored in bfloat16, or quantized
    ("SnapKV, bf16 K/V", "snapkv:dtype=bfloat16", 0.5), ("SnapKV, bf16 K/V", "snapkv:dtype=bfloat16", 0.75),
    ("SnapKV + int8", "snapkv:bits=8", 0.5), ("SnapKV + int4 g32", "snapkv:bits=4,group=32", 0.5),
    ("SnapKV + int8", "snapkv:bits=8", 0.75),
)


def _spec(base: str, ratio: float) -> str:
    return f"{base}{',' if ':' in base else ':'}ratio={ratio}"


def _num(x) -> str:
    return f"{x:,}" if float(x).is_integer() else f"{x:,.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.eviction_slice")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward call")
    ap.add_argument("--reference", default=None, help="kvpress figures (default OUT/kvpress_reference.json)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import kvjax
    from eval.common import encode_no_bos, write_json
    from eval.data import wikitext2
    from eval.perplexity import perplexity

    os.makedirs(args.out, exist_ok=True)
    cells = [("dense", "dense", None, "dense (no compression)")]
    for label, base, press in POLICIES:
        cells += [(label, _spec(base, r), r, press) for r in RATIOS]
    cells += [(label, _spec(base, r), r, None) for label, base, r in EXTRA]

    model, ids, text = None, None, wikitext2("test")
    rows = []
    for label, spec, ratio, press in cells:
        path = os.path.join(args.out, spec.replace(":", "_").replace(",", "_").replace("=", "") + ".json")
        if not os.path.exists(path):
            if model is None:
                model = kvjax.load("smollm2-135m")
                ids = np.asarray(encode_no_bos(model.tokenizer, text.text), np.int32)
            res = perplexity(model, ids, kvjax.parse_method(spec), context=args.context, batch=args.batch,
                             protocol="continue", prefix=args.prefix, max_tokens=args.windows * args.context)
            res.update(text.record())
            res.update({"method_arg": spec, "library": "kvjax", "task": "perplexity"})
            write_json(path, res)
            print(f"{spec}: ppl {res['ppl']:.4f} ({res['wall_s']:.0f}s)", flush=True)
        with open(path) as f:
            res = json.load(f)
        rows.append({"label": label, "spec": spec, "ratio": ratio, "press": press, **res})

    ref_path = args.reference or os.path.join(args.out, "kvpress_reference.json")
    ref = {}
    if os.path.exists(ref_path):
        with open(ref_path) as f:
            ref = json.load(f)
    figures = ref.get("ppl", {})

    def peer(press, ratio):
        v = figures.get(press or "", {}).get("dense" if ratio is None else str(ratio))
        return "" if v is None else f"{v:.2f}"

    r0 = rows[0]
    lines = [f"# Token eviction beside kvpress ({r0['date'][:10]}, {r0['device_kind']}, {r0['dtype']})", "",
             f"WikiText-2 test, first {args.windows} windows of {args.context} tokens (no BOS), "
             "compress-then-continue: "
             f"{args.prefix} tokens prefilled and compressed at the end of prefill, the last "
             f"{args.context - args.prefix} teacher-forced over that cache and scored ({r0['tokens']} predictions). "
             f"`python -m bench.eviction_slice --out {args.out}`.", "",
             "KV bytes/token: the prefix's cache (kept slots x (K, V, int32 position, + float32 score for h2o), "
             f"all layers) over its {args.prefix} tokens; dense float32 stores {_num(r0['dense_kv_bytes_per_token'])}. "
             "'saved vs bf16' compares with a bfloat16 dense cache (half that): rows that keep float32 K/V "
             "save nothing against it at r=0.5. "
             "kvpress: " + ref.get("source", "no reference file given") + ".", "",
             "| method | kvjax spec | evicted r | KV bytes/token | saved vs fp32 | saved vs bf16 | kvjax ppl | "
             "kvpress ppl (press) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        p = peer(r["press"], r["ratio"])
        bf16 = r["dense_kv_bytes_per_token"] * 2 / np.dtype(r["dense_dtype"]).itemsize
        lines.append(f"| {r['label']} | `{r['spec']}` | {'' if r['ratio'] is None else r['ratio']} | "
                     f"{_num(r['kv_bytes_per_token'])} | {100 * r['kv_saved']:.1f}% | "
                     f"{100 * (1 - r['kv_bytes_per_token'] / bf16):.1f}% | {r['ppl']:.2f} | "
                     f"{p + (' (' + r['press'] + ')' if p and r['ratio'] is not None else '')} |")
    with open(os.path.join(args.out, "eviction_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    decode_table(os.path.join(args.out, "decode"))


def decode_table(folder: str) -> None:
    """Tabulates the token-by-token runs found in ``folder`` (JSON of ``eval.perplexity --chunk 1``) into
    ``folder/decode_cpu.md``; does nothing when there are none."""
    import glob

    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            rows.append(json.load(f))
    if not rows:
        return
    rows.sort(key=lambda r: (r["method"] != "dense", r["kv_saved"], r["method_arg"]))
    r0 = rows[0]
    lines = [f"# Token eviction while decoding ({r0['date'][:10]}, {r0['device_kind']}, {r0['dtype']})", "",
             f"WikiText-2 test, first {r0['windows']} windows of {r0['context']} tokens, every prediction scored "
             f"({r0['tokens']}), each window fed one token per forward (`eval.perplexity --protocol full --chunk 1`): "
             "the cache is made for the window, so ratio r keeps int(512 * (1 - r)) slots and eviction starts "
             "once they are full (until then every token sees the whole window so far). Not comparable with the "
             "compress-then-continue table.", "",
             "| kvjax spec | KV bytes/token | saved vs fp32 | ppl |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['method_arg']}` | {_num(r['kv_bytes_per_token'])} | {100 * r['kv_saved']:.1f}% | {r['ppl']:.2f} |"
              for r in rows]
    with open(os.path.join(folder, "decode_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

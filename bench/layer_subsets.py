"""Best layer subsets of a compressor for given KV savings, picked by the C4 sensitivity sweep and measured
on WikiText-2 test and on C4 windows *after* those the sweep used:
``python -m bench.layer_subsets --compressor results/compressors/smollm2-l96
  --sensitivity results/smollm2/sensitivity-l96-c4/sensitivity.json --out results/smollm2/layer-subsets``"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.layer_subsets")
    ap.add_argument("--compressor", required=True)
    ap.add_argument("--sensitivity", required=True)
    ap.add_argument("--targets", default="0.25,0.4,0.5", help="KV savings (vs the same-dtype dense cache)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import jax
    import kvjax
    from eval.data import c4, wikitext2
    from eval.perplexity import perplexity
    from kvjax.compressors import load_compressor

    model = kvjax.load("smollm2-135m")
    method, mparams = load_compressor(args.compressor, model)
    sens = json.load(open(args.sensitivity))
    skip = int(sens.get("max_tokens") or 0)  # C4 tokens the sweep saw: evaluate after them
    subsets = []
    for target in [float(t) for t in args.targets.split(",")]:
        plan = next((p for p in sens["plan"] if p["kv_saved"] >= target - 1e-9), sens["plan"][-1])
        subsets.append((target, tuple(plan["layers"])))
    data = {"wikitext2-test": np.asarray(model.tokenizer.encode(wikitext2("test").text), np.int32),
            "c4-2k (after the sweep's tokens)": np.asarray(model.tokenizer.encode(c4().text), np.int32)[skip:]}
    rows = []
    for name, ids in data.items():
        dense = perplexity(model, ids, kvjax.get_method("dense"), None, context=512, batch=8,
                           max_tokens=args.windows * 512)
        rows.append({"dataset": name, "target": 0.0, "layers": [], "kv_saved": 0.0, "ppl": dense["ppl"],
                     "tokens": dense["tokens"]})
        for target, layers in subsets:
            m = dataclasses.replace(method, layers=layers)
            r = perplexity(model, ids, m, mparams, context=512, batch=8, max_tokens=args.windows * 512)
            rows.append({"dataset": name, "target": target, "layers": list(layers), "kv_saved": r["kv_saved"],
                         "ppl": r["ppl"], "tokens": r["tokens"], "increase": r["ppl"] / dense["ppl"] - 1})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "compressor": args.compressor, "sensitivity": args.sensitivity, "windows": args.windows}
    os.makedirs(args.out, exist_ok=True)
    json.dump({"meta": meta, "rows": rows}, open(os.path.join(args.out, "layer_subsets.json"), "w"), indent=1)
    lines = [f"# Layer subsets of {os.path.basename(args.compressor)} ({meta['date']}, {meta['device']}, "
             f"first {args.windows} windows of 512)", "",
             "| dataset | target saved | layers compressed | KV saved | ppl | vs dense |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        inc = f"{100 * r['increase']:+.1f}%" if "increase" in r else "—"
        lines.append(f"| {r['dataset']} | {100 * r['target']:.0f}% | {len(r['layers'])} | {100 * r['kv_saved']:.1f}% | "
                     f"{r['ppl']:.3f} | {inc} |")
    open(os.path.join(args.out, "layer_subsets.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

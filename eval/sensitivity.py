"""Layer sensitivity of a trained compressor: ``python -m eval.sensitivity --compressor PATH``.

For each layer alone, the perplexity when only that layer is compressed (the others dense), against the
dense model. Default text: the C4 subset, because the compressors are trained on WikiText-2
``wiki.valid.raw`` and measuring there rewards in-domain adaptation (every layer looks "free"); do not
report C4 figures for a layer subset chosen from this sweep. Layers sorted by cost give the cheapest subset for a memory target: the output lists, for each
target share of KV memory saved, the layers to compress. Writes JSON, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np


def sweep(model, method, mparams, token_ids, *, context=512, batch=8, max_tokens=None, progress=True) -> dict:
    """Returns {"dense": ppl, "layers": [{"layer", "ppl", "increase"}], "plan": [...]} for ``method``."""
    from tqdm.auto import tqdm

    from eval.perplexity import perplexity
    from kvjax.cache.dense import Dense

    cfg = model.cfg
    dense_method = Dense(dtype=method.dtype)
    dense = perplexity(model, token_ids, dense_method, None, context=context, batch=batch, max_tokens=max_tokens)["ppl"]
    rows = []
    for layer in tqdm(method.compressed_layers(cfg), desc="sensitivity", disable=not progress):
        one = dataclasses.replace(method, layers=(layer,))
        ppl = perplexity(model, token_ids, one, mparams, context=context, batch=batch, max_tokens=max_tokens)["ppl"]
        rows.append({"layer": layer, "ppl": ppl, "increase": ppl / dense - 1})
    # greedy plan: cheapest layers first; the saving of a subset is exact from bytes_per_token
    order = sorted(rows, key=lambda r: r["increase"])
    dense_bytes = dense_method.bytes_per_token(cfg)
    plan, chosen = [], []
    for r in order:
        chosen.append(r["layer"])
        m = dataclasses.replace(method, layers=tuple(sorted(chosen)))
        plan.append({"layers": sorted(chosen), "kv_saved": 1 - m.bytes_per_token(cfg) / dense_bytes,
                     "sum_of_single_layer_increases": float(sum(x["increase"] for x in order[: len(chosen)]))})
    return {"dense_ppl": dense, "layers": rows, "plan": plan}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.sensitivity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--compressor", required=True)
    ap.add_argument("--dataset", default="c4", choices=["wikitext2", "c4"])
    ap.add_argument("--split", default="valid", help="wikitext2 split (valid is the training side)")
    ap.add_argument("--text-file", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    import kvjax
    from eval.common import encode_no_bos
    from eval.data import load_text
    from kvjax.compressors import load_compressor

    model = kvjax.load(args.model)
    method, mparams = load_compressor(args.compressor, model)
    data = load_text(args.dataset, args.split, args.text_file, args.data_dir)
    ids = np.asarray(encode_no_bos(model.tokenizer, data.text), np.int32)
    res = sweep(model, method, mparams, ids, context=args.context, batch=args.batch, max_tokens=args.max_tokens or None)
    res.update({"compressor": os.path.abspath(args.compressor), "data": data.record(), "context": args.context,
                "max_tokens": args.max_tokens})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sensitivity.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Layer sensitivity of {os.path.basename(os.path.normpath(args.compressor))}", "",
             f"Dense perplexity {res['dense_ppl']:.3f} on {data.name} ({args.max_tokens} tokens, context {args.context}).",
             "", "| layer | ppl with only this layer compressed | increase |", "|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['ppl']:.3f} | {100 * r['increase']:+.2f}% |" for r in res["layers"]]
    lines += ["", "Cheapest layers first (sum of single-layer increases is an estimate; measure the subset):", "",
              "| layers compressed | KV saved | est. increase |", "|---:|---:|---:|"]
    lines += [f"| {len(p['layers'])} | {100 * p['kv_saved']:.1f}% | {100 * p['sum_of_single_layer_increases']:+.2f}% |"
              for p in res["plan"]]
    with open(os.path.join(args.out, "sensitivity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([r["layer"] for r in res["layers"]], [100 * r["increase"] for r in res["layers"]])
    ax.set_xlabel("layer compressed alone")
    ax.set_ylabel("perplexity change (%)")
    ax.set_title(os.path.basename(os.path.normpath(args.compressor)))
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sensitivity.png"), dpi=120)
    print("\n".join(lines[:4]))
    print(f"[eval.sensitivity] wrote {args.out}")


if __name__ == "__main__":
    main()

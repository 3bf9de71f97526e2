"""Dense, plain quantization and the committed KV-CAR compressors on the same small slice, on CPU:
``python -m bench.cpu_slice --out results/smollm2/cpu-slice`` (8 windows of 512 tokens per dataset)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_slice")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import jax
    import kvjax
    from eval.data import c4, wikitext2
    from eval.perplexity import perplexity
    from kvjax.compressors import load_compressor

    model = kvjax.load("smollm2-135m")
    bf16 = kvjax.get_method("dense", dtype="bfloat16").bytes_per_token(model.cfg)
    methods = [("dense (bf16 bytes)", kvjax.get_method("dense"), None, bf16),
               ("int8 per token-head", kvjax.get_method("quantized", bits=8), None, None),
               ("int4 groups of 32", kvjax.get_method("quantized", bits=4, group=32), None, None)]
    for name in ("smollm2-k96v192-int8", "smollm2-l96-int8"):
        m, mp = load_compressor(str(ROOT / "results" / "compressors" / name), model)
        methods.append((f"KV-CAR {name}", m, mp, None))
    rows = []
    for data in (wikitext2("test"), c4()):
        ids = np.asarray(model.tokenizer.encode(data.text), np.int32)
        for label, m, mp, nbytes in methods:
            r = perplexity(model, ids, m, mp, context=512, batch=8, max_tokens=args.windows * 512)
            nb = nbytes or m.bytes_per_token(model.cfg)
            rows.append({"dataset": data.name, "method": label, "ppl": r["ppl"], "tokens": r["tokens"],
                         "kv_bytes_per_token": nb, "kv_saved_vs_bf16": 1 - nb / bf16})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "windows": args.windows, "context": 512}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_slice.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Same-slice comparison ({meta['date']}, {meta['device']}, first {args.windows} windows of 512)", "",
             "| dataset | method | KV bytes/token | saved vs bf16 | ppl |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['method']} | {r['kv_bytes_per_token']} | {100 * r['kv_saved_vs_bf16']:.1f}% | "
              f"{r['ppl']:.3f} |" for r in rows]
    with open(os.path.join(args.out, "cpu_slice.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

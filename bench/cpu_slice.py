"""Dense, plain quantization and the committed KV-CAR compressors on the same small slice, on CPU:
``python -m bench.cpu_slice --out results/smollm2/cpu-slice`` (8 windows of 512 tokens per dataset).

``--set ae-int4 --name kvcar_int4`` stores the committed KV-CAR compressors' latents in int4.
``--set issue7 --name kivi_minicache`` runs the KIVI and MiniCache settings instead (MiniCache through the
``decode`` protocol, one token per step, with a dense decode row beside it); bytes per token are those of
a cache of one window (``cache_nbytes(cfg, 1, 512) / 512``: KIVI's full-precision ring included).
``--plot`` only draws ``pareto_<dataset>.png`` from every JSON already in ``--out`` (all sets on one plot per
dataset: KV saved vs bf16 against perplexity, the Pareto front marked, MiniCache's decode-protocol rows
included beside a dense row that equals the full-protocol one)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def plot(out: str) -> list[str]:
    """pareto_<dataset>.png from every ``*.json`` of ``out`` written by this script."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.report import pareto_front

    rows = []
    for f in sorted(pathlib.Path(out).glob("*.json")):
        d = json.loads(f.read_text())
        if isinstance(d, dict) and isinstance(d.get("rows"), list):
            rows += [dict(r, source=f.stem) for r in d["rows"] if "ppl" in r and "kv_saved_vs_bf16" in r]
    written = []
    for ds in sorted({r["dataset"] for r in rows}):
        pts = {}
        for r in rows:
            if r["dataset"] == ds:
                pts.setdefault(r["method"], r)  # the same row repeated across sets: drawn once
        items = list(pts.values())
        xy = [(100 * r["kv_saved_vs_bf16"], r["ppl"]) for r in items]
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for (x, y), r in zip(xy, items):
            ax.scatter(x, y, s=22, color="tab:red" if "minicache" in r["method"] else "tab:blue")
            ax.annotate(r["method"][:40], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        fx = [xy[i] for i in pareto_front(xy)]
        ax.plot([p[0] for p in fx], [p[1] for p in fx], "k--", lw=1, label="Pareto front")
        ax.set_yscale("log")
        ax.set_xlabel("KV memory saved vs a bf16 dense cache (%)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"{ds}, first 8 windows of 512 (CPU slice); red: MiniCache (decode protocol)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = os.path.join(out, f"pareto_{ds}.png")
        fig.savefig(name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_slice")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", default="base", choices=["base", "issue7", "ae-int4"], help="which methods")
    ap.add_argument("--name", default="cpu_slice", help="stem of the JSON / markdown files written")
    ap.add_argument("--only", default=None, help="comma-separated labels of the set to run (default all)")
    ap.add_argument("--plot", action="store_true", help="only draw pareto_<dataset>.png from the JSONs in --out")
    args = ap.parse_args(argv)
    if args.plot:
        for name in plot(args.out):
            print(name)
        return

    import jax
    import kvjax
    from eval.data import c4, wikitext2
    from eval.perplexity import perplexity
    from kvjax.compressors import load_compressor

    model = kvjax.load("smollm2-135m")
    bf16 = kvjax.get_method("dense", dtype="bfloat16").bytes_per_token(model.cfg)
    if args.set == "base":
        methods = [("dense (bf16 bytes)", kvjax.get_method("dense"), None, bf16, "full"),
                   ("int8 per token-head", kvjax.get_method("quantized", bits=8), None, None, "full"),
                   ("int4 groups of 32", kvjax.get_method("quantized", bits=4, group=32), None, None, "full")]
        for name in ("smollm2-k96v192-int8", "smollm2-l96-int8"):
            m, mp = load_compressor(str(ROOT / "results" / "compressors" / name), model)
            methods.append((f"KV-CAR {name}", m, mp, None, "full"))
    elif args.set == "ae-int4":  # the committed KV-CAR compressors with int4 latents instead of int8
        import dataclasses
        methods = [("dense (bf16 bytes)", kvjax.get_method("dense"), None, bf16, "full")]
        for name in ("smollm2-k96v192-int8", "smollm2-l96-int8"):
            m, mp = load_compressor(str(ROOT / "results" / "compressors" / name), model)
            for group in (32, 0):
                m4 = dataclasses.replace(m, latent_dtype="int4", latent_group=group)
                methods.append((f"KV-CAR {name} -> int4 latents, group {group or 'whole vector'}", m4, mp, None, "full"))
    else:
        pm = kvjax.parse_method
        methods = [("dense (bf16 bytes)", pm("dense"), None, bf16, "full")]
        methods += [(spec, pm(spec), None, None, "full") for spec in (
            "kivi:bits=2,residual=32", "kivi:bits=2,residual=128", "kivi:bits=4,residual=32",
            "kivi:bits=4,residual=0", "kivi:bits=2,residual=0")]
        methods += [("dense (bf16 bytes), decode protocol", pm("dense"), None, bf16, "decode")]
        methods += [(spec, pm(spec), None, None, "decode") for spec in (
            "minicache:retain=0.05,dtype=bfloat16", "minicache:retain=0.2,dtype=bfloat16",
            "minicache:start=2,retain=0.05,dtype=bfloat16")]
    if args.only:
        keep = set(args.only.split(";"))
        methods = [m for m in methods if m[0] in keep]
    rows = []
    for data in (wikitext2("test"), c4()):
        ids = np.asarray(model.tokenizer.encode(data.text), np.int32)
        for label, m, mp, nbytes, protocol in methods:
            r = perplexity(model, ids, m, mp, context=512, batch=8, max_tokens=args.windows * 512, protocol=protocol)
            nb = nbytes or (m.bytes_per_token(model.cfg) if args.set != "issue7" else m.kv_bytes_per_token(model.cfg, 512))
            rows.append({"dataset": data.name, "method": label, "protocol": protocol, "ppl": r["ppl"],
                         "tokens": r["tokens"], "kv_bytes_per_token": nb, "kv_saved_vs_bf16": 1 - nb / bf16,
                         "kv_bytes_per_token_long_context": nbytes or m.bytes_per_token(model.cfg),
                         "wall_s": r["wall_s"]})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "windows": args.windows, "context": 512}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Same-slice comparison ({meta['date']}, {meta['device']}, first {args.windows} windows of 512)", "",
             "| dataset | method | protocol | KV bytes/token | saved vs bf16 | ppl |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['method']} | {r['protocol']} | {r['kv_bytes_per_token']:.0f} | "
              f"{100 * r['kv_saved_vs_bf16']:.1f}% | {r['ppl']:.3f} |" for r in rows]
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

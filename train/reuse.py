"""KV-CAR cross-layer reuse plans: ``python -m train.reuse analyze|plan``.

``analyze`` runs the dense model over training text (default: WikiText-2 ``wiki.valid.raw``, never a split
that is evaluated) and compares each kv head of layer l with the same head of layer l-1 (mean L1 distance
and cosine similarity, for K after RoPE and for V). It writes ``OUT/similarity.json`` and heatmaps
(rows = layers, columns = heads). ``plan`` picks the heads to reuse from that table, by threshold, count
or share, and writes a plan file for ``Reuse(plan=kvjax.reuse.load_plan(path, model))``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HEATMAPS = (("k_l1", "K mean |difference|"), ("v_l1", "V mean |difference|"),
            ("k_cos", "K cosine similarity"), ("v_cos", "V cosine similarity"))


def analyze(model, windows, out: str, record: dict | None = None, batch: int = 4) -> dict:
    """Measures head similarity over ``windows`` [W, T]; writes ``out``/similarity.json and the heatmaps.
    Returns the similarity table (with the model identity and data record added)."""
    from kvjax.compressors.io import model_identity
    from kvjax.reuse import collect_kv, head_similarity

    k_layers, v_layers = collect_kv(model, windows, batch=batch)
    sim = head_similarity(k_layers, v_layers)
    sim.update({"model": model_identity(model), "data": record or {}, "windows": int(len(windows)),
                "context": int(np.shape(windows)[1])})
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "similarity.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(sim, f, indent=1)
    os.replace(tmp, path)
    write_heatmaps(sim, out)
    return sim


def write_heatmaps(sim: dict, out: str) -> list[str]:
    """One PNG per table in ``HEATMAPS``: rows = layers 1..L-1, columns = kv heads. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    name = sim.get("model", {}).get("name") or "model"
    for key, title in HEATMAPS:
        table = np.asarray(sim[key])
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * table.shape[1], 1.2 + 0.22 * table.shape[0]))
        im = ax.imshow(table, aspect="auto", cmap="viridis_r" if key.endswith("l1") else "viridis",
                       extent=(-0.5, table.shape[1] - 0.5, sim["layers"][-1] + 0.5, sim["layers"][0] - 0.5))
        ax.set_xticks(range(table.shape[1]))
        ax.set_xlabel("kv head")
        ax.set_ylabel("layer (vs. layer - 1)")
        ax.set_title(f"{name}: {title}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = os.path.join(out, f"similarity_{key}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _load_model(name):
    from kvjax.checkpoints import load
    return load(name)


def cmd_analyze(args):
    from train.autoencoder import windows_from_ids
    from train.data import training_text

    model = _load_model(args.model)
    text, record = training_text(args.data, args.data_dir)
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    windows = windows_from_ids(ids, args.context)[: args.windows]
    record["tokens"] = int(windows.size)
    sim = analyze(model, windows, args.out, record, batch=args.batch)
    print(f"[train.reuse] {len(windows)} windows x {args.context} tokens, {sim['n_layers']} layers x "
          f"{sim['n_kv_heads']} kv heads; wrote {args.out}/similarity.json and heatmaps")


def cmd_plan(args):
    from kvjax.cache.reuse import Reuse
    from kvjax.reuse import check_identity, make_plan, save_plan

    with open(args.similarity) as f:
        sim = json.load(f)
    model = _load_model(args.model)
    check_identity(args.similarity, sim.get("model", {}), model)
    plan = make_plan(sim, threshold=args.threshold, n_heads=args.heads, share=args.share, metric=args.metric)
    how = {"similarity": os.path.abspath(args.similarity), "metric": args.metric, "threshold": args.threshold,
           "heads": args.heads, "share": args.share}
    save_plan(args.out, plan, model, info=how)
    cfg = model.cfg
    saved = 1 - Reuse(plan=plan).bytes_per_token(cfg) / Reuse().bytes_per_token(cfg)
    print(f"[train.reuse] {len(plan)} of {cfg.n_layers * cfg.n_kv_heads} kv heads reused "
          f"({100 * saved:.1f}% of the KV cache saved); wrote {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.reuse", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="measure head similarity between adjacent layers")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--data", default=None, help="text file (default: WikiText-2 wiki.valid.raw)")
    a.add_argument("--data-dir", default=None, help="shared data folder (default ../shared/data)")
    a.add_argument("--windows", type=int, default=8, help="number of token windows to measure over")
    a.add_argument("--context", type=int, default=512, help="tokens per window")
    a.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    a.add_argument("--out", required=True, help="output directory")
    a.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("plan", help="choose the heads to reuse from a similarity table")
    p.add_argument("--similarity", required=True, help="similarity.json written by analyze")
    p.add_argument("--model", default="smollm2-135m")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="reuse heads within this distance (cosine: at least)")
    how.add_argument("--heads", type=int, help="reuse the N most similar heads")
    how.add_argument("--share", type=float, help="reuse this share of all heads (= of the KV bytes)")
    p.add_argument("--metric", default="l1", choices=["l1", "l1_rel", "cosine"])
    p.add_argument("--out", required=True, help="plan file (JSON)")
    p.set_defaults(fn=cmd_plan)
    args = ap.parse_args(argv)
    if getattr(args, "windows", 1) <= 0:
        ap.error("--windows must be positive")
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])

"""KV-CAR cross-layer reuse plans: ``python -m train.reuse analyze|plan``.

``analyze`` runs the dense model over training text (default: WikiText-2 ``wiki.valid.raw``, never a split
that is evaluated) and compares each kv head of layer l with the same head of layer l-1 (mean L1 distance
and cosine similarity, for K after RoPE and for V). It writes ``OUT/similarity.json`` and heatmaps
(rows = layers, columns = heads). ``plan`` picks the heads to reuse from that table, by threshold, count
or share, and writes a plan file for ``Reuse(plan=kvjax.reuse.load_plan(path, model))``. ``curve``
measures perplexity against the number of reused heads (greedy by the similarity table), for plain reuse
and, with ``--compressor``, for reuse of whole layers composed with a trained autoencoder in both modes
(decoded K/V and latents); it writes ``OUT/curve.json``, ``OUT/curve.md`` and ``OUT/curve.png``.
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


def refine_plan(model, sim: dict, n_heads: int, ids, *, metric: str = "cosine", candidates: int | None = None,
                context: int = 512, batch: int = 8, inner=None, mparams=None, log=print) -> tuple[list, tuple]:
    """Measured-cost refinement of a plain reuse plan: the ``candidates`` (default 2 x n_heads) most similar
    heads by ``metric`` are each reused alone and scored by perplexity over ``ids`` (calibration text, never
    the evaluation split); the ``n_heads`` cheapest are the plan. Returns (per-candidate costs, plan)."""
    from eval.perplexity import perplexity
    from kvjax.cache.reuse import Reuse
    from kvjax.reuse import head_scores

    scores = head_scores(sim, metric)
    n_cand = min(len(scores), candidates or 2 * n_heads)
    if not 0 <= n_heads <= n_cand:
        raise ValueError(f"cannot pick {n_heads} heads from {n_cand} candidates")
    pool = sorted(scores, key=lambda p: (scores[p], p))[:n_cand]
    kw = dict(context=context, batch=batch)
    base = perplexity(model, ids, inner, mparams, **kw)["ppl"]
    costs = []
    for i, head in enumerate(pool):
        ppl = perplexity(model, ids, Reuse(plan=(head,), inner=inner), mparams, **kw)["ppl"]
        costs.append({"layer": head[0], "head": head[1], "similarity_score": scores[head], "ppl": ppl,
                      "cost": ppl / base - 1})
        log(f"[train.reuse] candidate {i + 1}/{len(pool)} {head}: ppl {ppl:.3f} ({100 * costs[-1]['cost']:+.2f}%)")
    ranked = sorted(costs, key=lambda c: (c["cost"], c["layer"], c["head"]))
    return costs, tuple(sorted((c["layer"], c["head"]) for c in ranked[:n_heads]))


def cmd_plan(args):
    from kvjax.cache.reuse import Reuse
    from kvjax.reuse import check_identity, make_layer_plan, make_plan, save_plan

    with open(args.similarity) as f:
        sim = json.load(f)
    model = _load_model(args.model)
    check_identity(args.similarity, sim.get("model", {}), model)
    how = {"similarity": os.path.abspath(args.similarity), "metric": args.metric, "threshold": args.threshold,
           "heads": args.heads, "share": args.share, "whole_layers": args.whole_layers}
    if args.whole_layers is not None:
        plan = make_layer_plan(sim, args.whole_layers, args.metric)
    else:
        plan = make_plan(sim, threshold=args.threshold, n_heads=args.heads, share=args.share, metric=args.metric)
    if args.refine:
        if args.whole_layers is not None:
            raise SystemExit("--refine ranks single heads: not with --whole-layers")
        from eval.common import encode_no_bos
        from train.data import training_text

        text, source = training_text(args.data, args.data_dir)
        ids = encode_no_bos(model.tokenizer, text)[: args.refine_windows * args.context]
        costs, plan = refine_plan(model, sim, len(plan), ids, metric=args.metric, candidates=args.refine_candidates,
                                  context=args.context)
        how.update(refined_on=source, refine_tokens=len(ids), candidate_costs=costs)
    save_plan(args.out, plan, model, info=how)
    cfg = model.cfg
    saved = 1 - Reuse(plan=plan).bytes_per_token(cfg) / Reuse().bytes_per_token(cfg)
    print(f"[train.reuse] {len(plan)} of {cfg.n_layers * cfg.n_kv_heads} kv heads reused "
          f"({100 * saved:.1f}% of the KV cache saved); wrote {args.out}")


# ---------------------------------------------------------------------------------------------- the curve
def _bf16_bytes(method, cfg) -> int:
    """Bytes per token of ``method`` with its float storage in bfloat16 (int8 latents unchanged)."""
    import dataclasses

    if method.inner is not None:
        method = dataclasses.replace(method, inner=dataclasses.replace(method.inner, dtype="bfloat16"))
    return dataclasses.replace(method, dtype="bfloat16").bytes_per_token(cfg)


def thresholds(rows, rises=(0.03, 0.08)) -> list[dict]:
    """Per (series, dataset) and reference (dense, and the series' own zero-reuse point): the largest KV
    saving (vs bf16) whose ppl is within each relative rise of the reference."""
    out = []
    for key in sorted({(r["series"], r["dataset"]) for r in rows}):
        rs = [r for r in rows if (r["series"], r["dataset"]) == key]
        refs = {"dense": rs[0]["dense_ppl"]}
        zero = [r for r in rs if r["reused_heads"] == 0]
        if zero and zero[0]["series"] != "reuse":
            refs["no reuse"] = zero[0]["ppl"]
        for ref_name, ref in refs.items():
            for rise in rises:
                ok = [r for r in rs if r["ppl"] <= ref * (1 + rise)]
                best = max(ok, key=lambda r: r["kv_saved_vs_bf16"]) if ok else None
                out.append({"series": key[0], "dataset": key[1], "reference": ref_name, "reference_ppl": ref,
                            "max_rise": rise, "kv_saved_vs_bf16": best["kv_saved_vs_bf16"] if best else None,
                            "reused_heads": best["reused_heads"] if best else None,
                            "ppl": best["ppl"] if best else None})
    return out


def write_curve_plot(rows, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for series in sorted({r["series"] for r in rows}):
            rs = sorted((r for r in rows if r["dataset"] == ds and r["series"] == series),
                        key=lambda r: r["kv_saved_vs_bf16"])
            ax.plot([100 * r["kv_saved_vs_bf16"] for r in rs], [r["ppl"] for r in rs], "o-", label=series, ms=4)
        dense = next(r["dense_ppl"] for r in rows if r["dataset"] == ds)
        ax.axhline(dense, color="k", lw=0.8, ls="--", label="dense")
        ax.axhline(dense * 1.03, color="g", lw=0.6, ls=":", label="dense +3%")
        ax.axhline(dense * 1.08, color="r", lw=0.6, ls=":", label="dense +8%")
        ax.set_yscale("log")
        ax.set_xlabel("KV saved vs bf16 dense (%)")
        ax.set_ylabel("perplexity")
        ax.set_title(ds, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_curve(args):
    import datetime

    import jax

    from eval.common import encode_no_bos
    from eval.data import load_text
    from eval.perplexity import perplexity
    from kvjax.cache.dense import Dense
    from kvjax.cache.reuse import Reuse
    from kvjax.reuse import (check_identity, collect_kv, fit_latent_decoders, latent_fit_scores, make_layer_plan,
                             make_plan, plan_from_layer_scores)
    from kvjax.jsonio import write_json_atomic
    from train.autoencoder import windows_from_ids
    from train.data import training_text

    with open(args.similarity) as f:
        sim = json.load(f)
    model = _load_model(args.model)
    check_identity(args.similarity, sim.get("model", {}), model)
    cfg = model.cfg
    bf16 = Dense(dtype="bfloat16").bytes_per_token(cfg)
    series = [("reuse", Reuse(plan=make_plan(sim, n_heads=n, metric=args.metric)), None, n)
              for n in args.heads]
    if args.compressor:
        from kvjax.compressors import load_compressor

        ae, mp = load_compressor(args.compressor, model)
        text, _ = training_text(None, args.data_dir)
        calib = windows_from_ids(np.asarray(model.tokenizer.encode(text), np.int32), args.context)[: args.calib_windows]
        name = os.path.basename(os.path.normpath(args.compressor))
        kv = collect_kv(model, calib, pre_rope=ae.pre_rope) if "latent" in args.modes else None
        if "fit" in args.rank and kv is None:
            raise SystemExit("--rank fit ranks layers for latent reuse: include latent in --modes")
        fit = latent_fit_scores(ae, mp, kv) if "fit" in args.rank else None
        for rank in args.rank:
            for mode in args.modes:
                if rank == "fit" and mode != "latent":
                    continue  # the fit ranks layers for latent reuse only
                for n in args.layers:
                    if rank == "fit":
                        plan = plan_from_layer_scores(fit, n, cfg.n_kv_heads)
                    else:
                        plan = make_layer_plan(sim, n, args.metric, ae.compressed_layers(cfg))
                    m = Reuse(plan=plan, inner=ae, mode=mode)
                    p = fit_latent_decoders(model, m, mp, calib, kv=kv) if mode == "latent" and n else mp
                    label = f"{name} + reuse ({mode}{', layers by fit' if rank == 'fit' else ''})"
                    series.append((label, m, p, n * cfg.n_kv_heads))
    rows = []
    for ds in args.datasets:
        data = load_text(ds, "test", None, args.data_dir)
        ids = encode_no_bos(model.tokenizer, data.text)
        kw = dict(context=args.context, batch=args.batch, max_tokens=args.max_tokens)
        dense = perplexity(model, ids, Dense(), None, **kw)["ppl"]
        done = {}  # the zero-reuse point of every mode is the same method: measured once
        for label, m, p, n in series:
            key = (m.plan, m.mode if m.plan else "", m.inner)
            if key not in done:
                done[key] = perplexity(model, ids, m, p, **kw)
            r = done[key]
            nb = _bf16_bytes(m, cfg)
            rows.append({"series": label, "dataset": data.name, "reused_heads": n, "plan": [list(x) for x in m.plan],
                         "ppl": r["ppl"], "dense_ppl": dense, "rise_vs_dense": r["ppl"] / dense - 1,
                         "tokens": r["tokens"], "kv_bytes_per_token_bf16": nb, "kv_saved_vs_bf16": 1 - nb / bf16})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "plan"}), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "similarity": os.path.abspath(args.similarity), "metric": args.metric, "context": args.context,
            "max_tokens": args.max_tokens, "compressor": args.compressor, "calib_windows": args.calib_windows,
            "rank": args.rank if args.compressor else None,
            "model": sim.get("model", {})}
    os.makedirs(args.out, exist_ok=True)
    th = thresholds(rows)
    write_json_atomic(os.path.join(args.out, "curve.json"), {"meta": meta, "rows": rows, "thresholds": th}, indent=1)
    write_curve_plot(rows, os.path.join(args.out, "curve.png"))
    lines = [f"# Perplexity vs reused heads ({meta['date']}, {meta['device']}, context {args.context}, "
             f"{'first %d tokens' % args.max_tokens if args.max_tokens else 'whole test set'})", "",
             "| dataset | series | reused heads | KV saved vs bf16 | ppl | vs dense |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['series']} | {r['reused_heads']} | {100 * r['kv_saved_vs_bf16']:.1f}% | "
              f"{r['ppl']:.3f} | {100 * r['rise_vs_dense']:+.1f}% |" for r in rows]
    lines += ["", "Largest saving within a rise of the reference (among the measured points):", "",
              "| dataset | series | reference | ref ppl | rise <= | KV saved vs bf16 | reused heads | ppl |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {t['dataset']} | {t['series']} | {t['reference']} | {t['reference_ppl']:.3f} | "
              f"{100 * t['max_rise']:.0f}% | "
              + (f"{100 * t['kv_saved_vs_bf16']:.1f}% | {t['reused_heads']} | {t['ppl']:.3f} |"
                 if t["ppl"] else "none | | |")
              for t in th]
    with open(os.path.join(args.out, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_compose(args):
    """Saves a Reuse method as a compressor directory (``--compressor`` for eval.perplexity / zeroshot /
    capacity / report): plain reuse of the N most similar heads, or a trained autoencoder with whole layers
    reused (latent mode: the reusing layers' decoders fitted by least squares on wiki.valid)."""
    from kvjax.cache.reuse import Reuse
    from kvjax.compressors import load_compressor, save_compressor
    from kvjax.reuse import check_identity, collect_kv, fit_latent_decoders, make_layer_plan, make_plan
    from train.autoencoder import windows_from_ids
    from train.data import training_text

    with open(args.similarity) as f:
        sim = json.load(f)
    model = _load_model(args.model)
    check_identity(args.similarity, sim.get("model", {}), model)
    training = {"similarity": os.path.abspath(args.similarity), "metric": args.metric}
    if args.compressor is None:
        if args.plan:
            from kvjax.reuse import load_plan

            plan = load_plan(args.plan, model)
            training["plan_file"] = os.path.abspath(args.plan)
        elif args.heads is not None:
            plan = make_plan(sim, n_heads=args.heads, metric=args.metric)
            training["heads"] = args.heads
        else:
            raise SystemExit("plain reuse needs --heads N (the most similar heads) or --plan FILE (train.reuse plan)")
        method, mp = Reuse(plan=plan, dtype=args.dtype), {}
    else:
        if args.layers is None:
            raise SystemExit("--layers N: the number of whole layers reused with --compressor")
        ae, mp = load_compressor(args.compressor, model)
        method = Reuse(plan=make_layer_plan(sim, args.layers, args.metric, ae.compressed_layers(model.cfg)), inner=ae,
                       mode=args.mode)
        training.update(compressor=os.path.abspath(args.compressor), layers=args.layers, mode=args.mode)
        if args.mode == "latent" and args.layers:
            text, _ = training_text(None, args.data_dir)
            calib = windows_from_ids(np.asarray(model.tokenizer.encode(text), np.int32), args.context)[: args.calib_windows]
            mp = fit_latent_decoders(model, method, mp, calib, kv=collect_kv(model, calib, pre_rope=ae.pre_rope))
            training.update(calib_windows=args.calib_windows, context=args.context)
    path = save_compressor(args.out, method, mp, model, training=training)
    print(f"[train.reuse] {len(method.plan)} reused heads -> {path}")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


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
    how.add_argument("--whole-layers", type=int,
                     help="reuse every head of the N most similar layers (for an autoencoder: latents mix heads)")
    p.add_argument("--metric", default="l1", choices=["l1", "l1_rel", "cosine"])
    p.add_argument("--refine", action="store_true",
                   help="measure each candidate head's perplexity cost alone on calibration text (wiki.valid) "
                        "and keep the cheapest, as many as the threshold/target chose")
    p.add_argument("--refine-candidates", type=int, default=None, help="candidates to measure (default 2 x heads)")
    p.add_argument("--refine-windows", type=int, default=4, help="calibration windows of --context tokens")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--data", default=None, help="calibration text file (default: WikiText-2 wiki.valid.raw)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="plan file (JSON)")
    p.set_defaults(fn=cmd_plan)
    c = sub.add_parser("curve", help="perplexity vs reused heads (plain, and composed with an autoencoder)")
    c.add_argument("--similarity", required=True, help="similarity.json written by analyze")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--metric", default="cosine", choices=["l1", "l1_rel", "cosine"])
    c.add_argument("--heads", type=_int_list, default=[0, 3, 6, 9, 15, 30],
                   help="plain reuse: numbers of heads to reuse, greedy by the metric")
    c.add_argument("--compressor", default=None, help="trained autoencoder: also reuse whole layers with it")
    c.add_argument("--layers", type=_int_list, default=[0, 1, 2, 3, 5, 8],
                   help="with --compressor: numbers of whole layers to reuse")
    c.add_argument("--modes", type=lambda t: t.split(","), default=["decoded", "latent"],
                   help="with --compressor: decoded,latent")
    c.add_argument("--rank", type=lambda t: t.split(","), default=["cosine"],
                   help="with --compressor: how whole layers are chosen, cosine (the similarity table) and/or fit "
                        "(latent mode: least-squares residual of predicting a layer from the latents below)")
    c.add_argument("--calib-windows", type=int, default=8,
                   help="latent mode: wiki.valid windows for the least-squares decoders")
    c.add_argument("--datasets", nargs="+", default=["wikitext2"], choices=["wikitext2", "c4"])
    c.add_argument("--context", type=int, default=512)
    c.add_argument("--max-tokens", type=int, default=None, help="first N tokens of each text (CPU: 4096)")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--data-dir", default=None)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_curve)
    k = sub.add_parser("compose", help="save a reuse method (plain, or over a trained autoencoder) as a compressor")
    k.add_argument("--similarity", required=True, help="similarity.json written by analyze")
    k.add_argument("--model", default="smollm2-135m")
    k.add_argument("--metric", default="cosine", choices=["l1", "l1_rel", "cosine"])
    k.add_argument("--heads", type=int, default=None, help="plain reuse: the N most similar heads")
    k.add_argument("--plan", default=None, help="plain reuse: a plan file from `train.reuse plan` (e.g. --refine)")
    k.add_argument("--compressor", default=None, help="trained autoencoder whose whole layers are reused")
    k.add_argument("--layers", type=int, default=None, help="with --compressor: the N most similar layers")
    k.add_argument("--mode", default="latent", choices=["latent", "decoded"])
    k.add_argument("--dtype", default="float32", help="plain reuse: storage dtype of the stored heads")
    k.add_argument("--calib-windows", type=int, default=8)
    k.add_argument("--context", type=int, default=512)
    k.add_argument("--data-dir", default=None)
    k.add_argument("--out", required=True, help="compressor directory to write")
    k.set_defaults(fn=cmd_compose)
    args = ap.parse_args(argv)
    if getattr(args, "windows", 1) <= 0:
        ap.error("--windows must be positive")
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])

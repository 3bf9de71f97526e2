"""A grid of methods x tasks, resumable, written out as JSON, a markdown table and PNG plots.

The grid is a JSON file::

    {
      "model": "smollm2-135m", "dtype": "float32",
      "methods": ["dense", "dense:dtype=bfloat16", {"compressor": "ckpt/ae32", "label": "ae32"},
                  {"compressor": "ckpt/ae32", "settings": {"latent_dtype": "int4"}, "label": "ae32 int4"}],
      "tasks": [
        {"task": "perplexity", "dataset": "wikitext2", "context": 512, "protocol": "continue", "prefix": 384},
        {"task": "zeroshot", "name": "piqa", "limit": 500},
        {"task": "capacity", "memory_gb": 80, "seq_len": 4096, "batch": 64}
      ],
      "external": ["results/peers/kvpress.json"],
      "plot": {"groups": {"trained on the test domain": ["ae32"]}, "off_front": ["trained on the test domain"]}
    }

Perplexity tasks take the keyword arguments of :func:`eval.perplexity.perplexity` plus ``dataset`` /
``split`` / ``text_file``; zero-shot tasks take ``name`` (piqa, winogrande) or ``jsonl``, ``limit``,
``batch``; capacity tasks take those of :func:`eval.capacity.capacity`.

Every (method, task) cell is cached as ``OUT/cells/<name>.json`` together with its specification; a re-run
skips the cells already finished (a failed cell is recorded in the report and tried again next time).
Outputs in ``OUT``: ``results.json``, ``results.md`` (tables with date and device), ``ppl_vs_saved_*.png``
(KV memory saved vs perplexity, Pareto front marked) and ``capacity.png``.

External results (e.g. a peer library's run: ``python -m eval.peers kvpress --out DIR``) are JSON files
holding one result object, a list of them, or ``{"results": [...]}``, or a folder of such files (every
``*.json`` in it, in name order). Each needs a ``library`` field (the marker on the plots), ``method``, and
for the perplexity plot ``ppl`` and ``kv_saved``; where a row and the task's own cells both carry
``dataset``, ``protocol``, ``context``, ``prefix`` or ``tokens`` (the number of scored tokens) those must be
equal for the point to join the task's table and plot (a comparison is fair only under the same protocol and
tokens).

``plot`` (optional, outside the cells' specifications, so changing it re-draws without re-running):
``groups`` names sets of method labels that the perplexity plots draw in their own colour and legend entry;
the points of the groups listed in ``off_front`` (a list, or ``{dataset: list}`` for some datasets' plots only)
are drawn hollow and left out of the Pareto front (e.g. coders whose training text adapts the model to the
test corpus).

Command line::

    python -m eval.report --grid grid.json --out results/2026-11-smollm2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re
import sys
import time
import traceback

from eval.common import device_record, encode_no_bos, method_spec, now, write_json

MATCH_KEYS = ("dataset", "protocol", "context", "prefix", "tokens")


# ---------------------------------------------------------------------------------------------- grid
def _method_entry(entry) -> dict:
    if isinstance(entry, str):
        return {"method": entry}
    if isinstance(entry, dict) and ("method" in entry or "compressor" in entry):
        return dict(entry)
    raise ValueError(f"grid method {entry!r}: give a spec string or {{'method': ..., 'compressor': ...}}")


def _task_entry(entry) -> dict:
    if not isinstance(entry, dict) or entry.get("task") not in ("perplexity", "zeroshot", "capacity"):
        raise ValueError(f"grid task {entry!r}: needs 'task': perplexity, zeroshot or capacity")
    return dict(entry)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:80]


def cell_name(model: str, dtype: str, method: dict, task: dict) -> tuple[str, dict]:
    """(file stem, canonical spec) of one cell; the spec is what a cached cell must match to be reused."""
    spec = {"model": model, "dtype": dtype, "method": method, "task": task}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    mlabel = method.get("label") or method.get("method") or pathlib.Path(method["compressor"]).name
    return f"{task_slug(task)}__{_slug(mlabel)}__{digest}", spec


def task_slug(task: dict) -> str:
    digest = hashlib.sha1(json.dumps(task, sort_keys=True).encode()).hexdigest()[:6]
    label = task.get("label") or "-".join(str(task.get(k)) for k in ("task", "dataset", "name", "protocol")
                                          if task.get(k) is not None)
    return f"{_slug(label)}-{digest}"


class _Runner:
    """Runs cells in-process: the model is loaded once, texts tokenized once per dataset."""

    def __init__(self, grid: dict, model=None, data_dir=None, progress: bool = False):
        self.grid, self.model, self.data_dir, self.progress = grid, model, data_dir, progress
        self.texts: dict = {}

    def get_model(self):
        if self.model is None:
            from eval.common import load_model
            self.model = load_model(self.grid["model"], self.grid.get("dtype", "float32"))
        return self.model

    def method(self, entry: dict):
        from eval.common import load_method
        return load_method(entry.get("method", "dense"), entry.get("compressor"), self.get_model(),
                           entry.get("settings"))

    def run(self, method_entry: dict, task: dict) -> dict:
        from eval import data
        model = self.get_model()
        method, mparams, spec = self.method(method_entry)
        kind = task["task"]
        kw = {k: v for k, v in task.items() if k not in ("task", "label", "dataset", "split", "text_file", "name",
                                                         "jsonl", "source")}
        if kind == "perplexity":
            from eval.perplexity import perplexity
            key = (task.get("dataset", "wikitext2"), task.get("split", "test"), task.get("text_file"))
            if key not in self.texts:
                text = data.load_text(*key, data_dir=self.data_dir)
                self.texts[key] = (text, encode_no_bos(model.tokenizer, text.text))
            text, ids = self.texts[key]
            res = perplexity(model, ids, method, mparams, progress=self.progress, **kw)
            res.update(text.record())
        elif kind == "zeroshot":
            from eval.zeroshot import evaluate
            ds = data.load_choices(task.get("name", "piqa"), task.get("jsonl"), kw.pop("limit", None), self.data_dir,
                                   task.get("source", "files"))
            res = evaluate(model, ds.items, method, mparams, progress=self.progress, **kw)
            res.update(ds.record())
        else:
            from eval.capacity import capacity
            from eval.common import tree_bytes
            out = capacity(model.cfg, [method], param_bytes=tree_bytes(model.params), params=model.params,
                           mparams={method_spec(method): mparams} if mparams is not None else None,
                           dense_dtype=self.grid.get("dtype", "float32"),
                           do_verify=kw.pop("verify", False), **kw)
            res = {**{k: v for k, v in out.items() if k != "methods"}, **out["methods"][0], "task": "capacity"}
        res.update({"method_arg": spec, "compressor": method_entry.get("compressor"),
                    "label": method_entry.get("label") or spec, "library": "kvjax"})
        if kind != "zeroshot":
            res["task"] = kind
        else:
            res["zeroshot_task"] = res.pop("task")
            res["task"] = "zeroshot"
        return res


def run_grid(grid: dict, out_dir, model=None, data_dir=None, progress: bool = False, log=print) -> dict:
    """Runs every missing cell of ``grid`` into ``out_dir``, then writes results.json / results.md / plots.

    ``model``: an already loaded model (LoadedModel or eval.common.Model with a tokenizer); default: load
    ``grid["model"]``. Returns the results object written to results.json.
    """
    out = pathlib.Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    methods = [_method_entry(m) for m in grid.get("methods", ["dense"])]
    tasks = [_task_entry(t) for t in grid.get("tasks", [])]
    model_name = grid.get("model") or getattr(getattr(model, "cfg", None), "name", "model")
    dtype = grid.get("dtype", "float32")
    runner = _Runner(grid, model, data_dir, progress)
    cells, ran, reused, failed = [], 0, 0, 0
    for task in tasks:
        for method in methods:
            name, spec = cell_name(model_name, dtype, method, task)
            path = out / "cells" / f"{name}.json"
            cached = None
            if path.exists():
                try:
                    cached = json.loads(path.read_text())
                except json.JSONDecodeError:
                    cached = None
            if cached and cached.get("spec") == spec and "result" in cached:
                cells.append({"cell": name, **cached["result"]})
                reused += 1
                continue
            t0 = time.perf_counter()
            try:
                result = runner.run(method, task)
            except Exception as e:  # one broken cell must not lose the others
                failed += 1
                log(f"[eval.report] cell {name} failed: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stderr)
                cells.append({"cell": name, "task": task["task"], "label": method.get("label") or method.get("method"),
                              "library": "kvjax", "error": f"{type(e).__name__}: {e}"})
                continue
            write_json(path, {"spec": spec, "result": result})
            cells.append({"cell": name, **result})
            ran += 1
            log(f"[eval.report] cell {name} done in {time.perf_counter() - t0:.1f}s")
    external = []
    for f in grid.get("external", []):
        external.extend(load_external(f))
    measured = sorted({c["device_kind"] for c in cells if c.get("device_kind")})
    results = {"grid": grid, "model": model_name, "dtype": dtype, "date": now(), **device_record(),
               "cells_measured_on": measured, "cells": cells, "external": external, "ran": ran,
               "reused": reused, "failed": failed}
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results, tasks))
    results["plots"] = [str(p) for p in plot(results, tasks, out)]
    write_json(out / "results.json", results)
    return results


def load_external(path) -> list[dict]:
    """Result rows from an external JSON file, or from every ``*.json`` of a folder (name order); each row
    must name its ``library``."""
    p = pathlib.Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.json") if not f.name.startswith("."))
        if not files:
            raise ValueError(f"{p}: external results folder holds no .json file")
        return [{**row, "external_source": str(p)} for f in files for row in load_external(f)]
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: external results file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    rows = obj.get("results", [obj]) if isinstance(obj, dict) else obj
    if not isinstance(rows, list):
        raise ValueError(f"{p}: expected a result object, a list, or {{'results': [...]}}")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("library"):
            raise ValueError(f"{p}: result {i} has no 'library' field (which library produced it?)")
        if "method" not in r:
            raise ValueError(f"{p}: result {i} has no 'method' field")
        out.append({**r, "external_file": str(p), "external_source": str(p), "label": r.get("label") or r["method"]})
    return out


# ---------------------------------------------------------------------------------------------- tables
def _fmt(v, spec=".4f"):
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ppl_group(task: dict) -> dict:
    protocol = task.get("protocol", "full")
    return {"protocol": protocol, "context": task.get("context", 512),
            "prefix": task.get("prefix") if protocol == "continue" else None}


def _matches(row: dict, ref: dict) -> bool:
    return all(row.get(k) == ref.get(k) for k in MATCH_KEYS if row.get(k) is not None and ref.get(k) is not None)


def _task_rows(results: dict, task: dict) -> list[dict]:
    """Our cells of one task (by the cell names the grid gives it) and the external rows that match it."""
    names = {cell_name(results["model"], results["dtype"], _method_entry(m), task)[0]
             for m in results["grid"].get("methods", ["dense"])}
    rows = [c for c in results["cells"] if c.get("cell") in names]
    if task["task"] == "perplexity":
        ref = {**_ppl_group(task), **{k: rows[0][k] for k in ("dataset", "tokens") if rows and k in rows[0]}}
        rows += [r for r in results["external"] if "ppl" in r and r.get("task", "perplexity") == "perplexity"
                 and _matches(r, ref)]
    return rows


def markdown(results: dict, tasks: list[dict]) -> str:
    lines = [f"# kvjax evaluation: {results['model']} ({results['dtype']})", "",
             f"Date {results['date']}; rendered on {results['device_count']}x {results['device_kind']} "
             f"({results['platform']}, jax {results['jax_version']}); kvjax cells measured on "
             f"{', '.join(results.get('cells_measured_on') or ['?'])} (each cell JSON records its device and date).", ""]
    for task in tasks:
        rows = _task_rows(results, task)
        kind = task["task"]
        title = " ".join(f"{k}={v}" for k, v in task.items() if k != "task")
        lines += [f"## {kind}: {title}", ""]
        if kind == "perplexity":
            lines += ["| method | library | KV bytes/token | KV saved | ppl | tokens scored |",
                      "|---|---|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r.get('label')} | {r.get('library')} | {_fmt(r.get('kv_bytes_per_token'), '.1f')} | "
                             f"{_pct(r.get('kv_saved'))} | {_fmt(r.get('ppl'))} | {_fmt(r.get('tokens'))} |"
                             + (f" error: {r['error']}" if "error" in r else ""))
        elif kind == "zeroshot":
            lines += ["| method | library | KV saved | acc | acc_norm | n |", "|---|---|---:|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r.get('label')} | {r.get('library')} | {_pct(r.get('kv_saved'))} | "
                             f"{_fmt(r.get('acc'))} | {_fmt(r.get('acc_norm'))} | {_fmt(r.get('n'))} |"
                             + (f" error: {r['error']}" if "error" in r else ""))
        else:
            lines += ["| method | KV bytes/token | budget GiB | max batch @ seq | max seq @ batch | confirmed | "
                      "decode tok/s |", "|---|---:|---:|---:|---:|---|---:|"]
            for r in rows:
                if "error" in r:
                    lines.append(f"| {r.get('label')} | error: {r['error']} | | | | | |")
                    continue
                v = r.get("verify") or {}
                ran = f" (ran {v['batch']}x{v['seq_len']})" if "batch" in v and "error" not in v else ""
                tps = v.get("decode_tokens_per_s")
                lines.append(f"| {r.get('label')} | {r['bytes_per_token']} | {r['budget_bytes'] / 2**30:.2f} | "
                             f"{r['max_batch']} @ {r['at_seq_len']} | {r['max_seq_len_capped']} @ {r['at_batch']} | "
                             f"{'yes' if r.get('confirmed') else 'computed'}"
                             f"{ran}"
                             f" | {_fmt(tps, '.1f')} |")
        lines.append("")
    if results["external"]:
        sources = {f"{r['library']} ({r.get('external_source', r['external_file'])})" for r in results["external"]}
        lines += ["External results: " + ", ".join(sorted(sources)), ""]
    return "\n".join(lines)


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


# ---------------------------------------------------------------------------------------------- plots
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (saved, ppl) that no other point beats: saved >= and ppl <=, one strictly."""
    front = []
    for i, (s, p) in enumerate(points):
        if not any((s2 >= s and p2 <= p) and (s2 > s or p2 < p) for j, (s2, p2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_groups(grid: dict, dataset: str | None = None) -> tuple[dict, set]:
    """({method label: group name}, {groups left off the Pareto front of ``dataset``'s plot}) from the grid's
    optional ``plot``."""
    cfg = grid.get("plot") or {}
    groups = cfg.get("groups") or {}
    off_cfg = cfg.get("off_front") or []
    listed = set(off_cfg) if isinstance(off_cfg, list) else {g for v in off_cfg.values() for g in v}
    off = set(off_cfg) if isinstance(off_cfg, list) else set(off_cfg.get(dataset, []))
    if listed - set(groups):
        raise ValueError(f"grid plot.off_front names groups that plot.groups does not define: "
                         f"{sorted(listed - set(groups))}")
    return {str(label): g for g, labels in groups.items() for label in labels}, off


def front_of(rows: list[dict], pts: list[tuple[float, float]], group_of: dict, off_front: set) -> list[int]:
    """Indices into ``rows`` of the Pareto front over the rows whose group is not in ``off_front``."""
    on = [i for i, r in enumerate(rows) if group_of.get(str(r["label"])) not in off_front]
    return [on[k] for k in pareto_front([pts[i] for i in on])]


def plot(results: dict, tasks: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stamp = f"{results['model']} · {', '.join(results.get('cells_measured_on') or [results['device_kind']])} · {results['date'][:10]}"
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for task in tasks:
        if task["task"] != "perplexity":
            continue
        rows = [r for r in _task_rows(results, task) if r.get("ppl") is not None and r.get("kv_saved") is not None]
        if not rows:
            continue
        pts = [(float(r["kv_saved"]), float(r["ppl"])) for r in rows]
        group_of, off_front = plot_groups(results.get("grid") or {}, task.get("dataset") or rows[0].get("dataset"))
        front = front_of(rows, pts, group_of, off_front)
        libs = sorted({r["library"] for r in rows}, key=lambda x: (x != "kvjax", x))
        fig, ax = plt.subplots(figsize=(11, 5.5))
        for gi, group in enumerate(sorted({group_of[str(r["label"])] for r in rows if str(r["label"]) in group_of})):
            idx = [i for i, r in enumerate(rows) if group_of.get(str(r["label"])) == group]
            colour = plt.get_cmap("Dark2")(gi % 8)
            off = group in off_front
            ax.scatter([100 * pts[i][0] for i in idx], [pts[i][1] for i in idx], marker="o", zorder=3,
                       facecolors="none" if off else colour, edgecolors=colour,
                       label=group + (" (off the front)" if off else ""))
            for i in idx:
                ax.annotate(str(rows[i]["label"])[:34], (100 * pts[i][0], pts[i][1]), fontsize=7, color=colour,
                            xytext=(3, 3), textcoords="offset points")
        for li, lib in enumerate(libs):
            idx = [i for i, r in enumerate(rows) if r["library"] == lib and str(r["label"]) not in group_of]
            if not idx:
                continue
            ax.scatter([100 * pts[i][0] for i in idx], [pts[i][1] for i in idx], marker=markers[li % len(markers)],
                       label=lib, zorder=3)
            families: dict = {}  # a peer method at several ratios: one line, named in the legend
            for i in idx:
                if rows[i].get("peer_method") and rows[i].get("ratio") is not None:
                    families.setdefault(rows[i]["peer_method"], []).append(i)
                else:
                    ax.annotate(str(rows[i]["label"])[:34], (100 * pts[i][0], pts[i][1]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            for fam, fi in sorted(families.items()):
                fi = sorted(fi, key=lambda i: pts[i][0])
                name = str(rows[fi[0]]["label"]).rsplit(" r=", 1)[0]
                ax.plot([100 * pts[i][0] for i in fi], [pts[i][1] for i in fi], lw=1, alpha=0.7, zorder=2,
                        marker=markers[li % len(markers)], ms=4, label=f"{lib}: {name}")
        if max(p for _, p in pts) > 3 * min(p for _, p in pts):  # one runaway point must not flatten the rest
            from matplotlib.ticker import ScalarFormatter
            ax.set_yscale("log")
            for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_fmt(ScalarFormatter())
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.plot([100 * pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, zorder=2,
                label="Pareto front")
        ax.scatter([100 * pts[i][0] for i in front], [pts[i][1] for i in front], s=120, facecolors="none",
                   edgecolors="k", zorder=4)
        g = _ppl_group(task)
        ax.set_xlabel("KV memory saved vs dense (%)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(f"{rows[0].get('dataset', task.get('dataset', ''))} · {g['protocol']} ctx={g['context']}"
                     + (f" prefix={g['prefix']}" if g["prefix"] else "") + f"\n{stamp}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the points
        fig.tight_layout()
        name = out / f"ppl_vs_saved_{task_slug(task)}.png"
        fig.savefig(name, dpi=120)
        plt.close(fig)
        written.append(name)
    cap_rows = [c for c in results["cells"] if c.get("task") == "capacity" and "max_batch" in c]
    if cap_rows:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        labels = [str(r["label"])[:24] for r in cap_rows]
        colors = ["tab:green" if r.get("confirmed") else "tab:gray" for r in cap_rows]
        axes[0].bar(labels, [r["max_batch"] for r in cap_rows], color=colors)
        axes[0].set_title(f"max batch @ seq {cap_rows[0]['at_seq_len']}", fontsize=9)
        axes[1].bar(labels, [r["max_seq_len"] for r in cap_rows], color=colors)
        axes[1].set_title(f"max tokens per sequence @ batch {cap_rows[0]['at_batch']}\n(memory bound; the model's "
                          f"context is {cap_rows[0].get('model_max_seq_len', '?')})", fontsize=9)
        for ax in axes:
            ax.tick_params(axis="x", rotation=30, labelsize=7)
        fig.suptitle(f"KV capacity in {cap_rows[0]['memory_gb']:g} GiB (green: confirmed on device, grey: computed)"
                     f"\n{stamp}", fontsize=9)
        fig.tight_layout()
        name = out / "capacity.png"
        fig.savefig(name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", required=True, help="grid JSON (see the module docstring)")
    ap.add_argument("--out", required=True, help="output folder (cells/ cache, results.json/.md, PNGs)")
    ap.add_argument("--external", action="append", default=[], help="extra external result JSON (repeatable)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        grid = json.loads(pathlib.Path(args.grid).read_text())
    except FileNotFoundError:
        ap.error(f"{args.grid}: grid file not found")
    grid["external"] = list(grid.get("external", [])) + args.external
    res = run_grid(grid, args.out, data_dir=args.data_dir, progress=not args.no_progress)
    print(f"[eval.report] {len(res['cells'])} cells ({res['ran']} run, {res['reused']} reused, {res['failed']} failed),"
          f" {len(res['external'])} external rows -> {args.out}/results.md, {len(res['plots'])} plots")
    return res


if __name__ == "__main__":
    main()

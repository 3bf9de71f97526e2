"""Peer libraries under kvjax's perplexity protocol: NVIDIA kvpress presses and transformers' QuantizedCache.

``python -m eval.peers kvpress`` loads the same model file through ``transformers`` (its GGUF loader
dequantizes the SmolLM2 file to float32), scores the same token ids as :mod:`eval.perplexity` (kvjax's
tokenizer; the one transformers 5.2.0 builds from the GGUF gives other ids at 2 of the 303,415 positions of
WikiText-2 test, and its pre-tokenizer is not the GGUF's ``smollm`` type) in the same windows (:func:`eval.perplexity.plan_windows`), and writes one JSON per
(method, ratio) in eval.perplexity's schema, so ``eval.report`` puts both libraries on one plot.

Protocol (compress-then-continue, ``--protocol continue --prefix P`` of eval.perplexity): each window of
``context`` tokens starts from an empty cache; its first P tokens are prefilled with the press active
(kvpress compresses the cache once the prefill's attention has run), then the other ``context - P`` tokens
are teacher-forced in one forward call over the compressed cache, with their true positions P..C-1, and
only those are scored (the first one from the prefill's last logit).

Methods: ``dense`` (no press), the kvpress presses of :data:`PRESSES` at compression ratios r (kvpress
defaults for every other setting), and ``quanto-int4`` / ``quanto-int2`` (transformers' ``QuantizedCache``,
optimum-quanto backend, group 64, 128-token residual).

KV bytes per token are counted on the prefix, as eval.perplexity counts kvjax methods (``kv_bytes_at_context
= prefix``), and measured from the tensors the cache holds right after the prefill (first batch), which
must equal the arithmetic of :func:`press_bytes_per_token` / :func:`quanto_bytes_per_token`:

* a press at ratio r keeps ``max(1, int(P * (1 - r)))`` tokens per layer and head (kvpress's rule), in the
  model's dtype, gathered into contiguous tensors (no index is stored): ``(1 - r) x dense`` at P=384;
* QuantizedCache stores packed int4 / int2 codes and, per group of 64 values, a scale and a zero point in
  the model's dtype (float32 here), both counted. Its residual (up to 128 most recent tokens kept in full
  precision) holds none of the prefix: transformers quantizes the whole prefill at once, and only the
  continuation's tokens enter the residual. ``kv_cache_bytes_per_window`` adds those ``context - P``
  full-precision continuation tokens (every peer method holds them dense); ``kv_bytes_per_token`` does not.

``--shared-prefill`` scores every pending job from one prefill per batch (see :func:`batch_nll_shared`).
Jobs are resumable: a finished (method, ratio) JSON is skipped, and a job in progress saves its running
sums after every batch (``.partial-*.json``) and continues from there when started again.

Command line (set-up: README, "Peer libraries")::

    .venv-peers/bin/python -m eval.peers kvpress --methods dense,snapkv,observed_attention \\
        --ratios 0.5,0.75 --max-windows 8 --out results/peers/wikitext2-8win
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time

import numpy as np

from eval.perplexity import plan_windows

PEERS = ("kvpress",)
DEFAULT_RATIOS = (0.5, 0.75, 0.875)
QUANTO_GROUP = 64
QUANTO_RESIDUAL = 128


@dataclasses.dataclass(frozen=True)
class PressSpec:
    """One kvpress press: its class name in ``kvpress``, a label for tables, and whether its score reads
    the attention weights of the prefill (then the model must run with eager attention)."""

    cls: str
    label: str
    needs_attentions: bool = False


PRESSES: dict[str, PressSpec] = {
    "snapkv": PressSpec("SnapKVPress", "SnapKV"),
    "observed_attention": PressSpec("ObservedAttentionPress", "H2O (ObservedAttention)", needs_attentions=True),
    "expected_attention": PressSpec("ExpectedAttentionPress", "ExpectedAttention"),
    "tova": PressSpec("TOVAPress", "TOVA"),
    "streaming_llm": PressSpec("StreamingLLMPress", "StreamingLLM"),
    "knorm": PressSpec("KnormPress", "Knorm"),
}
ALIASES = {"h2o": "observed_attention", "expected": "expected_attention", "streamingllm": "streaming_llm"}
QUANTO = {"quanto-int4": 4, "quanto-int2": 2}
DEFAULT_METHODS = ("dense", *PRESSES, *QUANTO)


# ---------------------------------------------------------------------------------------------- jobs
@dataclasses.dataclass(frozen=True)
class Job:
    """One (method, ratio) cell: ``method`` is ``dense``, a key of PRESSES or of QUANTO; ``ratio`` is the
    press's compression ratio (None for dense and quanto)."""

    method: str
    ratio: float | None = None

    @property
    def name(self) -> str:
        return self.method if self.ratio is None else f"{self.method}-r{self.ratio:g}"

    @property
    def label(self) -> str:
        if self.method in PRESSES:
            return f"{PRESSES[self.method].label} r={self.ratio:g}"
        if self.method in QUANTO:
            return f"QuantizedCache int{QUANTO[self.method]} (quanto)"
        return "dense (transformers)"

    @property
    def library(self) -> str:
        return "transformers" if self.method in QUANTO else "kvpress"

    @property
    def spec(self) -> str:
        if self.method in PRESSES:
            return f"{self.method}:ratio={self.ratio:g}"
        if self.method in QUANTO:
            return f"{self.method}:group={QUANTO_GROUP},residual={QUANTO_RESIDUAL}"
        return "dense"


def parse_jobs(methods: str, ratios: str | None = None) -> list[Job]:
    """Jobs from ``--methods`` (comma-separated; ``name`` runs every ratio of ``--ratios``, ``name@r`` one
    ratio) in the order given. Raises ValueError naming an unknown method or a ratio outside (0, 1)."""
    rs = [float(r) for r in ratios.split(",")] if ratios else list(DEFAULT_RATIOS)
    for r in rs:
        if not 0.0 < r < 1.0:
            raise ValueError(f"--ratios: a compression ratio must be in (0, 1), got {r}")
    jobs: list[Job] = []
    for item in (m.strip() for m in methods.split(",")):
        if not item:
            continue
        name, _, one = item.partition("@")
        name = ALIASES.get(name.lower(), name.lower())
        if name not in PRESSES and name not in QUANTO and name != "dense":
            raise ValueError(f"--methods: unknown method {name!r}; use dense, {', '.join(PRESSES)}, "
                             f"{', '.join(QUANTO)} (or {', '.join(ALIASES)})")
        if name in PRESSES:
            for r in ([float(one)] if one else rs):
                if not 0.0 < r < 1.0:
                    raise ValueError(f"--methods {item!r}: a compression ratio must be in (0, 1)")
                jobs.append(Job(name, r))
        else:
            if one:
                raise ValueError(f"--methods {item!r}: {name} takes no ratio")
            jobs.append(Job(name))
    if len(set(jobs)) != len(jobs):
        raise ValueError("--methods: a (method, ratio) appears twice")
    return jobs


# ---------------------------------------------------------------------------------------------- bytes
def dense_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K and V of every layer for one token: 2 * L * K * D * itemsize."""
    return 2 * n_layers * n_kv_heads * head_dim * itemsize


def kept_tokens(prefix: int, ratio: float) -> int:
    """Tokens a kvpress ScorerPress keeps per layer and head out of ``prefix`` (its ``compute_n_kept``)."""
    return max(1, int(prefix * (1.0 - ratio)))


def press_bytes_per_token(dense_bpt: float, prefix: int, ratio: float) -> float:
    """Bytes per prefix token of a press at ``ratio``: the kept tokens stay in the dense layout."""
    return dense_bpt * kept_tokens(prefix, ratio) / prefix


def quanto_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, bits: int, group: int = QUANTO_GROUP,
                           scale_itemsize: int = 4) -> float:
    """Bytes per quantized token of transformers' quanto QuantizedCache: packed ``bits``-bit codes plus one
    scale and one zero point (``scale_itemsize`` bytes each) per ``group`` values, for K and V of every
    layer. Raises ValueError when a token's K*D values do not split into whole groups."""
    values = n_kv_heads * head_dim
    if values % group or (group * bits) % 8:
        raise ValueError(f"group={group}: K*D={values} values per token must split into whole groups of whole bytes")
    return 2 * n_layers * (values * bits / 8 + (values // group) * 2 * scale_itemsize)


def tensor_storage_bytes(t) -> int:
    """Bytes a (possibly quantized, tensor-subclass) torch tensor holds: the sum over its inner tensors
    (``__tensor_flatten__``: codes, scales, zero points), else ``numel * element_size``."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(t, n)) for n in names)
    return int(t.numel() * t.element_size())


def cache_storage_bytes(cache) -> int:
    """Bytes held by every layer of a transformers cache: K/V tensors (``keys``/``values``) and, for a
    QuantizedCache, the quantized tensors and the full-precision residual."""
    total = 0
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, attr, None)
            if t is not None and hasattr(t, "numel"):
                total += tensor_storage_bytes(t)
    return total


def window_bytes(kv_bytes_per_token: float, dense_bpt: float, context: int, prefix: int) -> float:
    """Bytes a peer's cache holds for one window at its end: the prefix as the method stores it, the
    ``context - prefix`` continuation tokens in full precision (presses compress only the prefill; the
    QuantizedCache keeps them in its residual)."""
    return kv_bytes_per_token * prefix + dense_bpt * (context - prefix)


# ---------------------------------------------------------------------------------------------- records
RECORD_KEYS = ("ppl", "nll", "nll_sum", "tokens", "windows", "input_tokens", "used_tokens", "dropped_tail_tokens",
               "context", "stride", "protocol", "prefix", "chunk", "batch", "method", "kv_bytes_per_token",
               "dense_kv_bytes_per_token", "dense_dtype", "kv_saved", "kv_bytes_at_context",
               "kv_cache_bytes_per_window", "model", "model_sha256", "model_source", "dtype", "device_kind",
               "platform", "device_count", "wall_s", "date")


def make_record(job: Job, *, nll_sum: float, tokens: int, windows: int, input_tokens: int, used_tokens: int,
                context: int, prefix: int, batch: int, kv_bytes_per_token: float, dense_kv_bytes_per_token: int,
                dense_dtype: str, model: dict, wall_s: float, device: str = "cpu", extra: dict | None = None) -> dict:
    """A result in eval.perplexity's schema (``RECORD_KEYS``; its jax_version aside) plus the peer's fields:
    library, label, peer_method, ratio, and whatever ``extra`` adds (press, versions, ...). ``used_tokens``:
    the length of the text the windows were cut from; ``model``: model, model_sha256, model_source, dtype;
    ``device``: the torch device type the model ran on."""
    from eval.common import now
    if tokens <= 0:
        raise ValueError("no scored tokens")
    mean = nll_sum / tokens
    kv = int(kv_bytes_per_token) if float(kv_bytes_per_token).is_integer() else float(kv_bytes_per_token)
    out = {"ppl": math.exp(mean), "nll": mean, "nll_sum": nll_sum, "tokens": int(tokens), "windows": int(windows),
           "input_tokens": int(input_tokens), "used_tokens": int(used_tokens),
           "dropped_tail_tokens": int(used_tokens - windows * context), "context": context, "stride": context,
           "protocol": "continue", "prefix": prefix, "chunk": None, "batch": batch, "method": job.spec,
           "kv_bytes_per_token": kv, "dense_kv_bytes_per_token": int(dense_kv_bytes_per_token),
           "dense_dtype": dense_dtype, "kv_saved": 1.0 - kv / dense_kv_bytes_per_token,
           "kv_bytes_at_context": prefix, "kv_cache_bytes_per_window": window_bytes(kv, dense_kv_bytes_per_token,
                                                                                      context, prefix), **model,
           "device_kind": device, "platform": device, "device_count": 1, "wall_s": wall_s, "date": now(),
           "task": "perplexity", "library": job.library, "label": job.label, "peer_method": job.method,
           "ratio": job.ratio}
    out.update(extra or {})
    return out


def versions() -> dict:
    """Installed versions of the peer's packages (None where one is missing)."""
    from importlib import metadata
    out = {}
    for pkg in ("kvpress", "transformers", "torch", "optimum-quanto", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------------------------------------- torch side
def require_peer() -> None:
    """Raises ImportError with the set-up command when kvpress (the ``peers`` extra) is not installed."""
    import importlib.util
    if importlib.util.find_spec("kvpress") is None or importlib.util.find_spec("torch") is None:
        raise ImportError("eval.peers needs the 'peers' extra (kvpress, transformers<5.3, torch): "
                          "python3 -m venv --system-site-packages .venv-peers && "
                          ".venv-peers/bin/pip install -e '.[peers]'  (see README, 'Peer libraries')")


def load_hf_model(path: str, attn_implementation: str = "eager"):
    """The transformers model of a ``.gguf`` file (dequantized to float32) or an HF directory, in eval mode."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    if str(path).endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                     gguf_file=os.path.basename(path), dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    return model.eval()


def make_press(job: Job):
    """The kvpress press object of a press job (kvpress defaults besides the ratio), else None."""
    if job.method not in PRESSES:
        return None
    import kvpress
    return getattr(kvpress, PRESSES[job.method].cls)(compression_ratio=job.ratio)


def make_cache(job: Job, hf_config):
    """A fresh transformers cache for one batch of windows: DynamicCache, or QuantizedCache for quanto jobs."""
    from transformers import DynamicCache, QuantizedCache
    if job.method in QUANTO:
        return QuantizedCache(backend="quanto", config=hf_config, nbits=QUANTO[job.method],
                              q_group_size=QUANTO_GROUP, residual_length=QUANTO_RESIDUAL)
    return DynamicCache()


def batch_nll(model, tokens, prefix: int, press=None, cache=None):
    """NLL of predictions ``prefix .. C-1`` of each window under compress-then-continue.

    tokens: [B, C] int64 torch tensor. Returns (nll [B, C-prefix] float64 torch tensor, bytes the cache
    held right after the prefill)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    cache = DynamicCache() if cache is None else cache
    with torch.inference_mode():
        with press(model) if press is not None else contextlib.nullcontext():
            head = model(input_ids=tokens[:, :prefix], past_key_values=cache, logits_to_keep=1).logits[:, -1]
        held = cache_storage_bytes(cache)
        nll = _continue_nll(model, tokens, prefix, head, cache)
    return nll, held


def batch_nll_shared(model, tokens, prefix: int, jobs: list[Job]) -> dict:
    """:func:`batch_nll` of several jobs from one prefill: returns {job: (nll, bytes held after the prefill)}.

    A kvpress press compresses a layer's cache after that layer's attention has run, so the prefill's hidden
    states, and the K/V each press compresses, are the same for every press and for dense. Here one prefill
    runs with a hook on every attention layer that hands each press its ``compress`` inputs (as kvpress's
    ``BasePress.forward_hook`` does) and keeps each result; each job's cache is then built from those K/V
    (``cache.update``: a QuantizedCache quantizes the whole prefill there, as in its own prefill) and the
    continuation runs once per job. Same numbers as one run per job (tested), for one prefill per batch."""
    import torch
    from transformers import DynamicCache

    presses = {j: make_press(j) for j in jobs if j.method in PRESSES}
    for press in presses.values():
        press.post_init_from_model(model)
    kept = {j: {} for j in presses}
    dense = DynamicCache()

    def hook(module, args, kwargs, output):
        layer = dense.layers[module.layer_idx]
        for j, press in presses.items():
            kept[j][module.layer_idx] = press.compress(module, kwargs["hidden_states"], layer.keys, layer.values,
                                                       output[1], kwargs)
        return output

    lm = model.model
    handles = []
    with torch.inference_mode():
        try:
            for layer in lm.layers:
                layer.self_attn.rotary_emb = lm.rotary_emb  # as kvpress's BasePress.__call__
                handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
            head = model(input_ids=tokens[:, :prefix], past_key_values=dense, logits_to_keep=1).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        out = {}
        for j in sorted(jobs, key=lambda j: j.method == "dense"):  # dense last: its continuation grows `dense`
            if j.method == "dense":
                cache = dense
            else:
                cache = make_cache(j, model.config)
                for i, layer in enumerate(dense.layers):
                    k, v = kept[j][i] if j in presses else (layer.keys, layer.values)
                    cache.update(k, v, i)
            held = cache_storage_bytes(cache)
            out[j] = (_continue_nll(model, tokens, prefix, head, cache), held)
    return out


def _continue_nll(model, tokens, prefix, head, cache):
    """NLL of tokens prefix..C-1: the first from the prefill's last logits ``head`` [B, V], the rest from one
    teacher-forced forward of tokens prefix..C-1 over ``cache``. Returns [B, C-prefix] float64."""
    import torch
    b, c = tokens.shape
    # true positions for RoPE; the mask follows the (possibly shorter) cache, as kvpress's pipeline does
    pos = torch.arange(prefix, c).unsqueeze(0).expand(b, -1)
    tail = model(input_ids=tokens[:, prefix:], past_key_values=cache, position_ids=pos).logits
    logits = torch.cat([head[:, None], tail[:, :-1]], dim=1).double()  # [B, C-P, V]
    targets = tokens[:, prefix:]
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[..., None])[..., 0]


def run_jobs(jobs: list[Job], model, ids: np.ndarray, *, context: int, prefix: int, batch: int = 8,
             max_windows: int | None = None, partial_dir: str | os.PathLike | None = None, shared: bool = False,
             log=None) -> dict:
    """Scores ``ids`` (1-D, no BOS) under the protocol with each job: one run per job, or with ``shared``
    one prefill per batch for all of them (:func:`batch_nll_shared`). Returns {job: state}, each state
    holding nll_sum, tokens, windows_total, done, kv_held (bytes after the first batch's prefill),
    kv_held_tokens (B*P of that batch), wall_s (the shared prefill's time is counted in every job).
    With ``partial_dir`` each job's state is saved after every batch as ``.partial-<job>.json`` and a
    later call resumes from it."""
    import torch
    from kvjax.jsonio import read_json
    from eval.common import write_json

    starts, weights = plan_windows(int(ids.size), context, None, "continue", prefix)
    if not (weights[:, prefix - 1:] == 1).all() or weights[:, :prefix - 1].any():
        raise AssertionError("plan_windows no longer scores exactly predictions prefix..context-1")
    if max_windows is not None:
        starts = starts[:max_windows]
    states, paths = {}, {}
    for job in jobs:
        state = {"job": job.name, "context": context, "prefix": prefix, "windows_total": int(len(starts)), "done": 0,
                 "nll_sum": 0.0, "tokens": 0, "kv_held": None, "kv_held_tokens": None, "wall_s": 0.0}
        paths[job] = None if partial_dir is None else pathlib.Path(partial_dir) / f".partial-{job.name}.json"
        if paths[job] is not None and paths[job].exists():
            old = read_json(paths[job])
            if all(old.get(k) == state[k] for k in ("job", "context", "prefix", "windows_total")):
                state = old
                if log:
                    log(f"[eval.peers] {job.name}: resuming at window {state['done']}/{len(starts)}")
        states[job] = state
    ids64 = np.asarray(ids, np.int64)
    while True:
        pending = [j for j in jobs if states[j]["done"] < len(starts)]
        if not pending:
            break
        first = min(states[j]["done"] for j in pending)
        group = [j for j in pending if states[j]["done"] == first] if shared else [pending[0]]
        s = starts[first: first + batch]
        tok = torch.as_tensor(ids64[s[:, None] + np.arange(context)[None, :]])
        t0 = time.perf_counter()
        if shared:
            res = batch_nll_shared(model, tok, prefix, group)
        else:
            res = {group[0]: batch_nll(model, tok, prefix, make_press(group[0]), make_cache(group[0], model.config))}
        dt = time.perf_counter() - t0
        for job, (nll, held) in res.items():
            st = states[job]
            if st["kv_held"] is None:
                st["kv_held"], st["kv_held_tokens"] = int(held), int(len(s) * prefix)
            st["nll_sum"] += float(nll.sum())
            st["tokens"] += int(nll.numel())
            st["done"] += int(len(s))
            st["wall_s"] += dt
            if paths[job] is not None:
                write_json(paths[job], st)
            if log:
                eta = st["wall_s"] / st["done"] * (len(starts) - st["done"]) if st["done"] else 0.0
                log(f"[eval.peers] {job.name}: {st['done']}/{len(starts)} windows, ppl "
                    f"{math.exp(st['nll_sum'] / st['tokens']):.4f}, {st['wall_s']:.0f}s, ~{eta / 60:.0f} min left")
    return states


def run_job(job: Job, model, ids: np.ndarray, **kw) -> dict:
    """:func:`run_jobs` for one job; returns its state."""
    return run_jobs([job], model, ids, **kw)[job]


def expected_bytes_per_token(job: Job, cfg, prefix: int, itemsize: int = 4) -> float:
    """The arithmetic bytes per prefix token of ``job`` on a kvjax ModelConfig (see the module docstring)."""
    dense = dense_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, itemsize)
    if job.method in PRESSES:
        return press_bytes_per_token(dense, prefix, job.ratio)
    if job.method in QUANTO:
        return quanto_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, QUANTO[job.method],
                                      QUANTO_GROUP, itemsize)
    return float(dense)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("peer", choices=PEERS)
    ap.add_argument("--model", default="smollm2-135m", help="named model or .gguf file (kvjax.load resolves it)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated: dense, " + ", ".join(PRESSES) + ", " + ", ".join(QUANTO)
                    + "; name@ratio for one ratio")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), help="press compression ratios")
    ap.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "c4"])
    ap.add_argument("--split", default="test", choices=["test", "valid"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=384)
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward call")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                    help="attention kernel (ObservedAttention needs eager attention weights)")
    ap.add_argument("--out", required=True, help="folder: one JSON per (method, ratio)")
    ap.add_argument("--force", action="store_true", help="re-run jobs whose JSON exists")
    ap.add_argument("--shared-prefill", action="store_true",
                    help="one prefill per batch for all pending jobs (same numbers, ~3x less work for 10 jobs)")
    args = ap.parse_args(argv)
    try:
        jobs = parse_jobs(args.methods, args.ratios)
    except ValueError as e:
        ap.error(str(e))
    if args.attn != "eager" and any(j.method in PRESSES and PRESSES[j.method].needs_attentions for j in jobs):
        ap.error("--attn sdpa: ObservedAttention reads the attention weights; use --attn eager")
    require_peer()

    import torch
    import kvjax
    from eval import data
    from eval.common import encode_no_bos
    from kvjax.cache.dense import Dense

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if args.force or not (out / f"{j.name}.json").exists()]
    for j in jobs:
        if j not in todo:
            log(f"[eval.peers] {j.name}: {out / (j.name + '.json')} exists, skipped")
    if not todo:
        return []
    text = data.load_text(args.dataset, args.split, None, args.data_dir)
    lm = kvjax.load(args.model, dtype="float32")  # tokenizer, config, file hash: the ids eval.perplexity scores
    ids = np.asarray(encode_no_bos(lm.tokenizer, text.text), np.int64)
    cfg = lm.cfg
    model_rec = {"model": cfg.name or lm.source, "model_sha256": lm.sha256, "model_source": lm.source,
                 "dtype": "float32"}
    del lm
    model = load_hf_model(model_rec["model_source"], args.attn)
    hf = model.config
    got = (hf.num_hidden_layers, hf.num_key_value_heads, getattr(hf, "head_dim", None), hf.vocab_size)
    if got != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size):
        raise ValueError(f"transformers read {model_rec['model_source']} as (layers, kv heads, head dim, vocab) "
                         f"{got}, kvjax as {(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size)}")
    dense_bpt = int(Dense(dtype="float32").bytes_per_token(cfg))
    results = []
    groups = [todo] if args.shared_prefill else [[j] for j in todo]
    for group in groups:
        t0 = time.perf_counter()
        states = run_jobs(group, model, ids, context=args.context, prefix=args.prefix, batch=args.batch,
                          max_windows=args.max_windows, partial_dir=out, shared=args.shared_prefill, log=log)
        for job in group:
            results.append(_finish(job, states[job], out, args, cfg, ids, text, model, model_rec, dense_bpt,
                                   time.perf_counter() - t0, log))
    return results


def _finish(job, state, out, args, cfg, ids, text, model, model_rec, dense_bpt, total_wall, log) -> dict:
    """Writes one finished job's JSON and drops its partial file; returns the record."""
    import torch
    from eval.common import write_json
    measured = state["kv_held"] / state["kv_held_tokens"]
    expected = expected_bytes_per_token(job, cfg, args.prefix)
    if not math.isclose(measured, expected, rel_tol=1e-9):
        log(f"[eval.peers] WARNING {job.name}: the cache held {measured:.2f} B/prefix token, the arithmetic "
            f"says {expected:.2f}")
    windows = state["windows_total"]
    rec = make_record(job, nll_sum=state["nll_sum"], tokens=state["tokens"], windows=windows,
                      input_tokens=int(ids.size), used_tokens=int(ids.size), context=args.context,
                      prefix=args.prefix, batch=args.batch, kv_bytes_per_token=measured,
                      dense_kv_bytes_per_token=dense_bpt, dense_dtype="float32", model=model_rec,
                      wall_s=state["wall_s"], device=model.device.type, extra={
                          **text.record(), "press": PRESSES[job.method].cls if job.method in PRESSES else None,
                          "quant_bits": QUANTO.get(job.method),
                          "quant_group": QUANTO_GROUP if job.method in QUANTO else None,
                          "quant_residual": QUANTO_RESIDUAL if job.method in QUANTO else None,
                          "kv_bytes_expected_per_token": expected, "attn_implementation": args.attn,
                          "torch_threads": torch.get_num_threads(), "versions": versions(),
                          "max_windows": args.max_windows, "peer": args.peer,
                          "total_wall_s": total_wall})
    if args.max_windows is not None:  # the text the windows cover, as eval.perplexity's --max-tokens
        rec["used_tokens"] = windows * args.context
        rec["dropped_tail_tokens"] = 0
    write_json(out / f"{job.name}.json", rec)
    (out / f".partial-{job.name}.json").unlink(missing_ok=True)
    log(f"[eval.peers] {job.label}: ppl {rec['ppl']:.4f} over {rec['tokens']:,} tokens ({windows} windows); "
        f"KV {rec['kv_bytes_per_token']:.1f} B/token, saved {100 * rec['kv_saved']:.1f}%; {state['wall_s']:.0f}s")
    return rec


if __name__ == "__main__":
    main()

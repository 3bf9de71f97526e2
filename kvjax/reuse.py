"""Choosing which kv heads reuse the layer below (KV-CAR cross-layer reuse), as pure functions.

``collect_kv`` runs the dense model and returns every layer's K (after RoPE, as the cache stores it) and
V; ``head_similarity`` compares each head of layer l with the same head of layer l-1 (mean L1 distance,
the paper's metric, and cosine similarity); ``make_plan`` turns that table into the (layer, head) pairs
of :class:`kvjax.cache.reuse.Reuse` (``make_layer_plan``: whole layers, for an autoencoder inner);
``save_plan`` / ``load_plan`` keep a plan with the identity of the model it was measured on;
``fit_latent_decoders`` fits, by least squares, the decoders with which a layer reused in latent mode
reads its source layer's latents.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.jsonio import read_json, write_json_atomic

FORMAT = "kvjax-reuse-plan/1"
METRICS = ("l1", "l1_rel", "cosine")


class PlanError(ValueError):
    """A reuse plan that cannot be used with this model, or a damaged plan file."""


# ---------------------------------------------------------------------------------------------- measuring
def collect_kv(model, token_windows, batch: int = 4, pre_rope: bool = False):
    """Dense forward over ``token_windows`` [W, T] (full windows, no padding), ``batch`` windows at a time.

    Returns (k_layers, v_layers): per layer a float32 numpy array [W*T, K, D]; keys after RoPE, or before
    it with ``pre_rope`` (the rotation undone: R(-p) R(p) = I).
    """
    from kvjax.cache.dense import Dense
    from kvjax.models.layers import rope
    from kvjax.models.transformer import forward

    cfg, method = model.cfg, Dense(layout="bskd")  # [B, S, K, D] is read below
    windows = np.asarray(token_windows, np.int32)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"token_windows must be a non-empty [W, T] array, got shape {windows.shape}")
    fwd = jax.jit(forward, static_argnames=("cfg", "method"))
    ks = [[] for _ in range(cfg.n_layers)]
    vs = [[] for _ in range(cfg.n_layers)]
    for i in range(0, len(windows), batch):
        tokens = jnp.asarray(windows[i:i + batch])
        cache = method.init(cfg, tokens.shape[0], tokens.shape[1])
        _, cache = fwd(model.params, cfg, tokens, cache, method)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        for l, state in enumerate(cache.layers):
            k = state["k"]
            if pre_rope and cfg.uses_rope:
                k = rope(k.astype(jnp.float32), -pos, cfg.rope_theta)
            ks[l].append(np.asarray(k, np.float32).reshape(-1, cfg.n_kv_heads, cfg.head_dim))
            vs[l].append(np.asarray(state["v"], np.float32).reshape(-1, cfg.n_kv_heads, cfg.head_dim))
    return [np.concatenate(x) for x in ks], [np.concatenate(x) for x in vs]


def _compare(a, b):
    """a, b: [N, K, D] (layer l and layer l-1). Returns per head: mean |a-b| per element, that mean over
    the mean |a|, and the mean over tokens of the cosine similarity of the D-vectors; each [K]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    l1 = diff.mean(axis=(0, 2))
    l1_rel = diff.sum(axis=(0, 2)) / np.maximum(np.abs(a).sum(axis=(0, 2)), 1e-30)
    dot = (a * b).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = np.where(norms > 0, dot / np.maximum(norms, 1e-30), np.where(dot == 0, 1.0, 0.0))
    return l1, l1_rel, cos.mean(axis=0)


def head_similarity(k_layers, v_layers) -> dict:
    """Compares head h of layer l with head h of layer l-1 for every layer l >= 1, over the given tokens.

    k_layers, v_layers: per layer [N, K, D] (keys after RoPE, every row a real token).
    Returns a JSON-able dict: ``layers`` [1..L-1], ``n_layers``, ``n_kv_heads``, ``head_dim``, ``tokens`` N,
    and for X in k, v the tables ``X_l1`` (mean absolute difference per element: the L1 distance divided
    by N*D), ``X_l1_rel`` (summed |difference| over summed |layer l|) and ``X_cos`` (mean cosine
    similarity of the head's D-vectors), each a list with one row per layer in ``layers`` and one column
    per head.
    """
    if len(k_layers) != len(v_layers) or len(k_layers) < 2:
        raise ValueError(f"need K and V for the same >= 2 layers, got {len(k_layers)} and {len(v_layers)}")
    shape = np.shape(k_layers[0])
    for name, arrs in (("k", k_layers), ("v", v_layers)):
        for l, x in enumerate(arrs):
            if np.shape(x) != shape or len(shape) != 3:
                raise ValueError(f"{name} of layer {l} has shape {np.shape(x)}, expected [N, K, D] = {shape}")
    n, heads, d = shape
    out = {"layers": list(range(1, len(k_layers))), "n_layers": len(k_layers), "n_kv_heads": heads,
           "head_dim": d, "tokens": n}
    for name, arrs in (("k", k_layers), ("v", v_layers)):
        rows = [_compare(arrs[l], arrs[l - 1]) for l in out["layers"]]
        for j, metric in enumerate(("l1", "l1_rel", "cos")):
            out[f"{name}_{metric}"] = [[float(x) for x in r[j]] for r in rows]
    return out


# ---------------------------------------------------------------------------------------------- planning
def head_scores(sim: dict, metric: str = "l1") -> dict:
    """Per (layer, head): the distance used to rank it, lower = more reusable. A head is only as reusable
    as the worse of its K and V (reuse replaces both): the larger L1 / the smaller cosine; for ``cosine``
    the score is 1 - cosine."""
    if metric not in METRICS:
        raise ValueError(f"reuse metric {metric!r}; choose from {', '.join(METRICS)}")
    key = {"l1": "l1", "l1_rel": "l1_rel", "cosine": "cos"}[metric]
    scores = {}
    for i, layer in enumerate(sim["layers"]):
        for head in range(sim["n_kv_heads"]):
            k, v = sim["k_" + key][i][head], sim["v_" + key][i][head]
            scores[(layer, head)] = 1.0 - min(k, v) if metric == "cosine" else max(k, v)
    return scores


def make_plan(sim: dict, *, threshold: float | None = None, n_heads: int | None = None,
              share: float | None = None, metric: str = "l1") -> tuple[tuple[int, int], ...]:
    """Returns the sorted (layer, head) pairs to reuse, chosen by exactly one of:

    threshold: every head whose K and V are both within it (L1 metrics: distance <= threshold; cosine:
               similarity >= threshold);
    n_heads:   the n most similar heads;
    share:     the most similar heads making up this share of all L*K heads (= of the dense KV bytes),
               rounded down.
    Ties rank the lower (layer, head) first.
    """
    given = [x is not None for x in (threshold, n_heads, share)]
    if sum(given) != 1:
        raise ValueError("make_plan needs exactly one of threshold, n_heads or share")
    scores = head_scores(sim, metric)
    if threshold is not None:
        limit = 1.0 - threshold if metric == "cosine" else threshold
        return tuple(sorted(p for p, s in scores.items() if s <= limit))
    total = sim["n_layers"] * sim["n_kv_heads"]
    if share is not None:
        if not 0 <= share <= 1:
            raise ValueError(f"reuse share {share} must be in [0, 1]")
        n_heads = math.floor(share * total + 1e-9)
    if not 0 <= n_heads <= len(scores):
        raise ValueError(f"cannot reuse {n_heads} heads: layers 1..{sim['n_layers'] - 1} have {len(scores)} heads")
    ranked = sorted(scores, key=lambda p: (scores[p], p))
    return tuple(sorted(ranked[:n_heads]))


def layer_scores(sim: dict, metric: str = "cosine") -> dict:
    """Per layer l >= 1: the mean of its heads' :func:`head_scores` (lower = more reusable as a whole)."""
    scores = head_scores(sim, metric)
    return {l: float(np.mean([scores[(l, h)] for h in range(sim["n_kv_heads"])])) for l in sim["layers"]}


def make_layer_plan(sim: dict, n_layers: int, metric: str = "cosine", allowed=None) -> tuple[tuple[int, int], ...]:
    """Every head of the ``n_layers`` most reusable layers (by :func:`layer_scores`, ties to the lower
    layer), chosen among ``allowed`` (default: all of 1..L-1); the plan for an autoencoder inner, whose
    latents can only be reused whole."""
    scores = layer_scores(sim, metric)
    pool = {l: s for l, s in scores.items() if allowed is None or l in set(allowed)}
    return plan_from_layer_scores(pool, n_layers, sim["n_kv_heads"])


# ---------------------------------------------------------------------------------------------- latent reuse
def fit_decoder(z, x, ridge: float = 1e-4):
    """Least-squares linear map from latents z [N, L] to rows x [N, W]: returns (w [L, W], b [W]) minimising
    |z w + b - x|^2 + ridge * mean(diag(zc^T zc)) * |w|^2 (zc: centred z), solved in float64."""
    z, x = np.asarray(z, np.float64), np.asarray(x, np.float64)
    mz, mx = z.mean(0), x.mean(0)
    zc, xc = z - mz, x - mx
    gram = zc.T @ zc
    gram += ridge * max(np.trace(gram) / len(gram), 1e-30) * np.eye(len(gram))
    w = np.linalg.solve(gram, zc.T @ xc)
    return w, mx - mz @ w


def fit_latent_decoders(model, method, mparams, token_windows, batch: int = 4, ridge: float = 1e-4,
                        kv=None) -> dict:
    """Returns ``mparams`` with the decoders of every layer that ``method`` (a latent-mode
    :class:`~kvjax.cache.reuse.Reuse` over a linear autoencoder) reuses replaced by least-squares maps from
    its source layer's latents to its own K (pre-RoPE when the autoencoder stores pre-RoPE keys) and V,
    measured on the dense model over ``token_windows`` [W, T] (training text, not an evaluated split).
    Latents pass through the storage's round trip (``Autoencoder.round_trip``: int8/int4/int2, bf16). The other
    layers' parameters are returned unchanged. ``kv``: the (k_layers, v_layers) of
    ``collect_kv(model, token_windows, pre_rope=<the autoencoder's pre_rope>)``, to reuse one pass over
    several plans (``token_windows`` is then not read)."""
    from kvjax.compressors.autoencoder import apply_coder

    if method.mode != "latent":
        raise ValueError(f"fit_latent_decoders needs a reuse method with mode='latent', got mode={method.mode!r}")
    cfg, ae = model.cfg, method.inner
    method.validate(cfg, mparams)
    if ae.hidden:
        raise ValueError(f"fit_latent_decoders fits linear decoders; the autoencoder has hidden={ae.hidden}")
    reused = sorted({l for l, _ in method.plan})
    if not reused:
        return mparams
    k_layers, v_layers = kv if kv is not None else collect_kv(model, token_windows, batch=batch, pre_rope=ae.pre_rope)
    out = dict(mparams)
    for layer in reused:
        src = method.source(cfg, layer, 0)
        new = dict(mparams[str(layer)])
        for part, rows in (("k", k_layers), ("v", v_layers)):
            z = ae.round_trip(apply_coder(mparams[str(src)][part + "_enc"],
                                          jnp.asarray(rows[src].reshape(len(rows[src]), -1))))
            w, b = fit_decoder(np.asarray(z), rows[layer].reshape(len(rows[layer]), -1), ridge)
            new[part + "_dec"] = [{"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}]
        out[str(layer)] = new
    return out


def latent_fit_scores(ae, mparams, kv, ridge: float = 1e-4) -> dict:
    """Per compressed layer l >= 1 whose layer below is compressed: how badly layer l-1's latents predict
    layer l's K and V through the least-squares decoders of :func:`fit_latent_decoders` (the residual
    sum of squares over the total sum of squares about the mean, K plus V; lower = more reusable in latent
    mode). ``kv``: (k_layers, v_layers) of ``collect_kv(..., pre_rope=ae.pre_rope)`` over training text."""
    from kvjax.compressors.autoencoder import apply_coder

    k_layers, v_layers = kv
    n = len(k_layers)
    layers = set(ae.layers) if ae.layers else set(range(n))
    scores = {}
    for layer in range(1, n):
        if layer not in layers or layer - 1 not in layers:
            continue
        total = 0.0
        for part, rows in (("k", k_layers), ("v", v_layers)):
            below = rows[layer - 1].reshape(len(rows[layer - 1]), -1)
            z = np.asarray(ae.round_trip(apply_coder(mparams[str(layer - 1)][part + "_enc"], jnp.asarray(below))),
                           np.float64)
            x = rows[layer].reshape(len(rows[layer]), -1).astype(np.float64)
            w, b = fit_decoder(z, x, ridge)
            total += float(((z @ w + b - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        scores[layer] = total
    return scores


def plan_from_layer_scores(scores: dict, n_layers: int, n_kv_heads: int) -> tuple[tuple[int, int], ...]:
    """Every head of the ``n_layers`` layers with the lowest ``scores`` (ties to the lower layer)."""
    if not 0 <= n_layers <= len(scores):
        raise ValueError(f"cannot reuse {n_layers} whole layers: {len(scores)} layers can be reused")
    chosen = sorted(scores, key=lambda l: (scores[l], l))[:n_layers]
    return tuple((l, h) for l in sorted(chosen) for h in range(n_kv_heads))


# ---------------------------------------------------------------------------------------------- files
def save_plan(path: str, plan, model, info: dict | None = None) -> str:
    """Writes ``plan`` with ``model``'s identity (and ``info``, e.g. how it was chosen) as JSON, atomically."""
    from kvjax.cache.reuse import Reuse
    from kvjax.compressors.io import model_identity

    method = Reuse(plan=plan)
    method.validate(model.cfg, None)
    cfg = model.cfg
    meta = {"format": FORMAT, "plan": [list(p) for p in method.plan], "model": model_identity(model),
            "kv_saved": len(method.plan) / (cfg.n_layers * cfg.n_kv_heads),  # share of heads = of dense bytes
            "info": info or {}}
    return write_json_atomic(path, meta, indent=1)


def read_plan_file(path: str) -> dict:
    """The plan file's JSON; a missing, corrupt or foreign file is a :class:`PlanError`."""
    meta = read_json(path, PlanError, "reuse plan")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PlanError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    return meta


def load_plan(path: str, model, check_hash: bool = True) -> tuple[tuple[int, int], ...]:
    """Returns the plan saved at ``path``; a plan measured on another model (shape or weights hash) is
    refused with a :class:`PlanError`."""
    from kvjax.cache.reuse import Reuse

    meta = read_plan_file(path)
    check_identity(path, meta.get("model", {}), model, check_hash)
    try:
        method = Reuse(plan=tuple(tuple(p) for p in meta["plan"]))
        method.validate(model.cfg, None)
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{path}: invalid plan ({e})") from None
    return method.plan


def check_identity(path: str, want: dict, model, check_hash: bool = True) -> None:
    """Raises :class:`PlanError` when ``want`` (a recorded model identity) is not ``model``."""
    from kvjax.compressors.io import model_identity

    have = model_identity(model)
    for key in ("arch", "n_layers", "n_kv_heads", "head_dim", "d_model"):
        if key in want and want[key] != have[key]:
            raise PlanError(f"{path}: measured on a model with {key}={want[key]}, but this model has "
                            f"{key}={have[key]} ({model.cfg.name or model.source})")
    if check_hash and want.get("sha256") and have["sha256"] and want["sha256"] != have["sha256"]:
        raise PlanError(f"{path}: measured on model weights sha256 {want['sha256'][:12]}…, but "
                        f"{model.source} has sha256 {have['sha256'][:12]}…")

"""Train KV-CAR autoencoders on a frozen model: ``python -m train.autoencoder``.

Stage 1 (per layer): only that layer is compressed; its K and V autoencoders learn from the model's
cross-entropy plus a scaled L1 reconstruction loss. Stage 2: every chosen layer compressed at once, the
encoders (``--stage2-train enc``, the paper's choice) or all coders fine-tuned on cross-entropy plus the
sum of the L1 terms. The base model never changes.

With ``--reuse-plan PLAN.json`` (from ``python -m train.reuse plan``; whole layers for the compressed
layers) the trained method is ``Reuse(plan, inner=Autoencoder(...), mode=--reuse-mode)``: reused layers
take their K/V from the layer below (its decoded K/V, or its latent through their own decoder), and the
loss adds ``--reuse-l1`` times the relative L1 distance between each reused head's actual K/V and what it
reads, so the coders learn to produce K/V that serve both layers (the paper's fine-tuning after reuse).
In latent mode the reused layers' decoders start as least-squares maps from the source latents.

Which layer is active is a traced mask, so one compiled step serves every layer of stage 1 and stage 2.
Checkpoints (orbax, atomic) go to ``OUT/ckpt`` every ``--save-every`` steps with the full configuration;
``--resume`` continues from the newest. The inference-form compressor (BatchNorm folded) is written to
``OUT/compressor`` and loads with ``kvjax.compressors.load_compressor``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kvjax.cache.autoencoder import LATENT_DTYPES, Autoencoder
from kvjax.cache.base import CacheMethod, write_at
from kvjax.cache.dense import Dense
from kvjax.cache.reuse import MODES as REUSE_MODES, Reuse
from kvjax.compressors.autoencoder import (LayerAutoencoders, fold_variables, straight_through,
                                           init_layer_variables, pca_linear_variables)
from kvjax.compressors.io import save_compressor
from kvjax.models.layers import rope
from kvjax.models.transformer import forward


LOSSES = ("ce", "kl")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    latent: int = 0  # 0: K*D / 2
    latent_v: int = 0  # 0: same as latent
    hidden: int = 0  # 0: linear autoencoders
    layers: tuple = ()  # (): every layer
    latent_dtype: str = ""  # "int8" / "int4" / "int2": stage 2 trains through the storage's round trip, stores that
    latent_group: int = 0  # int4 / int2: latents per scale (0: the whole latent vector)
    pre_rope: bool = True
    init: str = "pca"  # "pca" (linear variant only) or "random"
    steps1: int = 0  # stage-1 steps per layer (0: skip; see the README for why)
    steps2: int = 400  # stage-2 steps
    stage2_train: str = "all"  # "enc" (the paper) or "all"
    batch: int = 8
    context: int = 512
    lr: float = 1e-3
    lr2: float = 1e-4
    l1_weight: float = 0.01  # weight of the relative L1 reconstruction term (summed over layers)
    weight_decay: float = 0.0
    eval_every: int = 100
    eval_windows: int = 16
    save_every: int = 100
    seed: int = 0
    dtype: str = "float32"  # compute dtype of the frozen model
    reuse_plan: tuple = ()  # (layer, head) pairs reused from the layer below (see kvjax.cache.reuse)
    reuse_mode: str = "decoded"  # "decoded" or "latent"
    reuse_l1: float = 0.01  # weight of the relative L1 between reused heads' actual and read K/V
    init_from: str = ""  # a trained (linear) compressor to start from instead of --init: fine-tuning after reuse
    loss: str = "ce"  # "ce": next-token cross-entropy (the paper's); "kl": KL(dense model || compressed model) per token

    def __post_init__(self):
        from kvjax.cache.reuse import normalize_plan
        object.__setattr__(self, "reuse_plan", normalize_plan(self.reuse_plan))
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; choose from {LOSSES}")
        if self.reuse_mode not in REUSE_MODES:
            raise ValueError(f"reuse_mode={self.reuse_mode!r}; choose from {REUSE_MODES}")
        if self.reuse_plan and self.steps1:
            raise ValueError("--steps1 (per-layer stage 1) with --reuse-plan: reuse ties layers together; "
                             "train with --steps1 0 (stage 2 only)")

    def ae_method(self, dtype: str | None = None) -> Autoencoder:
        return Autoencoder(latent=self.latent, latent_v=self.latent_v, hidden=self.hidden, layers=tuple(self.layers),
                           latent_dtype=self.latent_dtype, pre_rope=self.pre_rope, dtype=dtype or self.dtype,
                           latent_group=self.latent_group)

    def method(self, dtype: str | None = None):
        """The inference method: the autoencoder, wrapped in :class:`Reuse` when there is a reuse plan."""
        ae = self.ae_method(dtype)
        return Reuse(plan=self.reuse_plan, inner=ae, mode=self.reuse_mode) if self.reuse_plan else ae


# ------------------------------------------------------------------------------------------ the training method
@dataclasses.dataclass(frozen=True)
class _TrainingCache(CacheMethod):
    """Training only (not a compression method): stores the *reconstructed* K/V densely so gradients reach
    the autoencoders, and returns each layer's L1 term and updated BatchNorm statistics in its state.
    mparams = {"vars": {layer: flax variables}, "active": [n_layers] float mask}.

    With a reuse ``plan`` a reused head stores what it reads (its source layer's reconstructed K/V, or in
    latent mode the source latent through this layer's decoder) and its state carries ``reuse_l1``, the
    relative L1 distance to the K/V the layer actually computed. Each state also keeps the new tokens'
    latents (``zk``, ``zv``) and stored K/V (``new_k``, ``new_v``: [B, T, K, D], keys after RoPE) for the
    layers above that read them."""

    name = "autoencoder-training"
    width: int = 0
    latent: int = 0
    hidden: int = 0
    pre_rope: bool = True
    quant: Autoencoder | None = None  # quantization-aware: latents pass through quant.round_trip (straight-through)
    latent_v: int = 0
    plan: tuple = ()
    reuse_mode: str = "decoded"

    def init_layer(self, cfg, layer, batch, max_len):
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}

    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        b, t = k.shape[:2]
        if not self.pre_rope:
            k = self.rotate_keys(cfg, k, positions)
        xk = k.reshape(b, t, -1).astype(jnp.float32)
        xv = v.reshape(b, t, -1).astype(jnp.float32)
        active = params["active"][layer]
        zk = zv = None
        if str(layer) in params["vars"]:
            module = LayerAutoencoders(self.width, self.latent, self.hidden, self.latent_v)
            var = params["vars"][str(layer)]
            (zk, zv), upd = module.apply(var, xk, xv, train=True, method=LayerAutoencoders.encode,
                                         mutable=["batch_stats"])
            if self.quant is not None:
                zk, zv = straight_through(self.quant.round_trip, zk), straight_through(self.quant.round_trip, zv)
            var = {**var, **upd}
            (rk, rv), upd = module.apply(var, zk, zv, train=True, method=LayerAutoencoders.decode,
                                         mutable=["batch_stats"])
            l1 = (jnp.mean(jnp.abs(rk - xk)) / (jnp.mean(jnp.abs(xk)) + 1e-6)
                  + jnp.mean(jnp.abs(rv - xv)) / (jnp.mean(jnp.abs(xv)) + 1e-6))
            xk = active * rk + (1 - active) * xk
            xv = active * rv + (1 - active) * xv
            stats = upd.get("batch_stats", {})
        else:
            l1, stats = jnp.float32(0), {}
        k = xk.reshape(k.shape)
        if self.pre_rope:
            k = self.rotate_keys(cfg, k, positions)
        v = xv.reshape(v.shape)
        new = {"k": write_at(state["k"], k, starts), "v": write_at(state["v"], v, starts),
               "l1": l1 * active, "batch_stats": stats, "new_k": k, "new_v": v}
        if zk is not None:
            new.update(zk=zk, zv=zv)
        return new

    def write(self, params, cfg, cache, layer, k, v, positions):
        reuse = Reuse(plan=self.plan)
        reused = reuse.reused_heads(layer)
        if not reused:
            return super().write(params, cfg, cache, layer, k, v, positions)
        k_act = self.rotate_keys(cfg, k, positions).astype(jnp.float32)  # [B, T, K, D] after RoPE
        v_act = v.astype(jnp.float32)
        stats = {}
        if self.reuse_mode == "latent":  # a whole compressed layer: the source latent, this layer's decoder
            src = cache.layers[reuse.source(cfg, layer, 0)]
            module = LayerAutoencoders(self.width, self.latent, self.hidden, self.latent_v)
            (rk, rv), upd = module.apply(params["vars"][str(layer)], src["zk"], src["zv"], train=True,
                                         method=LayerAutoencoders.decode, mutable=["batch_stats"])
            stats = upd.get("batch_stats", {})
            k_used, v_used = rk.reshape(k.shape), rv.reshape(v.shape)
            if self.pre_rope:
                k_used = self.rotate_keys(cfg, k_used, positions)
        else:  # each reused head: the source layer's stored (reconstructed) head
            ks, vs = [], []
            for h in range(cfg.n_kv_heads):
                src = reuse.source(cfg, layer, h)
                ks.append(k_act[:, :, h] if src == layer else cache.layers[src]["new_k"][:, :, h])
                vs.append(v_act[:, :, h] if src == layer else cache.layers[src]["new_v"][:, :, h])
            k_used, v_used = jnp.stack(ks, axis=2), jnp.stack(vs, axis=2)
        idx = jnp.asarray(reused)

        def rel_l1(used, actual):
            return jnp.mean(jnp.abs(used - actual)) / (jnp.mean(jnp.abs(actual)) + 1e-6)

        reuse_l1 = rel_l1(k_used[:, :, idx], k_act[:, :, idx]) + rel_l1(v_used[:, :, idx], v_act[:, :, idx])
        state = cache.layers[layer]
        starts = positions[:, 0]
        new = {"k": write_at(state["k"], k_used, starts), "v": write_at(state["v"], v_used, starts),
               "l1": jnp.float32(0), "reuse_l1": reuse_l1, "batch_stats": stats, "new_k": k_used, "new_v": v_used}
        return cache.set_layer(layer, new)

    def read_layer(self, params, cfg, cache, layer):
        return cache.layers[layer]["k"], cache.layers[layer]["v"]

    def layer_bytes_per_token(self, cfg, layer):
        return 2 * cfg.kv_width * 4


def token_nll(logits, tokens):
    """Mean next-token NLL of tokens [B, T] under logits [B, T, V] (every token after the first)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll)


def token_kl(teacher_logits, logits):
    """Mean over positions of KL(softmax(teacher) || softmax(logits)), [B, T, V] each (every position but the
    last, as :func:`token_nll` scores). Distillation from the dense model: the compressed cache is trained to
    keep the model's predictions, not to fit the training text better than the model does."""
    lt = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32), axis=-1)
    ls = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))


# ------------------------------------------------------------------------------------------ data
def windows_from_ids(ids: np.ndarray, context: int) -> np.ndarray:
    n = len(ids) // context
    if n == 0:
        raise ValueError(f"training text has {len(ids)} tokens, fewer than one window of --context {context}")
    return np.asarray(ids[: n * context], np.int32).reshape(n, context)


def split_windows(windows: np.ndarray, eval_windows: int):
    """Held-back evaluation windows come from the end of the text, training windows from the rest."""
    eval_windows = min(eval_windows, max(1, len(windows) // 5))
    if len(windows) - eval_windows < 1:
        raise ValueError(f"{len(windows)} windows: too few to hold back {eval_windows} for evaluation")
    return windows[:-eval_windows], windows[-eval_windows:]


# ------------------------------------------------------------------------------------------ the trainer
class Trainer:
    """Holds the frozen model, the data and the compiled steps; ``run`` trains and returns the compressor."""

    def __init__(self, model, train_windows: np.ndarray, eval_windows: np.ndarray, tc: TrainConfig,
                 out_dir: str, data_record: dict | None = None, progress: bool = True, save_dtype: str = "float32"):
        self.model, self.cfg, self.tc = model, model.cfg, tc
        self.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, tc.dtype), model.params)
        self.train_windows, self.eval_windows = train_windows, eval_windows
        self.out_dir, self.progress, self.save_dtype = out_dir, progress, save_dtype
        self.data_record = data_record or {}
        self.infer_method = tc.ae_method(dtype="float32")
        self.layers = self.infer_method.compressed_layers(self.cfg)
        self.latent = self.infer_method.latent_dim(self.cfg)
        self.latent_v = self.infer_method.latent_v_dim(self.cfg)
        self.train_method = _TrainingCache(width=self.cfg.kv_width, latent=self.latent, hidden=tc.hidden,
                                           pre_rope=tc.pre_rope, latent_v=self.latent_v, plan=tc.reuse_plan,
                                           reuse_mode=tc.reuse_mode)
        self.quant_method = dataclasses.replace(self.train_method, quant=self.infer_method)
        self.n1 = tc.steps1 * len(self.layers)
        self._dense_ppl = None
        self.total = self.n1 + tc.steps2
        if tc.reuse_plan:  # a plan that does not fit the model or the autoencoder fails here, not mid-run
            tc.method().validate(self.cfg, fold_variables(self.init_variables_abstract()))

    # -- optimizers: stage 1 trains everything of the active layer; stage 2 encoders (or all)
    def optimizer(self, stage: int, params):
        if stage == 1:  # one warmup-cosine cycle per layer: every layer gets the same schedule
            cycle = optax.warmup_cosine_decay_schedule(0.0, self.tc.lr, max(1, min(20, self.tc.steps1 // 4)),
                                                       max(2, self.tc.steps1), self.tc.lr * 0.1)
            sched = lambda count: cycle(count % self.tc.steps1)  # noqa: E731
        else:
            sched = optax.warmup_cosine_decay_schedule(0.0, self.tc.lr2, max(1, min(20, self.tc.steps2 // 10)),
                                                       max(2, self.tc.steps2), self.tc.lr2 * 0.1)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=self.tc.weight_decay))
        if stage == 2 and self.tc.stage2_train == "enc":
            labels = {l: {part: ("train" if part.endswith("enc") else "freeze") for part in p}
                      for l, p in params.items()}
            tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
        return tx

    def init_variables(self):
        key = jax.random.PRNGKey(self.tc.seed)
        keys = jax.random.split(key, len(self.layers))
        variables = {str(l): init_layer_variables(k, self.cfg.kv_width, self.latent, self.tc.hidden, self.latent_v)
                     for l, k in zip(self.layers, keys)}
        if self.tc.init_from:
            variables = self.variables_from_compressor(variables)
            if self.tc.reuse_mode == "latent":
                variables = self.fit_reuse_decoders(variables, self.calibration_rows())
        elif self.tc.init == "pca":
            if self.tc.hidden:
                raise ValueError("--init pca needs the linear variant (--hidden 0); use --init random")
            rows = self.calibration_rows()
            variables = {l: pca_linear_variables(v, *rows[int(l)], self.latent, self.latent_v) for l, v in variables.items()}
            if self.tc.reuse_mode == "latent":
                variables = self.fit_reuse_decoders(variables, rows)
        return variables

    def variables_from_compressor(self, variables):
        """Training variables holding a trained linear compressor's parameters (``tc.init_from``), which must
        have this run's autoencoder settings (a composed method's inner autoencoder counts)."""
        from kvjax.compressors import load_compressor

        method, mp = load_compressor(self.tc.init_from, self.model)
        ae = getattr(method, "inner", None) or method
        mine, cfg = self.tc.ae_method(), self.cfg

        def shape(m):
            return {"latent": m.latent_dim(cfg), "latent_v": m.latent_v_dim(cfg), "hidden": m.hidden,
                    "layers": m.compressed_layers(cfg), "pre_rope": m.pre_rope}

        for key, want in shape(mine).items():
            if shape(ae)[key] != want:
                raise ValueError(f"--init-from {self.tc.init_from}: its {key}={shape(ae)[key]!r}, this run's is {want!r}")
        if self.tc.hidden:
            raise ValueError("--init-from starts linear autoencoders only (--hidden 0)")
        out = {}
        for l, var in variables.items():
            params = {part: {"dense_0": {"kernel": jnp.asarray(mp[l][part][0]["w"], jnp.float32),
                                         "bias": jnp.asarray(mp[l][part][0]["b"], jnp.float32)}}
                      for part in ("k_enc", "k_dec", "v_enc", "v_dec")}
            out[l] = {**var, "params": params}
        return out

    def fit_reuse_decoders(self, variables, rows):
        """Latent reuse: each reused layer's (linear) decoders become least-squares maps from its source
        layer's latents (int8 round trip included when latents are int8) to its own K and V rows."""
        from kvjax.reuse import fit_decoder

        reuse = Reuse(plan=self.tc.reuse_plan)
        variables = dict(variables)
        for layer in sorted({l for l, _ in self.tc.reuse_plan}):
            src = reuse.source(self.cfg, layer, 0)
            params = dict(variables[str(layer)]["params"])
            for i, part in enumerate(("k", "v")):
                enc = variables[str(src)]["params"][part + "_enc"]["dense_0"]
                z = self.infer_method.round_trip(jnp.asarray(rows[src][i], jnp.float32) @ enc["kernel"] + enc["bias"])
                w, b = fit_decoder(np.asarray(z), rows[layer][i])
                params[part + "_dec"] = {"dense_0": {"kernel": jnp.asarray(w, jnp.float32),
                                                     "bias": jnp.asarray(b, jnp.float32)}}
            variables[str(layer)] = {**variables[str(layer)], "params": params}
        return variables

    def calibration_rows(self, n_windows: int = 8):
        """Per layer: (K rows, before RoPE when ``pre_rope``, and V rows) [N, K*D] from a dense pass over
        training windows."""
        from kvjax.reuse import collect_kv

        windows = self.train_windows[:n_windows]
        k_layers, v_layers = collect_kv(dataclasses.replace(self.model, params=self.params), windows)  # post-RoPE keys
        w, t = windows.shape
        pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), (w, 1))
        rows = {}
        for l in self.layers:
            k = k_layers[l]
            if self.tc.pre_rope and self.cfg.uses_rope:  # undo the rotation: R(-p) R(p) = I
                k = rope(jnp.asarray(k).reshape(w, t, self.cfg.n_kv_heads, -1), -pos, self.cfg.rope_theta)
            rows[l] = (np.asarray(k, np.float64).reshape(-1, self.cfg.kv_width),
                       np.asarray(v_layers[l], np.float64).reshape(-1, self.cfg.kv_width))
        return rows

    def make_step(self, tx, method):
        cfg, w, wr = self.cfg, self.tc.l1_weight, self.tc.reuse_l1

        kl = self.tc.loss == "kl"

        def loss_fn(ae_params, variables, params, tokens, active, teacher):
            merged = {l: {**v, "params": ae_params[l]} for l, v in variables.items()}
            mp = {"vars": merged, "active": active}
            cache = method.init(cfg, tokens.shape[0], tokens.shape[1])
            logits, cache = forward(params, cfg, tokens, cache, method, mp)
            ce = token_nll(logits, tokens)
            l1 = sum(cache.layers[int(l)]["l1"] for l in variables)
            reuse_l1 = sum((st["reuse_l1"] for st in cache.layers if "reuse_l1" in st), jnp.float32(0))
            stats = {l: cache.layers[int(l)]["batch_stats"] for l in variables}
            fit = token_kl(teacher, logits) if kl else ce
            return fit + w * l1 + wr * reuse_l1, (ce, l1, reuse_l1, stats)

        def step(variables, opt_state, params, tokens, active):
            ae_params = {l: v["params"] for l, v in variables.items()}
            teacher = None
            if kl:  # the frozen model's own predictions through a dense cache
                dense = Dense(dtype=self.tc.dtype)
                teacher, _ = forward(params, cfg, tokens, dense.init(cfg, *tokens.shape), dense)
                teacher = jax.lax.stop_gradient(teacher)
            (loss, (ce, l1, reuse_l1, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                ae_params, variables, params, tokens, active, teacher)
            updates, opt_state = tx.update(grads, opt_state, ae_params)
            ae_params = optax.apply_updates(ae_params, updates)
            new_vars = {l: {**variables[l], "params": ae_params[l],
                            **({"batch_stats": stats[l]} if stats[l] else {})} for l in variables}
            return new_vars, opt_state, {"loss": loss, "ce": ce, "l1": l1, "reuse_l1": reuse_l1}

        return jax.jit(step, donate_argnums=(0, 1))

    def evaluate(self, variables) -> dict:
        """Held-back perplexity through the real compressed cache (folded coders), and dense (measured once)."""
        from eval.perplexity import perplexity

        ids = self.eval_windows.reshape(-1)  # contiguous windows: re-windowing gives the same ones

        def ppl(method, mp):
            return perplexity((self.params, self.cfg), ids, method, mp, context=self.tc.context,
                              batch=self.tc.batch)["ppl"]

        if self._dense_ppl is None:
            self._dense_ppl = ppl(Dense(dtype=self.tc.dtype), None)
        return {"eval_ppl_dense": self._dense_ppl, "eval_ppl": ppl(self.tc.method(), fold_variables(variables))}

    def run(self, resume: bool = False, stop_after: int | None = None):
        """Trains to the end (or to step ``stop_after``, as an interruption would); returns (method, mparams, history)."""
        from tqdm.auto import tqdm
        from train.checkpoint import CheckpointStore

        store = CheckpointStore(os.path.join(self.out_dir, "ckpt"), self.record())
        stage = tx = step_fn = opt_state = None
        step = 0
        if resume and store.latest_step() is not None:
            step = store.latest_step()
            stage = 1 if step < self.n1 else 2
            template = self.init_variables_abstract()
            tx, step_fn = self.setup_stage(stage, template)
            opt_template = tx.init({l: v["params"] for l, v in template.items()})
            variables, opt_state = store.restore(step, template, opt_template)
            self.log(f"resumed from step {step} (stage {stage})")
        else:
            store.check_fresh(resume)
            variables = self.init_variables()
        history = []
        if step == 0:  # where the initialisation starts (PCA init is already a usable compressor)
            history.append({"step": 0, "stage": 0, **self.evaluate(variables)})
            self.log(f"initial held-back ppl {history[0]['eval_ppl']:.3f} (dense {history[0]['eval_ppl_dense']:.3f})")
        bar = tqdm(total=self.total, initial=step, disable=not self.progress, desc="train.autoencoder", file=sys.stderr)
        t0 = time.perf_counter()
        end = self.total if stop_after is None else min(stop_after, self.total)
        while step < end:
            if (1 if step < self.n1 else 2) != stage:
                stage = 1 if step < self.n1 else 2
                tx, step_fn = self.setup_stage(stage, variables)
                opt_state = tx.init({l: v["params"] for l, v in variables.items()})
            if stage == 1:
                layer = self.layers[step // self.tc.steps1]
                active = jnp.zeros((self.cfg.n_layers,), jnp.float32).at[layer].set(1.0)
            else:
                active = jnp.zeros((self.cfg.n_layers,), jnp.float32).at[jnp.asarray(self.layers)].set(1.0)
            # batches depend only on (seed, step), so a resumed run sees the same data as an uninterrupted one
            idx = np.random.default_rng([self.tc.seed, step]).integers(0, len(self.train_windows), self.tc.batch)
            tokens = jnp.asarray(self.train_windows[idx])
            new_vars, new_opt, metrics = step_fn(variables, opt_state, self.params, tokens, active)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                bar.close()
                raise FloatingPointError(
                    f"non-finite loss {loss} at step {step} (stage {stage}); training stopped. The last good "
                    f"checkpoint in {store.directory} is intact (step {store.latest_step()}); lower --lr or check the data.")
            variables, opt_state = new_vars, new_opt
            step += 1
            rec = {"step": step, "stage": stage, "loss": loss, "ce": float(metrics["ce"]), "l1": float(metrics["l1"]),
                   "reuse_l1": float(metrics["reuse_l1"]), "ppl": math.exp(float(metrics["ce"]))}
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{loss:.3f}", ppl=f"{rec['ppl']:.2f}", l1=f"{rec['l1']:.3f}")
            if step % self.tc.eval_every == 0 or step == self.total:
                rec.update(self.evaluate(variables))
                self.log(f"step {step}: held-back ppl {rec['eval_ppl']:.3f} (dense {rec['eval_ppl_dense']:.3f})")
            history.append(rec)
            if step % self.tc.save_every == 0 or step in (self.total, self.n1, end):
                store.save(step, variables, opt_state)
        bar.close()
        mparams = fold_variables(variables)
        final = history[-1] if history else {}
        training = {**self.record(), "steps_done": step, "seconds": time.perf_counter() - t0,
                    "final": final, "history_tail": history[-5:]}
        path = save_compressor(os.path.join(self.out_dir, "compressor"), self.tc.method(), mparams, self.model,
                               training=training, dtype=self.save_dtype)
        with open(os.path.join(self.out_dir, "history.json"), "w") as f:
            json.dump(history, f)
        self.log(f"wrote {path}")
        return self.tc.method(), mparams, history

    def setup_stage(self, stage, variables):
        tx = self.optimizer(stage, {l: v["params"] for l, v in variables.items()})
        method = self.quant_method if (stage == 2 and self.infer_method.integer_latents) else self.train_method
        return tx, self.make_step(tx, method)

    def init_variables_abstract(self):
        keys = jax.random.split(jax.random.PRNGKey(0), len(self.layers))
        return {str(l): init_layer_variables(k, self.cfg.kv_width, self.latent, self.tc.hidden, self.latent_v)
                for l, k in zip(self.layers, keys)}

    def record(self) -> dict:
        from kvjax.compressors.io import model_identity
        # through JSON, so that nested tuples (a reuse plan) compare equal to a saved run record
        return {"train_config": json.loads(json.dumps(dataclasses.asdict(self.tc))),
                "model": model_identity(self.model), "data": self.data_record}

    def log(self, msg):
        print(f"[train.autoencoder] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ CLI
def parse_layers(text: str) -> tuple:
    if text in ("", "all"):
        return ()
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return tuple(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.autoencoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="training text file (default: WikiText-2 wiki.valid.raw)")
    ap.add_argument("--data-dir", default=None, help="shared data folder (default ../shared/data)")
    ap.add_argument("--layers", default="all", help="layers to compress: 'all' or e.g. '0-9,12'")
    ap.add_argument("--latent", type=int, default=0, help="latent width (0: half of K*D)")
    ap.add_argument("--latent-v", type=int, default=0, help="latent width of V (0: same as --latent)")
    ap.add_argument("--hidden", type=int, default=0, help="hidden width (0: linear autoencoders)")
    ap.add_argument("--latent-dtype", default="", choices=list(LATENT_DTYPES),
                    help="stored latents; int8/int4/int2 train stage 2 through the quantizer (straight-through)")
    ap.add_argument("--latent-group", type=int, default=0,
                    help="int4/int2: latents per float16 scale and minimum (0: the whole latent vector)")
    ap.add_argument("--post-rope", action="store_true", help="compress keys after RoPE (default: before)")
    ap.add_argument("--init", default=None, choices=["pca", "random"], help="default: pca if linear else random")
    ap.add_argument("--steps1", type=int, default=0, help="stage-1 steps per layer")
    ap.add_argument("--steps2", type=int, default=400)
    ap.add_argument("--stage2-train", default="all", choices=["enc", "all"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=1e-4)
    ap.add_argument("--l1-weight", type=float, default=0.01)
    ap.add_argument("--loss", default="ce", choices=list(LOSSES),
                    help="ce: next-token cross-entropy on the training text (the paper's); kl: distil the dense "
                         "model's predictions (keeps the model, does not adapt it to the training text)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reuse-plan", default=None,
                    help="reuse plan JSON (python -m train.reuse plan; whole layers for compressed layers)")
    ap.add_argument("--reuse-mode", default="decoded", choices=list(REUSE_MODES),
                    help="reused layers read the layer below's decoded K/V, or its latent through their own decoder")
    ap.add_argument("--reuse-l1", type=float, default=0.01,
                    help="weight of the relative L1 between reused heads' actual and read K/V")
    ap.add_argument("--init-from", default="",
                    help="start from this trained linear compressor (e.g. fine-tuning it after reuse)")
    ap.add_argument("--out", required=True, help="output directory (checkpoints, compressor, history)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--max-tokens", type=int, default=0, help="use only the first N training tokens (0: all)")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype of the written compressor's parameters (float16 halves the file)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from kvjax.checkpoints import load
    from train.data import training_text

    tc = TrainConfig(latent=args.latent, latent_v=args.latent_v, hidden=args.hidden, layers=parse_layers(args.layers),
                     latent_dtype=args.latent_dtype, latent_group=args.latent_group, pre_rope=not args.post_rope,
                     init=args.init or ("pca" if args.hidden == 0 else "random"), steps1=args.steps1,
                     steps2=args.steps2, stage2_train=args.stage2_train, batch=args.batch, context=args.context,
                     lr=args.lr, lr2=args.lr2, l1_weight=args.l1_weight, eval_every=args.eval_every,
                     save_every=args.save_every, seed=args.seed, dtype=args.dtype, reuse_mode=args.reuse_mode,
                     reuse_l1=args.reuse_l1, init_from=args.init_from, loss=args.loss)
    model = load(args.model)
    if args.reuse_plan:
        from kvjax.reuse import load_plan
        tc = dataclasses.replace(tc, reuse_plan=load_plan(args.reuse_plan, model))
    text, record = training_text(args.data, args.data_dir)
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    record["tokens"] = int(len(ids))
    train_w, eval_w = split_windows(windows_from_ids(ids, tc.context), tc.eval_windows)
    trainer = Trainer(model, train_w, eval_w, tc, args.out, record, progress=not args.no_progress,
                      save_dtype=args.save_dtype)
    trainer.run(resume=args.resume)


if __name__ == "__main__":
    main()

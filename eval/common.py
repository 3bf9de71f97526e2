"""Helpers shared by the eval CLIs: model and method loading, batch sharding, run records, JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from typing import Any

import jax
import numpy as np

from kvjax.cache.dense import Dense


@dataclasses.dataclass(frozen=True)
class Model:
    """What the eval functions need of a model: accepts a LoadedModel or a (params, cfg[, tokenizer]) tuple."""

    params: Any
    cfg: Any
    tokenizer: Any = None
    name: str = ""
    sha256: str = ""
    source: str = ""

    @classmethod
    def of(cls, model) -> "Model":
        if isinstance(model, Model):
            return model
        if isinstance(model, tuple):
            params, cfg, *rest = model
            tok = rest[0] if rest else None
            return cls(params=params, cfg=cfg, tokenizer=tok, name=cfg.name)
        return cls(params=model.params, cfg=model.cfg, tokenizer=model.tokenizer, name=model.cfg.name or model.source,
                   sha256=getattr(model, "sha256", ""), source=getattr(model, "source", ""))

    @property
    def dtype(self) -> str:
        return str(jax.tree_util.tree_leaves(self.params)[0].dtype)

    @property
    def param_bytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.params)))

    def record(self) -> dict:
        return {"model": self.name, "model_sha256": self.sha256, "model_source": self.source, "dtype": self.dtype}


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def method_spec(method) -> str:
    """``name:key=value,...`` of the settings that differ from their defaults (parseable by
    ``kvjax.parse_method``; nested methods print as their repr)."""
    fields = []
    for f in dataclasses.fields(method):
        v = getattr(method, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        if isinstance(v, tuple):
            v = "+".join(str(x) for x in v)
        fields.append(f"{f.name}={v}")
    return method.name + (":" + ",".join(fields) if fields else "")


def kv_record(method, cfg, dense_dtype: str, context: int | None = None) -> dict:
    """Bytes per token of the method and of a dense cache in ``dense_dtype``; kv_saved = 1 - ratio.

    ``context``: the number of tokens cached (the window), for methods whose bytes do not grow linearly
    with it (eviction budgets, residual windows); the bytes are then ``cache_nbytes(cfg, 1, context) /
    context``. Without it, the per-slot ``bytes_per_token``."""
    kv = method.kv_bytes_per_token(cfg, context) if context else method.bytes_per_token(cfg)
    kv = int(kv) if float(kv).is_integer() else float(kv)
    dense = int(Dense(dtype=dense_dtype).bytes_per_token(cfg))
    rec = {"method": method_spec(method), "kv_bytes_per_token": kv, "dense_kv_bytes_per_token": dense,
           "dense_dtype": dense_dtype, "kv_saved": 1.0 - kv / dense}
    if context:
        rec["kv_bytes_at_context"] = context
    return rec


def device_record() -> dict:
    d = jax.devices()
    return {"device_kind": d[0].device_kind, "platform": d[0].platform, "device_count": len(d),
            "jax_version": jax.__version__}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Batcher:
    """Places batches for data parallelism: with several devices the batch axis is sharded over a 1-D mesh
    and parameters are replicated (kvjax.sharding); the batch size is rounded up to a multiple of the
    device count and callers pad the last batch and mask the pad rows out."""

    def __init__(self, batch: int, devices=None):
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        devices = jax.devices() if devices is None else list(devices)
        self.n = len(devices)
        self.mesh = None
        if self.n > 1:
            from kvjax.sharding import batch_mesh
            self.mesh = batch_mesh(devices)
        self.batch = -(-batch // self.n) * self.n

    def params(self, tree):
        if self.mesh is None or tree is None:
            return tree
        from kvjax.sharding import replicate
        return replicate(tree, self.mesh)

    def shard(self, tree):
        if self.mesh is None:
            return jax.tree_util.tree_map(jax.numpy.asarray, tree)
        from kvjax.sharding import shard_batch
        return shard_batch(tree, self.mesh)


# ---------------------------------------------------------------------------------------------- CLI
def add_model_args(ap: argparse.ArgumentParser, method_default: str = "dense") -> None:
    ap.add_argument("--model", default="smollm2-135m", help="named model, .gguf file, or HF directory")
    ap.add_argument("--method", default=method_default, help="cache method spec, e.g. 'dense:dtype=bfloat16'")
    ap.add_argument("--compressor", default=None, help="trained compressor checkpoint (replaces --method)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="parameter / compute dtype")
    ap.add_argument("--data-dir", default=None, help="shared data folder (default $KVJAX_DATA_DIR or ../shared/data)")
    ap.add_argument("--json", default=None, help="write the result here")


def load_model(name: str, dtype: str):
    from kvjax.checkpoints import load
    return load(name, dtype=dtype)


def load_method(spec: str, compressor: str | None, model, settings: dict | None = None):
    """Returns (method, mparams, spec string): a trained compressor wins over ``--method``. ``settings``
    override a compressor's storage settings (e.g. ``{"latent_dtype": "int4", "latent_group": 32}``: the same
    coders with int4 latents)."""
    if compressor:
        import dataclasses

        from kvjax.compressors import load_compressor  # lazy: heavy (orbax)
        method, mparams = load_compressor(compressor, model)
        if settings:
            try:
                method = dataclasses.replace(method, **settings)
            except TypeError as e:
                raise ValueError(f"{compressor}: settings {settings} do not apply to {type(method).__name__}: {e}") from None
            method.validate(model.cfg, mparams)
        return method, mparams, method_spec(method)
    if settings:
        raise ValueError(f"settings {settings} need a compressor")
    from kvjax.cache.registry import parse_method
    return parse_method(spec), None, spec


def encode_no_bos(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS (kvjax tokenizers take ``add_bos``; plain ones just ``encode``)."""
    try:
        return list(tokenizer.encode(text, add_bos=False))
    except TypeError:
        return list(tokenizer.encode(text))


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented JSON atomically (a reader never sees half a file)."""
    from kvjax.jsonio import write_json_atomic

    write_json_atomic(path, obj, default=_jsonable)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)

"""Saving and loading trained compressors, with the identity of the model they were trained for.

A compressor directory holds ``compressor.json`` (format, method settings, model identity, training
record) and ``params/`` (an orbax checkpoint of the inference-form parameters). It is written into a
temporary sibling and renamed into place, so a reader never sees a half-written compressor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp

from kvjax.jsonio import read_json

FORMAT = "kvjax-compressor/1"


class CompressorError(ValueError):
    """A compressor that cannot be used with this model, or a damaged compressor directory."""


def model_identity(model) -> dict:
    cfg = model.cfg
    return {"name": cfg.name, "sha256": getattr(model, "sha256", ""), "arch": cfg.arch, "n_layers": cfg.n_layers,
            "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "d_model": cfg.d_model}


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def save_compressor(path: str, method, mparams, model, training: dict | None = None, dtype="float32") -> str:
    """Writes ``method`` settings, ``mparams`` (cast to ``dtype``) and the model identity to ``path``."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), mparams)
        has_params = bool(jax.tree_util.tree_leaves(params))
        if has_params:  # a method without learned parameters (plain reuse) writes none
            ck = _checkpointer()
            ck.save(os.path.join(tmp, "params"), params)
            ck.wait_until_finished()
        meta = {"format": FORMAT, "method": method_to_json(method),
                "model": model_identity(model), "training": training or {}, "has_params": has_params}
        with open(os.path.join(tmp, "compressor.json"), "w") as f:
            json.dump(meta, f, indent=2)
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def method_to_json(method) -> dict:
    """``{"name", "settings"}`` of a method; a nested method (``Reuse(inner=...)``) nests the same way,
    tuples (layer lists, reuse plans) become lists."""
    def value(v):
        if dataclasses.is_dataclass(v) and hasattr(v, "name"):
            return method_to_json(v)
        if isinstance(v, tuple):
            return [value(x) for x in v]
        return v

    return {"name": method.name, "settings": {f.name: value(getattr(method, f.name)) for f in dataclasses.fields(method)}}


def method_from_json(meta: dict, dtype: str | None = None):
    """Inverse of :func:`method_to_json` (lists become tuples); ``dtype`` replaces every ``dtype`` setting."""
    from kvjax.cache.registry import get_method

    def value(v):
        if isinstance(v, dict) and set(v) == {"name", "settings"}:
            return method_from_json(v, dtype)
        if isinstance(v, list):
            return tuple(value(x) for x in v)
        return v

    settings = {k: value(v) for k, v in meta["settings"].items()}
    if dtype is not None and "dtype" in settings:
        settings["dtype"] = dtype
    return get_method(meta["name"], **settings)


def read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, "compressor.json")
    if not os.path.isdir(path):
        raise CompressorError(f"{path}: no such compressor directory")
    meta = read_json(meta_path, CompressorError, "compressor.json: not a kvjax compressor (or not written whole)")
    if meta.get("format") != FORMAT:
        raise CompressorError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _restore_here(params_path: str):
    """Restores arrays saved on any device (a GPU run's checkpoint on a CPU machine, say) onto this one."""
    from jax.sharding import SingleDeviceSharding

    ck = _checkpointer()
    tree = ck.metadata(params_path).item_metadata.tree
    here = SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
    return ck.restore(params_path, target)


def load_compressor(path: str, model, dtype: str | None = None, check_hash: bool = True):
    """Returns (method, mparams) for ``model`` (a LoadedModel); a compressor trained for another model
    (layer count, dims, or weights hash) is refused with a clear error."""
    path = os.path.abspath(path)  # orbax takes absolute paths only
    meta = read_metadata(path)
    want, have = meta["model"], model_identity(model)
    for key in ("arch", "n_layers", "n_kv_heads", "head_dim", "d_model"):
        if want.get(key) != have[key]:
            raise CompressorError(f"{path}: trained for a model with {key}={want.get(key)}, "
                                  f"but this model has {key}={have[key]} ({model.cfg.name or model.source})")
    if check_hash and want.get("sha256") and have["sha256"] and want["sha256"] != have["sha256"]:
        raise CompressorError(f"{path}: trained for model weights sha256 {want['sha256'][:12]}…, but "
                              f"{model.source} has sha256 {have['sha256'][:12]}…")
    method = method_from_json(meta["method"], dtype)
    if not meta.get("has_params", True):
        method.validate(model.cfg, {})
        return method, {}
    try:
        params = _restore_here(os.path.join(path, "params"))
    except Exception as e:  # orbax raises many types for damaged directories
        raise CompressorError(f"{path}/params: cannot restore the compressor parameters ({type(e).__name__}: {e})") from None
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    method.validate(model.cfg, params)
    return method, params

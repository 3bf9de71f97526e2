"""Loading real checkpoints: Hugging Face directories, GGUF files, and named models.

``kvjax.load("smollm2-135m")`` returns a :class:`LoadedModel` (config, parameter pytree, tokenizer).
Nothing here downloads from a hub: every path is local.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig
    params: Any  # pytree of jax arrays (layout: kvjax.models.params)
    tokenizer: Any  # kvjax.checkpoints.tokenizer.Tokenizer, or None when the checkpoint ships none
    source: str  # the file or directory it came from
    sha256: str = ""  # hash of the weights file(s), recorded with trained compressors


def load(model: str, dtype: str = "float32") -> LoadedModel:
    """Loads a named model (see ``kvjax.checkpoints.named.NAMED``), a ``.gguf`` file, or an HF directory."""
    from kvjax.checkpoints import named

    if model in named.NAMED:
        path = named.resolve(model)
    elif os.path.exists(model):
        path = model
    else:
        raise ValueError(f"unknown model {model!r}: not a named model ({', '.join(named.NAMED)}) "
                         f"and no such file or directory")
    if os.path.isdir(path):
        from kvjax.checkpoints.hf import load_hf
        cfg, params, tok, digest = load_hf(path)
    elif path.endswith(".gguf"):
        from kvjax.checkpoints.gguf import load_gguf
        cfg, params, tok, digest = load_gguf(path)
    else:
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face directory with config.json")
    if model in named.NAMED:
        cfg = dataclasses.replace(cfg, name=model)
    from kvjax.models.params import check_params
    check_params(params, cfg, source=path)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), params)
    return LoadedModel(cfg=cfg, params=params, tokenizer=tok, source=path, sha256=digest)


__all__ = ["LoadedModel", "load"]

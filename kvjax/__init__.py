"""kvjax: KV-cache compression for pretrained LLMs in JAX.

>>> import kvjax
>>> model = kvjax.load("smollm2-135m")
>>> kvjax.generate_text(model, ["The capital of France is"], max_new_tokens=8)

Heavy pieces (checkpoint readers, training, kernels) load only when used.
"""

from kvjax.cache import Cache, CacheMethod, Dense, available, get_method, parse_method
from kvjax.checkpoints import LoadedModel, load
from kvjax.config import ModelConfig
from kvjax.generate import Generation, Sampler, decode_step, generate, generate_text, prefill
from kvjax.models import forward, init_params

__all__ = ["Cache", "CacheMethod", "Dense", "Generation", "LoadedModel", "ModelConfig", "Sampler", "available",
           "decode_step", "forward", "generate", "generate_text", "get_method", "init_params", "load",
           "parse_method", "prefill"]
__version__ = "0.1.0"

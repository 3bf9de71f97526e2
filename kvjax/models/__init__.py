"""Pure-function model definitions (GPT-2 and Llama families)."""

from kvjax.models.params import cast_params, check_params, init_params
from kvjax.models.transformer import forward, unembed

__all__ = ["cast_params", "check_params", "forward", "init_params", "unembed"]

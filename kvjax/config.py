"""Frozen model configuration, built from a Hugging Face ``config.json`` or from GGUF metadata.

One dataclass serves both families. It is hashable, so it is passed to jitted functions as a static
argument.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

ARCHITECTURES = ("llama", "gpt2")


class ConfigError(ValueError):
    """A configuration that kvjax cannot build a model from (names the file or field)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" or "gpt2"
    vocab_size: int
    d_model: int  # E
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # K
    head_dim: int  # D
    d_ff: int  # F
    max_seq_len: int
    norm_eps: float
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""  # model identity, recorded with trained compressors

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.arch!r}; kvjax supports {ARCHITECTURES}")
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            if int(getattr(self, f)) <= 0:
                raise ConfigError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G = H / K)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_width(self) -> int:
        """Width of one layer's K (or V) for one token: K * D."""
        return self.n_kv_heads * self.head_dim

    @property
    def uses_rope(self) -> bool:
        return self.arch == "llama"

    def dense_kv_bytes_per_token(self, itemsize: int = 2) -> int:
        """Bytes an uncompressed cache stores per token over all layers (K and V)."""
        return 2 * self.n_layers * self.kv_width * itemsize

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str | os.PathLike, name: str = "") -> "ModelConfig":
        """Builds a config from a Hugging Face ``config.json`` (a dict or a path to the file)."""
        source = "config"
        if not isinstance(hf, Mapping):
            from kvjax.jsonio import read_json

            source = os.fspath(hf)
            hf = read_json(source, ConfigError, "config.json")
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r} for model_type {model_type!r}")
            return hf[key]

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        if model_type == "gpt2" or "GPT2LMHeadModel" in archs:
            e, h = int(need("n_embd")), int(need("n_head"))
            return cls(
                arch="gpt2", vocab_size=int(need("vocab_size")), d_model=e, n_layers=int(need("n_layer")),
                n_heads=h, n_kv_heads=h, head_dim=e // h, d_ff=int(hf.get("n_inner") or 4 * e),
                max_seq_len=int(need("n_positions")), norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=True, bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids, name=name,
            )
        if model_type in ("llama", "mistral") or any("Llama" in a for a in archs):
            rope_params = hf.get("rope_parameters") or {}
            if hf.get("rope_scaling") or rope_params.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: scaled RoPE ({hf.get('rope_scaling') or rope_params!r}) is not supported yet")
            if hf.get("sliding_window"):
                raise ConfigError(f"{source}: sliding-window attention (sliding_window={hf['sliding_window']}) "
                                  f"is not supported")
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise ConfigError(f"{source}: attention/MLP biases are not supported for llama models")
            e, h = int(need("hidden_size")), int(need("num_attention_heads"))
            rope_theta = hf.get("rope_theta")
            if rope_theta is None:  # transformers 5 moved it under rope_parameters
                rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            return cls(
                arch="llama", vocab_size=int(need("vocab_size")), d_model=e, n_layers=int(need("num_hidden_layers")),
                n_heads=h, n_kv_heads=int(hf.get("num_key_value_heads") or h),
                head_dim=int(hf.get("head_dim") or e // h), d_ff=int(need("intermediate_size")),
                max_seq_len=int(hf.get("max_position_embeddings", 2048)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids, name=name,
            )
        raise ConfigError(f"{source}: unknown architecture (model_type={model_type!r}, architectures={archs!r}); "
                          f"kvjax supports GPT2LMHeadModel and LlamaForCausalLM")

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str = "", source: str = "gguf") -> "ModelConfig":
        """Builds a config from GGUF key/value metadata (already decoded to Python values)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{source}: unknown GGUF architecture {arch!r}; kvjax reads 'llama' GGUF files")

        def need(key):
            if key not in meta:
                raise ConfigError(f"{source}: GGUF metadata lacks {key!r}")
            return meta[key]

        e = int(need("llama.embedding_length"))
        h = int(need("llama.attention.head_count"))
        vocab = meta.get("llama.vocab_size")
        if vocab is None:
            vocab = len(need("tokenizer.ggml.tokens"))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch="llama", vocab_size=int(vocab), d_model=e, n_layers=int(need("llama.block_count")),
            n_heads=h, n_kv_heads=int(meta.get("llama.attention.head_count_kv", h)),
            head_dim=int(meta.get("llama.rope.dimension_count", e // h)),
            d_ff=int(need("llama.feed_forward_length")), max_seq_len=int(meta.get("llama.context_length", 2048)),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            tie_embeddings=bool(meta.get("_tied", False)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),), name=name,
        )

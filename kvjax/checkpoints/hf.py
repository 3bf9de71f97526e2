"""Hugging Face checkpoint directories (``config.json`` + safetensors) -> kvjax config and parameter pytree.

A table maps every HF tensor name to a path in the kvjax pytree (:mod:`kvjax.models.params`) with an
explicit transform: Llama ``nn.Linear`` weights are stored [out, in] and are transposed; GPT-2 ``Conv1D``
weights are already (in, out); GPT-2's fused ``c_attn`` is split into q, k, v. Every tensor's shape is
checked against the config before it is placed, and errors name the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Callable

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy API needs)
import numpy as np

from kvjax.config import ConfigError, ModelConfig
from kvjax.models.params import check_params, layer_shapes, top_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"

# Prefixes HF puts in front of the base model's tensors (LlamaForCausalLM -> "model.", GPT2LMHeadModel ->
# "transformer."); a checkpoint of the bare base model has none.
_PREFIXES = {"llama": ("model.",), "gpt2": ("transformer.",)}
# Buffers some checkpoints carry that are not weights (causal-mask constants, RoPE frequencies).
_BUFFER_SUFFIXES = {"llama": ("rotary_emb.inv_freq",), "gpt2": (".attn.bias", ".attn.masked_bias")}
_FLOAT_DTYPES = (np.float32, np.float16, np.float64, ml_dtypes.bfloat16)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (the message names the file and, where one is at fault, the tensor)."""


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Where one HF tensor goes: ``dest`` kvjax paths ((key,) or ("layers", i, key)), the HF shape
    expected, and a transform from the HF array to one array per destination."""

    dest: tuple[tuple, ...]
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _same(x):
    return (x,)


def _transpose(x):
    return (np.ascontiguousarray(x.T),)


def _split3(x):
    # GPT-2 c_attn: weight [E, 3E] -> q, k, v [E, E] along the output axis; bias [3E] -> 3 x [E].
    return tuple(np.ascontiguousarray(p) for p in np.split(x, 3, axis=-1))


def tensor_table(cfg: ModelConfig) -> dict[str, _Rule]:
    """HF tensor name (without the base-model prefix) -> rule, for every tensor a checkpoint of ``cfg`` has.

    ``lm_head.weight`` is listed only when the config keeps a separate output head.
    """
    top, lay = top_shapes(cfg), layer_shapes(cfg)

    def t(shape):
        return tuple(reversed(shape))

    table: dict[str, _Rule] = {}
    if cfg.arch == "llama":
        table["embed_tokens.weight"] = _Rule((("embed",),), top["embed"], _same)
        table["norm.weight"] = _Rule((("final_norm",),), top["final_norm"], _same)
        if "lm_head" in top:  # nn.Linear(E, V): stored [V, E]
            table["lm_head.weight"] = _Rule((("lm_head",),), t(top["lm_head"]), _transpose)
        per_layer = {  # HF name -> (kvjax key, transform); nn.Linear weights are [out, in]
            "input_layernorm.weight": ("attn_norm", _same),
            "self_attn.q_proj.weight": ("wq", _transpose),
            "self_attn.k_proj.weight": ("wk", _transpose),
            "self_attn.v_proj.weight": ("wv", _transpose),
            "self_attn.o_proj.weight": ("wo", _transpose),
            "post_attention_layernorm.weight": ("mlp_norm", _same),
            "mlp.gate_proj.weight": ("w_gate", _transpose),
            "mlp.up_proj.weight": ("w_up", _transpose),
            "mlp.down_proj.weight": ("w_down", _transpose),
        }
        for i in range(cfg.n_layers):
            for hf_name, (key, fn) in per_layer.items():
                shape = t(lay[key]) if fn is _transpose else lay[key]
                table[f"layers.{i}.{hf_name}"] = _Rule((("layers", i, key),), shape, fn)
        return table

    # gpt2: Conv1D weights are already (in, out)
    table["wte.weight"] = _Rule((("embed",),), top["embed"], _same)
    table["wpe.weight"] = _Rule((("pos_embed",),), top["pos_embed"], _same)
    table["ln_f.weight"] = _Rule((("final_norm",),), top["final_norm"], _same)
    table["ln_f.bias"] = _Rule((("final_bias",),), top["final_bias"], _same)
    per_layer = {
        "ln_1.weight": "ln1_scale", "ln_1.bias": "ln1_bias",
        "attn.c_proj.weight": "wo", "attn.c_proj.bias": "bo",
        "ln_2.weight": "ln2_scale", "ln_2.bias": "ln2_bias",
        "mlp.c_fc.weight": "w_fc", "mlp.c_fc.bias": "b_fc",
        "mlp.c_proj.weight": "w_proj", "mlp.c_proj.bias": "b_proj",
    }
    e = cfg.d_model
    for i in range(cfg.n_layers):
        table[f"h.{i}.attn.c_attn.weight"] = _Rule(
            tuple(("layers", i, k) for k in ("wq", "wk", "wv")), (e, 3 * e), _split3)
        table[f"h.{i}.attn.c_attn.bias"] = _Rule(
            tuple(("layers", i, k) for k in ("bq", "bk", "bv")), (3 * e,), _split3)
        for hf_name, key in per_layer.items():
            table[f"h.{i}.{hf_name}"] = _Rule((("layers", i, key),), lay[key], _same)
    return table


# ---------------------------------------------------------------------------------------------- files
def _weight_files(directory: str) -> tuple[list[str], dict[str, str] | None]:
    """Returns (the safetensors files, sorted; the index's tensor -> file map, or None for one file)."""
    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(single):
        return [single], None
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = sorted({os.path.join(directory, v) for v in weight_map.values()})
        for path in files:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: weights shard listed in {index} not found")
        return files, weight_map
    others = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt.index", "tf_model.h5")
              if os.path.exists(os.path.join(directory, n))]
    hint = ""
    if others:
        hint = f" (found {', '.join(others)}: only safetensors is read; re-save with safe_serialization=True)"
    raise CheckpointError(f"{single}: weights file not found, nor {INDEX_NAME}{hint}")


def _sha256(files: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_tensors(files: list[str], weight_map: dict[str, str] | None, directory: str):
    """Yields (name, file, array) for every tensor of every file (arrays in their stored dtype)."""
    from safetensors import SafetensorError, safe_open

    seen: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                names = list(f.keys())
                for name in names:
                    if name in seen:
                        raise CheckpointError(f"{path}: tensor {name} also stored in {seen[name]}")
                    seen[name] = path
                    if weight_map is not None and os.path.join(directory, weight_map.get(name, "")) != path:
                        raise CheckpointError(f"{path}: tensor {name} is not listed for this file in {INDEX_NAME}")
                    yield name, path, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        except (OSError, TypeError) as e:  # TypeError: numpy lacks the stored dtype
            raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(seen))
        if missing:
            raise CheckpointError(f"{os.path.join(directory, INDEX_NAME)}: tensors {missing[:5]} listed but not "
                                  f"stored in their shard")


# -------------------------------------------------------------------------------------------- config
def _check_supported(hf: dict, cfg: ModelConfig, path: str) -> None:
    """Rejects HF settings that change the computation in ways the kvjax model does not implement."""
    if cfg.arch == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{path}: activation_function={act!r} is not supported (kvjax GPT-2 uses gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ConfigError(f"{path}: scale_attn_by_inverse_layer_idx=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise ConfigError(f"{path}: scale_attn_weights=false is not supported")
        if hf.get("tie_word_embeddings") is False:
            raise ConfigError(f"{path}: tie_word_embeddings=false is not supported for GPT-2 (its head is wte)")
    else:
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{path}: hidden_act={act!r} is not supported (kvjax Llama uses SwiGLU with silu)")
        # transformers 5 writes scaled RoPE as rope_parameters.rope_type rather than rope_scaling
        rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"{path}: rope_parameters.rope_type={rope_type!r} is not supported yet "
                              f"(only unscaled RoPE)")


# ---------------------------------------------------------------------------------------------- load
def load_hf(directory: str, dtype: Any = np.float32):
    """Loads a Hugging Face checkpoint directory (GPT2LMHeadModel or LlamaForCausalLM, safetensors).

    Returns ``(cfg, params, tokenizer, sha256)``: the :class:`ModelConfig`; the parameter pytree of numpy
    arrays in ``dtype`` (float32 by default) laid out as :mod:`kvjax.models.params` says; a
    ``kvjax.checkpoints.tokenizer.Tokenizer`` when ``tokenizer.json`` is present, else None; and the hex
    sha256 of the weight files (streamed, in sorted path order).
    Raises ConfigError / CheckpointError naming the file (and tensor) at fault.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    config_path = os.path.join(directory, CONFIG_NAME)
    cfg = ModelConfig.from_hf_config(config_path)  # names config_path when missing or unknown
    with open(config_path) as f:
        hf = json.load(f)
    _check_supported(hf, cfg, config_path)

    files, weight_map = _weight_files(directory)
    table = tensor_table(cfg)
    prefixes = _PREFIXES[cfg.arch]
    buffers = _BUFFER_SUFFIXES[cfg.arch]

    params: dict[str, Any] = {"layers": [{} for _ in range(cfg.n_layers)]}
    placed: dict[str, str] = {}  # table name -> HF name it came from
    unknown: list[str] = []
    head = None  # (HF name, file, array) of an lm_head a tied config does not use
    used_prefix = ""  # the base-model prefix this checkpoint uses, for naming missing tensors

    def put(dest, arr):
        if dest[0] == "layers":
            params["layers"][dest[1]][dest[2]] = arr
        else:
            params[dest[0]] = arr

    for hf_name, path, arr in _read_tensors(files, weight_map, directory):
        if hf_name.endswith(buffers):
            continue
        name = hf_name
        for p in prefixes:
            if name.startswith(p):
                name, used_prefix = name[len(p):], p
                break
        rule = table.get(name)
        if rule is None:
            if name == "lm_head.weight":  # the config ties the head: checked against the embedding below
                head = (hf_name, path, arr)
            else:
                unknown.append(hf_name)
            continue
        if name in placed:
            raise CheckpointError(f"{path}: tensor {hf_name} duplicates {placed[name]}")
        if arr.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {hf_name} has dtype {arr.dtype}; expected a float dtype")
        if tuple(arr.shape) != rule.shape:
            raise CheckpointError(f"{path}: tensor {hf_name} has shape {tuple(arr.shape)}, expected {rule.shape} "
                                  f"for {cfg.arch} config {config_path}")
        for dest, part in zip(rule.dest, rule.transform(arr)):
            put(dest, np.asarray(part, dtype=dtype))
        placed[name] = hf_name

    if unknown:
        shown = ", ".join(sorted(unknown)[:10]) + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        raise CheckpointError(f"{directory}: unknown tensors for a {cfg.arch} model with {cfg.n_layers} layers: "
                              f"{shown}")
    missing = [n for n in table if n not in placed]
    if cfg.arch == "llama" and missing == ["lm_head.weight"]:
        # No separate head in the file: the output head is the embedding, as the task brief for loaders says.
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
        missing = []
    if missing:
        names = ", ".join(("" if n == "lm_head.weight" else used_prefix) + n for n in missing[:10])
        names += f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        stored = ", ".join(os.path.basename(f) for f in files)
        raise CheckpointError(f"{directory}: missing tensors {names} in {stored}")
    if head is not None:
        hf_name, path, arr = head
        emb = params["embed"]
        if arr.shape != emb.shape:
            raise CheckpointError(f"{path}: tensor {hf_name} has shape {tuple(arr.shape)}, expected {emb.shape} "
                                  f"(tied to the embedding)")
        if not np.array_equal(np.asarray(arr, dtype=dtype), emb):
            # transformers ties the head to the embedding for such configs and ignores the stored head; so do we.
            warnings.warn(f"{path}: {hf_name} differs from the embedding but {config_path} ties them; "
                          f"using the embedding as transformers does", stacklevel=2)

    check_params(params, cfg, source=directory)
    return cfg, params, _load_tokenizer(directory, cfg), _sha256(files)


def _load_tokenizer(directory: str, cfg: ModelConfig):
    path = os.path.join(directory, TOKENIZER_NAME)
    if not os.path.isfile(path):
        return None
    try:
        from kvjax.checkpoints.tokenizer import Tokenizer
    except ImportError as e:
        raise ImportError(f"{path}: cannot load the tokenizer because kvjax.checkpoints.tokenizer "
                          f"is unavailable ({e})") from e
    add_bos = cfg.arch == "llama" and cfg.bos_token_id is not None
    return Tokenizer.from_hf_file(path, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids, add_bos=add_bos)


__all__ = ["CheckpointError", "load_hf", "tensor_table"]

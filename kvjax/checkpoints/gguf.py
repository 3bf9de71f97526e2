"""Loads a llama.cpp GGUF file (architecture "llama") into kvjax's parameter layout.

Every tensor is dequantized to float32 with the ``gguf`` package. GGUF stores matrices in PyTorch order
[out, in]; kvjax stores (in, out), so matrices are transposed. llama.cpp's converter permutes the rows of
``attn_q`` / ``attn_k`` so that RoPE rotates adjacent pairs (GPT-J style); kvjax uses the Hugging Face
rotate-half convention, so that permutation is undone here.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType

from kvjax.config import ConfigError, ModelConfig
from kvjax.models.params import layer_shapes, top_shapes

# Tensor types this loader dequantizes (all through ``gguf.quants.dequantize``).
SUPPORTED_TYPES = frozenset({
    QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
})

# kvjax name -> GGUF name ("{}" is the block index), for the llama family.
TOP_TENSORS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
LAYER_TENSORS = {
    "attn_norm": "blk.{}.attn_norm.weight", "wq": "blk.{}.attn_q.weight", "wk": "blk.{}.attn_k.weight",
    "wv": "blk.{}.attn_v.weight", "wo": "blk.{}.attn_output.weight", "mlp_norm": "blk.{}.ffn_norm.weight",
    "w_gate": "blk.{}.ffn_gate.weight", "w_up": "blk.{}.ffn_up.weight", "w_down": "blk.{}.ffn_down.weight",
}
# kvjax names stored [V, E] in both layouts (an embedding table, not a matmul weight): no transpose.
_NOT_TRANSPOSED = {"embed"}

_GGUF_MAGIC = b"GGUF"


def file_sha256(path: str, chunk: int = 1 << 23) -> str:
    """Returns the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _field_value(field) -> Any:
    """Decodes one GGUF key/value field into a Python value (str, int, float, bool or a list of them)."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"nested array in field {field.name!r}")
        if not len(field.data):
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def read_metadata(reader: "gguf.GGUFReader") -> dict[str, Any]:
    """Returns every key/value of a GGUF file as plain Python values (the ``GGUF.*`` header fields included)."""
    return {name: _field_value(field) for name, field in reader.fields.items()}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation. w: [rows, cols] in GGUF [out, in] order, rows = n_head * D.

    The converter did ``w.reshape(n_head, 2, D // 2, cols).swapaxes(1, 2).reshape(rows, cols)``.
    """
    rows, cols = w.shape
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class _Reader(gguf.GGUFReader):
    """``GGUFReader`` over a plain ndarray view of its memory map.

    The reader slices its buffer once per string of the vocabulary (~10^5 times); on an ``np.memmap`` each
    slice runs ``memmap.__array_finalize__``, which made the header parse three times slower.
    """

    @property
    def data(self):
        return self._buf

    @data.setter
    def data(self, value):
        self._buf = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def _open(path: str) -> "gguf.GGUFReader":
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        reader = _Reader(path)
    except Exception as e:  # the reader fails deep in numpy on truncated or corrupt headers
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ValueError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte "
                             f"{int(t.data_offset) + int(t.n_bytes)}, the file has {size} bytes")
    return reader


def _dequantize(path: str, t, numpy_shape: tuple[int, ...]) -> np.ndarray:
    """Returns tensor ``t`` as a float32 array of ``numpy_shape`` (GGUF [out, in] order)."""
    qtype = QT(int(t.tensor_type))
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"{path}: tensor {t.name} has type {qtype.name}, which kvjax does not dequantize "
                         f"(supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})")
    try:
        arr = gguf.quants.dequantize(t.data, qtype)
    except Exception as e:
        raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({qtype.name}): {e}") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size != int(np.prod(numpy_shape)):
        raise ValueError(f"{path}: tensor {t.name} holds {arr.size} values, expected shape {numpy_shape}")
    return arr.reshape(numpy_shape)


def load_gguf(path: str | os.PathLike):
    """Loads a llama-architecture GGUF file.

    Returns (cfg: ModelConfig, params: dict of float32 numpy arrays in the layout of
    ``kvjax.models.params``, tokenizer: ``kvjax.checkpoints.tokenizer.Tokenizer`` or None when the file
    has no tokenizer, sha256: hex digest of the file). Raises FileNotFoundError / ValueError (ConfigError
    for metadata) naming ``path`` for a missing, corrupt or truncated file, another architecture, an
    unsupported tensor type, or a missing, unexpected or misshapen tensor.
    """
    path = os.fspath(path)
    reader = _open(path)
    try:
        meta = read_metadata(reader)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode GGUF metadata ({type(e).__name__}: {e})") from None
    tensors = {t.name: t for t in reader.tensors}
    meta["_tied"] = "output.weight" not in tensors
    cfg = ModelConfig.from_gguf_metadata(meta, source=path)  # rejects non-llama architectures

    scaling = meta.get("llama.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in tensors:
        raise ConfigError(f"{path}: RoPE scaling ({scaling or 'rope_freqs.weight'}) is not supported yet")

    # kvjax name -> (GGUF name, kvjax shape); then every GGUF tensor must be claimed exactly once.
    wanted = {k: (TOP_TENSORS[k], s) for k, s in top_shapes(cfg).items()}
    for i in range(cfg.n_layers):
        for k, s in layer_shapes(cfg).items():
            wanted[f"layers.{i}.{k}"] = (LAYER_TENSORS[k].format(i), s)
    unexpected = sorted(set(tensors) - {g for g, _ in wanted.values()})
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors for a {'tied' if cfg.tie_embeddings else 'untied'} llama "
                         f"model: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")

    out: dict[str, np.ndarray] = {}
    for key, (gname, shape) in wanted.items():
        t = tensors.get(gname)
        if t is None:
            raise ValueError(f"{path}: missing tensor {gname} (kvjax {key}, shape {shape})")
        short = key.rsplit(".", 1)[-1]
        transpose = len(shape) == 2 and short not in _NOT_TRANSPOSED
        numpy_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        gguf_shape = tuple(int(x) for x in reversed(t.shape))  # t.shape is ggml order (innermost first)
        if gguf_shape != numpy_shape:
            raise ValueError(f"{path}: tensor {gname} has shape {gguf_shape}, expected {numpy_shape} "
                             f"from the metadata (kvjax {key} {tuple(shape)})")
        w = _dequantize(path, t, numpy_shape)
        if short == "wq":
            w = unpermute_qk(w, cfg.n_heads)
        elif short == "wk":
            w = unpermute_qk(w, cfg.n_kv_heads)
        w = np.ascontiguousarray(w.T if transpose else w, dtype=np.float32)
        if np.may_share_memory(w, reader.data):  # F32 tensors come back as views of the memory map
            w = w.copy()
        out[key] = w

    params = {k: out[k] for k in top_shapes(cfg)}
    params["layers"] = [{k: out[f"layers.{i}.{k}"] for k in layer_shapes(cfg)} for i in range(cfg.n_layers)]
    del reader, tensors, out

    tokenizer = None
    if "tokenizer.ggml.model" in meta:
        from kvjax.checkpoints.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_gguf_metadata(meta, source=path)
    return cfg, params, tokenizer, file_sha256(path)


__all__ = ["LAYER_TENSORS", "SUPPORTED_TYPES", "TOP_TENSORS", "file_sha256", "load_gguf", "read_metadata",
           "unpermute_qk"]

"""A small tokenizer wrapper over Hugging Face ``tokenizers``, built from a ``tokenizer.json`` or GGUF metadata.

The wrapper adds no special tokens of its own except an optional BOS in front; ``encode`` of plain text
never inserts EOS or template tokens.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL = 3
_USER_DEFINED = 4

# Pre-tokenizers of the ``tokenizer.ggml.pre`` values kvjax knows. Each must equal what the model's own
# Hugging Face tokenizer.json uses, or token ids drift from the ones the model was trained on.
_PRE_TOKENIZERS = {
    # SmolLM / SmolLM2 (HuggingFaceTB): digits one by one, then GPT-2 byte-level with its regex.
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
}


class Tokenizer:
    """Text <-> token ids. Attributes: ``bos_id`` (int or None), ``eos_ids`` (tuple of ints), ``add_bos``
    (whether :meth:`encode` prepends BOS by default) and ``vocab_size`` (including added tokens)."""

    def __init__(self, tk: tokenizers.Tokenizer, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 add_bos: bool = False):
        self.tk = tk
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.add_bos = bool(add_bos)
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos=True needs a bos_id")
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
                f"add_bos={self.add_bos})")

    # ------------------------------------------------------------------ encode / decode
    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; call encode with add_bos=False")
            return [self.bos_id] + ids
        return ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Returns the token ids of ``text``; BOS in front when ``add_bos`` (default: ``self.add_bos``)."""
        return self._with_bos(list(self.tk.encode(text, add_special_tokens=False).ids), add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """Returns one list of token ids per text (as :meth:`encode`, in parallel)."""
        encs = self.tk.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(list(e.ids), add_bos) for e in encs]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Returns the text of ``ids``; special (control) tokens are dropped when ``skip_special``."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                     add_bos: bool = False) -> "Tokenizer":
        """Loads a Hugging Face ``tokenizer.json``."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or unknown components
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(tk, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "gguf") -> "Tokenizer":
        """Builds the tokenizer that a GGUF file describes (``tokenizer.ggml.*`` keys, decoded to Python values).

        Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE). Control tokens (type 3) become special
        added tokens, user-defined tokens (type 4) plain added tokens. Raises ValueError naming ``source``
        for an unsupported model or pre-tokenizer, or inconsistent vocabulary data.
        """
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError(f"{source}: GGUF metadata has no tokenizer (tokenizer.ggml.model missing)")
        if model != "gpt2":
            raise ValueError(f"{source}: GGUF tokenizer model {model!r} is not supported; kvjax reads byte-level "
                             f"BPE ('gpt2') tokenizers only (SentencePiece 'llama' vocabularies are not implemented)")
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported; kvjax knows "
                             f"{sorted(_PRE_TOKENIZERS)}")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens:
            raise ValueError(f"{source}: GGUF metadata lacks 'tokenizer.ggml.tokens'")
        if merges is None:
            raise ValueError(f"{source}: GGUF metadata lacks 'tokenizer.ggml.merges' (needed for a BPE tokenizer)")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{source}: the GGUF token list has duplicate entries")
        pairs = []
        for m in merges:
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{source}: malformed BPE merge {m!r} (expected two tokens separated by a space)")
            pairs.append((parts[0], parts[1]))

        tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        tk.decoder = decoders.ByteLevel()
        special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types)
                if t == _USER_DEFINED]
        if special:
            tk.add_special_tokens(special)
        if user:
            tk.add_tokens(user)
        if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(f"{source}: tokenizer built with {tk.get_vocab_size(with_added_tokens=True)} ids "
                             f"from {len(tokens)} GGUF tokens")

        def token_id(key):
            v = meta.get(key)
            if v is None:
                return None
            if not 0 <= int(v) < len(tokens):
                raise ValueError(f"{source}: {key}={v} is outside the vocabulary of {len(tokens)} tokens")
            return int(v)

        bos = token_id("tokenizer.ggml.bos_token_id")
        eos_ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            i = token_id(key)
            if i is not None and i not in eos_ids:
                eos_ids.append(i)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        if add_bos and bos is None:
            raise ValueError(f"{source}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        return cls(tk, bos_id=bos, eos_ids=eos_ids, add_bos=add_bos)

"""Evaluation data: the shared, sha256-pinned files and the readers that turn them into eval inputs.

The data folder is ``../shared/data`` next to the repository root, overridden by the environment variable
``KVJAX_DATA_DIR`` or a CLI's ``--data-dir``. Every known file (``KNOWN_FILES``, copied from
``shared/data/README.md``) is checked against its sha256 before it is read; a mismatch is refused with an
error naming the file and both hashes. A file's hash is computed once per process (keyed by its path,
size and modification time).

Readers:

* :func:`wikitext2` — WikiText-2 raw, the llama.cpp files: ``test`` is ``wiki.test.raw``; the train side
  (``valid``) is ``wiki.valid.raw`` (``wiki.train.raw`` is not in the shared folder).
* :func:`c4` — a 2,000-document C4 ``en`` validation subset, documents joined with ``"\\n\\n"``. This
  subset is NOT the GPTQ-style C4 corpus (first 1,100 documents of shard 00000): numbers on it compare
  between our own runs only, never with published C4 perplexities.
* :func:`text_file` — any UTF-8 text file the user names (hash recorded, not checked).
* :func:`piqa`, :func:`winogrande` — the validation/dev splits (jsonl + labels file), formatted with the
  lm-evaluation-harness prompts (see each reader).
* :func:`read_choice_jsonl` — a user's multiple-choice jsonl, one object per line, in one of two schemas:

  - ``{"context": str, "choices": [str, ...], "label": int}``: each choice is scored as the continuation of
    the context, appended verbatim (put a leading space in the choices if the text needs one);
  - ``{"context_options": [str, ...], "continuation": str, "label": int}``: partial scoring (Winogrande
    style), several contexts and one shared continuation, of which only the continuation is scored.

  A line that is not JSON or breaks the schema is an error naming the file and the line number.

``source="tfds"`` reads PIQA / WinoGrande through ``tensorflow_datasets.data_source`` (array-record data
sources: no TensorFlow needed). It needs the dataset already prepared in the TFDS data dir (nothing is
downloaded unless ``download=True`` is asked for), and it is tested only where tensorflow_datasets is
installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Iterator, Sequence


class DataError(ValueError):
    """Evaluation data that cannot be used (missing, hash mismatch, malformed, empty); names the file."""


# path inside the data folder -> (bytes, sha256), from shared/data/README.md
KNOWN_FILES: dict[str, tuple[int, str]] = {
    "wikitext-2-raw/wiki.test.raw": (1_290_590, "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
    "wikitext-2-raw/wiki.valid.raw": (1_146_846, "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
    "piqa/valid.jsonl": (495_929, "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
    "piqa/valid-labels.lst": (3_676, "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb"),
    "winogrande/dev.jsonl": (492_370, "711649cc959dc9851dec62c4b8b7e9405850af3b6fd33236879ec3175538ff91"),
    "winogrande/dev-labels.lst": (2_534, "5ae1e30f52a50b880515685dcfae7d57649cce256d375947cdd02f687de7e6ba"),
    "c4/c4_validation_2k.parquet": (2_723_638, "4083c86a02a942fcc54674a68d65a29ccd1aaabe2dddc7ba16624f16936b944b"),
}

C4_NOTE = ("2,000-document C4 en validation subset (shared/data/c4); not the GPTQ C4 corpus: "
           "not comparable with published C4 perplexities")

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


# ---------------------------------------------------------------------------------------------- files
def default_data_dir() -> pathlib.Path:
    """``$KVJAX_DATA_DIR`` if set, else ``<repo root>/../shared/data``."""
    env = os.environ.get("KVJAX_DATA_DIR")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    return pathlib.Path(data_dir) if data_dir else default_data_dir()


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), computed once per process for a given path, size and mtime."""
    p = pathlib.Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def known_file(name: str, data_dir: str | os.PathLike | None = None) -> tuple[pathlib.Path, str]:
    """Returns (path, sha256) of a known data file after checking its hash; refuses a missing or changed file."""
    if name not in KNOWN_FILES:
        raise DataError(f"{name}: not a known data file ({', '.join(KNOWN_FILES)})")
    root = resolve_data_dir(data_dir)
    path = root / name
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data dir {root}; set KVJAX_DATA_DIR or pass --data-dir)")
    expected = KNOWN_FILES[name][1]
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 mismatch: the file has {actual}, expected {expected} "
                        f"(shared/data/README.md); refusing to use a changed data file")
    return path, actual


def user_file(path: str | os.PathLike) -> tuple[pathlib.Path, str]:
    """Returns (path, sha256) of a file the user named (recorded, not checked against a table)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    return p, sha256_file(p)


# ---------------------------------------------------------------------------------------------- text
@dataclasses.dataclass(frozen=True)
class TextData:
    """A text corpus to score: its name, the text, and the files (path, sha256) it was read from."""

    name: str
    text: str
    files: tuple[tuple[str, str], ...]
    note: str = ""

    def record(self) -> dict:
        """The JSON-able description of where the text came from."""
        out = {"dataset": self.name, "files": [{"path": p, "sha256": h} for p, h in self.files]}
        if self.note:
            out["note"] = self.note
        return out


def _read_text(path: pathlib.Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"{path}: the text is empty")
    return text


def wikitext2(split: str = "test", data_dir=None) -> TextData:
    """WikiText-2 raw: ``test`` (wiki.test.raw) or ``valid`` (wiki.valid.raw, the train side here)."""
    names = {"test": "wikitext-2-raw/wiki.test.raw", "valid": "wikitext-2-raw/wiki.valid.raw",
             "validation": "wikitext-2-raw/wiki.valid.raw"}
    if split not in names:
        raise DataError(f"wikitext2 has splits test and valid here (wiki.train.raw is not shared), not {split!r}")
    path, digest = known_file(names[split], data_dir)
    return TextData(name=f"wikitext2-{'test' if split == 'test' else 'valid'}", text=_read_text(path),
                    files=((str(path), digest),))


def c4(data_dir=None) -> TextData:
    """The 2,000-document C4 subset, documents joined with "\\n\\n" (see :data:`C4_NOTE`)."""
    import pyarrow.parquet as pq

    path, digest = known_file("c4/c4_validation_2k.parquet", data_dir)
    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    text = "\n\n".join(d for d in docs if d)
    if not text.strip():
        raise DataError(f"{path}: the text column is empty")
    return TextData(name="c4-2k", text=text, files=((str(path), digest),), note=C4_NOTE)


def text_file(path) -> TextData:
    """Any UTF-8 text file; an empty (or whitespace-only) file is an error."""
    p, digest = user_file(path)
    return TextData(name=f"text:{p.name}", text=_read_text(p), files=((str(p), digest),))


def load_text(dataset: str, split: str = "test", text_path=None, data_dir=None) -> TextData:
    """Dispatch for the CLIs: ``--text-file`` wins; else ``wikitext2`` or ``c4``."""
    if text_path:
        return text_file(text_path)
    if dataset == "wikitext2":
        return wikitext2(split, data_dir)
    if dataset == "c4":
        return c4(data_dir)
    raise DataError(f"unknown dataset {dataset!r}; use wikitext2, c4 or --text-file")


# ---------------------------------------------------------------------------------------------- choices
@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """Score ``context + delimiter + choice`` for each choice (only the choice's tokens)."""

    context: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = ""  # lm-evaluation-harness's target_delimiter; " " for PIQA

    def continuations(self) -> list[str]:
        return [self.delimiter + c for c in self.choices]


@dataclasses.dataclass(frozen=True)
class PartialChoice:
    """Partial scoring: score ``continuation`` after each of ``contexts``; the likeliest context wins."""

    contexts: tuple[str, ...]
    continuation: str
    label: int


@dataclasses.dataclass(frozen=True)
class ChoiceData:
    name: str
    items: tuple
    files: tuple[tuple[str, str], ...]

    def record(self) -> dict:
        return {"task": self.name, "files": [{"path": p, "sha256": h} for p, h in self.files]}


def iter_jsonl(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for each non-blank line; a bad line is an error naming file and line."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: line {n} is not a JSON object")
            yield n, obj


def _read_labels(path: pathlib.Path, allowed: Sequence[int]) -> list[int]:
    labels = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            v = int(line.strip())
        except ValueError:
            raise DataError(f"{path}:{n}: label {line!r} is not an integer") from None
        if v not in allowed:
            raise DataError(f"{path}:{n}: label {v} is not one of {tuple(allowed)}")
        labels.append(v)
    return labels


def _need(obj, key, kind, path, n):
    if key not in obj:
        raise DataError(f"{path}:{n}: line {n} lacks the field {key!r}")
    v = obj[key]
    if not isinstance(v, kind):
        raise DataError(f"{path}:{n}: field {key!r} on line {n} should be {kind.__name__}, got {type(v).__name__}")
    return v


def _str_list(obj, key, path, n):
    v = _need(obj, key, list, path, n)
    if len(v) < 2 or not all(isinstance(s, str) and s for s in v):
        raise DataError(f"{path}:{n}: field {key!r} on line {n} should be a list of at least 2 non-empty strings")
    return tuple(v)


def _label(obj, n_options, path, n):
    label = _need(obj, "label", int, path, n)
    if isinstance(label, bool) or not 0 <= label < n_options:
        raise DataError(f"{path}:{n}: label {label!r} on line {n} is not an index into {n_options} options")
    return label


def piqa_item(goal: str, sol1: str, sol2: str, label: int) -> MultipleChoice:
    """lm-evaluation-harness PIQA: context "Question: {goal}\\nAnswer:", choices " {sol}"."""
    return MultipleChoice(context=f"Question: {goal}\nAnswer:", choices=(sol1, sol2), label=int(label), delimiter=" ")


def winogrande_item(sentence: str, option1: str, option2: str, label: int, where: str = "") -> PartialChoice:
    """lm-evaluation-harness WinoGrande: split at "_"; context_i = prefix + option_i; continuation
    = " " + (text after the blank, stripped)."""
    idx = sentence.find("_")
    if idx < 0:
        raise DataError(f"{where or 'winogrande'}: sentence has no '_' blank: {sentence!r}")
    prefix, rest = sentence[:idx], sentence[idx + 1:].strip()
    if not rest:
        raise DataError(f"{where or 'winogrande'}: nothing follows the blank in {sentence!r}")
    return PartialChoice(contexts=(prefix + option1, prefix + option2), continuation=" " + rest, label=int(label))


def _limit(items, limit):
    return tuple(items if limit is None else items[:limit])


def piqa(data_dir=None, limit: int | None = None, source: str = "files", **tfds_kwargs) -> ChoiceData:
    """PIQA validation (1,838 questions; labels 0/1) as :class:`MultipleChoice` items."""
    if source == "tfds":
        rows = _tfds_rows("piqa", "validation", **tfds_kwargs)
        items = [piqa_item(r["goal"], r["sol1"], r["sol2"], int(r["label"])) for r in rows]
        return ChoiceData("piqa", _limit(items, limit), (("tfds:piqa/validation", ""),))
    if source != "files":
        raise DataError(f"unknown source {source!r}; use files or tfds")
    jpath, jhash = known_file("piqa/valid.jsonl", data_dir)
    lpath, lhash = known_file("piqa/valid-labels.lst", data_dir)
    labels = _read_labels(lpath, (0, 1))
    items = []
    for i, (n, obj) in enumerate(iter_jsonl(jpath)):
        g, s1, s2 = (_need(obj, k, str, jpath, n) for k in ("goal", "sol1", "sol2"))
        if i >= len(labels):
            raise DataError(f"{lpath}: {len(labels)} labels, but {jpath} has more lines")
        items.append(piqa_item(g, s1, s2, labels[i]))
    if len(items) != len(labels):
        raise DataError(f"{lpath}: {len(labels)} labels for {len(items)} questions in {jpath}")
    return ChoiceData("piqa", _limit(items, limit), ((str(jpath), jhash), (str(lpath), lhash)))


def winogrande(data_dir=None, limit: int | None = None, source: str = "files", **tfds_kwargs) -> ChoiceData:
    """WinoGrande dev (1,267 questions; labels 1/2 in the file, 0/1 here) as :class:`PartialChoice` items."""
    if source == "tfds":
        rows = _tfds_rows("winogrande", "validation", **tfds_kwargs)
        items = [winogrande_item(r["sentence"], r["option1"], r["option2"], int(r["label"]), f"tfds row {i}")
                 for i, r in enumerate(rows)]
        return ChoiceData("winogrande", _limit(items, limit), (("tfds:winogrande/validation", ""),))
    if source != "files":
        raise DataError(f"unknown source {source!r}; use files or tfds")
    jpath, jhash = known_file("winogrande/dev.jsonl", data_dir)
    lpath, lhash = known_file("winogrande/dev-labels.lst", data_dir)
    labels = _read_labels(lpath, (1, 2))
    items = []
    for i, (n, obj) in enumerate(iter_jsonl(jpath)):
        s, o1, o2 = (_need(obj, k, str, jpath, n) for k in ("sentence", "option1", "option2"))
        if i >= len(labels):
            raise DataError(f"{lpath}: {len(labels)} labels, but {jpath} has more lines")
        if "answer" in obj and str(obj["answer"]) != str(labels[i]):
            raise DataError(f"{jpath}:{n}: answer {obj['answer']!r} disagrees with {lpath} line {i + 1} ({labels[i]})")
        items.append(winogrande_item(s, o1, o2, labels[i] - 1, f"{jpath}:{n}"))
    if len(items) != len(labels):
        raise DataError(f"{lpath}: {len(labels)} labels for {len(items)} questions in {jpath}")
    return ChoiceData("winogrande", _limit(items, limit), ((str(jpath), jhash), (str(lpath), lhash)))


def read_choice_jsonl(path, limit: int | None = None) -> ChoiceData:
    """A user's jsonl of multiple-choice (``context``/``choices``/``label``) or partial-scoring
    (``context_options``/``continuation``/``label``) items; see the module docstring."""
    p, digest = user_file(path)
    items = []
    for n, obj in iter_jsonl(p):
        if "choices" in obj:
            ctx = _need(obj, "context", str, p, n)
            choices = _str_list(obj, "choices", p, n)
            items.append(MultipleChoice(context=ctx, choices=choices, label=_label(obj, len(choices), p, n)))
        elif "context_options" in obj:
            ctxs = _str_list(obj, "context_options", p, n)
            cont = _need(obj, "continuation", str, p, n)
            if not cont:
                raise DataError(f"{p}:{n}: field 'continuation' on line {n} is empty")
            items.append(PartialChoice(contexts=ctxs, continuation=cont, label=_label(obj, len(ctxs), p, n)))
        else:
            raise DataError(f"{p}:{n}: line {n} has neither 'choices' nor 'context_options' "
                            f"(schemas: context/choices/label or context_options/continuation/label)")
    if not items:
        raise DataError(f"{p}: no items (the file is empty)")
    return ChoiceData(f"jsonl:{p.name}", _limit(items, limit), ((str(p), digest),))


def load_choices(task: str, jsonl=None, limit=None, data_dir=None, source: str = "files") -> ChoiceData:
    """Dispatch for the CLIs: ``--jsonl`` wins; else ``piqa`` or ``winogrande``."""
    if jsonl:
        return read_choice_jsonl(jsonl, limit)
    if task == "piqa":
        return piqa(data_dir, limit, source)
    if task == "winogrande":
        return winogrande(data_dir, limit, source)
    raise DataError(f"unknown task {task!r}; use piqa, winogrande or --jsonl")


# ---------------------------------------------------------------------------------------------- tfds
def _tfds_rows(name: str, split: str, data_dir=None, download: bool = False) -> list[dict]:
    """Rows of a TFDS dataset through ``tfds.data_source`` (no TensorFlow), bytes decoded to str."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("--source tfds needs tensorflow_datasets (pip install tensorflow-datasets); "
                        "TensorFlow itself is not needed") from None
    try:
        import tensorflow_datasets.text  # noqa: F401  (registers piqa / winogrande)
    except ImportError:
        pass
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)

    def dec(v):
        return v.decode("utf-8") if isinstance(v, bytes) else v

    return [{k: dec(v) for k, v in source[i].items()} for i in range(len(source))]

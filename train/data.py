"""Training text. Default: WikiText-2 ``wiki.valid.raw`` from the shared data folder (sha256-checked);
never the test split or anything that is evaluated."""

from __future__ import annotations


def training_text(path: str | None = None, data_dir: str | None = None):
    """Returns (text, record) where record names the file(s) and their sha256."""
    from eval.data import text_file, wikitext2

    data = text_file(path) if path else wikitext2("valid", data_dir)
    return data.text, data.record()

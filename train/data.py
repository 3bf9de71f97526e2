"""Training text. Default: WikiText-2 ``wiki.valid.raw`` from the shared data folder (sha256-checked);
never the test split or anything that is evaluated."""

from __future__ import annotations

import os


def training_text(path: str | None = None, data_dir: str | None = None):
    """Returns (text, record) where record names the file and its sha256."""
    from eval.data import read_text_file, verified_path

    if path is None:
        path = verified_path("wikitext2-valid", data_dir)
    text, digest = read_text_file(path)
    return text, {"file": os.path.abspath(path), "sha256": digest}

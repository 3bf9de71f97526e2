"""The main job on the embedded default model: ``python -m eval.demo``.

Loads SmolLM2-135M-Instruct, measures WikiText-2 (test) and C4-subset perplexity through the dense cache and
through the committed KV-CAR compressor (by default keys at 96 of 192 dimensions and all 192 value dimensions,
int4 latents in groups of 32, trained quantization-aware to keep the dense model's predictions; each token
attends to what the cache stores and restores), prints
the KV bytes per token actually stored, and generates a continuation through the compressed cache.
On a CPU the default slice (8 windows of 512 tokens per dataset) takes a minute or two; ``--windows 0``
scores the whole test set (a GPU job: see results/smollm2 for the full-set figures).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np

DEFAULT_COMPRESSOR = (pathlib.Path(__file__).resolve().parents[1] / "results" / "compressors"
                      / "smollm2-k96v192-int4-g32-qat-kl")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--compressor", default=str(DEFAULT_COMPRESSOR))
    ap.add_argument("--windows", type=int, default=8, help="512-token windows per dataset (0: all)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args(argv)

    import kvjax
    from kvjax.cache.dense import Dense
    from kvjax.compressors import load_compressor
    from kvjax.compressors.io import read_metadata
    from eval.data import c4, wikitext2
    from eval.perplexity import perplexity

    t0 = time.perf_counter()
    model = kvjax.load(args.model)
    method, mparams = load_compressor(args.compressor, model)
    print(f"model {args.model} ({model.source}), compressor {os.path.relpath(args.compressor)}: "
          f"{method.name} latent K={method.latent_dim(model.cfg)} V={method.latent_v_dim(model.cfg)} "
          f"stored as {method.storage_dtype}")
    bf16_dense = Dense(dtype="bfloat16").bytes_per_token(model.cfg)
    stored = method.bytes_per_token(model.cfg)
    rows = []
    for data in (wikitext2("test", args.data_dir), c4(args.data_dir)):
        ids = np.asarray(model.tokenizer.encode(data.text), np.int32)
        max_tokens = args.windows * 512 if args.windows else None
        for label, m, mp in (("dense", Dense(), None), ("KV-CAR", method, mparams)):
            r = perplexity(model, ids, m, mp, context=512, batch=8, max_tokens=max_tokens)
            rows.append((data.name, label, r["ppl"], r["tokens"]))
            print(f"  {data.name:14s} {label:7s} ppl {r['ppl']:8.3f} over {r['tokens']} tokens", flush=True)
    text = kvjax.generate_text(model, [args.prompt], max_new_tokens=16, method=method, mparams=mparams)[0]
    print()
    print("| dataset | dense ppl | KV-CAR ppl | change |")
    print("|---|---:|---:|---:|")
    for i in range(0, len(rows), 2):
        (name, _, p0, _), (_, _, p1, _) = rows[i], rows[i + 1]
        print(f"| {name} | {p0:.3f} | {p1:.3f} | {100 * (p1 / p0 - 1):+.1f}% |")
    print(f"\nKV bytes per token stored: {stored} (a bf16 dense cache stores {bf16_dense}: "
          f"{100 * (1 - stored / bf16_dense):.1f}% saved, quantization scales counted)")
    loss = read_metadata(args.compressor).get("training", {}).get("train_config", {}).get("loss", "ce")
    if loss == "ce":
        print("(A WikiText-2 drop is not a compression gain: this compressor was trained with cross-entropy on\n"
              " wiki.valid.raw and adapts the model to Wikipedia text, as a no-saving control does too; C4 shows what\n"
              " compression costs. Compressors trained with --loss kl do not adapt. README.)")
    print(f"generation through the compressed cache: {args.prompt!r} -> {text!r}")
    print(f"[eval.demo] {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

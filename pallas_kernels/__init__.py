"""Pallas kernels for kvjax, one folder per op (tokamax layout): a pure-jnp float32 reference that is
the specification, one file per backend, an ``api.py`` with an ``implementation=`` switch that falls back
to XLA, a shared test base and a ``bench.py``.

Ops:
  decode_attention      split-K flash-decoding attention over the dense head-major cache (the model's decode step).
  decompress_attention  fused decode attention over the KV-CAR compressed (latent) cache.
"""

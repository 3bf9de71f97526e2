"""Learned compressors (KV-CAR autoencoders) and their checkpoints."""

from kvjax.compressors.io import CompressorError, load_compressor, read_metadata, save_compressor

__all__ = ["CompressorError", "load_compressor", "read_metadata", "save_compressor"]

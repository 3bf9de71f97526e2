"""Training entry points: ``python -m train.autoencoder`` (KV-CAR autoencoders)."""

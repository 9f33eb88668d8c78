"""Tiny random-weight models made by the project's own code (for `--demo`, tests and benchmarks): checkpoints,
a VAE, LoRAs and embeddings. A helper layer above the services (it uses the captioning service's own tiny
captioners)."""

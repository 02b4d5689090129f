"""Weights in and out: Hugging Face checkpoints, GGUF files, orbax checkpoints."""

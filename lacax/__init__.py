"""lacax: efficient LLM inference and adaptation in JAX."""

__version__ = "0.1.0"

"""Spec2RTL-Agent (arXiv 2506.13905)."""

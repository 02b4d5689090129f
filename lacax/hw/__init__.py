"""LLMs for hardware design: backends, sandboxed EDA tools, benchmark harness, and the systems built on them."""

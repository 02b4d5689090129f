"""Language-model backends behind one protocol (`lacax.hw.backends.base`)."""

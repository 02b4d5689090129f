"""Edge-LLM: layer-wise compression, adaptive layer tuning, voting and the hardware scheduling model."""

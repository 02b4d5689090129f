"""Tiny random Hugging Face models saved to a temp dir: the references for parity tests (no downloads)."""

from __future__ import annotations

import functools
import os
import tempfile

import torch
import transformers

_COMMON = dict(vocab_size=113, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-5)

ARCHITECTURES = {
    "llama3_rope_untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=50000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        tie_word_embeddings=False, sliding_window=None)),
    "qwen2_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
}


@functools.lru_cache(maxsize=None)
def saved_model(arch: str, seed: int = 0) -> tuple[str, torch.nn.Module]:
  """(checkpoint directory, torch model in eval mode) for a tiny random model of `arch`."""
  config_cls, model_cls, extra = ARCHITECTURES[arch]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**_COMMON, **extra)).eval()
  path = os.path.join(tempfile.mkdtemp(prefix=f"lacax_{arch}_"), "model")
  model.save_pretrained(path)
  return path, model

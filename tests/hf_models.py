"""Tiny random Hugging Face models saved to a temp dir: the references for parity tests (no downloads)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile

import safetensors.torch
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


@functools.lru_cache(maxsize=None)
def saved_model_with_tokenizer(seed: int = 0, vocab_size: int = 384, num_layers: int = 2) -> str:
  """A checkpoint directory that `lacax.weights.loader.load_model` loads whole: a tiny random Llama and a
  byte-level BPE tokenizer trained on the embedded default text (tokenizer.json), for end-to-end job runs.

  Training is deterministic, so the same arguments give the same files in every process.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  from lacax.eval.texts import default_text  # pylint: disable=g-import-not-at-top

  path = os.path.join(tempfile.mkdtemp(prefix="lacax_tiny_job_model_"), "model")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([default_text()[:100_000]], trainer=trainer)
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2,
      rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=0, bos_token_id=None)
  transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
  tok.save(os.path.join(path, "tokenizer.json"))
  return path


@functools.lru_cache(maxsize=None)
def smollm2_checkpoint_dir() -> str:
  """`smollm2_torch()` saved as a Hugging Face checkpoint directory (config + safetensors), once per test
  session (for a reference that loads a checkpoint itself, such as the kvpress worker); a fresh temporary
  directory outside a test session."""
  session = os.environ.get("LACAX_TEST_TMPDIR")
  saved = os.path.join(session, "smollm2_hf") if session else None
  if saved and os.path.isfile(os.path.join(saved, "config.json")):
    return saved
  partial = tempfile.mkdtemp(prefix="smollm2_hf_", dir=session)
  model = smollm2_torch()
  # Not save_pretrained: a model read from GGUF counts as quantized to transformers, which refuses to save it.
  # Its weights are plain float32 tensors: the config without the GGUF marker, the state dict as safetensors
  # (without the tied LM head, a second name for the embedding).
  config = model.config.to_dict()
  config.pop("quantization_config", None)
  with open(os.path.join(partial, "config.json"), "w") as f:
    json.dump(config, f)
  tied = bool(getattr(model.config, "tie_word_embeddings", False))
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()
                               if not (tied and k == "lm_head.weight")},
                              os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
  if not saved:
    return partial
  try:
    os.rename(partial, saved)
  except OSError:  # another worker got there first: its copy is the same
    shutil.rmtree(partial, ignore_errors=True)
  return saved


def smollm2_torch() -> torch.nn.Module:
  """transformers' SmolLM2-135M-Instruct (float32, eval mode) read from the same GGUF file lacax loads.

  transformers dequantizes a GGUF file in about 40 s on two cores, and three test modules need the model, often
  in different pytest-xdist workers. The first process converts it and leaves the config and state dict in the
  test session's temporary directory (written to a temporary name, then renamed); the others load those in a few
  seconds. Outside a test session (no LACAX_TEST_TMPDIR) it reads the GGUF file every time."""
  from lacax.weights import loader  # pylint: disable=g-import-not-at-top

  path = loader.default_model_path()
  session = os.environ.get("LACAX_TEST_TMPDIR")
  saved = os.path.join(session, "smollm2_torch") if session else None
  if saved and os.path.isfile(os.path.join(saved, "state.pt")):
    config = transformers.AutoConfig.from_pretrained(saved)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(torch.load(os.path.join(saved, "state.pt"), weights_only=True))
    return model.eval()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  if saved:
    partial = tempfile.mkdtemp(prefix="smollm2_torch_", dir=session)
    model.config.to_json_file(os.path.join(partial, "config.json"))
    torch.save(model.state_dict(), os.path.join(partial, "state.pt"))
    try:
      os.rename(partial, saved)
    except OSError:  # another worker got there first: its copy is the same
      shutil.rmtree(partial, ignore_errors=True)
  return model

"""Shared pieces of the training tests: a learnable regression task, a tiny Llama, a byte-level chat tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from lacax.model import config as config_lib
from lacax.tokenizer import Tokenizer
from lacax.train import state as st

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def mlp_params(seed: int = 0, width: int = 32, layers: int = 3) -> dict:
  """A small MLP regressor; `layers` hidden layers stacked on axis 0 (like the Llama layers)."""
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"w_in": 0.3 * jax.random.normal(k[0], (8, width)), "b_in": jnp.zeros(width),
          "layers": {"w": jax.random.normal(k[1], (layers, width, width)) / np.sqrt(width),
                     "b": jnp.zeros((layers, width))},
          "w_out": 0.3 * jax.random.normal(k[2], (width, 1))}


def mlp_loss(trainable, frozen, batch, rng):
  """Mean squared error; `weight` = the rows that count (batch["w"] masks rows)."""
  del rng
  p = st.combine(trainable, frozen)
  h = jnp.tanh(batch["x"] @ p["w_in"] + p["b_in"])

  def layer(h, lp):
    return h + jnp.tanh(h @ lp["w"] + lp["b"]), None

  h, _ = jax.lax.scan(layer, h, p["layers"])
  err = (h @ p["w_out"])[:, 0].astype(jnp.float32) - batch["y"]
  w = batch["w"]
  return jnp.sum(w * err ** 2) / jnp.maximum(jnp.sum(w), 1.0), {"weight": jnp.sum(w)}


_TARGET = np.random.RandomState(123).randn(8).astype(np.float32)


def regression_batch(step: int, batch_size: int = 16, ragged: bool = False) -> dict:
  """Batch `step` of y = sin(x . v); with `ragged`, some rows are masked out (uneven weights)."""
  r = np.random.RandomState(step)
  x = r.randn(batch_size, 8).astype(np.float32)
  w = np.ones(batch_size, np.float32)
  if ragged:
    w = (r.rand(batch_size) < 0.6).astype(np.float32)
    w[0] = 1.0
  return {"x": x, "y": np.sin(x @ _TARGET).astype(np.float32), "w": w}


def tiny_llama_cfg(**kw) -> config_lib.ModelConfig:
  base = dict(vocab_size=272, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, max_position_embeddings=256, name="tiny")
  base.update(kw)
  return config_lib.ModelConfig(**base)


def byte_tokenizer() -> Tokenizer:
  """Byte-level tokenizer (one id per byte) with ChatML special tokens and template."""
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  vocab = {c: i for i, c in enumerate(sorted(alphabet))}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  eos = backend.token_to_id("<|im_end|>")
  return Tokenizer(backend, eos_id=eos, chat_template=CHATML)

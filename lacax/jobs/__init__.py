"""Experiment jobs: each is `run(config, run_dir) -> dict of results`, driven by `experiments/run.py`."""

from __future__ import annotations

from typing import Any


def model_from_config(config: Any):
  """The model of a job's config: `config.model.path` (None = the embedded default) in `config.model.dtype`,
  or, with `config.model.init="random"`, the tiny random model `config.model.random` describes (tests).

  With a `config.mesh` section of more than one device, the parameters are loaded straight into the shards
  of its rules (`lacax.sharding.mesh_rules_from_config`), and the returned `Model.mesh_rules` carries them to
  whatever the job builds next (caches, generation, training); there is no implicit mesh context.
  """
  from lacax import sharding  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import load_model  # pylint: disable=g-import-not-at-top

  init = config.model.get("init", "")
  if init == "random":
    return random_model(config.model.random, dtype=config.model.get("dtype", "float32"))
  if init:
    raise ValueError(f"model.init={init!r} is unknown; expected '' (load model.path) or 'random'")
  mesh_rules = sharding.mesh_rules_from_config(config.get("mesh"))
  return load_model(config.model.path or None, dtype=config.model.get("dtype", "float32"), mesh_rules=mesh_rules)


def random_model(random: Any, dtype: str = "float32"):
  """A random-weight Llama of the shape in `random` (hidden_size, intermediate_size, num_layers, num_heads,
  num_kv_heads, seed) with the embedded SmolLM2 tokenizer: the jobs' `:tiny` variants."""
  import jax  # pylint: disable=g-import-not-at-top
  from lacax.model import llama  # pylint: disable=g-import-not-at-top
  from lacax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from lacax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from lacax.weights.gguf import smollm2_gguf_path  # pylint: disable=g-import-not-at-top
  from lacax.weights.loader import Model  # pylint: disable=g-import-not-at-top

  tok = Tokenizer.from_gguf(smollm2_gguf_path())
  cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=random.hidden_size,
                    intermediate_size=random.intermediate_size, num_layers=random.num_layers,
                    num_heads=random.num_heads, num_kv_heads=random.num_kv_heads, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, dtype=dtype, name="random-tiny")
  params = llama.init_params(cfg, jax.random.PRNGKey(random.seed), std=0.1)
  return Model(cfg=cfg, params=params, tokenizer=tok, source=smollm2_gguf_path())

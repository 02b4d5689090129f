"""Per-layer sensitivity tables measured by lacax on calibration tokens (Edge-LLM's LUC inputs).

For each decoder layer l, the inputs X_l are the dense model's residual stream before l on the calibration
tokens. The layer is compressed alone (every projection, from one statistics pass) and run on X_l; the table
holds the mean squared error of its output against the dense layer's output on the same inputs:

  prune[l, r]  pruned at ratios[r] (0.05 .. 0.9 by default) with `method` (SparseGPT by default);
  quant[l, b]  weights fake-quantized at bits[b] (symmetric, `group_size` None = per channel).

`rel_prune` / `rel_quant` divide by the mean square of the dense layer's residual update (f(x) - x), which
removes the depth-wise growth of the activation scale that dominates the reference's raw MSE. The reference's
tables were never released as code; these are lacax's own measurement of what they hold.

Saved as JSON or npz, each layer under a key that carries its index ("layer{l}"), parsed back from the key
(never from list position: the reference's `os.walk` order bug), and tagged with the model's identity (config
hash and weight digest, `model_identity`): loading a table for another model raises `SensitivityMismatch`
naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax import io as lacax_io
from lacax.compress import calibrate, prune, quant
from lacax.errors import ConfigError, FileFormatError
from lacax.model import llama
from lacax.model.config import ModelConfig

DEFAULT_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # the reference's `pruning_ratios`
DEFAULT_BITS = (2, 3, 4, 8)
_LAYER_KEY = re.compile(r"^layer(\d+)$")


class SensitivityMismatch(ConfigError):
  """A sensitivity table measured on another model (or with other candidates) than the one it is used for."""


def model_identity(params: dict[str, Any], cfg: ModelConfig) -> dict[str, str]:
  """{"name", "config_hash", "weights_digest"}: a hash of the config's shape fields and a digest of a few
  weights of every layer (a table measured on a same-shaped model with other weights is refused too)."""
  shape_fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "dtype")}
  config_hash = hashlib.sha256(json.dumps(shape_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
  layers = params["layers"]
  first = layers[0] if isinstance(layers, (list, tuple)) else layers
  digest = hashlib.sha256()
  for name in ("attn_norm", "wq", "w_down"):
    leaf = first[name]
    arr = np.asarray(leaf.dense() if hasattr(leaf, "dense") else leaf, np.float32)
    digest.update(np.ascontiguousarray(arr.reshape(arr.shape[0], -1)[:, :64]).tobytes())
  first_rows = llama.embed_tokens(params["embed"], jnp.arange(4), jnp.float32)
  digest.update(np.ascontiguousarray(np.asarray(first_rows, np.float32)).tobytes())
  return {"name": cfg.name, "config_hash": config_hash, "weights_digest": digest.hexdigest()[:16]}


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
  """Measured sensitivities. prune: [L, len(ratios)], quant: [L, len(bits)] output MSEs (and the relative ones);
  `model`: `model_identity` of the model measured; `settings`: how it was measured."""

  ratios: tuple[float, ...]
  bits: tuple[int, ...]
  prune: np.ndarray
  quant: np.ndarray
  rel_prune: np.ndarray
  rel_quant: np.ndarray
  model: dict[str, str]
  settings: dict[str, Any]

  @property
  def num_layers(self) -> int:
    return int(self.prune.shape[0])

  def metric(self, kind: str, relative: bool = False) -> np.ndarray:
    """"prune" or "quant" table [L, candidates], raw or relative."""
    if kind not in ("prune", "quant"):
      raise ValueError(f"sensitivity kind={kind!r}; expected 'prune' or 'quant'")
    return getattr(self, ("rel_" if relative else "") + kind)

  def check_model(self, params: dict[str, Any], cfg: ModelConfig) -> None:
    """Raises `SensitivityMismatch` unless the table was measured on this model."""
    here = model_identity(params, cfg)
    if (here["config_hash"], here["weights_digest"]) != (self.model.get("config_hash"),
                                                         self.model.get("weights_digest")):
      raise SensitivityMismatch(
          f"the sensitivity table was measured on model {self.model.get('name')!r} (config hash "
          f"{self.model.get('config_hash')}, weights {self.model.get('weights_digest')}), not on this model "
          f"{here['name']!r} (config hash {here['config_hash']}, weights {here['weights_digest']}); measure it "
          "again with lacax.compress.sensitivity.measure")

  # --- files -------------------------------------------------------------------------------------------------

  def _layer_records(self) -> dict[str, dict[str, list[float]]]:
    return {f"layer{l}": {"prune": self.prune[l].tolist(), "quant": self.quant[l].tolist(),
                          "rel_prune": self.rel_prune[l].tolist(), "rel_quant": self.rel_quant[l].tolist()}
            for l in range(self.num_layers)}

  def save(self, path: str) -> None:
    """Writes the table atomically: `.json` (readable) or `.npz` (arrays `layer{l}/prune`, ...)."""
    header = {"format": "lacax.sensitivity/1", "ratios": list(self.ratios), "bits": list(self.bits),
              "model": self.model, "settings": self.settings}
    if path.endswith(".json"):
      lacax_io.write_json(path, {**header, "layers": self._layer_records()})
    elif path.endswith(".npz"):
      arrays = {"header": np.frombuffer(json.dumps(header).encode(), np.uint8)}
      for key, rec in self._layer_records().items():
        for field, values in rec.items():
          arrays[f"{key}/{field}"] = np.asarray(values, np.float64)
      buf = io.BytesIO()
      np.savez(buf, **arrays)
      lacax_io.atomic_write_bytes(path, buf.getvalue())
    else:
      raise ValueError(f"sensitivity table path {path!r}: expected a .json or .npz file")

  @classmethod
  def load(cls, path: str, *, params: dict[str, Any] | None = None, cfg: ModelConfig | None = None
           ) -> "SensitivityTable":
    """Reads a table saved by `save`; with params and cfg, refuses one measured on another model."""
    if path.endswith(".json"):
      data = lacax_io.read_json(path, what="sensitivity table")
      header, records = data, data.get("layers")
    elif path.endswith(".npz"):
      with np.load(path) as f:
        header = json.loads(bytes(f["header"]).decode())
        records = {}
        for key in f.files:
          if key == "header":
            continue
          layer, _, field = key.partition("/")
          records.setdefault(layer, {})[field] = f[key].tolist()
    else:
      raise ValueError(f"sensitivity table path {path!r}: expected a .json or .npz file")
    if not isinstance(header, dict) or header.get("format") != "lacax.sensitivity/1" or not isinstance(records,
                                                                                                      dict):
      raise FileFormatError(path, "not a lacax sensitivity table (format 'lacax.sensitivity/1')")
    table = cls.from_layer_records(records, header, where=path)
    if params is not None and cfg is not None:
      table.check_model(params, cfg)
    return table

  @classmethod
  def from_layer_records(cls, records: dict[str, dict[str, Sequence[float]]], header: dict[str, Any], *,
                         where: str = "sensitivity table") -> "SensitivityTable":
    """Builds the table from {"layer{l}": {...}} in any order; the index comes from the key."""
    by_index = {}
    for key, rec in records.items():
      match = _LAYER_KEY.match(key)
      if not match:
        raise FileFormatError(where, f"entry {key!r} is not named layer<index>")
      by_index[int(match.group(1))] = rec
    L = len(by_index)
    if sorted(by_index) != list(range(L)):
      missing = sorted(set(range(max(by_index) + 1)) - set(by_index)) if by_index else [0]
      raise FileFormatError(where, f"layers {missing} are missing (found {sorted(by_index)})")
    ratios, bits = tuple(float(r) for r in header["ratios"]), tuple(int(b) for b in header["bits"])
    fields = {}
    for field, width in (("prune", len(ratios)), ("quant", len(bits)), ("rel_prune", len(ratios)),
                         ("rel_quant", len(bits))):
      rows = []
      for l in range(L):
        row = by_index[l].get(field)
        if row is None or len(row) != width:
          raise FileFormatError(where, f"layer{l}.{field} has {None if row is None else len(row)} values; "
                                f"expected {width}")
        rows.append(row)
      fields[field] = np.asarray(rows, np.float64)
    return cls(ratios=ratios, bits=bits, model=dict(header["model"]), settings=dict(header.get("settings", {})),
               **fields)


def measure(params: dict[str, Any], cfg: ModelConfig, calib_tokens: np.ndarray, *,
            ratios: Sequence[float] = DEFAULT_RATIOS, bits: Sequence[int] = DEFAULT_BITS,
            method: str = "sparsegpt", group_size: int | None = None, block_size: int = 128,
            damp: float = 0.01, progress: Callable[[int], None] | None = None) -> SensitivityTable:
  """Measures the table (module docstring) on calibration tokens [B, T]."""
  ratios = tuple(float(r) for r in ratios)
  bits = tuple(int(b) for b in bits)
  bad = [r for r in ratios if not 0.0 < r < 1.0]
  if bad or not ratios:
    raise ConfigError(f"sensitivity ratios={ratios}: expected a non-empty list of values in (0, 1)")
  for b in bits:
    quant.qmax(b)
  if method not in prune.METHODS:
    raise ConfigError(f"sensitivity method={method!r}; expected one of {list(prune.METHODS)}")
  layers = calibrate.stacked_layers(params)
  x, positions = calibrate.embed_inputs(params, cfg, calib_tokens)
  mse = jax.jit(lambda a, b: jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2))
  out = {k: np.zeros((cfg.num_layers, n)) for k, n in (("prune", len(ratios)), ("quant", len(bits)))}
  rel = {k: np.zeros_like(v) for k, v in out.items()}
  for l in range(cfg.num_layers):
    layer_p = calibrate.layer_slice(layers, l)
    dense_out = calibrate.run_layer_jit(layer_p, cfg, x, positions)
    scale = float(mse(dense_out, x)) or 1.0  # mean square of the layer's residual update
    grams = calibrate.layer_grams_jit(layer_p, cfg, x, positions) if method != "magnitude" else {}
    for r, ratio in enumerate(ratios):
      pruned = prune.prune_layer(layer_p, grams, ratio, method, block_size=block_size, damp=damp)
      out["prune"][l, r] = float(mse(calibrate.run_layer_jit(pruned, cfg, x, positions), dense_out))
    for b, width in enumerate(bits):
      q = dict(layer_p)
      for name in calibrate.PROJECTIONS:
        q[name] = quant.fake_quant_weight(layer_p[name], calibrate.num_input_axes(name), width, group_size,
                                          ste_window=None)
      out["quant"][l, b] = float(mse(calibrate.run_layer_jit(q, cfg, x, positions), dense_out))
    for k in out:
      rel[k][l] = out[k][l] / scale
    x = dense_out
    if progress is not None:
      progress(l + 1)
  settings = {"method": method, "group_size": group_size, "block_size": block_size, "damp": damp,
              "calib_shape": list(np.shape(calib_tokens))}
  return SensitivityTable(ratios=ratios, bits=bits, prune=out["prune"], quant=out["quant"],
                          rel_prune=rel["prune"], rel_quant=rel["quant"], model=model_identity(params, cfg),
                          settings=settings)

"""`CompressionPolicy`: what to do to every decoder layer (a config value: JSON, validated, loadable); the byte
model; the LUC and uniform policies; a deterministic search for a memory budget.

Byte model (`layer_bytes`, documented so that a budget means one thing). For a projection of n = K * N weights
with sparsity s, w bits and g = group size (K when per-channel), stored in a sparse format:

  values  n * (1 - s) * w / 8         only the kept weights (N:M: s = 1 - n/m)
  index   n / 8 when s > 0            a one-bit-per-weight mask (unstructured);
          n * (n/m) * ceil(log2 m) / 8   per kept weight, its position in the group (N:M)
  scales  (n / g) * scale_bytes       one scale per group (4: lacax stores float32 scales)

w = 32 (or 16) with no quantization. A policy's bytes are the sum over layers and projections plus the dense
non-layer parameters (embedding, norms, LM head) at `dense_bytes` each. lacax itself stores pruned weights as
zeros inside the dense packed codes (no sparse kernel): `packed_bytes` (lacax.compress.packed) reports that
resident size, which falls with the bit width but not with sparsity.

Search (`search_policy`): each layer picks one (sparsity, bits) candidate; its cost is the measured prune MSE at
that sparsity plus the measured quant MSE at those bits (an additive model; 0 for dense and unquantized).
Starting from every layer dense at the highest width, it repeatedly takes the single-layer step down with the
least added cost per byte saved (ties: lower layer index, then the cheaper candidate) until the budget is met;
deterministic, and the result's bytes never exceed the budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from lacax import io as lacax_io
from lacax.compress import allocate
from lacax.compress.prune import METHODS
from lacax.errors import ConfigError, ValidationError
from lacax.model.config import ModelConfig

STORAGES = ("fake", "packed", "sparse")
FLOAT_BITS = 32  # "not quantized" in the byte model (float32 weights)


@dataclasses.dataclass(frozen=True)
class CompressionPolicy:
  """Per-layer compression of a decoder.

  Attributes:
    sparsity: per layer, the fraction of each projection's weights pruned (0 = dense).
    w_bits: per layer, weight bits (2..8), or None = not quantized.
    a_bits: per layer, per-token activation bits of the projection inputs, or None.
    kv_bits: per layer, KV-cache bits, or None (carried for the KV cache; `apply_policy` does not change it).
    method: "sparsegpt", "wanda" or "magnitude".
    nm: (n, m) semi-structured pruning for every layer (sparsity is then n/m), or None = unstructured.
    group_size: weight quantization group (input features), None = per output channel.
    storage: "fake" (dense fake-quantized weights), "packed" (`PackedWeight`, dequantized in the matmul) or
      "sparse" (as packed, but 8-bit layers with pruned weights keep only their non-zero codes and a bit mask:
      `lacax.model.quantized.SparseWeight`, where it takes fewer bytes).
    block_size, damp: SparseGPT's block (128) and damping fraction (0.01).
    model: the `model_identity` the policy was built for ({} = any).
  """

  sparsity: tuple[float, ...]
  w_bits: tuple[int | None, ...]
  a_bits: tuple[int | None, ...] = ()
  kv_bits: tuple[int | None, ...] = ()
  method: str = "sparsegpt"
  nm: tuple[int, int] | None = None
  group_size: int | None = None
  storage: str = "fake"
  block_size: int = 128
  damp: float = 0.01
  model: dict[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    L = len(self.sparsity)
    object.__setattr__(self, "sparsity", tuple(float(s) for s in self.sparsity))
    for name in ("w_bits", "a_bits", "kv_bits"):
      value = tuple(getattr(self, name)) or (None,) * L
      object.__setattr__(self, name, tuple(None if b is None else int(b) for b in value))
    if self.nm is not None:
      object.__setattr__(self, "nm", tuple(int(v) for v in self.nm))

  @property
  def num_layers(self) -> int:
    return len(self.sparsity)

  def problems(self, cfg: ModelConfig | None = None) -> list[str]:
    """Every problem of the policy (against `cfg` when given), one message each naming the field."""
    out = []
    L = self.num_layers
    if L == 0:
      out.append("CompressionPolicy.sparsity is empty; expected one value per layer")
    if cfg is not None and L != cfg.num_layers:
      out.append(f"CompressionPolicy.sparsity has {L} layers; the model has {cfg.num_layers}")
    for l, s in enumerate(self.sparsity):
      if not 0.0 <= s < 1.0:
        out.append(f"CompressionPolicy.sparsity[{l}]={s}; expected a value in [0, 1)")
    for name in ("w_bits", "a_bits", "kv_bits"):
      values = getattr(self, name)
      if len(values) != L:
        out.append(f"CompressionPolicy.{name} has {len(values)} entries; expected {L} (one per layer)")
      for l, b in enumerate(values):
        if b is not None and not 2 <= b <= 8:
          out.append(f"CompressionPolicy.{name}[{l}]={b}; expected an integer in [2, 8] or null")
    if self.method not in METHODS:
      out.append(f"CompressionPolicy.method={self.method!r}; expected one of {list(METHODS)}")
    if self.nm is not None:
      n, m = self.nm
      if not 0 < n < m:
        out.append(f"CompressionPolicy.nm={self.nm}; expected (n, m) with 0 < n < m")
      elif any(abs(s - n / m) > 1e-9 for s in self.sparsity):
        out.append(f"CompressionPolicy.nm={self.nm} prunes {n}/{m} of every layer; sparsity must then be "
                   f"{n / m} in every layer")
    if self.storage not in STORAGES:
      out.append(f"CompressionPolicy.storage={self.storage!r}; expected one of {list(STORAGES)}")
    if self.block_size <= 0:
      out.append(f"CompressionPolicy.block_size={self.block_size}; expected a positive integer")
    if not 0 <= self.damp < 1:
      out.append(f"CompressionPolicy.damp={self.damp}; expected a value in [0, 1)")
    if cfg is not None:
      for name, k in _input_features(cfg).items():
        if self.group_size is not None and (self.group_size <= 0 or k % self.group_size):
          out.append(f"CompressionPolicy.group_size={self.group_size} does not divide the {k} input features "
                     f"of {name}")
        if self.nm is not None and k % self.nm[1]:
          out.append(f"CompressionPolicy.nm={self.nm}: m does not divide the {k} input features of {name}")
    return out

  def validate(self, cfg: ModelConfig | None = None) -> "CompressionPolicy":
    problems = self.problems(cfg)
    if problems:
      raise ValidationError(problems, what="the compression policy")
    return self

  def to_json(self) -> dict[str, Any]:
    return {"format": "lacax.compression_policy/1", **dataclasses.asdict(self),
            "nm": None if self.nm is None else list(self.nm)}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "CompressionPolicy":
    if not isinstance(data, dict) or data.get("format") != "lacax.compression_policy/1":
      raise ConfigError("not a lacax compression policy (expected a JSON object with format "
                        "'lacax.compression_policy/1')")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields - {"format"})
    if unknown:
      raise ConfigError(f"compression policy has unknown field(s) {unknown}; known: {sorted(fields)}")
    return cls(**{k: v for k, v in data.items() if k != "format"}).validate()

  def save(self, path: str) -> None:
    lacax_io.write_json(path, self.to_json())

  @classmethod
  def load(cls, path: str) -> "CompressionPolicy":
    return cls.from_json(lacax_io.read_json(path, what="compression policy"))

  def summary(self) -> dict[str, Any]:
    bits = [32 if b is None else b for b in self.w_bits]
    return {"mean_sparsity": float(np.mean(self.sparsity)), "mean_w_bits": float(np.mean(bits))}


# --- byte model ------------------------------------------------------------------------------------------------


def _input_features(cfg: ModelConfig) -> dict[str, int]:
  D, H, KV, hd, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  return {"wq": D, "wk": D, "wv": D, "wo": H * hd, "w_gate": D, "w_up": D, "w_down": F}


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(K, N) of each layer projection."""
  D, H, KV, hd, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  return {"wq": (D, H * hd), "wk": (D, KV * hd), "wv": (D, KV * hd), "wo": (H * hd, D), "w_gate": (D, F),
          "w_up": (D, F), "w_down": (F, D)}


def layer_bytes(cfg: ModelConfig, sparsity: float, w_bits: int | None, *, group_size: int | None = None,
                nm: tuple[int, int] | None = None, scale_bytes: int = 4, dense_bits: int = FLOAT_BITS) -> float:
  """Modelled bytes of one decoder layer's seven projections (module docstring; norms excluded)."""
  total = 0.0
  for k, n in projection_shapes(cfg).values():
    count = k * n
    bits = dense_bits if w_bits is None else w_bits
    if nm is not None:
      keep = nm[0] / nm[1]
      total += count * keep * bits / 8 + count * keep * math.ceil(math.log2(nm[1])) / 8
    else:
      total += count * (1 - sparsity) * bits / 8 + (count / 8 if sparsity > 0 else 0.0)
    if w_bits is not None:
      total += count / (k if group_size is None else group_size) * scale_bytes
  return total


def fixed_bytes(cfg: ModelConfig, dense_bytes: int = 4) -> float:
  """Bytes of the parameters a policy does not compress: embedding, LM head, norms (and biases)."""
  D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
  count = V * D * (1 if cfg.tie_word_embeddings else 2) + D + 2 * L * D
  if cfg.attention_bias:
    count += L * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
  return float(count * dense_bytes)


def policy_bytes(policy: CompressionPolicy, cfg: ModelConfig, *, scale_bytes: int = 4) -> float:
  """Modelled bytes of the whole model compressed by `policy`."""
  return fixed_bytes(cfg) + sum(layer_bytes(cfg, s, b, group_size=policy.group_size, nm=policy.nm,
                                            scale_bytes=scale_bytes)
                                for s, b in zip(policy.sparsity, policy.w_bits))


# --- policies --------------------------------------------------------------------------------------------------


def uniform_policy(cfg: ModelConfig, sparsity: float, w_bits: int | None, **kwargs) -> CompressionPolicy:
  L = cfg.num_layers
  return CompressionPolicy(sparsity=(sparsity,) * L, w_bits=(w_bits,) * L, **kwargs).validate(cfg)


def luc_policy(table, cfg: ModelConfig, target_sparsity: float, *, mode: str = "ordinary",
               s_min: float = 0.0, s_max: float = 0.9, base_bits: int | None = 8, high_bits: int | None = None,
               relative: bool = False, **kwargs) -> CompressionPolicy:
  """The reference's LUC: sparsity allocated from the prune table (`allocate.allocate_sparsity`, mean exactly
  target), bits from the quant table at `base_bits` (`allocate.allocate_bits`; high_bits None = uniform)."""
  if table.num_layers != cfg.num_layers:
    raise ConfigError(f"the sensitivity table has {table.num_layers} layers; the model has {cfg.num_layers}")
  sens = allocate.layer_scores(table.metric("prune", relative))
  sparsity = allocate.allocate_sparsity(sens, target_sparsity, mode=mode, s_min=s_min, s_max=s_max)
  if base_bits is None or high_bits is None:
    bits = (base_bits,) * cfg.num_layers
  else:
    if base_bits not in table.bits:
      raise ConfigError(f"base_bits={base_bits} is not among the table's measured bits {list(table.bits)}")
    q = table.metric("quant", relative)[:, table.bits.index(base_bits)]
    bits = tuple(int(b) for b in allocate.allocate_bits(q, base_bits=base_bits, high_bits=high_bits))
  return CompressionPolicy(sparsity=tuple(sparsity), w_bits=bits, model=dict(table.model), **kwargs).validate(cfg)


def search_policy(table, cfg: ModelConfig, budget_bytes: float, *, bits: Sequence[int] | None = None,
                  ratios: Sequence[float] | None = None, relative: bool = False, group_size: int | None = None,
                  scale_bytes: int = 4, **kwargs) -> CompressionPolicy:
  """The policy of least summed measured sensitivity whose `policy_bytes` fit `budget_bytes` (module
  docstring). Candidates: sparsity 0 or one of the table's ratios (`ratios` a subset), bits one of the table's
  (`bits` a subset)."""
  if table.num_layers != cfg.num_layers:
    raise ConfigError(f"the sensitivity table has {table.num_layers} layers; the model has {cfg.num_layers}")
  bits = tuple(table.bits if bits is None else bits)
  ratios = tuple(table.ratios if ratios is None else ratios)
  for b in bits:
    if b not in table.bits:
      raise ConfigError(f"search bits {b} not measured in the table (bits {list(table.bits)})")
  for r in ratios:
    if not any(abs(r - t) < 1e-12 for t in table.ratios):
      raise ConfigError(f"search ratio {r} not measured in the table (ratios {list(table.ratios)})")
  prune_t, quant_t = table.metric("prune", relative), table.metric("quant", relative)
  cands = []  # (sparsity, bits, ratio index or -1, bits index)
  for s in (0.0,) + ratios:
    r = -1 if s == 0.0 else [i for i, t in enumerate(table.ratios) if abs(t - s) < 1e-12][0]
    for b in bits:
      cands.append((s, b, r, table.bits.index(b)))
  L = cfg.num_layers
  cost = np.array([[(0.0 if r < 0 else prune_t[l, r]) + quant_t[l, bi] for (_, _, r, bi) in cands]
                   for l in range(L)])
  size = np.array([layer_bytes(cfg, s, b, group_size=group_size, scale_bytes=scale_bytes) for (s, b, _, _) in cands])
  start = max(range(len(cands)), key=lambda c: (size[c], -c))  # dense, widest
  choice = [start] * L
  fixed = fixed_bytes(cfg)
  total = fixed + size[start] * L
  minimum = fixed + size.min() * L
  if budget_bytes < minimum:
    raise ConfigError(f"budget_bytes={budget_bytes:.0f} is below the smallest policy of these candidates "
                      f"({minimum:.0f} bytes: sparsity {max(ratios, default=0)}, {min(bits)} bits everywhere)")
  while total > budget_bytes:
    best = None
    for l in range(L):
      cur = choice[l]
      for c in range(len(cands)):
        saved = size[cur] - size[c]
        if saved <= 0:
          continue
        key = ((cost[l, c] - cost[l, cur]) / saved, l, size[c], c)
        if best is None or key < best:
          best = key
    _, l, _, c = best
    total += size[c] - size[choice[l]]
    choice[l] = c
  policy = CompressionPolicy(sparsity=tuple(cands[c][0] for c in choice), w_bits=tuple(cands[c][1] for c in choice),
                             group_size=group_size, model=dict(table.model), **kwargs)
  return policy.validate(cfg)


def predicted_cost(policy: CompressionPolicy, table, relative: bool = False) -> float:
  """Summed measured sensitivity of a policy whose choices are table candidates (the search's objective)."""
  prune_t, quant_t = table.metric("prune", relative), table.metric("quant", relative)
  total = 0.0
  for l, (s, b) in enumerate(zip(policy.sparsity, policy.w_bits)):
    if s > 0:
      total += prune_t[l, [i for i, t in enumerate(table.ratios) if abs(t - s) < 1e-12][0]]
    if b is not None:
      total += quant_t[l, table.bits.index(b)]
  return float(total)


"""Edge-LLM's hardware scheduling, as lacax's own analytic cost model and mapping search.

Edge-LLM (arXiv 2406.15758) names a third component, "a complementary hardware scheduling strategy to handle
the irregular computation patterns introduced by LUC and adaptive layer tuning", but released no code for it and
does not describe its accelerator template, cost model or search. **Everything in this module is lacax's own
formulation**, not a reproduction: a roofline-style model of one matmul on a tiled accelerator, and a search over
per-layer mappings that always includes the default mapping, so its result is never worse than the default.

The device (`Device`): an on-chip buffer of `buffer_bytes` that holds one tile of each operand (weights,
activations, float32 partial sums; twice with double buffering), DRAM at `dram_bytes_per_cycle`, `lanes`
parallel processing lanes doing `macs_per_lane(bits)` multiply-accumulates per cycle (narrower operands pack
more MACs per lane), zero-weight skipping with efficiency `sparse_skip` (0 = dense compute, 1 = every pruned MAC
skipped), sparse weights stored as nonzero values plus a 1-bit-per-weight mask when that is smaller than dense,
and a fixed `tile_overhead_cycles` per tile step (DMA set-up and control).

A workload (`Matmul`) is out[m, n] = act[m, k] @ weight[k, n], `repeat` times (e.g. once per kv head for the
attention over the cache), with its weight bits, activation bits and weight sparsity. A mapping (`Mapping`)
chooses tile sizes (tm, tk, tn), the loop order of the tile loops (outer to inner, a permutation of "mkn") and
how the lanes split over the tile's m and n (par_m x par_n = lanes). Its cost (`cost`):

  * buffer: mult * (weight tile + activation tile + float32 output tile) <= buffer_bytes, else infeasible;
  * DRAM traffic of an operand = its bytes * (tile loads / its number of tiles), where the tile loads are the
    product of the trip counts of every loop down to the innermost loop that indexes the operand (a tile stays
    resident across inner loops that do not index it); output tiles revisited because k is not innermost spill
    float32 partial sums (read + write);
  * compute cycles = sum over tiles of ceil(tm_i / par_m) * ceil(tn_i / par_n) * tk_i / macs_per_lane(bits),
    times (1 - sparse_skip * sparsity), bits = the wider of weight and activation bits;
  * latency = max(compute, memory) with double buffering (compute + memory without) + tile overhead.

`schedule_model` maps every projection (and the attention over the KV cache) of every layer of a model under
per-layer bits and sparsities (a LUC policy), and reports the modelled latency of the searched mappings beside
the default's. `tuning_workloads` gives the matmuls of one adaptive-layer-tuning step (the prefix forward, the
window forward and the window's input-gradient backward), so a window's schedule can be costed too.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np

ORDERS = tuple("".join(p) for p in itertools.permutations("mkn"))
_DIMS = {"w": "kn", "a": "mk", "o": "mn"}


@dataclasses.dataclass(frozen=True)
class Device:
  """An accelerator description (all sizes in bytes and cycles).

  Attributes:
    name: a label.
    buffer_bytes: on-chip buffer for the tiles of the three operands.
    dram_bytes_per_cycle: DRAM bandwidth / clock.
    clock_hz: the clock (for seconds).
    lanes: parallel processing lanes (a power of two).
    macs: ((bits, MACs per lane per cycle), ...): the widest entry >= an operand's bits applies.
    sparse_skip: fraction of zero-weight MACs the lanes skip, in [0, 1].
    double_buffer: tiles are double-buffered (loads overlap compute; each tile takes twice its bytes).
    tile_overhead_cycles: fixed cycles per tile step.
  """

  name: str = "edge-accelerator"
  buffer_bytes: int = 256 * 1024
  dram_bytes_per_cycle: float = 16.0
  clock_hz: float = 1.0e9
  lanes: int = 256
  macs: tuple[tuple[int, int], ...] = ((2, 8), (4, 4), (8, 2), (16, 1), (32, 1))
  sparse_skip: float = 0.5
  double_buffer: bool = True
  tile_overhead_cycles: int = 16

  def __post_init__(self):
    for field in ("buffer_bytes", "lanes", "clock_hz", "dram_bytes_per_cycle"):
      if not getattr(self, field) > 0:
        raise ValueError(f"Device.{field}={getattr(self, field)!r} must be > 0")
    if self.lanes & (self.lanes - 1):
      raise ValueError(f"Device.lanes={self.lanes} must be a power of two")
    if not 0.0 <= self.sparse_skip <= 1.0:
      raise ValueError(f"Device.sparse_skip={self.sparse_skip} must be in [0, 1]")
    if not self.macs or any(b <= 0 or m <= 0 for b, m in self.macs):
      raise ValueError(f"Device.macs={self.macs!r} must be non-empty (bits, MACs per lane) pairs, both > 0")

  def macs_per_lane(self, bits: int) -> int:
    fitting = [m for b, m in sorted(self.macs) if b >= bits]
    if not fitting:
      raise ValueError(f"Device {self.name!r} has no MAC entry for {bits}-bit operands (macs={self.macs})")
    return fitting[0]


@dataclasses.dataclass(frozen=True)
class Matmul:
  """out[m, n] = act[m, k] @ weight[k, n], `repeat` times; weight bits / sparsity, activation bits."""

  name: str
  m: int
  k: int
  n: int
  w_bits: int = 16
  a_bits: int = 16
  sparsity: float = 0.0
  repeat: int = 1

  def __post_init__(self):
    for field in ("m", "k", "n", "w_bits", "a_bits", "repeat"):
      if not getattr(self, field) >= 1:
        raise ValueError(f"Matmul {self.name!r}: {field}={getattr(self, field)!r} must be >= 1")
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"Matmul {self.name!r}: sparsity={self.sparsity} must be in [0, 1)")

  @property
  def weight_bytes_per_element(self) -> float:
    """Stored bytes per weight: dense, or nonzero values + a 1-bit mask when that is smaller."""
    dense = self.w_bits / 8
    sparse = (1.0 - self.sparsity) * self.w_bits / 8 + 1 / 8
    return min(dense, sparse)

  @property
  def macs(self) -> int:
    return self.m * self.k * self.n * self.repeat


@dataclasses.dataclass(frozen=True)
class Mapping:
  """Tile sizes, loop order (outer -> inner over the tile loops) and the lanes' split over m and n."""

  tm: int
  tk: int
  tn: int
  order: str = "mnk"
  par_m: int = 1
  par_n: int = 256


@dataclasses.dataclass(frozen=True)
class Cost:
  """The modelled cost of one workload under one mapping (cycles and bytes, all `repeat`s included)."""

  latency_cycles: float
  compute_cycles: float
  memory_cycles: float
  dram_bytes: float
  buffer_bytes: float
  feasible: bool
  utilization: float


def _tile_sum(size: int, tile: np.ndarray, par: np.ndarray) -> np.ndarray:
  """sum over the tiles of a dimension of ceil(tile_i / par) (the last tile may be partial)."""
  full = size // tile
  rem = size - full * tile
  return full * np.ceil(tile / par) + np.ceil(rem / par)


def _costs(w: Matmul, device: Device, tm, tk, tn, order_idx, par_m):
  """Vectorised cost of mappings (numpy arrays of equal shape); returns a dict of arrays."""
  tm, tk, tn, par_m = (np.asarray(x, np.float64) for x in (tm, tk, tn, par_m))
  order_idx = np.asarray(order_idx)
  par_n = device.lanes / par_m
  count = {"m": np.ceil(w.m / tm), "k": np.ceil(w.k / tk), "n": np.ceil(w.n / tn)}
  wb = w.weight_bytes_per_element
  tile_bytes = {"w": tk * tn * wb, "a": tm * tk * w.a_bits / 8, "o": tm * tn * 4.0}
  total = {"w": w.k * w.n * wb, "a": w.m * w.k * w.a_bits / 8}
  mult = 2.0 if device.double_buffer else 1.0
  buffer = mult * (tile_bytes["w"] + tile_bytes["a"] + tile_bytes["o"])
  traffic = np.zeros_like(tm)
  loads_o = None
  for oi, order in enumerate(ORDERS):
    sel = order_idx == oi
    if not np.any(sel):
      continue
    for op, dims in _DIMS.items():
      deepest = max(order.index(d) for d in dims)
      loads = np.ones_like(tm)
      for d in order[:deepest + 1]:
        loads = loads * count[d]
      tiles = count[dims[0]] * count[dims[1]]
      if op == "o":
        out_bytes = w.m * w.n * w.a_bits / 8
        spill = 2.0 * (loads - tiles) / tiles * (w.m * w.n * 4.0)  # float32 partial sums read + written
        t = out_bytes + spill
      else:
        t = total[op] * loads / tiles
      traffic = np.where(sel, traffic + t, traffic)
  traffic = traffic * w.repeat
  bits = max(w.w_bits, w.a_bits)
  lane_steps = _tile_sum(w.m, tm, par_m) * _tile_sum(w.n, tn, par_n) * w.k
  compute = lane_steps / device.macs_per_lane(bits) * (1.0 - device.sparse_skip * w.sparsity) * w.repeat
  memory = traffic / device.dram_bytes_per_cycle
  steps = count["m"] * count["k"] * count["n"] * w.repeat
  overlap = np.maximum(compute, memory) if device.double_buffer else compute + memory
  latency = overlap + steps * device.tile_overhead_cycles
  ideal = w.macs * (1.0 - device.sparse_skip * w.sparsity) / (device.lanes * device.macs_per_lane(bits))
  feasible = (buffer <= device.buffer_bytes) & (tm <= w.m) & (tk <= w.k) & (tn <= w.n)
  return {"latency": latency, "compute": compute, "memory": memory, "traffic": traffic, "buffer": buffer,
          "feasible": feasible, "utilization": ideal / np.maximum(compute, 1e-9)}


def cost(w: Matmul, device: Device, mapping: Mapping) -> Cost:
  """The modelled cost of `w` under `mapping` (see the module docstring)."""
  if mapping.order not in ORDERS:
    raise ValueError(f"Mapping.order={mapping.order!r} must be a permutation of 'mkn'")
  if mapping.par_m * mapping.par_n != device.lanes:
    raise ValueError(f"Mapping par_m * par_n = {mapping.par_m * mapping.par_n} must equal Device.lanes="
                     f"{device.lanes}")
  c = _costs(w, device, mapping.tm, mapping.tk, mapping.tn, ORDERS.index(mapping.order), mapping.par_m)
  return Cost(latency_cycles=float(c["latency"]), compute_cycles=float(c["compute"]),
              memory_cycles=float(c["memory"]), dram_bytes=float(c["traffic"]), buffer_bytes=float(c["buffer"]),
              feasible=bool(c["feasible"]), utilization=float(c["utilization"]))


def default_mapping(w: Matmul, device: Device) -> Mapping:
  """The mapping a fixed dataflow would use for every layer: output-stationary ("mnk", k innermost), lanes
  across n, tm = min(m, 16), and the largest square power-of-two (tk, tn) whose 16-bit dense tiles fit the
  buffer (so it fits for every narrower or sparser layer too), clipped to the layer's dimensions."""
  tm = min(w.m, 16)
  mult = 2.0 if device.double_buffer else 1.0
  t = 1
  while mult * (2 * t * 2 * t * 2 + tm * 2 * t * 2 + tm * 2 * t * 4) <= device.buffer_bytes:
    t *= 2
  return Mapping(tm=tm, tk=min(t, w.k), tn=min(t, w.n), order="mnk", par_m=1, par_n=device.lanes)


def _candidates(size: int) -> np.ndarray:
  values = {size}
  p = 1
  while p < size:
    values.add(p)
    p *= 2
  return np.asarray(sorted(values), np.float64)


@functools.lru_cache(maxsize=4096)
def search(w: Matmul, device: Device) -> tuple[Mapping, Cost]:
  """The lowest-latency feasible mapping over power-of-two tiles (and the full dimension), every loop order
  and every power-of-two split of the lanes; the default mapping is a candidate too, so the result is never
  worse than `default_mapping`."""
  pars = [2 ** i for i in range(int(math.log2(device.lanes)) + 1)]
  grid = np.meshgrid(_candidates(w.m), _candidates(w.k), _candidates(w.n), np.arange(len(ORDERS)),
                     np.asarray(pars, np.float64), indexing="ij")
  tm, tk, tn, oi, pm = (g.ravel() for g in grid)
  c = _costs(w, device, tm, tk, tn, oi, pm)
  latency = np.where(c["feasible"], c["latency"], np.inf)
  best = int(np.argmin(latency))
  found = Mapping(tm=int(tm[best]), tk=int(tk[best]), tn=int(tn[best]), order=ORDERS[int(oi[best])],
                  par_m=int(pm[best]), par_n=int(device.lanes // pm[best]))
  default = default_mapping(w, device)
  found_cost, default_cost = cost(w, device, found), cost(w, device, default)
  if not found_cost.feasible or default_cost.latency_cycles <= found_cost.latency_cycles:
    return default, default_cost
  return found, found_cost


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
  """One decoder layer's compression: weight / activation / KV bits and weight sparsity."""

  w_bits: int = 16
  a_bits: int = 16
  kv_bits: int = 16
  sparsity: float = 0.0


def layer_workloads(cfg, layer: int, prec: LayerPrecision, tokens: int, context: int) -> list[Matmul]:
  """The matmuls of one decoder layer on `tokens` new tokens attending `context` cached ones: the seven
  projections (weights at the layer's bits and sparsity) and the attention over the KV cache (the cache is
  the "weight" operand, at kv bits, once per kv head)."""
  D, H, KV, hd, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  G = H // KV
  mk = lambda name, k, n: Matmul(f"layer{layer}.{name}", tokens, k, n, prec.w_bits, prec.a_bits,  # noqa: E731
                                 prec.sparsity)
  out = [mk("wq", D, H * hd), mk("wk", D, KV * hd), mk("wv", D, KV * hd), mk("wo", H * hd, D),
         mk("w_gate", D, F), mk("w_up", D, F), mk("w_down", F, D)]
  if context > 0:
    out.append(Matmul(f"layer{layer}.qk", tokens * G, hd, context, prec.kv_bits, prec.a_bits, 0.0, KV))
    out.append(Matmul(f"layer{layer}.pv", tokens * G, context, hd, prec.kv_bits, prec.a_bits, 0.0, KV))
  return out


def tuning_workloads(cfg, precisions: Sequence[LayerPrecision], tokens: int,
                     window: tuple[int, int] | None) -> list[Matmul]:
  """The projection matmuls of one adaptive-layer-tuning step on `tokens` tokens: the forward of every layer
  up to the window's top, and for the window's layers the input-gradient backward (dX = dY W^T: the same
  weight, transposed shape). window=None: full backprop through every layer (the baseline)."""
  start, stop = window if window is not None else (0, cfg.num_layers)
  out = []
  for i in range(stop):
    fwd = layer_workloads(cfg, i, precisions[i], tokens, 0)
    out.extend(fwd)
    if i >= start:
      out.extend(dataclasses.replace(w, name=w.name + ".grad", k=w.n, n=w.k) for w in fwd)
  return out


def schedule(workloads: Sequence[Matmul], device: Device) -> dict[str, object]:
  """Searched vs default mapping of every workload, and the totals (cycles, seconds, DRAM bytes)."""
  rows, total, total_default, traffic, traffic_default = [], 0.0, 0.0, 0.0, 0.0
  for w in workloads:
    mapping, c = search(w, device)
    d = cost(w, device, default_mapping(w, device))
    rows.append({"name": w.name, "m": w.m, "k": w.k, "n": w.n, "w_bits": w.w_bits, "a_bits": w.a_bits,
                 "sparsity": w.sparsity, "mapping": dataclasses.asdict(mapping), "latency_cycles": c.latency_cycles,
                 "default_latency_cycles": d.latency_cycles, "dram_bytes": c.dram_bytes,
                 "utilization": c.utilization})
    total += c.latency_cycles
    total_default += d.latency_cycles
    traffic += c.dram_bytes
    traffic_default += d.dram_bytes
  return {"device": dataclasses.asdict(device), "layers": rows, "latency_cycles": total,
          "default_latency_cycles": total_default, "speedup_vs_default": total_default / max(total, 1e-9),
          "latency_s": total / device.clock_hz, "dram_bytes": traffic, "default_dram_bytes": traffic_default}


def schedule_model(cfg, precisions: Sequence[LayerPrecision], device: Device, *, tokens: int = 1,
                   context: int = 512) -> dict[str, object]:
  """`schedule` of every layer of a model (decode: tokens=1 with `context` cached tokens; prefill: tokens=T)."""
  if len(precisions) != cfg.num_layers:
    raise ValueError(f"schedule_model got {len(precisions)} layer precisions for {cfg.num_layers} layers")
  workloads = [w for i, p in enumerate(precisions) for w in layer_workloads(cfg, i, p, tokens, context)]
  return schedule(workloads, device)

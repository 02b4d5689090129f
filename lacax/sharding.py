"""Scale-out on JAX's own sharding: logical axis names, mesh rules, sharded loading, multi-host start-up.

lacax names every array dimension by meaning (a *logical axis*) and maps names to the axes of a
`jax.sharding.Mesh` with *rules*, as MaxText's `logical_axis_rules` and Flax's `nn.logical_axis_rules` do.
Shardings are plain `NamedSharding`s and XLA's SPMD partitioner splits the compiled programs; lacax adds no
communication layer of its own.

Logical axes (the model layout is in `lacax.model.llama`, the cache layout in `lacax.cache.kv_cache`):

  parameters  embed, lm_head         [vocab, embed]
              final_norm             [norm]
              layers.attn_norm, mlp_norm              [layers, norm]
              layers.wq              [layers, embed, heads, head_dim]
              layers.wk, wv          [layers, embed, kv_heads, head_dim]
              layers.wo              [layers, heads, head_dim, embed]
              layers.bq              [layers, heads, head_dim];  bk, bv [layers, kv_heads, head_dim]
              layers.w_gate, w_up    [layers, embed, mlp];       w_down [layers, mlp, embed]
  cache       k, v                   [layers, batch, slots, kv_heads, head_dim]
              pos, scores            [layers, batch, slots, kv_heads]
              length                 [layers, -]  replicated (see below)
              state                  left to XLA (a few scalars per row: the ladder cursor, RoPE frequencies)
  activations the residual stream    [batch, -, -] (sequence and width follow the weights)

Default rules (`DEFAULT_RULES`) for a mesh with axes ("data", "fsdp", "tensor"):

  batch -> (data, fsdp)                 rows split over data-parallel and FSDP replicas
  embed -> fsdp                         parameters sharded over FSDP; XLA gathers one layer at a time
  vocab, heads, kv_heads, mlp -> tensor Megatron-style tensor parallelism (heads and the MLP width)
  layers, slots, head_dim, norm -> ()   replicated

The cursors (`length`, a few integers per row) are replicated and constrained at the start and end of every
forward, like every other cache array, so that a compiled streaming loop returns its cache in exactly the layout
it was given (an ahead-of-time compiled step, as `streaming_nll` uses, accepts nothing else). The policy state
(e.g. the ladder cursor of each row) is created uncommitted and never constrained: XLA gives it the layout its
planner needs, and the loop keeps it from one call to the next.

`layers` stays whole because the forward scans over it (a sharded scan axis would be gathered at every step);
`slots` stays whole so that every cache policy's gathers and merges along the slot axis are local to a shard:
`lacax.cache.kv_cache.gather_slots` then runs the compaction kernel per shard under `jax.shard_map`, and the
whole cache is never gathered to one device. (KVMerger is not there yet: its planner reduces over flattened
(layer, row, head, run) segment ids, which XLA partitions by all-gathering its [layers, batch, slots, kv_heads]
plan arrays, and its Pallas merge kernel is not wrapped in `slot_local`, so on TPU/GPU XLA would replicate the
kernel's operands; its keys and values stay local on CPU, where the jnp reference runs. AdaKV's
head-adaptive budget is one top-k across a layer's kv heads, so with kv heads split over the tensor axis its
[layers, batch, slots, kv_heads] scores and keep mask are all-gathered there too; its keys and values stay
local.)

Fallback when a rule does not divide a dimension: the mesh axes of a dimension's rule are taken in order,
skipping axes the mesh does not have, axes of size 1, and axes an earlier dimension of the same array already
uses; the longest prefix whose total size divides the dimension is kept and the dimension is replicated over the
rest. So a batch of 1 on data=8 is replicated, a batch of 4 on (data=2, fsdp=4) splits over data only, and
SmolLM2's 3 kv heads stay whole on tensor=2 (its 9 query heads too), while every other array still shards.

Two ways in:

* explicit: `mr = MeshRules(make_mesh((4, 2), ("data", "tensor")))`, then `mr.shard_params(params)`,
  `mr.shard_cache(policy.init(...))`, `load_model(path, mesh_rules=mr)`, `generate(..., mesh_rules=mr)`.
  A cache placed by `shard_cache` remembers its `MeshRules` (a static field of `KVCache`, so it is part of the
  jit cache key); the forward and the policies' gathers read it from there.
* from a config: `lacax.jobs.model_from_config(config)` loads the model into the shards of
  `mesh_rules_from_config(config.mesh)` and returns it with `Model.mesh_rules`, which the job passes on
  (`generate(..., mesh_rules=model.mesh_rules)`, `streaming_nll(..., mesh_rules=...)`, `Trainer(mesh_rules=)`).
  There is no implicit, thread-local mesh context: every layout decision is an argument.

Multi-host (TPU pod slices, SLURM, Open MPI): `initialize_multihost()` calls `jax.distributed.initialize()` when
the environment (or a flag) says the job spans several processes; `is_primary_process()` gates logging and file
writes. Every process builds the same global mesh from `jax.devices()`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

# Mesh axis names, in the order `make_mesh` lays devices out (the last axis varies fastest, so "tensor" groups
# neighbouring devices, which share the fastest links).
MESH_AXES = ("data", "fsdp", "tensor")

# Every logical axis name lacax uses (rules may only name these).
LOGICAL_AXES = ("batch", "layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "slots")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("slots", ()),
    ("head_dim", ()),
    ("norm", ()),
)

# Logical axes of every parameter, by name (stacked layer parameters under "layers").
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("vocab", "embed"),
    "final_norm": ("norm",),
}
LAYER_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "bq": ("layers", "heads", "head_dim"),
    "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "bo": ("layers", "embed"),
    "b_down": ("layers", "embed"),
}
# Logical axes of the cache's array fields (the policy `state`: see `cache_axes`).
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "slots", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "slots", "kv_heads", "head_dim"),
    "pos": ("layers", "batch", "slots", "kv_heads"),
    "scores": ("layers", "batch", "slots", "kv_heads"),
    "length": ("layers", None),
}
LogicalAxes = Sequence[str | None]


# ----------------------------------------------------------------------------------------------------------------
# Rules and meshes.
# ----------------------------------------------------------------------------------------------------------------


def _axes_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(a for a in value.replace("+", " ").split() if a)
  return tuple(value)


def parse_rules(rules: str | Mapping[str, Any] | Sequence[tuple[str, Any]] | None,
                base: Rules = DEFAULT_RULES) -> Rules:
  """Rules with `rules` laid over `base` (logical axes not mentioned keep their base mapping).

  Args:
    rules: None or "" (the base rules); a string "batch=data+fsdp,embed=,heads=tensor" (an empty right-hand
      side replicates the axis), as `--config.mesh.rules=...` gives it; or a mapping / sequence of
      (logical axis, mesh axis or axes) pairs.
    base: the rules to start from.

  Raises:
    ValueError: a malformed entry or an unknown logical axis (the message names it).
  """
  if rules is None or (isinstance(rules, str) and not rules.strip()):
    return tuple(base)
  if isinstance(rules, str):
    pairs = []
    for entry in rules.split(","):
      if not entry.strip():
        continue
      if "=" not in entry:
        raise ValueError(f"mesh.rules entry {entry.strip()!r} must read '<logical axis>=<mesh axis>[+<mesh axis>]'")
      name, axes = entry.split("=", 1)
      pairs.append((name.strip(), axes))
  elif isinstance(rules, Mapping):
    pairs = list(rules.items())
  else:
    pairs = list(rules)
  merged = dict(base)
  for name, axes in pairs:
    if name not in LOGICAL_AXES:
      raise ValueError(f"mesh.rules names the logical axis {name!r}; expected one of {list(LOGICAL_AXES)}")
    merged[name] = _axes_tuple(axes)
  return tuple(merged.items())


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES, *,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A device mesh of `shape` over `axis_names` (all devices of every process by default).

  One entry of `shape` may be -1: it takes every device the others leave. The axes are `AxisType.Auto`, so
  XLA propagates shardings through the program (classic GSPMD; no sharding-in-types surprises).

  Raises:
    ValueError: the shape does not match the names or the device count (the message names mesh.shape).
  """
  shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
  devices = list(devices) if devices is not None else jax.devices()
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh.shape={shape} has {len(shape)} entries but mesh.axes={axis_names} has "
                     f"{len(axis_names)}")
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f"mesh.axes={axis_names} repeats a name")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={shape} must hold positive sizes and at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh.shape={shape}: {len(devices)} devices are not divisible by {known}")
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, but {len(devices)} are available "
                     f"({devices[0].platform})")
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, axis_names, axis_types=auto, devices=devices)


def abstract_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES) -> AbstractMesh:
  """A mesh of devices that need not exist (for `jax.eval_shape`-style memory tables)."""
  return AbstractMesh(tuple(int(s) for s in shape), tuple(axis_names))


# ----------------------------------------------------------------------------------------------------------------
# Logical axes of parameters and caches.
# ----------------------------------------------------------------------------------------------------------------


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_axes(path: Sequence[Any]) -> tuple[str, ...]:
  """Logical axes of the parameter at pytree `path` (e.g. (DictKey('layers'), DictKey('wq'))).

  Raises:
    KeyError: a parameter lacax has no axis names for (so it is never silently replicated).
  """
  names = tuple(_key_name(k) for k in path)
  if len(names) == 3 and names[0] == "layers" and isinstance(path[1], jax.tree_util.SequenceKey):
    names = (names[0], names[2])  # a segment of heterogeneous layers (lacax.model.llama)
  if len(names) == 2 and names[0] == "layers" and names[1] in LAYER_PARAM_AXES:
    return LAYER_PARAM_AXES[names[1]]
  if len(names) == 1 and names[0] in PARAM_AXES:
    return PARAM_AXES[names[0]]
  raise KeyError(f"parameter {'/'.join(names)!r} has no logical axis names; add it to lacax.sharding.PARAM_AXES "
                 "or LAYER_PARAM_AXES")


def param_logical_axes(params: Any) -> Any:
  """The parameter pytree's structure with each leaf replaced by its logical axes (a tuple of names)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(treedef, [_Axes(param_axes(path)) for path, _ in flat])


def cache_axes(path: Sequence[Any], leaf: Any) -> tuple[str | None, ...]:
  """Logical axes of the cache leaf at `path` (a `KVCache` field; anything under `state` is replicated, and so
  are the per-layer statistics of `stats` but the per-slot value norms and queries, laid out like `scores`)."""
  field = _key_name(path[0])
  if field in CACHE_AXES:
    return CACHE_AXES[field]
  if field == "stats" and len(path) > 1 and _key_name(path[1]) == "value_norm":
    return CACHE_AXES["scores"]
  if field == "stats" and len(path) > 1 and _key_name(path[1]) == "queries":  # [L, B, S, KV, G, D]
    return CACHE_AXES["scores"] + (None, None)
  return (None,) * np.ndim(leaf)


class _Axes(tuple):
  """A tuple of axis names that pytree functions treat as one leaf (tuple subclasses are not pytree nodes)."""


# ----------------------------------------------------------------------------------------------------------------
# MeshRules: a mesh plus the rules that place every named array on it.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshRules:
  """A mesh and the logical-axis rules that place arrays on it. Hashable: usable as a static jit argument.

  Attributes:
    mesh: a `jax.sharding.Mesh` (or an `AbstractMesh`, for shape-only memory tables: `spec` and
      `shard_shape` work, placing arrays does not).
    rules: (logical axis, mesh axes) pairs; `parse_rules` builds them from a string or a mapping.
  """

  mesh: Mesh | AbstractMesh
  rules: Rules = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "rules", parse_rules(self.rules, base=()))
    known = set(self.mesh.axis_names) | set(MESH_AXES)  # the defaults may name axes a smaller mesh lacks
    for name, axes in self.rules:
      unknown = [a for a in axes if a not in known]
      if unknown:
        raise ValueError(f"mesh rule {name}={'+'.join(map(str, axes))} names mesh axes {unknown} that are neither "
                         f"in the mesh {tuple(self.mesh.axis_names)} nor in {MESH_AXES}")

  @property
  def axis_sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    """The mesh axes the rules give `logical` (before the divisibility fallback)."""
    if logical is None:
      return ()
    return dict(self.rules).get(logical, ())

  def spec(self, logical_axes: LogicalAxes, shape: Sequence[int]) -> PartitionSpec:
    """The partition spec of an array of `shape` whose dimensions are named `logical_axes`.

    Applies the fallback of the module docstring: mesh axes that do not divide a dimension are dropped.
    """
    if len(logical_axes) != len(shape):
      raise ValueError(f"logical axes {tuple(logical_axes)} do not match the shape {tuple(shape)}")
    sizes, used, out = self.axis_sizes, set(), []
    for name, dim in zip(logical_axes, shape):
      candidates = [a for a in self.mesh_axes(name) if sizes.get(a, 1) > 1 and a not in used]
      chosen: list[str] = []
      for axis in candidates:
        if dim % (math.prod(sizes[a] for a in chosen) * sizes[axis]):
          break
        chosen.append(axis)
      used.update(chosen)
      out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)

  def shard_shape(self, logical_axes: LogicalAxes, shape: Sequence[int]) -> tuple[int, ...]:
    """The per-device block of an array of `shape` (no devices needed)."""
    sizes, out = self.axis_sizes, []
    for dim, entry in zip(shape, self.spec(logical_axes, shape)):
      axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
      out.append(dim // math.prod(sizes[a] for a in axes))
    return tuple(out)

  def sharding(self, logical_axes: LogicalAxes, shape: Sequence[int]) -> NamedSharding:
    if not isinstance(self.mesh, Mesh):
      raise ValueError("this MeshRules holds an AbstractMesh: it gives specs and shard shapes, not shardings")
    return NamedSharding(self.mesh, self.spec(logical_axes, shape))

  def constrain(self, x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """`with_sharding_constraint` by logical axes (inside jit), or a placement (outside)."""
    sharding = self.sharding(logical_axes, x.shape)
    if isinstance(x, jax.core.Tracer):
      return jax.lax.with_sharding_constraint(x, sharding)
    return jax.device_put(x, sharding)

  def put(self, x: Any, logical_axes: LogicalAxes) -> jax.Array:
    """Places a host (numpy) or device array; every device receives only its block."""
    return jax.device_put(x, self.sharding(logical_axes, np.shape(x)))

  # -- parameters ----------------------------------------------------------------------------------------------

  def param_shardings(self, params: Any) -> Any:
    """`NamedSharding` per parameter (params may be arrays or `ShapeDtypeStruct`s)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: self.sharding(param_axes(p), x.shape), params)

  def param_specs(self, params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, x: self.spec(param_axes(p), x.shape), params)

  def shard_params(self, params: Any) -> Any:
    """Places (host or device) parameters by the rules; each device receives only its block."""
    return jax.tree_util.tree_map_with_path(lambda p, x: self.put(x, param_axes(p)), params)

  def abstract_params(self, shapes: Any) -> Any:
    """`ShapeDtypeStruct`s with shardings, e.g. the target of `lacax.weights.checkpoint.restore_params`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding(param_axes(p), x.shape)),
        shapes)

  # -- caches ------------------------------------------------------------------------------------------------------

  def cache_shardings(self, cache: Any) -> Any:
    """The cache's structure with a `NamedSharding` per array (state replicated)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: self.sharding(cache_axes(p, x), np.shape(x)), cache)

  def cache_specs(self, cache: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, x: self.spec(cache_axes(p, x), np.shape(x)), cache)

  def shard_cache(self, cache: Any) -> Any:
    """The cache placed by the rules (constrained inside jit), remembering these rules for its consumers.

    The policy state is left to XLA (see `create_cache`), except that state committed to devices is replicated
    on the mesh, so that it can meet the mesh's arrays in one program.
    """
    def place(path, x):
      if _key_name(path[0]) != "state":
        return self.constrain(x, cache_axes(path, x))
      if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed:
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))
      return x

    return jax.tree_util.tree_map_with_path(place, cache).replace(mesh_rules=self)

  def create_cache(self, build: Callable[[], Any]) -> Any:
    """The cache `build()` returns, its arrays created straight into their shards (never whole on one device).

    The policy state is left as `build` gives it (uncommitted): a compiled loop then chooses its layout, which
    the state keeps from one call to the next.
    """
    abstract = jax.eval_shape(build)
    shardings = self.cache_shardings(abstract.replace(state=None))
    arrays = jax.jit(lambda: build().replace(state=None), out_shardings=shardings)()
    return arrays.replace(state=build().state, mesh_rules=self)

  def constrain_cache(self, cache: Any) -> Any:
    """Sharding constraints on the cache's arrays (inside jit), so loop carries keep the rules' layout.

    The policy state is not constrained: it is a few integers per row, and XLA lays it out as the planner that
    updates it needs, the same in every iteration.
    """
    def constrain(path, x):
      if _key_name(path[0]) == "state":
        return x
      return jax.lax.with_sharding_constraint(x, self.sharding(cache_axes(path, x), np.shape(x)))

    return jax.tree_util.tree_map_with_path(constrain, cache)

  def slot_local(self, fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                 plan: jax.Array) -> jax.Array:
    """fn(x, plan) run shard by shard, for an op that moves cache rows along the slot axis only.

    Args:
      fn: e.g. `pallas_kernels.compaction.gather`: x [L, B, S, KV, D], plan [L, B, S_out, KV or 1] int ->
        [L, B, S_out, KV, D]; output slot m of (layer, row, head) reads source slot plan[..., m, head].
      x: a cache array laid out by these rules.
      plan: the index plan, batch and layer axes as full as x's.

    With the slot axis unsharded every (layer, row, head) block lives on one device, so `jax.shard_map` runs
    `fn` on the local blocks (a Pallas kernel then sees local shapes, and XLA never gathers the cache). With
    the slot axis sharded by custom rules, `fn` runs on the global arrays and XLA inserts the collectives.
    """
    spec = tuple(self.spec(CACHE_AXES["k"], x.shape))
    if spec[2] is not None or not isinstance(self.mesh, Mesh):
      return fn(x, plan)
    plan_spec = PartitionSpec(spec[0], spec[1], None, spec[3] if plan.shape[3] == x.shape[3] else None)
    local = jax.shard_map(fn, mesh=self.mesh, in_specs=(PartitionSpec(*spec), plan_spec),
                          out_specs=PartitionSpec(*spec), check_vma=False)
    return local(x, plan)

  # -- memory --------------------------------------------------------------------------------------------------

  def device_bytes(self, tree: Any, axes_of: Callable[[Any, Any], LogicalAxes]) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs), the logical axes given by `axes_of`.

    Under the fallback rules every device holds the same block size, so this is the per-device figure.
    """
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shape = self.shard_shape(axes_of(path, leaf), np.shape(leaf))
      total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total

  def param_bytes(self, params: Any) -> int:
    return self.device_bytes(params, lambda p, x: param_axes(p))

  def cache_bytes(self, cache: Any) -> int:
    return self.device_bytes(cache, cache_axes)

  def describe(self, params: Any) -> str:
    """A readable table: each parameter's shape, partition spec and per-device block."""
    lines = [f"mesh {dict(self.axis_sizes)}; rules {dict(self.rules)}"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      axes = param_axes(path)
      name = "/".join(_key_name(k) for k in path)
      lines.append(f"  {name:<18}{str(tuple(leaf.shape)):<28}{str(self.spec(axes, leaf.shape)):<44}"
                   f"{self.shard_shape(axes, leaf.shape)}")
    return "\n".join(lines)


def mesh_rules_from_config(mesh_config: Any) -> MeshRules | None:
  """`MeshRules` from a config's `mesh` section, or None for the default single device.

  Fields: `shape` (a tuple; () or None = no mesh), `axes` (names, default ("data", "fsdp", "tensor")) and
  `rules` (a string or mapping laid over `DEFAULT_RULES`; "" = the defaults).
  """
  if mesh_config is None:
    return None
  get = (lambda k, d=None: mesh_config.get(k, d)) if hasattr(mesh_config, "get") else (
      lambda k, d=None: getattr(mesh_config, k, d))
  shape = get("shape")
  if shape is None or (isinstance(shape, str) and not shape.strip()) or len(shape) == 0:
    return None
  if isinstance(shape, str):
    shape = tuple(int(s) for s in shape.replace("x", ",").split(",") if s.strip())
  axes = tuple(get("axes") or MESH_AXES)
  return MeshRules(make_mesh(shape, axes), parse_rules(get("rules") or None))


# ----------------------------------------------------------------------------------------------------------------
# Sharded loading.
# ----------------------------------------------------------------------------------------------------------------

Reader = Callable[[tuple[str, ...], "int | None"], np.ndarray]


def _index_key(index: tuple[slice, ...]) -> tuple:
  return tuple((s.start, s.stop, s.step) for s in index)


def load_params(shapes: Any, read: Reader, mesh_rules: MeshRules) -> Any:
  """Builds the parameter pytree straight into its shards from a per-tensor reader.

  Args:
    shapes: the parameter pytree as `jax.ShapeDtypeStruct`s (`lacax.model.llama.param_shapes(cfg)`); their
      dtype is the dtype the parameters get.
    read: read(path, layer) -> numpy array in lacax layout: for a stacked layer parameter (path
      ("layers", name)) the block of one layer, else (layer None) the whole parameter.
    mesh_rules: where the parameters go.

  One parameter at a time, each layer tensor is read once and its pieces copied into the blocks this process's
  devices hold; each device then receives its block only. No device ever holds a whole parameter it shards,
  and the host holds at most one parameter's local blocks plus one layer tensor (a stacked parameter of
  L layers is never materialised on the host unless the local devices hold all of it).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, spec in flat:
    names = tuple(_key_name(k) for k in path)
    sharding = mesh_rules.sharding(param_axes(path), spec.shape)
    device_index = sharding.addressable_devices_indices_map(spec.shape)
    blocks: dict[tuple, np.ndarray] = {}
    index_of: dict[tuple, tuple[slice, ...]] = {}
    for index in device_index.values():
      index_of[_index_key(index)] = index
    dtype = np.dtype(spec.dtype)

    def check(array: np.ndarray, expected: tuple[int, ...], layer) -> np.ndarray:
      if tuple(array.shape) != tuple(expected):
        where = f" layer {layer}" if layer is not None else ""
        raise ValueError(f"reader returned shape {tuple(array.shape)} for {'/'.join(names)}{where}, "
                         f"expected {tuple(expected)}")
      return array

    if names[0] == "layers":
      num_layers = spec.shape[0]
      for key, index in index_of.items():
        block_shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, spec.shape))
        blocks[key] = np.empty(block_shape, dtype)
      for layer in range(num_layers):
        w = check(np.asarray(read(names, layer)), spec.shape[1:], layer)
        for key, index in index_of.items():
          layers = range(*index[0].indices(num_layers))
          if layer in layers:
            blocks[key][layers.index(layer)] = w[index[1:]]
    else:
      w = check(np.asarray(read(names, None)), spec.shape, None)
      for key, index in index_of.items():
        blocks[key] = np.ascontiguousarray(w[index], dtype=dtype)
      del w
    arrays = [jax.device_put(blocks[_index_key(index)], device) for device, index in device_index.items()]
    out.append(jax.make_array_from_single_device_arrays(spec.shape, sharding, arrays))
    del blocks, arrays
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------------------------
# Multi-host.
# ----------------------------------------------------------------------------------------------------------------

# Environment variables that mean "this process is one of several" (JAX's own launcher variables, Cloud TPU pod
# slices and multislice, SLURM, Open MPI).
_MULTIHOST_ADDRESS_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
_MULTIHOST_LIST_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
_MULTIHOST_COUNT_VARS = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def multihost_requested(flag: bool | None = None, environ: Mapping[str, str] | None = None) -> bool:
  """Whether the job spans several processes: `flag` if given, else read from the environment.

  The environment says so when it sets a coordinator address (JAX_COORDINATOR_ADDRESS,
  MEGASCALE_COORDINATOR_ADDRESS), lists several TPU workers (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with a
  comma), or counts more than one process (JAX_NUM_PROCESSES, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE).
  """
  if flag is not None:
    return bool(flag)
  env = os.environ if environ is None else environ
  if any(env.get(v) for v in _MULTIHOST_ADDRESS_VARS):
    return True
  if any("," in env.get(v, "") for v in _MULTIHOST_LIST_VARS):
    return True
  for var in _MULTIHOST_COUNT_VARS:
    value = env.get(var, "")
    if value.isdigit() and int(value) > 1:
      return True
  return False


def initialize_multihost(flag: bool | None = None) -> bool:
  """Calls `jax.distributed.initialize()` (once) when `multihost_requested(flag)`; returns whether it did.

  Must run before any other JAX call touches the devices. JAX reads the coordinator address, process count and
  process id from the environment (Cloud TPU metadata, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID).
  """
  if not multihost_requested(flag):
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize()
  return True


def is_primary_process() -> bool:
  """True on process 0, which logs and writes results and checkpoints for the whole job."""
  return jax.process_index() == 0


def fully_replicated(x: Any) -> Any:
  """`x` readable by this process (np.asarray): unchanged when it is, else replicated over its mesh.

  Only arrays spread over several processes (multi-host) are not fully addressable; replicating one is a
  collective, so every process must call this for the same arrays.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return x
  return jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))(x)


__all__ = ["MESH_AXES", "LOGICAL_AXES", "DEFAULT_RULES", "PARAM_AXES", "LAYER_PARAM_AXES", "CACHE_AXES",
           "MeshRules", "parse_rules", "make_mesh", "abstract_mesh", "param_axes",
           "param_logical_axes", "cache_axes", "mesh_rules_from_config", 
           "load_params", "multihost_requested", "initialize_multihost", "is_primary_process", "fully_replicated"]

"""The train state pytree and freezing by parameter label.

A model's parameters are any pytree. `labels` decide what trains: for every leaf, True (trains), False (frozen)
or a boolean row mask over the leaf's leading axis (for layers stacked on axis 0: only those rows train, the
others stay bit-identical). `partition` splits the pytree into a `trainable` and a `frozen` pytree of the same
structure, with `None` where a leaf belongs to the other side; `combine` puts them back together. Only the
trainable pytree gets gradients and optimizer state, so frozen weights (a LoRA run's base model) cost no optimizer
memory. Row-masked leaves are trainable; their frozen rows get their gradients and updates multiplied by zero.

`make_labels(params, trainable=..., layer_window=...)` builds labels from path patterns, e.g.
`trainable=("lora/",)` (only adapters) or `layer_window=(4, 8)` (rows 4..7 of every leaf under a `layers`
key; Edge-LLM's adaptive layer tuning). Paths are "/"-joined keys: "layers/wq", "lora/layers/wq/a".
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree; every field is an array or a pytree of arrays).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    trainable: the trainable parameters (float32 master weights), `None` where a leaf is frozen.
    frozen: the frozen parameters, `None` where a leaf trains (not written to checkpoints by default: the same
      command rebuilds them).
    opt_state: the optax state of `trainable`.
    rng: uint32[2] PRNG key; step s uses `fold_in(rng, s)` (so a resumed run draws the same numbers).
  """

  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array

  @property
  def params(self) -> Any:
    """The whole parameter pytree (trainable and frozen leaves together)."""
    return combine(self.trainable, self.frozen)


def path_str(path: Sequence[Any]) -> str:
  """"layers/wq" for the pytree path (DictKey('layers'), DictKey('wq')) (sequence indices as numbers)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _is_none(x: Any) -> bool:
  return x is None


def make_labels(params: Any, trainable: str | Sequence[str] = "all", *, frozen: Sequence[str] = (),
                layer_window: tuple[int, int] | None = None, layers_key: str = "layers") -> Any:
  """Labels for `partition`: which leaves (or rows of stacked leaves) train.

  Args:
    params: the parameter pytree (arrays or ShapeDtypeStructs).
    trainable: "all", or regular expressions searched in each leaf's path ("lora/", "layers/(wq|wv)"):
      leaves matching one of them train.
    frozen: regular expressions of leaves frozen even if `trainable` matches them (e.g. "embed").
    layer_window: (start, stop): only rows start..stop-1 of the leaves under a `layers_key` key train, and every
      leaf outside `layers_key` is frozen (combine with `trainable` to train, e.g., only adapters in the window).
    layers_key: the key whose leaves are stacked over layers on axis 0.

  Returns:
    A pytree of the same structure: True, False or a bool numpy row mask [rows] per leaf.

  Raises:
    ValueError: a pattern that matches no leaf, an empty or out-of-range window, or labels that train nothing.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_str(p) for p, _ in flat]
  patterns = None if trainable == "all" else ([trainable] if isinstance(trainable, str) else list(trainable))
  for field, pats in (("train.trainable", patterns or ()), ("train.frozen", frozen)):
    for pat in pats:
      if not any(re.search(pat, n) for n in names):
        raise ValueError(f"{field} pattern {pat!r} matches no parameter; parameters are {names}")
  labels = []
  for name, (_, leaf) in zip(names, flat):
    on = patterns is None or any(re.search(p, name) for p in patterns)
    on = on and not any(re.search(p, name) for p in frozen)
    if layer_window is not None:
      stacked = layers_key in name.split("/")
      if not stacked or not on:
        on = False
      else:
        rows = leaf.shape[0]
        start, stop = layer_window
        if not 0 <= start < stop <= rows:
          raise ValueError(f"train.layer_window={tuple(layer_window)} must satisfy 0 <= start < stop <= {rows} "
                           f"(the layers of {name})")
        mask = np.zeros(rows, bool)
        mask[start:stop] = True
        on = True if mask.all() else mask
    labels.append(on)
  if not any(l is not False for l in labels):
    raise ValueError(f"the train.trainable / train.frozen / train.layer_window labels leave nothing to train; "
                     f"parameters are {names}")
  return jax.tree_util.tree_unflatten(treedef, labels)


def partition(params: Any, labels: Any) -> tuple[Any, Any]:
  """(trainable, frozen): the same structure as `params`, `None` where a leaf belongs to the other side."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  lab = treedef.flatten_up_to(labels)
  train = [x if l is not False else None for x, l in zip(leaves, lab)]
  froz = [x if l is False else None for x, l in zip(leaves, lab)]
  return jax.tree_util.tree_unflatten(treedef, train), jax.tree_util.tree_unflatten(treedef, froz)


def combine(trainable: Any, frozen: Any) -> Any:
  """The inverse of `partition` (`frozen` may be None or empty when everything trains)."""
  if frozen is None or (isinstance(frozen, dict) and not frozen):
    return trainable
  return jax.tree_util.tree_map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=_is_none)


def update_masks(trainable: Any, labels: Any) -> Any:
  """Per trainable leaf: None (the whole leaf trains) or a float32 mask broadcastable to it (row-masked leaves)."""
  def mask(x, l):
    if x is None or isinstance(l, bool):
      return None
    return jnp.asarray(l, jnp.float32).reshape((-1,) + (1,) * (len(x.shape) - 1))

  return jax.tree_util.tree_map(mask, trainable, labels, is_leaf=_is_none)


def apply_masks(tree: Any, masks: Any) -> Any:
  """tree * mask on the row-masked leaves (the others are returned untouched)."""
  if masks is None:
    return tree
  return jax.tree_util.tree_map(lambda x, m: x if m is None or x is None else x * m.astype(x.dtype), tree, masks,
                                is_leaf=_is_none)


def cast_floats(tree: Any, dtype: Any) -> Any:
  """Floating leaves cast to `dtype` (None: unchanged); integer leaves untouched."""
  if dtype is None:
    return tree
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else x, tree,
      is_leaf=_is_none)


def count_params(tree: Any) -> int:
  """Number of scalars in the arrays of `tree` (None leaves count 0)."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def create_train_state(params: Any, optimizer: Any, *, labels: Any = None, seed: int = 0,
                       master_dtype: Any = jnp.float32) -> TrainState:
  """A fresh state: trainable leaves cast to `master_dtype` (float32 master weights), the optimizer initialised.

  Args:
    params: the full parameter pytree.
    optimizer: an optax `GradientTransformation` (`lacax.train.optim.make_optimizer`).
    labels: from `make_labels` (None: everything trains).
    seed: seeds the state's PRNG key (dropout, noisy routers, ...).
    master_dtype: dtype of the trainable weights (None: keep the params' own).
  """
  if labels is None:
    labels = jax.tree_util.tree_map(lambda _: True, params)
  trainable, frozen = partition(params, labels)
  # Own copies: the train step donates (and so deletes) the trainable buffers, never the caller's params.
  trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=master_dtype if master_dtype is not None and
                                                         jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                                         copy=True), trainable)
  opt_state = optimizer.init(trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=opt_state,
                    rng=jax.random.PRNGKey(seed))

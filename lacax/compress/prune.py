"""Pruning of projection matrices: SparseGPT (unstructured and N:M), Wanda, magnitude; all jitted JAX.

Every function takes one layer's projection as a matrix W [K, N] (K contracted input features, N outputs; the
transpose of the [rows = outputs, columns = inputs] matrix of the references) and, where it needs one, the Gram
matrix G = X^T X [K, K] of the projection's calibration inputs (`lacax.compress.calibrate.layer_grams`).

* SparseGPT (Frantar & Alistarh 2023; IST-DASLab/sparsegpt `fasterprune`): H = 2 G / n, dead inputs (H_jj = 0)
  get H_jj = 1 and W_j = 0, damping `damp` (1%) of mean(diag H) added to the diagonal, the upper Cholesky factor
  of H^-1; blocks of `block_size` (128) input features; in each block the pruned set is the smallest
  w^2 / [H^-1]_jj^2, re-chosen per block (unstructured: exactly round(s * N * block) weights of the block;
  the reference's threshold `<=` sort[int(n s)] prunes one more), or for N:M the n smallest of every m
  consecutive inputs of each output; each pruned column's error is propagated to the rest of the block and,
  after the block, to all later inputs (the OBS update).
* Wanda (Sun et al. 2023, locuslab/wanda): score |W_kj| * ||X_k||_2, the smallest s fraction of each output's
  inputs pruned (or n of every m); no weight update.
* magnitude: the smallest |W| of the whole matrix (or n of every m per output).

`sparsity` is a traced value (one compiled program serves every ratio); n:m and the block size are static.
`prune_layers` prunes a model layer by layer, each layer calibrated on the outputs of the already-compressed
layers before it (the reference's sequential order).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("sparsegpt", "wanda", "magnitude")


def _rank_mask(score: jax.Array, k: jax.Array) -> jax.Array:
  """True for the k entries of `score` with the smallest values (ties by position), any shape."""
  flat = score.reshape(-1)
  ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  return (ranks < k).reshape(score.shape)


def _nm_mask(score: jax.Array, n: int, m: int) -> jax.Array:
  """[K, N] score -> True for the n smallest of every m consecutive inputs (axis 0) of each output."""
  K, N = score.shape
  groups = score.reshape(K // m, m, N)
  ranks = jnp.argsort(jnp.argsort(groups, axis=1, stable=True), axis=1, stable=True)
  return (ranks < n).reshape(K, N)


def _check_nm(K: int, nm: tuple[int, int] | None) -> None:
  if nm is None:
    return
  n, m = nm
  if not (0 < n < m) or K % m:
    raise ValueError(f"nm={nm}: expected 0 < n < m with m dividing the {K} input features")


@functools.partial(jax.jit, static_argnames=("nm",))
def magnitude(w: jax.Array, sparsity: jax.Array, nm: tuple[int, int] | None = None) -> jax.Array:
  """w [K, N] with the smallest-|w| fraction `sparsity` of all entries (or n of every m inputs) set to 0."""
  score = jnp.abs(w.astype(jnp.float32))
  if nm is not None:
    mask = _nm_mask(score, *nm)
  else:
    mask = _rank_mask(score, jnp.round(sparsity * w.size).astype(jnp.int32))
  return jnp.where(mask, 0, w).astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("nm",))
def wanda(w: jax.Array, gram: jax.Array, sparsity: jax.Array, nm: tuple[int, int] | None = None) -> jax.Array:
  """Wanda: score |w_kj| * ||x_k|| (||x_k||^2 = G_kk); each output's smallest-score inputs set to 0."""
  K, N = w.shape
  score = jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))[:, None]
  if nm is not None:
    mask = _nm_mask(score, *nm)
  else:
    k = jnp.round(sparsity * K).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(score, axis=0, stable=True), axis=0, stable=True)
    mask = ranks < k
  return jnp.where(mask, 0, w).astype(w.dtype)


def _hinv_upper(gram: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
  """(upper Cholesky factor U of H^-1 with H^-1 = U^T U, dead-input mask) of H = gram (+ damping)."""
  K = gram.shape[0]
  h = gram.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(K, dtype=jnp.float32)
  low = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(K, dtype=jnp.float32))
  return jnp.linalg.cholesky(hinv).T, dead


@functools.partial(jax.jit, static_argnames=("nm", "block_size"))
def sparsegpt(w: jax.Array, gram: jax.Array, sparsity: jax.Array, nm: tuple[int, int] | None = None,
              block_size: int = 128, damp: float = 0.01) -> jax.Array:
  """SparseGPT of w [K, N] given the inputs' Gram matrix [K, K] (module docstring); returns the pruned w."""
  K, N = w.shape
  bs = min(block_size, K)
  nblocks = -(-K // bs)
  Kp = nblocks * bs
  hinv, dead = _hinv_upper(gram, damp)
  # Rows of the reference's W are outputs: work on W^T [N, K]; pad the inputs to whole blocks (padded columns are
  # zero, never chosen by the unstructured mask, and have no coupling in H^-1).
  wt = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32).T)
  wt = jnp.pad(wt, ((0, 0), (0, Kp - K)))
  hinv = jnp.pad(hinv, ((0, Kp - K), (0, Kp - K)))
  hinv = hinv + jnp.diag(jnp.where(jnp.arange(Kp) >= K, 1.0, 0.0))
  real = jnp.arange(Kp) < K

  def block(b, wt):
    i1 = b * bs
    w1 = jax.lax.dynamic_slice(wt, (0, i1), (N, bs))
    h1 = jax.lax.dynamic_slice(hinv, (i1, i1), (bs, bs))
    d1 = jnp.diag(h1)
    real1 = jax.lax.dynamic_slice(real, (i1,), (bs,))
    if nm is None:
      score = jnp.where(real1[None, :], w1 ** 2 / d1[None, :] ** 2, jnp.inf)
      count = jnp.sum(real1)
      mask1 = _rank_mask(score, jnp.round(sparsity * N * count).astype(jnp.int32))
    else:
      mask1 = jnp.zeros((N, bs), bool)
    n, m = nm if nm is not None else (0, 1)

    def column(i, state):
      w1, mask1, err1 = state
      if nm is not None:
        def choose(mask1):
          cols = jax.lax.dynamic_slice(w1, (0, i), (N, m))
          dd = jax.lax.dynamic_slice(d1, (i,), (m,))
          pick = jnp.argsort(jnp.argsort(cols ** 2 / dd[None, :] ** 2, axis=1, stable=True), axis=1,
                             stable=True) < n
          return jax.lax.dynamic_update_slice(mask1, pick, (0, i))
        mask1 = jax.lax.cond(i % m == 0, choose, lambda mk: mk, mask1)
      col = w1[:, i]
      q = jnp.where(mask1[:, i], 0.0, col)
      e = (col - q) / d1[i]
      w1 = w1 - e[:, None] * jnp.where(jnp.arange(bs) >= i, h1[i], 0.0)[None, :]
      w1 = w1.at[:, i].set(q)
      return w1, mask1, err1.at[:, i].set(e)

    w1, mask1, err1 = jax.lax.fori_loop(0, bs, column, (w1, mask1, jnp.zeros((N, bs), jnp.float32)))
    after = jnp.arange(Kp) >= i1 + bs
    rows = jax.lax.dynamic_slice(hinv, (i1, 0), (bs, Kp))
    wt = wt - err1 @ jnp.where(after[None, :], rows, 0.0)
    return jax.lax.dynamic_update_slice(wt, w1, (0, i1))

  wt = jax.lax.fori_loop(0, nblocks, block, wt)
  return wt[:, :K].T.astype(w.dtype)


def prune_matrix(w: jax.Array, gram: jax.Array | None, sparsity: float, method: str,
                 nm: tuple[int, int] | None = None, *, block_size: int = 128, damp: float = 0.01) -> jax.Array:
  """One projection matrix [K, N] pruned by `method` ("sparsegpt", "wanda", "magnitude"); s = 0 and no N:M
  returns w unchanged."""
  if method not in METHODS:
    raise ValueError(f"pruning method={method!r}; expected one of {list(METHODS)}")
  if not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"sparsity={sparsity}; expected a value in [0, 1)")
  _check_nm(w.shape[0], nm)
  if nm is None and float(sparsity) == 0.0:
    return w
  s = jnp.asarray(sparsity, jnp.float32)
  if method == "magnitude":
    return magnitude(w, s, nm)
  if gram is None:
    raise ValueError(f"pruning method {method!r} needs the Gram matrix of the calibration inputs")
  if method == "wanda":
    return wanda(w, gram, s, nm)
  return sparsegpt(w, gram, s, nm, block_size=block_size, damp=damp)


def reconstruction_error(w: jax.Array, w_hat: jax.Array, gram: jax.Array) -> float:
  """||X W - X W_hat||_F^2 = tr(D^T G D), D = W - W_hat, from the Gram matrix G = X^T X."""
  d = (w - w_hat).astype(jnp.float32)
  return float(jnp.sum(d * (gram.astype(jnp.float32) @ d)))


def prune_layer(layer_p: dict[str, Any], grams: dict[str, jax.Array], sparsity: float, method: str,
                nm: tuple[int, int] | None = None, *, block_size: int = 128, damp: float = 0.01
                ) -> dict[str, Any]:
  """One layer (stacked with a leading axis of 1) with all seven projections pruned from one statistics pass."""
  from lacax.compress import calibrate  # pylint: disable=g-import-not-at-top

  out = dict(layer_p)
  for name in calibrate.PROJECTIONS:
    w = layer_p[name][0]
    mat = calibrate.matrix(w, name)
    pruned = prune_matrix(mat, grams.get(name), sparsity, method, nm, block_size=block_size, damp=damp)
    out[name] = pruned.reshape(w.shape)[None]
  return out


def prune_layers(params: dict[str, Any], cfg, calib_tokens: np.ndarray, sparsities, method: str = "sparsegpt",
                 nm=None, *, block_size: int = 128, damp: float = 0.01,
                 after_layer: Callable[[int, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Prunes every layer l at `sparsities[l]` (nm: one (n, m) for all, or a per-layer list, None = unstructured),
  in order, each calibrated on the outputs of the layers before it as already compressed.

  `after_layer(l, layer_p) -> (stored, run)` runs on each pruned layer (stacked with a leading axis of 1): `stored`
  (dense arrays) goes into the result, and `run` computes the inputs of the next layer (`apply_policy`
  quantizes there, so that later layers calibrate through the quantized ones). Returns params with dense
  stacked layers.
  """
  from lacax.compress import calibrate  # pylint: disable=g-import-not-at-top

  layers = calibrate.stacked_layers(params)
  L = cfg.num_layers
  sparsities = [float(s) for s in sparsities]
  if len(sparsities) != L:
    raise ValueError(f"{len(sparsities)} sparsities given for a model of {L} layers")
  nms = list(nm) if isinstance(nm, list) else [nm] * L
  x, positions = calibrate.embed_inputs(params, cfg, calib_tokens)
  done = []
  for l in range(L):
    layer_p = calibrate.layer_slice(layers, l)
    if sparsities[l] > 0 or nms[l] is not None:
      grams = calibrate.layer_grams_jit(layer_p, cfg, x, positions) if method != "magnitude" else {}
      layer_p = prune_layer(layer_p, grams, sparsities[l], method, nms[l], block_size=block_size, damp=damp)
    run_p = layer_p
    if after_layer is not None:
      layer_p, run_p = after_layer(l, layer_p)
    done.append(layer_p)
    if l + 1 < L:
      x = calibrate.run_layer_jit(run_p, cfg, x, positions)
    if progress is not None:
      progress(l + 1)
  stacked = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *done)
  return {**params, "layers": stacked}

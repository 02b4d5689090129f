"""The Llama-family decoder as pure functions over a parameter pytree.

`forward(params, tokens, positions, cache, cfg) -> (logits, cache)`: the decoder layers are stacked on a
leading axis and run with `lax.scan`, so compile time does not grow with depth. New keys/values are written
into the cache first and attention then reads the whole (static-capacity) cache through a mask built from
the slots' original positions, so prefill, chunked prefill and decode are one code path.

Parameter layout (L layers, D model width, H query heads, KV kv heads, hd head_dim, F MLP width, V vocab):

  embed [V, D]; final_norm [D]; lm_head [V, D] (absent when embeddings are tied)
  layers: attn_norm [L, D]; wq [L, D, H, hd]; wk, wv [L, D, KV, hd]; wo [L, H, hd, D];
          bq [L, H, hd], bk, bv [L, KV, hd] (only with attention_bias); mlp_norm [L, D];
          w_gate, w_up [L, D, F]; w_down [L, F, D]
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import KVCache, write_slots
from lacax.model import cpu_attention
from lacax.model import rope as rope_lib
from lacax.model.config import ModelConfig

Params = dict[str, Any]

# Finite stand-in for -inf: a fully masked row (a padding query) then gives a uniform, not NaN, distribution.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# An attention-probability hook: (probs [B, KV, G, T, S] float32, layer index) -> probs. ACT plugs in here.
ProbsHook = Callable[[jax.Array, jax.Array], jax.Array]


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """The parameter pytree as `jax.ShapeDtypeStruct`s (no allocation)."""
  L, D, H, KV, hd, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
  dt = cfg.jnp_dtype
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dt)
  layers = {
      "attn_norm": s(L, D), "wq": s(L, D, H, hd), "wk": s(L, D, KV, hd), "wv": s(L, D, KV, hd),
      "wo": s(L, H, hd, D), "mlp_norm": s(L, D), "w_gate": s(L, D, F), "w_up": s(L, D, F), "w_down": s(L, F, D),
  }
  if cfg.attention_bias:
    layers.update(bq=s(L, H, hd), bk=s(L, KV, hd), bv=s(L, KV, hd))
  params = {"embed": s(V, D), "layers": layers, "final_norm": s(D)}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = s(V, D)
  return params


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
  """Random parameters (normal(0, std) matrices, unit norms, zero biases), for tests and benchmarks."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, spec), k in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      out.append(jnp.ones(spec.shape, spec.dtype))
    elif name.endswith("['bq']") or name.endswith("['bk']") or name.endswith("['bv']"):
      out.append(jnp.zeros(spec.shape, spec.dtype))
    else:
      out.append((std * jax.random.normal(k, spec.shape, jnp.float32)).astype(spec.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32 and cast back, as Hugging Face does."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def _score_query_weights(score_mode: str, positions: jax.Array) -> jax.Array:
  """[B, T] float32 weight of each query in the attention statistics the cache records."""
  valid = positions >= 0
  if score_mode == "accumulate":
    return valid.astype(jnp.float32)
  n_valid = jnp.sum(valid, axis=1, keepdims=True)
  t = jnp.arange(positions.shape[1])[None, :]
  width = 1 if score_mode == "last" else int(score_mode.split(":", 1)[1])
  return (valid & (t >= n_valid - width)).astype(jnp.float32)


def _visible(key_pos: jax.Array, query_pos: jax.Array) -> jax.Array:
  """Broadcast bool: the slot holds a token (pos >= 0) that is not in the (real) query's future."""
  return (key_pos >= 0) & (key_pos <= query_pos) & (query_pos >= 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_pos: jax.Array, query_pos: jax.Array,
              probs_hook: Callable[[jax.Array], jax.Array] | None = None, *, need_probs: bool = True,
              sharded: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Grouped-query attention over the whole (static-capacity) cache layer.

  A query attends the slots that hold a token (key_pos >= 0) not in its future (key_pos <= query_pos); a
  padding query (query_pos < 0) attends nothing and gets a uniform, finite distribution (blocked: finite).

  Three formulations give the same numbers for real queries (up to float rounding); the choice is static:
  * slot-major (decode and short chunks, T * KV * G <= `_SLOT_MAJOR_MAX_COLUMNS`, no hook): the cache layer
    is read as the contiguous [S, KV * hd] matrix it is stored as and multiplied by block-diagonal queries.
    This costs KV times the (negligible, T-sized) flops of per-head products but never copies the cache into
    a head-major layout, which on CPU costs more than the attention itself (SmolLM2 at 4k slots: 2.7x).
  * blocked (long prefill, T >= 2 * `_BLOCK_Q`, when neither a hook nor the probabilities are needed): an
    online softmax over query x slot blocks that skips the blocks no query of the block can see (the future
    half of a causal prefill, empty slots); never materialises the [B, KV, G, T, S] probabilities.
  * head-major (otherwise: short prefills, a probability hook, recorded scores, a sharded cache): per-head
    batched products over [B, KV, ...] with an explicit softmax.
  On XLA:CPU, `forward` hands decode attention to a custom call instead (lacax.model.cpu_attention),
  which computes the slot-major numbers straight from the stacked cache; this function is its reference.

  Args:
    q: [B, T, KV, G, hd] rotated queries.
    k, v: [B, S, KV, hd] rotated keys and values of the whole cache layer.
    key_pos: [B, S, KV] int32 original position held by each slot, -1 when empty.
    query_pos: [B, T] int32 original positions of the queries, -1 for padding.
    probs_hook: optional function of the probabilities [B, KV, G, T, S] (attention calibration).
    need_probs: False lets long prefills use the blocked formulation (probs is then None).
    sharded: the cache is laid out on a mesh (kv heads and slots split over devices): only the head-major
      formulation keeps every device on its own shard (the others would all-gather the cache layer).

  Returns:
    out [B, T, KV, G, hd] in v.dtype and probs [B, KV, G, T, S] float32 (unused probabilities cost nothing
    under jit: XLA drops them), or None from the blocked formulation.
  """
  B, T, KV, G, hd = q.shape
  if probs_hook is None and not sharded and T * KV * G <= _SLOT_MAJOR_MAX_COLUMNS:
    return _attention_slot_major(q, k, v, key_pos, query_pos)
  if probs_hook is None and not sharded and not need_probs and T >= 2 * _BLOCK_Q:
    return attention_blocked(q, k, v, key_pos, query_pos), None
  scale = hd ** -0.5
  # [B, KV, T, S] mask.
  kp = jnp.transpose(key_pos, (0, 2, 1))[:, :, None, :]
  qp = query_pos[:, None, :, None]
  mask = _visible(kp, qp)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  if probs_hook is not None:
    probs = probs_hook(probs)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), probs


# Largest T * KV * G (columns of the block-diagonal query matrix) the slot-major formulation is used for.
_SLOT_MAJOR_MAX_COLUMNS = 64
# Query and slot block sizes of the blocked formulation.
_BLOCK_Q = 256
_BLOCK_S = 512


def attention_blocked(q: jax.Array, k: jax.Array, v: jax.Array, key_pos: jax.Array, query_pos: jax.Array, *,
                      block_q: int = _BLOCK_Q, block_s: int = _BLOCK_S) -> jax.Array:
  """`attention`'s output by an online softmax over (query block, slot block) pairs, skipping invisible pairs.

  A pair is computed only if some slot of the block holds a token (pos >= 0) no later than the latest query of
  the block; the rest contribute exactly nothing to real queries, so a causal prefill does about half the
  work of the explicit formulation and never holds more than one [B, KV, G, block_q, block_s] tile. Real
  queries always see at least their own token, so their results equal `attention`'s up to float rounding.
  Padding queries (query_pos < 0) get a finite value that differs from the explicit formulation's (they
  average only the computed blocks); callers drop them.

  Args: as `attention` (no hook); block sizes need not divide T or S (both are padded).

  Returns:
    out [B, T, KV, G, hd] in v.dtype.
  """
  B, T, KV, G, hd = q.shape
  S = k.shape[1]
  nq, ns = -(-T // block_q), -(-S // block_s)
  q = jnp.pad(q, ((0, 0), (0, nq * block_q - T), (0, 0), (0, 0), (0, 0)))
  query_pos = jnp.pad(query_pos, ((0, 0), (0, nq * block_q - T)), constant_values=-1)
  k = jnp.pad(k, ((0, 0), (0, ns * block_s - S), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, ns * block_s - S), (0, 0), (0, 0)))
  key_pos = jnp.pad(key_pos, ((0, 0), (0, ns * block_s - S), (0, 0)), constant_values=-1)
  k_blocks = k.reshape(B, ns, block_s, KV, hd)
  v_blocks = v.reshape(B, ns, block_s, KV, hd)
  kp_blocks = key_pos.reshape(B, ns, block_s, KV)
  # Earliest token any slot block holds, latest position any query block asks for (over the whole batch).
  big = jnp.iinfo(jnp.int32).max
  first_held = jnp.min(jnp.where(kp_blocks >= 0, kp_blocks, big), axis=(0, 2, 3))  # [ns]
  last_query = jnp.max(query_pos.reshape(B, nq, block_q), axis=(0, 2))  # [nq]
  scale = hd ** -0.5

  def query_block(args):
    qi, qp, latest = args  # [B, bq, KV, G, hd], [B, bq], scalar
    qp5 = qp[:, None, None, :, None]  # [B, 1, 1, bq, 1]

    def slot_block(j, carry):
      def compute(carry):
        m, l, acc = carry
        kj = jax.lax.dynamic_index_in_dim(k_blocks, j, 1, keepdims=False)
        vj = jax.lax.dynamic_index_in_dim(v_blocks, j, 1, keepdims=False)
        kp = jax.lax.dynamic_index_in_dim(kp_blocks, j, 1, keepdims=False)
        kp5 = jnp.transpose(kp, (0, 2, 1))[:, :, None, None, :]  # [B, KV, 1, 1, bs]
        s = jnp.einsum("btkgd,bskd->bkgts", qi, kj, preferred_element_type=jnp.float32) * scale
        s = jnp.where(_visible(kp5, qp5), s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(vj.dtype), vj,
                                                 preferred_element_type=jnp.float32)
        return m_new, l, acc

      return jax.lax.cond(first_held[j] <= latest, compute, lambda c: c, carry)

    init = (jnp.full((B, KV, G, block_q), _MASK_VALUE, jnp.float32), jnp.zeros((B, KV, G, block_q), jnp.float32),
            jnp.zeros((B, KV, G, block_q, hd), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, ns, slot_block, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # [B, KV, G, bq, hd]
    return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, bq, KV, G, hd]

  q_blocks = jnp.moveaxis(q.reshape(B, nq, block_q, KV, G, hd), 1, 0)
  qp_blocks = jnp.moveaxis(query_pos.reshape(B, nq, block_q), 1, 0)
  out = jax.lax.map(query_block, (q_blocks, qp_blocks, last_query))  # [nq, B, bq, KV, G, hd]
  out = jnp.moveaxis(out, 0, 1).reshape(B, nq * block_q, KV, G, hd)[:, :T]
  return out.astype(v.dtype)


def _attention_slot_major(q: jax.Array, k: jax.Array, v: jax.Array, key_pos: jax.Array, query_pos: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """`attention` over the cache in its stored [B, S, KV * hd] layout (see there)."""
  B, T, KV, G, hd = q.shape
  S = k.shape[1]
  n = T * KV * G
  eye = jnp.eye(KV, dtype=q.dtype)
  # q_bd[b, (i, d), (t, j, g)] = q[b, t, j, g, d] if i == j else 0.
  q_bd = jnp.einsum("btjgd,ij->bidtjg", q * jnp.asarray(hd ** -0.5, q.dtype), eye).reshape(B, KV * hd, n)
  logits = jnp.einsum("bsc,bcn->bsn", k.reshape(B, S, KV * hd), q_bd, preferred_element_type=jnp.float32)
  logits = logits.reshape(B, S, T, KV, G)
  kp = key_pos[:, :, None, :, None]  # [B, S, 1, KV, 1]
  qp = query_pos[:, None, :, None, None]  # [B, 1, T, 1, 1]
  logits = jnp.where(_visible(kp, qp), logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=1)  # over the slots
  probs_t = jnp.transpose(probs.reshape(B, S, n), (0, 2, 1))  # [B, n, S]: the product's natural operand order
  out = jnp.einsum("bns,bsc->bnc", probs_t.astype(v.dtype), v.reshape(B, S, KV * hd),
                   preferred_element_type=jnp.float32)
  # Keep the diagonal blocks: query head (j, g) with kv head i == j.
  out = jnp.einsum("btjgid,ji->btjgd", out.reshape(B, T, KV, G, KV, hd), eye.astype(out.dtype))
  return out.astype(v.dtype), jnp.transpose(probs, (0, 3, 4, 2, 1))


def _write_layer(cache: jax.Array, update: jax.Array, layer: jax.Array, slots: jax.Array) -> jax.Array:
  """cache[layer, b, slots[b, t]] = update[b, t] (keys, values or positions); slots out of range (padding)
  are dropped."""
  rows = jnp.arange(cache.shape[1])[:, None]
  return cache.at[layer, rows, slots].set(update, mode="drop")


def _cached_layer_attention(q: jax.Array, k_all: jax.Array, v_all: jax.Array, pos_all: jax.Array,
                            query_pos: jax.Array, layer: jax.Array, slot_cos: jax.Array | None,
                            slot_sin: jax.Array | None) -> jax.Array:
  """`attention` over layer `layer` of the stacked cache, keys rotated at their slots when tables are given:
  the pure-JAX definition of what the CPU decode kernel computes (lacax.model.cpu_attention)."""
  k = k_all[layer]
  if slot_cos is not None:
    k = rope_lib.rotate(k, slot_cos[None, :, None, :], slot_sin[None, :, None, :])
  return attention(q, k, v_all[layer], pos_all[layer], query_pos, need_probs=False)[0]


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache | None, cfg: ModelConfig, *,
            logits_index: jax.Array | None = None, probs_hook: ProbsHook | None = None
            ) -> tuple[jax.Array, KVCache | None]:
  """Runs the decoder over new tokens, appending their keys/values to the cache (if any).

  Args:
    params: the parameter pytree (layout in the module docstring).
    tokens: [B, T] int32 token ids.
    positions: [B, T] int32 original positions of the tokens, -1 for padding. With a cache, real tokens come
      first in each row (right padding); without one, padding may sit anywhere.
    cache: the KV cache; its `rope_mode` and `score_mode` decide how keys are rotated and which attention
      statistics are recorded. None runs without a cache (teacher-forced scoring, training): each token
      attends the given tokens of its row at positions <= its own (causal by position), keys rotated at their
      positions; the logits equal those of a prefill into an empty cache, and the function is differentiable.
    cfg: the model config (static under jit).
    logits_index: optional [B] int32: compute logits only at token index logits_index[b] of each row
      (saves the [B, T, V] projection during prefill).
    probs_hook: optional hook on the post-softmax attention of every layer (ACT); None leaves the
      computation untouched.

  Returns:
    logits: [B, T, V] float32, or [B, 1, V] with `logits_index`.
    cache: the updated cache (slots written, `length` advanced by the number of real tokens per row), or
      None without a cache.
  """
  B, T = tokens.shape
  G = cfg.group_size
  dtype = cfg.jnp_dtype
  inv_freq = rope_lib.inv_frequencies(cfg)
  x = params["embed"].astype(dtype)[tokens]
  uncached = cache is None
  mesh_rules = None if uncached else cache.mesh_rules
  if mesh_rules is not None:  # on a mesh: batch rows split over the data axes (lacax.sharding)
    x = mesh_rules.constrain(x, ("batch", None, None))
    cache = mesh_rules.constrain_cache(cache)
  score_weights = None
  if not uncached and cache.score_mode is not None:
    score_weights = _score_query_weights(cache.score_mode, positions)
  use_cpu_kernel = (not uncached and probs_hook is None and score_weights is None and mesh_rules is None
                    and cpu_attention.supports(T, cfg.num_kv_heads, G, cfg.head_dim, dtype, cache.k.dtype,
                                               cache.rope_mode)
                    and cpu_attention.available())
  if uncached:
    write = None
  elif mesh_rules is None and cache.k.dtype in cpu_attention.WRITE_DTYPES and cpu_attention.available():
    write = functools.partial(cpu_attention.cache_write, reference=_write_layer)  # in place on CPU
  else:
    write = _write_layer
  # Rotation tables are the same in every layer: built once per forward, not once per layer.
  rope_mode = "stored" if uncached else cache.rope_mode
  if rope_mode == "slot":  # the cache's slots (queries are rotated at theirs, which vary by layer)
    S = cache.capacity
    slot_cos, slot_sin = rope_lib.rope_table(jnp.arange(S, dtype=jnp.int32)[None, :, None], inv_freq)
  else:  # the new tokens' own positions (queries; keys too when stored rotated, or without a cache)
    new_cos, new_sin = rope_lib.rope_table(positions[:, :, None], inv_freq)
  n_new = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)
  token_pos = jnp.broadcast_to(positions[:, :, None], (B, T, cfg.num_kv_heads))

  def layer(carry, inputs):
    x, k_all, v_all, pos_all, length_all, scores_all = carry
    p, i = inputs
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, p["wq"])
    k_new = jnp.einsum("btd,dhk->bthk", h, p["wk"])
    v_new = jnp.einsum("btd,dhk->bthk", h, p["wv"])
    if cfg.attention_bias:
      q, k_new, v_new = q + p["bq"], k_new + p["bk"], v_new + p["bv"]
    if rope_mode == "stored":  # keys enter the cache rotated at their original position
      k_new = rope_lib.rotate(k_new, new_cos, new_sin)

    if uncached:  # attend the given tokens themselves
      q = rope_lib.rotate(q, new_cos, new_sin).reshape(B, T, cfg.num_kv_heads, G, cfg.head_dim)
      hook = None if probs_hook is None else (lambda probs: probs_hook(probs, i))
      out, probs = attention(q, k_new, v_new, token_pos, positions, hook, need_probs=False)
    else:
      # Write the new tokens at the layer's cursor (padding goes to slot S and is dropped).
      S = cache.capacity
      length = length_all[i]
      slots = write_slots(length, positions, S)
      k_all = write(k_all, k_new.astype(k_all.dtype), i, slots)
      v_all = write(v_all, v_new.astype(v_all.dtype), i, slots)
      pos_all = _write_layer(pos_all, token_pos, i, slots)
      length_all = length_all.at[i].add(n_new)
      if rope_mode == "slot":
        q = rope_lib.apply_rope(q, slots[:, :, None], inv_freq)
      else:
        q = rope_lib.rotate(q, new_cos, new_sin)
      q = q.reshape(B, T, cfg.num_kv_heads, G, cfg.head_dim)

      if use_cpu_kernel:  # reads the layer straight from the stacked cache (see lacax.model.cpu_attention)
        tables = (slot_cos[0, :, 0], slot_sin[0, :, 0]) if rope_mode == "slot" else ()
        out = cpu_attention.decode_attention(q, k_all, v_all, pos_all, positions, i, _cached_layer_attention,
                                             *tables)
        probs = None
      else:
        k_layer, v_layer, pos_layer = k_all[i], v_all[i], pos_all[i]
        if rope_mode == "slot":
          k_layer = rope_lib.rotate(k_layer, slot_cos, slot_sin)
        elif rope_mode == "original":
          k_layer = rope_lib.apply_rope(k_layer, pos_layer, inv_freq)
        hook = None if probs_hook is None else (lambda probs: probs_hook(probs, i))
        out, probs = attention(q, k_layer, v_layer, pos_layer, positions, hook,
                               need_probs=score_weights is not None, sharded=mesh_rules is not None)
    out = out.reshape(B, T, cfg.num_heads, cfg.head_dim)
    x = x + jnp.einsum("bthk,hkd->btd", out, p["wo"])

    if score_weights is not None:
      agg = {"mean": jnp.mean, "max": jnp.max, "sum": jnp.sum}[cache.score_agg]
      received = jnp.einsum("bkts,bt->bsk", agg(probs, axis=2), score_weights)
      if cache.score_mode == "accumulate":
        received = received + scores_all[i]
      scores_all = scores_all.at[i].set(received)

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = jax.nn.silu(jnp.einsum("btd,df->btf", h, p["w_gate"]))
    up = jnp.einsum("btd,df->btf", h, p["w_up"])
    x = x + jnp.einsum("btf,fd->btd", gate * up, p["w_down"])
    return (x, k_all, v_all, pos_all, length_all, scores_all), None

  if uncached:
    empty = jnp.zeros((), jnp.float32)
    init = (x, empty, empty, empty, empty, empty)
  else:
    scores = cache.scores if cache.scores is not None else jnp.zeros((), jnp.float32)
    init = (x, cache.k, cache.v, cache.pos, cache.length, scores)
  layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
  (x, k_all, v_all, pos_all, length_all, scores), _ = jax.lax.scan(layer, init, (params["layers"], layer_ids))

  if logits_index is not None:
    x = jnp.take_along_axis(x, logits_index[:, None, None].astype(jnp.int32), axis=1)
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  unembed = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
  logits = jnp.einsum("btd,vd->btv", x, unembed.astype(dtype), preferred_element_type=jnp.float32)
  if uncached:
    return logits, None
  cache = cache.replace(k=k_all, v=v_all, pos=pos_all, length=length_all,
                        scores=scores if cache.scores is not None else None)
  if mesh_rules is not None:
    cache = mesh_rules.constrain_cache(cache)
  return logits, cache

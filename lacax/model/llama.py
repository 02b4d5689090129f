"""The Llama-family decoder as pure functions over a parameter pytree: one forward, typed extension points.

`forward(params, tokens, positions, cache, cfg, *, options=None) -> (logits, cache)`, and `run(...)`, the same
forward returning a `ForwardOutput` (logits, cache, hidden states). The decoder layers are stacked on a leading
axis and run with `lax.scan`, so compile time does not grow with depth. With a cache, new keys/values are
written into it first and attention then reads the whole (static-capacity) cache through a mask built from
the slots' original positions, so prefill, chunked prefill and decode are one code path. Without a cache
(`cache=None`), each token attends the given tokens of its row up to its own position: teacher-forced scoring
and training (differentiable; the logits equal a prefill into an empty cache).

Parameter layout (L layers, D model width, H query heads, KV kv heads, hd head_dim, F MLP width, V vocab):

  embed [V, D]; final_norm [D]; lm_head [V, D] (absent when embeddings are tied)
  layers: attn_norm [L, D]; wq [L, D, H, hd]; wk, wv [L, D, KV, hd]; wo [L, H, hd, D];
          bq [L, H, hd], bk, bv [L, KV, hd] (only with attention_bias); mlp_norm [L, D];
          w_gate, w_up [L, D, F]; w_down [L, F, D];
          optional bo, b_down [L, D]: output biases of the attention and MLP blocks (FLAP's bias
          compensation of pruned channels; absent in every checkpoint lacax loads)

Heterogeneous layers (sliced subnets, AmoebaLLM export): `params["layers"]` may instead be a list of segments,
each a dict as above stacked over its own layers, whose head counts and MLP widths differ (read off the
weights; `ModelConfig.segments` declares them, see `param_shapes`). Each segment is scanned with the same
layer body. The cache keeps `cfg.num_kv_heads` (the widest) kv heads per layer; a layer with fewer kv heads
uses the first ones and leaves the rest empty (pos -1).

Extension points (`ForwardOptions`; every field at its default is the plain forward, bit for bit):

  * depth: `layers` (static tuple of layer indices that run; the others are not computed, their cache
    layers untouched) and `layer_gate` ([L] traced: where 0 the layer's residual update is discarded exactly,
    x_out = x_in, so one compiled program serves every depth mask; the layer still computes and writes its
    cache layer).
  * width: `head_mask` ([L, H] or [H], traced) multiplies each query head's attention output before the
    output projection (0 = head removed, exactly as if its rows of wo were sliced away); `ffn_mask` ([L, F]
    or [F], traced) multiplies each MLP channel (silu(gate) * up) before the down projection. Several subnet
    shapes thus run in one compiled training step.
  * adapters: `lora` (a pytree of per-projection {"a": [L, in..., r], "b": [L, r, out...]} weights beside the
    base weights, built by `lacax.model.lora`) and `lora_config` (static: scale, dropout); the delta
    scale * b(a(dropout(x))) is added to any of the projections wq, wk, wv, wo, w_gate, w_up, w_down.
    `lora_rng` turns LoRA dropout on (training); None = no dropout.
  * hidden states: `hidden_layers` (static tuple of j in [0, L]): `run` returns the residual stream after j
    layers (j = 0: the embeddings), before the final norm, stacked [len, B, T, D] (distillation, early-exit
    heads: `unembed` turns one into logits). `logits=False` skips the LM head.
  * quantized weights: every projection goes through `project(x, w, equation)`. A weight that is an instance of
    `ProjectedWeight` (a pytree whose leaves are stacked on the layer axis, e.g. packed int8/int4 values
    and scales) computes its own product there, so a quantized-weight type plugs in without another copy of
    the model. The embedding table stays dense (it is gathered, not multiplied).
  * attention probabilities: `probs_hook(probs [B, KV, G, T, S] float32, layer) -> probs` (ACT).
  * attention statistics: `scores` (a `lacax.cache.kv_cache.ScoreRecording`; default the cache's own,
    `cache.recording`, which its policy declared) says which statistic is written into `cache.scores`.
  * other per-layer statistics: a cache with `stats` (a `lacax.cache.kv_cache.CacheStats`, built by a policy
    that declares a `StatsRecording`) gets what its recording asks for: ||W_o v||_1 of each written token at
    its slot, the squared rotated queries of the step's last W queries, running pre-RoPE query moments. They
    need no attention probabilities (the CPU decode kernel still serves the attention); a cache without
    `stats` runs exactly the forward without them.
  * int8 KV cache (a cache from `init_cache(..., dtype=jnp.int8)`, any policy): new keys / values are
    quantized per token and kv head when written and dequantized when a layer reads the cache (by the CPU
    decode kernel as it reads each slot, elsewhere the whole layer first).
  * placement: `mesh_rules` (a `lacax.sharding.MeshRules`; default the cache's) keeps activations and the cache
    in the rules' layout; also for the cache-less forward.

The CPU decode kernel (lacax.model.cpu_attention) serves the attention wherever it computes the same numbers:
XLA:CPU, a cache, no hook, no recorded statistics, no mesh; width masks, gates and LoRA do not change that.
Packed low-bit projections (lacax.model.quantized.PackedWeight) run their decode products through a second
CPU kernel (lacax.model.cpu_quant_matmul) under the same rule: only where it computes the same numbers. That
kernel also streams the dense float32 / bfloat16 / float16 layer projections and the LM head of a decode step
(a cache, no mesh, at most `cpu_quant_matmul.MAX_ROWS` new tokens in all): the stacked layer weights are
wrapped as `StreamedWeight`s, which read their layer in place (no per-layer slice copies) with float32
accumulation, where XLA:CPU's dot reads a bfloat16 weight at a small fraction of the read bandwidth.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lacax.cache.kv_cache import CacheStats, KVCache, ScoreRecording, dequantize_kv, quantize_kv, write_slots
from lacax.model import cpu_attention
from lacax.model import cpu_quant_matmul
from lacax.model import precision
from lacax.model import rope as rope_lib
from lacax.model.config import ModelConfig, dtype_of

Params = dict[str, Any]

# Finite stand-in for -inf: a fully masked row (a padding query) then gives a uniform, not NaN, distribution.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# An attention-probability hook: (probs [B, KV, G, T, S] float32, layer index) -> probs. ACT plugs in here.
ProbsHook = Callable[[jax.Array, jax.Array], jax.Array]


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """The parameter pytree as `jax.ShapeDtypeStruct`s (no allocation); `params["layers"]` is a list of
  segments when `cfg.layer_shapes` declares heterogeneous layers."""
  D, hd, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
  dt = cfg.jnp_dtype
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731

  def segment(L, H, KV, F):
    layers = {
        "attn_norm": s(L, D), "wq": s(L, D, H, hd), "wk": s(L, D, KV, hd), "wv": s(L, D, KV, hd),
        "wo": s(L, H, hd, D), "mlp_norm": s(L, D), "w_gate": s(L, D, F), "w_up": s(L, D, F), "w_down": s(L, F, D),
    }
    if cfg.attention_bias:
      layers.update(bq=s(L, H, hd), bk=s(L, KV, hd), bv=s(L, KV, hd))
    return layers

  segments = [segment(*seg) for seg in cfg.segments]
  params = {"embed": s(V, D), "layers": segments if cfg.layer_shapes is not None else segments[0],
            "final_norm": s(D)}
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
  probs = attention_probs(q, k, key_pos, query_pos)
  if probs_hook is not None:
    probs = probs_hook(probs)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), probs


def attention_probs(q: jax.Array, k: jax.Array, key_pos: jax.Array, query_pos: jax.Array) -> jax.Array:
  """The explicit post-softmax probabilities of `attention` (head-major): [B, KV, G, T, S] float32.

  Args: q [B, T, KV, G, hd] rotated queries; k [B, S, KV, hd] rotated keys; key_pos [B, S, KV]; query_pos
  [B, T] (-1 = padding, which gets a uniform finite row).
  """
  scale = q.shape[-1] ** -0.5
  kp = jnp.transpose(key_pos, (0, 2, 1))[:, :, None, :]  # [B, KV, 1, S] against [B, 1, T, 1]
  qp = query_pos[:, None, :, None]
  mask = _visible(kp, qp)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


def last_query_rows(x: jax.Array, query_pos: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """The last `width` real queries of every row: (x rows [B, width, ...], their positions [B, width], -1 where
  a row has fewer than `width` real queries). Real queries come first in each row (right padding)."""
  n_valid = jnp.sum(query_pos >= 0, axis=1, keepdims=True).astype(jnp.int32)
  idx = n_valid - width + jnp.arange(width, dtype=jnp.int32)[None, :]
  safe = jnp.maximum(idx, 0)
  rows = jnp.take_along_axis(x, safe.reshape(safe.shape + (1,) * (x.ndim - 2)), axis=1)
  pos = jnp.where(idx >= 0, jnp.take_along_axis(query_pos, safe, axis=1), -1)
  return rows, pos


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
                            slot_sin: jax.Array | None, k_scale: jax.Array | None = None,
                            v_scale: jax.Array | None = None) -> jax.Array:
  """`attention` over layer `layer` of the stacked cache, keys rotated at their slots when tables are given (an
  int8 cache dequantized to q's dtype first): the pure-JAX definition of what the CPU decode kernel computes
  (lacax.model.cpu_attention)."""
  k, v = k_all[layer], v_all[layer]
  if k_scale is not None:
    k, v = dequantize_kv(k, k_scale[layer], q.dtype), dequantize_kv(v, v_scale[layer], q.dtype)
  if slot_cos is not None:
    k = rope_lib.rotate(k, slot_cos[None, :, None, :], slot_sin[None, :, None, :])
  return attention(q, k, v, pos_all[layer], query_pos, need_probs=False)[0]


# --- extension points ---------------------------------------------------------------------------------------


class ProjectedWeight:
  """Base class of weights that compute their own projection (quantized weights plug in here).

  A subclass is a pytree (e.g. a `flax.struct.dataclass`) whose array leaves carry the layer axis first when
  stored in `params["layers"]` (the scan slices every leaf), and implements `project`. `shape` is the dense
  weight's shape (per layer inside the scan), which the forward reads to size heads and channels.
  """

  @property
  def shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  def project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    """`jnp.einsum(equation, x, dense_weight)` computed from this representation."""
    raise NotImplementedError

  def dense(self) -> jax.Array:
    """The dense weight (for export, merging and references)."""
    raise NotImplementedError

  # True for types whose `at_layer` reads one layer out of the stacked leaves: the forward's scan then passes
  # the stacked weight whole instead of slicing it (a slice is a copy where a custom call reads it).
  reads_layers_in_place = False

  def at_layer(self, index: jax.Array) -> "ProjectedWeight":
    """Layer `index` (int32 scalar, traced) of this weight stacked on a leading layer axis."""
    raise NotImplementedError


@flax.struct.dataclass
class StreamedWeight(ProjectedWeight):
  """A dense projection weight stacked on a leading layer axis, read in place at layer `layer` by the CPU
  weight-streaming kernel (`cpu_quant_matmul.project_dense_group`) where it applies, else by XLA's einsum of the
  layer's slice. `run` wraps the dense layer weights of a decode step in it (a view: no copy, same values);
  the product equals `jnp.einsum(equation, x, data[layer])` up to float32 summation order (the kernel
  accumulates in float32 and rounds once to x's dtype)."""

  data: jax.Array
  layer: jax.Array | None = None

  reads_layers_in_place = True

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.data.shape[0 if self.layer is None else 1:])

  def at_layer(self, index: jax.Array) -> "StreamedWeight":
    return self.replace(layer=jnp.asarray(index, jnp.int32))

  def dense(self, dtype=None) -> jax.Array:
    w = self.data if self.layer is None else jax.lax.dynamic_index_in_dim(self.data, self.layer, 0, False)
    return w if dtype is None else w.astype(dtype)

  def project(self, x: jax.Array, equation: str, preferred_element_type=None) -> jax.Array:
    (y,) = StreamedWeight.project_together((self,), x, equation, preferred_element_type)
    return y

  @staticmethod
  def project_together(ws: Sequence["StreamedWeight"], x: jax.Array, equation: str,
                       preferred_element_type=None) -> tuple[jax.Array, ...]:
    """`w.project(x, equation)` for every w, in one kernel call where the kernel streams them all (one dtype,
    one layer index: a decoder layer's q / k / v, or gate / up), else one product each."""
    def einsum(x, data, layer):
      w = data if layer is None else jax.lax.dynamic_index_in_dim(data, layer, 0, False)
      return jnp.einsum(equation, x, w, preferred_element_type=preferred_element_type)

    layer = ws[0].layer
    if layer is not None and "->" in equation and all(_same_index(w.layer, layer) for w in ws):
      xs, w_axes = equation.replace(" ", "").split("->")[0].split(",")
      num_in = sum(1 for a in w_axes if a in xs)
      if (len({jnp.dtype(w.data.dtype) for w in ws}) == 1
          and all(cpu_quant_matmul.supports_dense(w.shape, w.data.dtype, num_in, x, equation) for w in ws)):
        reference = lambda x, datas, layer: tuple(einsum(x, d, layer) for d in datas)  # noqa: E731
        return cpu_quant_matmul.project_dense_group(tuple(w.data for w in ws), layer, num_in, x, reference,
                                                    preferred_element_type)
    if len(ws) > 1:  # not one group: each on its own (the kernel may still stream it)
      return tuple(w.project(x, equation, preferred_element_type) for w in ws)
    return (einsum(x, ws[0].data, ws[0].layer),)


def _same_index(a: jax.Array | None, b: jax.Array) -> bool:
  """Whether two layer indices are the same value: one traced value, or equal concrete ones."""
  if a is b:
    return True
  if a is None or isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
    return False
  return int(a) == int(b)


def _streams_weights(uncached: bool, mesh_rules: Any, rows: int) -> bool:
  """Whether a forward streams its dense weights through the CPU kernel (module docstring); static."""
  return (not uncached and mesh_rules is None and rows <= cpu_quant_matmul.MAX_ROWS
          and cpu_quant_matmul.available())


def project_group(x: jax.Array, ws: Sequence[Any], equation: str, dot_dtype=None) -> tuple[jax.Array, ...]:
  """`project(x, w, equation)` for each of the weights of one input (a layer's q / k / v, or gate / up): where
  all are `StreamedWeight`s of one layer, one call of the CPU weight-streaming kernel computes them all, which
  pays its fixed cost (the thread pool's start and join, x's widening) once instead of once per weight."""
  if len(ws) > 1 and all(isinstance(w, StreamedWeight) for w in ws):
    return StreamedWeight.project_together(ws, x, equation)
  return tuple(project(x, w, equation, dot_dtype=dot_dtype) for w in ws)


def project(x: jax.Array, w: Any, equation: str, preferred_element_type=None, dot_dtype=None) -> jax.Array:
  """The one function every projection of the forward goes through: x times the weight by `equation`.

  A dense weight is multiplied in `dot_dtype` (operands cast at use, float32 accumulation, result in
  `preferred_element_type` or x's dtype; `lacax.model.precision.lowp_einsum`), or, without one, in its own
  dtype when x has it too. A bfloat16 product thus runs as one on XLA:CPU, forward and backward, with the same
  numbers as the plain einsum of the cast operands there.
  """
  if isinstance(w, ProjectedWeight):
    return w.project(x, equation, preferred_element_type)
  dot = dtype_of(dot_dtype, "dot_dtype")
  dtype = jnp.dtype(dot if dot is not None else w.dtype if x.dtype == w.dtype else jnp.float32)
  if dtype in precision.LOW_PRECISION:
    return precision.lowp_einsum(equation, x, w, dtype, jnp.dtype(preferred_element_type or x.dtype))
  if dot is not None:  # float32 products of whatever came in
    out = jnp.einsum(equation, x.astype(dot), w.astype(dot), preferred_element_type=preferred_element_type)
    return out.astype(preferred_element_type or x.dtype)
  return jnp.einsum(equation, x, w, preferred_element_type=preferred_element_type)


# Projections LoRA can target: (einsum of the input with A, einsum of the rank-r code with B).
LORA_TARGETS = {
    "wq": ("btd,dr->btr", "btr,rhk->bthk"),
    "wk": ("btd,dr->btr", "btr,rhk->bthk"),
    "wv": ("btd,dr->btr", "btr,rhk->bthk"),
    "wo": ("bthk,hkr->btr", "btr,rd->btd"),
    "w_gate": ("btd,dr->btr", "btr,rf->btf"),
    "w_up": ("btd,dr->btr", "btr,rf->btf"),
    "w_down": ("btf,fr->btr", "btr,rd->btd"),
}


@flax.struct.dataclass
class ForwardOptions:
  """The forward's extension points (module docstring). A pytree: arrays are traced, the rest is static.

  Attributes:
    layer_gate: [L] traced; a layer where it is 0 passes its residual stream through exactly. Without a
      cache (training, scoring) such a layer is not computed at all (`lax.cond` in the layer scan; under `vmap`
      XLA turns it back into a select); with a cache its keys and values are still written.
    head_mask: [L, H] or [H] traced multiplier of each query head's attention output.
    ffn_mask: [L, F] or [F] traced multiplier of each MLP channel.
    lora: LoRA weights: {projection: {"a": [L, in..., r], "b": [L, r, out...]}} (a list of such dicts, one per
      segment, for heterogeneous layers); None = no adapters.
    lora_rng: PRNG key for LoRA dropout (training); None = no dropout.
    layers: static tuple of the layer indices that run (ascending); None = all.
    hidden_layers: static tuple of j in [0, L]: return the residual stream after j layers.
    logits: static; False skips the LM head (`ForwardOutput.logits` is then None).
    lora_config: static object with `scale` (alpha / r) and `dropout` (`lacax.model.lora.LoraConfig`).
    probs_hook: static `ProbsHook` on every layer's post-softmax attention (ACT).
    scores: static `ScoreRecording` (None = the cache's `recording`).
    mesh_rules: static `lacax.sharding.MeshRules` (None = the cache's).
    dot_dtype: static dtype name of the dense projections' products (and the LM head's): weights and inputs
      cast where they are used, float32 accumulation, results in the residual stream's dtype
      (`lacax.model.precision`); None = each weight's own dtype. Mixed-precision training sets "bfloat16" over
      float32 master weights and a float32 residual stream (`lacax.train.lm`).
  """

  layer_gate: jax.Array | None = None
  head_mask: jax.Array | None = None
  ffn_mask: jax.Array | None = None
  lora: Any = None
  lora_rng: jax.Array | None = None
  layers: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)
  hidden_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  logits: bool = flax.struct.field(pytree_node=False, default=True)
  lora_config: Any = flax.struct.field(pytree_node=False, default=None)
  probs_hook: ProbsHook | None = flax.struct.field(pytree_node=False, default=None)
  scores: ScoreRecording | None = flax.struct.field(pytree_node=False, default=None)
  mesh_rules: Any = flax.struct.field(pytree_node=False, default=None)
  dot_dtype: str | None = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class ForwardOutput:
  """What `run` returns: logits [B, T, V] float32 (or [B, 1, V] with `logits_index`; None with
  `options.logits=False`), the updated cache (None without one), and hidden [len(hidden_layers), B, T, D]
  (None when no hidden layer is asked for)."""

  logits: jax.Array | None
  cache: KVCache | None
  hidden: jax.Array | None = None


def layer_segments(params: Params) -> list[dict[str, Any]]:
  """`params["layers"]` as a list of segments (one for a homogeneous model)."""
  layers = params["layers"]
  return list(layers) if isinstance(layers, (list, tuple)) else [layers]


def _num_stacked(segment: dict[str, Any]) -> int:
  return int(segment["attn_norm"].shape[0])


def unembed(params: Params, x: jax.Array, cfg: ModelConfig, *, stream: bool = False, dot_dtype=None) -> jax.Array:
  """Logits [B, T, V] float32 of residual-stream states x [B, T, D]: final norm, then the LM head.

  `stream` (static): a dense head of a kernel dtype is read by the CPU weight-streaming kernel where it applies
  (`run` sets it for decode steps; the numbers equal the einsum's up to float32 summation order).
  `dot_dtype`: the head's product dtype (`project`; None: the head's own when x has it too)."""
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
  if isinstance(head, ProjectedWeight):
    return project(x, head, "btd,vd->btv", preferred_element_type=jnp.float32)
  head = head.astype(cfg.jnp_dtype)
  equation = cpu_quant_matmul.ROWS_EQUATION
  if stream and cpu_quant_matmul.supports_rows(head.shape, x, equation, dtype=head.dtype):
    reference = lambda x, table, scales, mins: jnp.einsum(equation, x, table, preferred_element_type=jnp.float32)
    return cpu_quant_matmul.project_rows(x, head, None, None, reference, preferred_element_type=jnp.float32)
  return project(x, head, equation, preferred_element_type=jnp.float32, dot_dtype=dot_dtype)


def embed_tokens(table: Any, tokens: jax.Array, dtype) -> jax.Array:
  """The embeddings [..., D] in `dtype` of token ids: rows of the table [V, D] (a dense array, or a
  `ProjectedWeight` with a `lookup(tokens, dtype)` such as `lacax.model.quantized.PackedTable`)."""
  if isinstance(table, ProjectedWeight):
    return table.lookup(tokens, dtype)
  if jnp.dtype(table.dtype).itemsize == 2 and jnp.issubdtype(table.dtype, jnp.floating):
    return _take_rows_16bit(table, tokens).astype(dtype)
  return table[tokens].astype(dtype)  # the rows, not the whole table, cast


@jax.custom_jvp
def _take_rows_16bit(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """table[tokens] for a bfloat16 / float16 table, gathered as uint16 bits. XLA:CPU upcasts a 16-bit float
  gather to float32 over its whole operand (float normalisation), and inside a decode loop it hoists that
  convert out of the loop: every decode call made a float32 copy of the embedding table (113 MB and 0.5 ms for
  SmolLM2's [49152, 576]) to read one row per step. Integer rows are gathered as they are. The derivative is
  the plain gather's."""
  bits = jax.lax.bitcast_convert_type(table, jnp.uint16)[tokens]
  return jax.lax.bitcast_convert_type(bits, table.dtype)


@_take_rows_16bit.defjvp
def _take_rows_16bit_jvp(primals, tangents):
  table, tokens = primals
  return _take_rows_16bit(table, tokens), tangents[0][tokens]


def _check_options(options: ForwardOptions, cfg: ModelConfig, num_layers: int) -> None:
  """Shape checks of the options (trace time), each naming the field."""
  L = num_layers
  if options.layer_gate is not None and tuple(options.layer_gate.shape) != (L,):
    raise ValueError(f"ForwardOptions.layer_gate has shape {tuple(options.layer_gate.shape)}; expected ({L},)")
  for name, width in (("head_mask", cfg.num_heads), ("ffn_mask", cfg.intermediate_size)):
    mask = getattr(options, name)
    if mask is not None and tuple(mask.shape) not in ((width,), (L, width)):
      raise ValueError(f"ForwardOptions.{name} has shape {tuple(mask.shape)}; expected ({width},) or "
                       f"({L}, {width})")
  if options.layers is not None:
    layers = tuple(options.layers)
    if any(not 0 <= i < L for i in layers) or list(layers) != sorted(set(layers)):
      raise ValueError(f"ForwardOptions.layers={layers} must be distinct ascending layer indices in [0, {L})")
  for j in options.hidden_layers:
    if not 0 <= j <= L:
      raise ValueError(f"ForwardOptions.hidden_layers contains {j}; expected indices in [0, {L}]")
  dtype_of(options.dot_dtype, "ForwardOptions.dot_dtype")
  if options.lora is not None:
    if options.lora_config is None:
      raise ValueError("ForwardOptions.lora is set but lora_config is None (it gives the scale alpha / r)")
    for seg in (options.lora if isinstance(options.lora, (list, tuple)) else [options.lora]):
      unknown = sorted(set(seg) - set(LORA_TARGETS))
      if unknown:
        raise ValueError(f"ForwardOptions.lora targets {unknown}; expected a subset of {sorted(LORA_TARGETS)}")


def _record_stats(stats: CacheStats, layer: jax.Array, slots: jax.Array, positions: jax.Array, q_pre: jax.Array,
                  q: jax.Array, v_new: jax.Array, wo: Any, kv_cache: int, num_heads: int) -> CacheStats:
  """`stats` with layer `layer`'s statistics of this step recorded (what `stats.recording` asks for).

  Args:
    stats: the cache's statistics (float32 arrays, see `CacheStats`).
    layer: the layer index (traced, inside the scan).
    slots: [B, T] slots the step's tokens were written to (capacity = dropped, for padding).
    positions: [B, T] the tokens' original positions, -1 for padding.
    q_pre: [B, T, H_s, D] pre-RoPE queries (biases and adapters included); q: [B, T, KV_s, G_s, D] the same
      rotated as the attention reads them.
    v_new: [B, T, KV_s, D] the step's values; wo: the layer's output projection [H_s, D, model width] (or a
      `ProjectedWeight`; the value norm uses its dense weight, as kvpress reads `o_proj.weight`).
    kv_cache, num_heads: the cache's kv heads and the model's query heads (a narrower segment is padded).
  """
  rec = stats.recording
  f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
  B, T, kv_s, g_s, hd = q.shape
  pad_kv = [(0, 0), (0, 0), (0, kv_cache - kv_s)]
  out = {}
  if rec.value_norm:  # kvpress CriticalKVPress.vwl1norm: |v_h W_o[h]|_1 over the model width, mean over the group
    w = (wo.dense() if isinstance(wo, ProjectedWeight) else wo).astype(f32)
    w = w.reshape(kv_s, g_s, hd, w.shape[-1])
    norm = jnp.zeros((B, T, kv_s), f32)
    for g in range(g_s):  # one query head per kv head at a time: [B, T, KV, width], not [B, T, H, width]
      norm = norm + jnp.sum(jnp.abs(jnp.einsum("btkd,kde->btke", v_new.astype(f32), w[:, g], precision=hi)), -1)
    norm = jnp.pad(norm / g_s, pad_kv)
    out["value_norm"] = _write_layer(stats.value_norm, norm, layer, slots)
  if rec.window_q2:  # ThinK: mean over the window and the group of the squared rotated queries
    rows, row_pos = last_query_rows(q.astype(f32), positions, rec.window_q2)
    weight = (row_pos >= 0).astype(f32)  # a row shorter than the window averages its own queries
    count = jnp.sum(weight, axis=1)
    q2 = jnp.einsum("bt,btkgd->bkd", weight, rows * rows, precision=hi)
    q2 = q2 / (jnp.maximum(count, 1.0) * g_s)[:, None, None]
    q2 = jnp.pad(q2, [(0, 0), (0, kv_cache - kv_s), (0, 0)])
    old = stats.window_q2[layer]
    out["window_q2"] = stats.window_q2.at[layer].set(jnp.where((count > 0)[:, None, None], q2, old))
  if rec.queries:  # per-slot pre-RoPE queries, grouped by kv head (NonCausalAttn, Compactor)
    g_full = stats.queries.shape[4]
    grouped = q_pre.astype(f32).reshape(B, T, kv_s, g_s, hd)
    grouped = jnp.pad(grouped, [(0, 0), (0, 0), (0, kv_cache - kv_s), (0, g_full - g_s), (0, 0)])
    out["queries"] = _write_layer(stats.queries, grouped, layer, slots)
  if rec.query_moments is not None:  # ExpectedAttention online: moments of the queries at positions >= n_sink
    weight = (positions >= rec.query_moments).astype(f32)
    qf = q_pre.astype(f32)
    pad_h = [(0, 0), (0, num_heads - qf.shape[2]), (0, 0)]
    q_sum = jnp.pad(jnp.einsum("bt,bthd->bhd", weight, qf, precision=hi), pad_h)
    q_outer = jnp.pad(jnp.einsum("bt,bthd,bthe->bhde", weight, qf, qf, precision=hi), pad_h + [(0, 0)])
    out["q_count"] = stats.q_count.at[layer].add(jnp.sum(weight, axis=1))
    out["q_sum"] = stats.q_sum.at[layer].add(q_sum)
    out["q_outer"] = stats.q_outer.at[layer].add(q_outer)
  return stats.replace(**out)


def _advance_cursors(carry: tuple, ids: np.ndarray, positions: jax.Array, n_new: jax.Array, pad: int,
                     capacity: int) -> tuple[tuple, jax.Array]:
  """The cache bookkeeping of a step for the layers `ids` of a segment at once, before its scan: the slots the
  new tokens go to in each layer ([len(ids), B, T], `write_slots` at each layer's cursor), their positions
  written there (the segment's kv heads; `pad` more heads of the cache stay empty) and the cursors advanced by
  the real tokens. None of it depends on a layer's activations, and done per layer inside the scan it was a
  handful of small XLA ops per layer and step (about 10 us of a 135M model's 400 us bfloat16 decode layer)."""
  x, k_all, v_all, pos_all, length_all, *rest = carry
  B, T = positions.shape
  rows = jnp.asarray(ids, jnp.int32)
  slots = jax.vmap(lambda length: write_slots(length, positions, capacity))(length_all[rows])
  token_pos = jnp.broadcast_to(positions[:, :, None], (B, T, pos_all.shape[-1] - pad))
  token_pos = jnp.pad(token_pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1) if pad else token_pos
  batch = jnp.arange(B)[None, :, None]
  pos_all = pos_all.at[rows[:, None, None], batch, slots].set(token_pos[None], mode="drop")
  length_all = length_all.at[rows].add(n_new[None])
  return (x, k_all, v_all, pos_all, length_all, *rest), slots


def _rows(value: jax.Array | None, ids: np.ndarray) -> jax.Array | None:
  """Rows `ids` of an [L, W] option; a [W] option is shared by every layer (None stays None)."""
  if value is None:
    return None
  return value[ids] if value.ndim == 2 else jnp.broadcast_to(value, (ids.size,) + value.shape)


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache | None, cfg: ModelConfig, *,
            logits_index: jax.Array | None = None, probs_hook: ProbsHook | None = None,
            options: ForwardOptions | None = None) -> tuple[jax.Array, KVCache | None]:
  """Runs the decoder over new tokens, appending their keys/values to the cache (if any); see `run`.

  `probs_hook` is shorthand for `options.probs_hook`. Returns (logits, cache) of `run`'s `ForwardOutput`.
  """
  if probs_hook is not None:
    options = (options or ForwardOptions()).replace(probs_hook=probs_hook)
  out = run(params, tokens, positions, cache, cfg, logits_index=logits_index, options=options)
  return out.logits, out.cache


def run(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache | None, cfg: ModelConfig, *,
        logits_index: jax.Array | None = None, options: ForwardOptions | None = None) -> ForwardOutput:
  """Runs the decoder over new tokens, appending their keys/values to the cache (if any).

  Args:
    params: the parameter pytree (layout in the module docstring).
    tokens: [B, T] int32 token ids.
    positions: [B, T] int32 original positions of the tokens, -1 for padding. With a cache, real tokens come
      first in each row (right padding); without one, padding may sit anywhere.
    cache: the KV cache; its `rope_mode` decides how keys are rotated and its `recording` which attention
      statistics are recorded. None runs without a cache (teacher-forced scoring, training): each token
      attends the given tokens of its row at positions <= its own (causal by position), keys rotated at their
      positions; the logits equal those of a prefill into an empty cache, and the function is differentiable.
    cfg: the model config (static under jit).
    logits_index: optional [B] int32: compute logits only at token index logits_index[b] of each row
      (saves the [B, T, V] projection during prefill).
    options: the extension points (`ForwardOptions`); None = the plain forward.

  Returns:
    A `ForwardOutput`: logits [B, T, V] float32 ([B, 1, V] with `logits_index`), the updated cache (slots
    written, `length` advanced by the number of real tokens per row; None without a cache) and the hidden
    states asked for.
  """
  options = options or ForwardOptions()
  B, T = tokens.shape
  dtype = cfg.jnp_dtype
  segments = layer_segments(params)
  num_layers = sum(_num_stacked(s) for s in segments)
  if num_layers != cfg.num_layers:
    raise ValueError(f"params hold {num_layers} layers but ModelConfig.num_layers={cfg.num_layers}")
  if cfg.layer_shapes is not None:
    got = tuple((_num_stacked(seg), int(seg["wq"].shape[-2]), int(seg["wk"].shape[-2]), int(seg["w_gate"].shape[-1]))
                for seg in segments)
    if got != cfg.layer_shapes:
      raise ValueError(f"params hold layer segments {got}; ModelConfig.layer_shapes={cfg.layer_shapes}")
  _check_options(options, cfg, num_layers)
  inv_freq = rope_lib.inv_frequencies(cfg)
  x = embed_tokens(params["embed"], tokens, dtype)
  uncached = cache is None
  mesh_rules = options.mesh_rules if options.mesh_rules is not None else (None if uncached else cache.mesh_rules)
  if mesh_rules is not None:  # on a mesh: batch rows split over the data axes (lacax.sharding)
    x = mesh_rules.constrain(x, ("batch", None, None))
    if not uncached:
      cache = mesh_rules.constrain_cache(cache)
  recording = None if uncached else (options.scores or cache.recording)
  if recording is not None and cache.scores is None:
    raise ValueError(f"recording attention statistics ({recording}) needs a cache with scores (built with "
                     "score_mode); this cache has none")
  score_weights = None if recording is None else recording.query_weights(positions)
  # A "window" / "last" statistic reads only the last W queries of the step: a long step (a prefill) computes
  # the probabilities of those rows alone, beside an attention that needs none (static; 0 = all rows). With a
  # probability hook (ACT) the statistic is taken from the hooked probabilities of every row, as before.
  window_rows = 0
  if recording is not None and recording.kind in ("window", "last") and options.probs_hook is None:
    width = recording.width if recording.kind == "window" else 1
    window_rows = width if T > width else 0
  probs_hook = options.probs_hook
  kv_cache = cfg.num_kv_heads if uncached else cache.k.shape[3]
  quantized = not uncached and cache.quantized  # int8 keys / values with per-token scales
  if uncached:
    write = None
  elif mesh_rules is None and cache.k.dtype in cpu_attention.WRITE_DTYPES and cpu_attention.available():
    write = functools.partial(cpu_attention.cache_write, reference=_write_layer)  # in place on CPU
  else:
    write = _write_layer
  # Rotation tables are the same in every layer: built once per forward, not once per layer.
  rope_mode = "stored" if uncached else cache.rope_mode
  if rope_mode == "slot":  # the cache's slots (queries are rotated at theirs, which vary by layer)
    slot_cos, slot_sin = rope_lib.rope_table(jnp.arange(cache.capacity, dtype=jnp.int32)[None, :, None], inv_freq)
    slot_rows = (slot_cos[0, :, 0], slot_sin[0, :, 0])  # [capacity, hd]: the kernel's tables, the queries' lookup
  else:  # the new tokens' own positions (queries; keys too when stored rotated, or without a cache)
    new_cos, new_sin = rope_lib.rope_table(positions[:, :, None], inv_freq)
  n_new = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)
  lora_cfg = options.lora_config
  stream = _streams_weights(uncached, mesh_rules, B * T)

  def lora_delta(name, inp, lora_p, rng):
    """scale * b(a(dropout(inp))) for projection `name`, or None when it carries no adapter."""
    if lora_p is None or name not in lora_p:
      return None
    eq_a, eq_b = LORA_TARGETS[name]
    if rng is not None and lora_cfg.dropout > 0:
      key = jax.random.fold_in(rng, list(LORA_TARGETS).index(name))
      keep = jax.random.bernoulli(key, 1.0 - lora_cfg.dropout, inp.shape)
      inp = jnp.where(keep, inp / (1.0 - lora_cfg.dropout), 0).astype(inp.dtype)
    code = jnp.einsum(eq_a, inp, lora_p[name]["a"].astype(inp.dtype))
    return jnp.asarray(lora_cfg.scale, inp.dtype) * jnp.einsum(eq_b, code, lora_p[name]["b"].astype(inp.dtype))

  def projections(names, inp, p, equation, lora_p, rng):
    """The projections `names` of one input (`project_group`), each with its LoRA delta."""
    ys = project_group(inp, [p[name] for name in names], equation, dot_dtype=options.dot_dtype)
    out = []
    for name, y in zip(names, ys):
      delta = lora_delta(name, inp, lora_p, rng)
      out.append(y if delta is None else y + delta.astype(y.dtype))
    return tuple(out)

  def projection(name, inp, p, equation, lora_p, rng):
    (y,) = projections((name,), inp, p, equation, lora_p, rng)
    return y

  def layer_body(kv_s, g_s, use_cpu_kernel, in_place):
    """The decoder layer for a segment of kv_s kv heads with g_s query heads each; `in_place` holds the stacked
    weights that read their layer in place (`ProjectedWeight.at_layer`) instead of being sliced by the scan."""
    pad = kv_cache - kv_s

    def pad_heads(a, value=0):  # [B, T, kv_s, ...] -> [B, T, kv_cache, ...]
      return a if not pad else jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3),
                                       constant_values=value)

    def layer(carry, inputs):
      x, k_all, v_all, pos_all, length_all, scores_all, ks_all, vs_all, stats_all = carry
      (p, step), i, slots, gate, head_mask, ffn_mask, lora_p = inputs
      p = {**p, **{name: w.at_layer(step) for name, w in in_place.items()}}
      rng = None if options.lora_rng is None else jax.random.fold_in(options.lora_rng, i)
      x_in = x
      h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
      q, k_new, v_new = projections(("wq", "wk", "wv"), h, p, "btd,dhk->bthk", lora_p, rng)
      if cfg.attention_bias:
        q, k_new, v_new = q + p["bq"], k_new + p["bk"], v_new + p["bv"]
      q_pre = q  # [B, T, H_s, hd] before RoPE (the query moments' input)
      if rope_mode == "stored":  # keys enter the cache rotated at their original position
        k_new = rope_lib.rotate(k_new, new_cos, new_sin)
      hook = None if probs_hook is None else (lambda probs: probs_hook(probs, i))
      token_pos = jnp.broadcast_to(positions[:, :, None], (B, T, kv_s))

      if uncached:  # attend the given tokens themselves
        q = rope_lib.rotate(q, new_cos, new_sin).reshape(B, T, kv_s, g_s, cfg.head_dim)
        out, probs = attention(q, k_new, v_new, token_pos, positions, hook, need_probs=False)
      else:
        # Write the new tokens at the layer's cursor, `slots` (padding goes to slot S and is dropped); a layer
        # with fewer kv heads than the cache leaves the others empty. Their positions, and the cursors, were
        # written for every layer of the segment before its scan (`_advance_cursors`).
        if quantized:  # int8 cache: per-token scales beside the values (lacax.cache.kv_cache.quantize_kv)
          (k_q, k_s), (v_q, v_s) = quantize_kv(k_new), quantize_kv(v_new)
          k_all = _write_layer(k_all, pad_heads(k_q), i, slots)
          v_all = _write_layer(v_all, pad_heads(v_q), i, slots)
          ks_all = _write_layer(ks_all, pad_heads(k_s), i, slots)
          vs_all = _write_layer(vs_all, pad_heads(v_s), i, slots)
        else:
          k_all = write(k_all, pad_heads(k_new.astype(k_all.dtype)), i, slots)
          v_all = write(v_all, pad_heads(v_new.astype(v_all.dtype)), i, slots)
        if rope_mode == "slot":
          # apply_rope(q, slots[:, :, None], inv_freq) by a lookup of the slot table, not a cos/sin of its own in
          # every layer (a 5 us fusion per layer and step of SmolLM2's bfloat16 decode). Padding tokens (slot
          # `capacity`, dropped) are rotated at the last slot instead: nothing reads their outputs.
          cos_q, sin_q = (jnp.take(rows, slots, axis=0, mode="clip")[:, :, None] for rows in slot_rows)
          q = rope_lib.rotate(q, cos_q, sin_q)
        else:
          q = rope_lib.rotate(q, new_cos, new_sin)
        q = q.reshape(B, T, kv_s, g_s, cfg.head_dim)

        if use_cpu_kernel:  # reads the layer straight from the stacked cache (see lacax.model.cpu_attention)
          tables = slot_rows if rope_mode == "slot" else ()
          scales = dict(k_scale=ks_all, v_scale=vs_all) if quantized else {}
          out = cpu_attention.decode_attention(pad_heads(q), k_all, v_all, pos_all, positions, i,
                                               _cached_layer_attention, *tables, **scales)
          out = out[:, :, :kv_s] if pad else out
          probs = None
        else:
          k_layer, v_layer, pos_layer = k_all[i], v_all[i], pos_all[i]
          if quantized:
            k_layer, v_layer = dequantize_kv(k_layer, ks_all[i], dtype), dequantize_kv(v_layer, vs_all[i], dtype)
          if pad:
            k_layer, v_layer, pos_layer = k_layer[:, :, :kv_s], v_layer[:, :, :kv_s], pos_layer[:, :, :kv_s]
          if rope_mode == "slot":
            k_layer = rope_lib.rotate(k_layer, slot_cos, slot_sin)
          elif rope_mode == "original":
            k_layer = rope_lib.apply_rope(k_layer, pos_layer, inv_freq)
          out, probs = attention(q, k_layer, v_layer, pos_layer, positions, hook,
                                 need_probs=score_weights is not None and not window_rows,
                                 sharded=mesh_rules is not None)
          if window_rows:  # only the rows the statistic reads: [B, KV, G, W, S]
            q_rows, row_pos = last_query_rows(q, positions, window_rows)
            probs = attention_probs(q_rows, k_layer, pos_layer, row_pos)
        if stats_all is not None:
          stats_all = _record_stats(stats_all, i, slots, positions, q_pre, q, v_new, p["wo"], kv_cache, cfg.num_heads)
      out = out.reshape(B, T, kv_s * g_s, cfg.head_dim)
      if head_mask is not None:
        out = out * head_mask[:kv_s * g_s, None].astype(out.dtype)
      attn = projection("wo", out, p, "bthk,hkd->btd", lora_p, rng)
      if "bo" in p:
        attn = attn + p["bo"]
      x = x + attn

      if score_weights is not None:
        weights = recording.row_weights(row_pos) if window_rows else score_weights
        received = jnp.einsum("bkts,bt->bsk", recording.reduce_heads(probs), weights)
        if pad:
          received = jnp.pad(received, ((0, 0), (0, 0), (0, pad)))
        if recording.kind == "accumulate":
          received = received + scores_all[i]
        scores_all = scores_all.at[i].set(received)

      h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
      gate_out, up = projections(("w_gate", "w_up"), h, p, "btd,df->btf", lora_p, rng)
      # silu in float32, rounded once, as PyTorch computes it for a bfloat16 tensor (XLA:CPU otherwise rounds after
      # each of its five ops: a 4-9 us fusion per bfloat16 decode layer, and further from Hugging Face's logits).
      act = jax.nn.silu(gate_out.astype(jnp.float32)).astype(gate_out.dtype) * up
      if ffn_mask is not None:
        act = act * ffn_mask[:act.shape[-1]].astype(act.dtype)
      mlp = projection("w_down", act, p, "btf,fd->btd", lora_p, rng)
      if "b_down" in p:
        mlp = mlp + p["b_down"]
      x = x + mlp
      if gate is not None:  # a layer that is off passes the residual stream through exactly
        x = jnp.where(gate != 0, x, x_in)
      return ((x, k_all, v_all, pos_all, length_all, scores_all, ks_all, vs_all, stats_all),
              (x if options.hidden_layers else None))

    if not uncached:  # the cache rows of an off layer are still written (a later call may turn it on)
      return layer

    def skipping_layer(carry, inputs):
      """Without a cache, a traced gate of 0 skips the layer's computation (lax.cond), not just its result."""
      gate = inputs[3]
      if gate is None:
        return layer(carry, inputs)
      ungated = inputs[:3] + (None,) + inputs[4:]
      skipped = (carry, carry[0] if options.hidden_layers else None)
      return jax.lax.cond(gate != 0, lambda: layer(carry, ungated), lambda: skipped)

    return skipping_layer

  if uncached:
    empty = jnp.zeros((), jnp.float32)
    carry = (x, empty, empty, empty, empty, empty, empty, empty, None)
  else:
    empty = jnp.zeros((), jnp.float32)
    scores = cache.scores if cache.scores is not None else empty
    carry = (x, cache.k, cache.v, cache.pos, cache.length, scores, cache.k_scale if quantized else empty,
             cache.v_scale if quantized else empty, cache.stats)
  lora_segments = None
  if options.lora is not None:
    lora_segments = list(options.lora) if isinstance(options.lora, (list, tuple)) else [options.lora]
    if len(lora_segments) != len(segments):
      raise ValueError(f"ForwardOptions.lora has {len(lora_segments)} segment(s); params have {len(segments)}")
  hidden_steps = [x] if options.hidden_layers else None  # residual after 0, 1, ... executed layers
  executed = []  # global index of each executed layer, in order
  start = 0
  for s, seg in enumerate(segments):
    num_stacked = _num_stacked(seg)
    stop = start + num_stacked
    h_s, kv_s = int(seg["wq"].shape[-2]), int(seg["wk"].shape[-2])
    if h_s % kv_s or kv_s > kv_cache:
      raise ValueError(f"layer segment {s}: {h_s} query heads must be a multiple of its {kv_s} kv heads, and "
                       f"kv heads at most the cache's {kv_cache}")
    g_s = h_s // kv_s
    ids = np.arange(start, stop)
    if options.layers is not None:
      ids = np.asarray([i for i in options.layers if start <= i < stop], np.int64)
    if ids.size:
      local = ids - start
      select = (lambda a: a) if ids.size == num_stacked else (lambda a: a[local])  # noqa: E731
      seg_p = jax.tree.map(select, seg)
      lora_p = None if lora_segments is None else jax.tree.map(select, lora_segments[s])
      gate = None if options.layer_gate is None else options.layer_gate[ids]
      use_cpu_kernel = (not uncached and probs_hook is None and score_weights is None and mesh_rules is None
                        and cpu_attention.supports(T, kv_cache, g_s, cfg.head_dim, dtype, cache.k.dtype,
                                                   cache.rope_mode)
                        and cpu_attention.available())
      # Weights that can read their layer out of the stacked leaves stay out of the scanned inputs: XLA:CPU
      # would copy each layer's slice before a custom call (the low-bit matmul) could read it.
      if stream:  # dense projections as in-place views for the CPU weight-streaming kernel
        seg_p = {name: StreamedWeight(w) if name in LORA_TARGETS and isinstance(w, jax.Array) else w
                 for name, w in seg_p.items()}
      in_place = {name: w for name, w in seg_p.items()
                  if isinstance(w, ProjectedWeight) and w.reads_layers_in_place}
      sliced = {name: w for name, w in seg_p.items() if name not in in_place}
      seg_slots = None
      if not uncached:
        carry, seg_slots = _advance_cursors(carry, ids, positions, n_new, kv_cache - kv_s, cache.capacity)
      xs = ((sliced, jnp.arange(ids.size, dtype=jnp.int32)), jnp.asarray(ids, jnp.int32), seg_slots, gate,
            _rows(options.head_mask, ids), _rows(options.ffn_mask, ids), lora_p)
      carry, ys = jax.lax.scan(layer_body(kv_s, g_s, use_cpu_kernel, in_place), carry, xs)
      if hidden_steps is not None:
        hidden_steps.extend(ys[n] for n in range(ids.size))
      executed.extend(int(i) for i in ids)
    start = stop
  x, k_all, v_all, pos_all, length_all, scores, k_scale, v_scale, stats = carry

  hidden = None
  if options.hidden_layers:
    # The residual after j layers = after the last executed layer with index < j (skipped ones pass through).
    picks = [sum(1 for i in executed if i < j) for j in options.hidden_layers]
    hidden = jnp.stack([hidden_steps[n] for n in picks])

  logits = None
  if options.logits:
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[:, None, None].astype(jnp.int32), axis=1)
    logits = unembed(params, x, cfg, stream=stream, dot_dtype=options.dot_dtype)
  if uncached:
    return ForwardOutput(logits, None, hidden)
  cache = cache.replace(k=k_all, v=v_all, pos=pos_all, length=length_all,
                        scores=scores if cache.scores is not None else None, stats=stats)
  if quantized:
    cache = cache.replace(k_scale=k_scale, v_scale=v_scale)
  if mesh_rules is not None:
    cache = mesh_rules.constrain_cache(cache)
  return ForwardOutput(logits, cache, hidden)

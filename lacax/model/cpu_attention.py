"""Cached attention (decode and prefill) as an XLA:CPU custom call (`cpu_attention.cc`), built on first use.

Inside the decoder's `lax.scan`, XLA:CPU copies each layer's slice of the stacked KV cache before its dot
products read it, and the few-column products of decode run well below memory bandwidth: at 4k slots the
attention of SmolLM2-135M cost about as much as all its weights. The kernel in `cpu_attention.cc` reads the
layer straight from the stacked cache (the layer index is an operand), once, with an online softmax split
over slot ranges on XLA's intra-op thread pool, rotating pre-RoPE keys on the fly (rope_mode "slot").

It is an implementation detail of `lacax.model.llama.forward`, used only where it computes exactly what the
pure-JAX formulation computes (`llama.attention` is the reference, and the path everywhere else):
  * XLA:CPU (`lax.platform_dependent`: other backends never see the custom call), float32 or bfloat16
    queries and cache (arithmetic in float32: with bfloat16 the reference rounds rotated keys and
    probabilities to bfloat16 first, the kernel does not), or an int8 cache with per-token scales
    (lacax.cache.int8: the kernel dequantizes as it reads, one byte per element, where the reference
    dequantizes the whole layer to the model's dtype first; the result has the queries' dtype);
  * any number of query rows: up to 64 (T * KV * G, decode) an online softmax split over slot ranges; more
    (prefill, chunked prefill) a blocked kernel over tiles of 64 query rows x 64 slots that skips key blocks
    no query of a tile can see (the causal future of a prefill) and masks only blocks that need it;
  * head_dim 32, 64 or 128, at most 64 query heads per kv head;
  * no probability hook (ACT), no recorded attention scores (H2O, TOVA, SnapKV, PyramidKV), no mesh;
  * rope_mode "slot" (keys rotated at their slot) or "stored" (keys cached rotated); "original" is not.
Differentiation goes through the reference (a custom JVP), so gradients never need the kernel.

The same library writes new keys/values of 16-bit caches into the stacked cache in place (`cache_write`):
XLA:CPU's float normalisation turns a bfloat16 dynamic-update-slice into float32 converts of the whole
operand, i.e. of the entire stacked cache, twice per layer and step (SmolLM2 bfloat16 decode at 4k tokens:
2.9 tok/s with the plain scatter).

The library is built at first use by `lacax.model.cpu_kernels` (the one build, cache and checksum mechanism
of lacax's CPU kernels; its docstring says where the cache lives and how a corrupt one is rebuilt). Without a
compiler, or if the build fails, lacax logs one warning, "lacax: CPU decode-attention kernel unavailable,
using the pure-JAX path (<why>)", and uses the pure-JAX path. `LACAX_CPU_KERNELS=0` turns the kernel off;
`set_enabled` does the same from Python (call `jax.clear_caches()` afterwards: the choice is made when a
function is traced).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import cpu_kernels

SOURCE = Path(__file__).with_name("cpu_attention.cc")
_TARGETS = {"lacax_decode_attention": "LacaxDecodeAttention", "lacax_decode_attention_int8": "LacaxDecodeAttentionInt8",
            "lacax_cache_write": "LacaxCacheWrite"}
HEAD_DIMS = (32, 64, 128)
DECODE_ROWS = 64  # T * KV * G up to which the decode path runs; more rows take the blocked (prefill) path
MAX_GROUP = 64  # query heads per kv head

KERNELS = cpu_kernels.KernelLibrary(SOURCE, _TARGETS, "CPU decode-attention kernel")


def set_enabled(enabled: bool) -> None:
  """Turns the kernel on or off for functions traced from now on (see the module docstring)."""
  KERNELS.set_enabled(enabled)


def available() -> bool:
  """Whether the kernel is enabled, built and registered (builds it on the first call). False unless the
  default backend is the CPU: no build, and no warning, on GPU/TPU hosts."""
  return KERNELS.available()


def bf16_products() -> bool:
  """Whether the decode path takes bfloat16 queries and caches in bfloat16 products (vdpbf16ps: the build has
  AVX-512 BF16), rounding the weights and the rotated keys to bfloat16 as the model's bfloat16 reference does;
  otherwise it computes in float32."""
  return KERNELS.query("LacaxAttentionBf16Products") == 1


def supports(T: int, KV: int, G: int, head_dim: int, dtype, cache_dtype, rope_mode: str) -> bool:
  """Static check: can the kernel compute this attention (T new tokens, KV kv heads of G queries each)?"""
  floats = (jnp.float32, jnp.bfloat16)
  return (jnp.dtype(dtype) in floats and jnp.dtype(cache_dtype) in floats + (jnp.int8,) and head_dim in HEAD_DIMS
          and G <= MAX_GROUP and rope_mode in ("slot", "stored"))


def _call(q, k_all, v_all, pos_all, query_pos, layer, cos, sin, *scales, rotate: bool, target: str | None = None):
  """The custom call; `scales` = (k_scale, v_scale) for an int8 cache (the result then has q's dtype)."""
  default, out_dtype = ("lacax_decode_attention_int8", q.dtype) if scales else ("lacax_decode_attention", v_all.dtype)
  target = target or default
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, out_dtype), vmap_method="sequential")(
      q, k_all, v_all, pos_all, query_pos.astype(jnp.int32), jnp.asarray(layer, jnp.int32), cos, sin, *scales,
      rotate=np.int64(rotate))


def decode_attention(q: jax.Array, k_all: jax.Array, v_all: jax.Array, pos_all: jax.Array, query_pos: jax.Array,
                     layer: jax.Array, reference, slot_cos: jax.Array | None = None,
                     slot_sin: jax.Array | None = None, k_scale: jax.Array | None = None,
                     v_scale: jax.Array | None = None) -> jax.Array:
  """Attention of q over layer `layer` of the stacked cache: the kernel on CPU, `reference` elsewhere.

  Args:
    q: [B, T, KV, G, hd] rotated queries (float32 or bfloat16).
    k_all, v_all: [L, B, S, KV, hd] the stacked cache (keys pre-RoPE when slot tables are given); the result
      has their dtype (q's for an int8 cache).
    pos_all: [L, B, S, KV] int32 original positions (-1 empty).
    query_pos: [B, T] int32 (-1 padding).
    layer: int32 scalar layer index.
    reference: the pure-JAX equivalent, a function of the same arguments (used on other backends and for
      derivatives).
    slot_cos, slot_sin: [S, hd] rotation tables at the slot indices (rope_mode "slot"), or None.
    k_scale, v_scale: [L, B, S, KV] float32 scales of an int8 cache (lacax.cache.kv_cache.quantize_kv), else
      None; `reference` then takes them as two more arguments.
  """
  rotate = slot_cos is not None
  if not rotate:
    slot_cos = slot_sin = jnp.zeros((1, q.shape[-1]), jnp.float32)
  scales = () if k_scale is None else (k_scale, v_scale)
  if (k_scale is None) != (v_scale is None) or (jnp.dtype(k_all.dtype) == jnp.int8) != bool(scales):
    raise ValueError(f"decode_attention: an int8 cache takes k_scale and v_scale, a float one neither (cache "
                     f"{k_all.dtype}, k_scale {None if k_scale is None else k_scale.shape}, v_scale "
                     f"{None if v_scale is None else v_scale.shape})")

  def _reference(q, k_all, v_all, pos_all, query_pos, layer, cos, sin, *scales):
    return reference(q, k_all, v_all, pos_all, query_pos, layer, *((cos, sin) if rotate else (None, None)), *scales)

  kernel = lambda *args: _call(*args, rotate=rotate)
  return cpu_kernels.on_cpu(kernel, _reference, q, k_all, v_all, pos_all, query_pos, layer, slot_cos, slot_sin,
                            *scales)


# Cache dtypes whose writes go through the kernel library: XLA:CPU's float normalisation turns a 16-bit
# dynamic-update-slice into float32 converts of the whole stacked cache (twice per layer and step).
WRITE_DTYPES = (jnp.bfloat16, jnp.float16)


def cache_write(cache: jax.Array, update: jax.Array, layer: jax.Array, slots: jax.Array, reference) -> jax.Array:
  """cache[layer, b, slots[b, t]] = update[b, t] in place on CPU (out-of-range slots dropped); `reference`
  (same arguments) elsewhere and for derivatives.

  Args:
    cache: [L, B, S, KV, hd] stacked keys or values.
    update: [B, T, KV, hd] in the cache's dtype.
    layer: int32 scalar.
    slots: [B, T] int32.
  """
  kernel = lambda cache, update, layer, slots: jax.ffi.ffi_call(
      "lacax_cache_write", jax.ShapeDtypeStruct(cache.shape, cache.dtype), input_output_aliases={0: 0},
      vmap_method="sequential")(cache, update, layer, slots)
  return cpu_kernels.on_cpu(kernel, reference, cache, update.astype(cache.dtype), jnp.asarray(layer, jnp.int32),
                            slots.astype(jnp.int32))

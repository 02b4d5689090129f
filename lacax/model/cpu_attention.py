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
    probabilities to bfloat16 first, the kernel does not);
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

Building needs a C++17 compiler (`$CXX`, else `c++`/`g++`/`clang++`) and the XLA FFI headers that jaxlib
ships (`jax.ffi.include_dir()`). The shared library is compiled with `-O3 -march=native` into
`$LACAX_CACHE_DIR` (default `~/.cache/lacax`)/kernels, keyed by a hash of the source, the flags, the
compiler, jaxlib and the CPU. Each build is a directory renamed into place whole, with a manifest of the
library's size and SHA-256; the library is checked against it before it is loaded, so a truncated or
corrupt cached kernel is never mapped (no SIGBUS): it is deleted and rebuilt, with the warning
"lacax: cached CPU kernel is corrupt, rebuilding it: <file and what is wrong>". An interrupted build leaves
a `.partial-*` directory that no lookup reads and a later build deletes. Without a compiler, or if the
build fails, lacax logs one warning, "lacax: CPU decode-attention kernel unavailable, using the pure-JAX
path (<why>)", and uses the pure-JAX path. `LACAX_CPU_KERNELS=0` turns the kernel off; `set_enabled` does the
same from Python (call `jax.clear_caches()` afterwards: the choice is made when a function is traced).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_TARGETS = {"lacax_decode_attention": "LacaxDecodeAttention", "lacax_cache_write": "LacaxCacheWrite"}
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second for compilers that reject -march=native
HEAD_DIMS = (32, 64, 128)
DECODE_ROWS = 64  # T * KV * G up to which the decode path runs; more rows take the blocked (prefill) path
MAX_GROUP = 64  # query heads per kv head

_lock = threading.Lock()
_state: dict[str, object] = {"enabled": os.environ.get("LACAX_CPU_KERNELS", "1") != "0", "built": None}


def set_enabled(enabled: bool) -> None:
  """Turns the kernel on or off for functions traced from now on (see the module docstring)."""
  _state["enabled"] = bool(enabled)


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_fingerprint() -> str:
  """What -march=native depends on: the CPU model and its feature flags."""
  try:
    info = Path("/proc/cpuinfo").read_text()
    lines = [l for l in info.splitlines() if l.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
  root = os.environ.get("LACAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lacax")
  return Path(root) / "kernels"


# The cache holds one directory per build, `cpu_attention-<key>/` with `lib.so` and `manifest.json` (the
# library's size and SHA-256). A build happens in `.partial-<key>-<random>/` and is renamed into place
# whole, so an interrupted build leaves only a `.partial-*` directory, which no lookup reads and a later
# build sweeps away once it is an hour old (a younger one may belong to a build still running).
_LIBRARY = "lib.so"
_MANIFEST = "manifest.json"
_CACHE_FORMAT = b"lacax-kernel-cache-2"
_STALE_SECONDS = 3600.0


def _digest(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(build_dir: Path) -> Path | None:
  """The library of a finished build directory if its size and checksum match its manifest; else None
  (a corrupt build is moved aside and deleted, with a warning, so that it is rebuilt)."""
  if not build_dir.exists():
    return None
  library = build_dir / _LIBRARY
  try:
    manifest = json.loads((build_dir / _MANIFEST).read_text())
    size, sha = int(manifest["size"]), str(manifest["sha256"])
    actual = library.stat().st_size
    if actual != size:
      problem = f"{library} has {actual} bytes, its manifest records {size}"
    elif _digest(library) != sha:
      problem = f"{library} does not match the SHA-256 its manifest records"
    else:
      return library
  except (OSError, ValueError, KeyError, TypeError) as e:
    problem = f"{build_dir} is unreadable or incomplete ({type(e).__name__}: {e})"
  logging.warning("lacax: cached CPU kernel is corrupt, rebuilding it: %s", problem)
  _discard(build_dir)
  return None


def _discard(path: Path) -> None:
  """Removes a directory of the cache: renamed aside first (atomic), so no lookup sees it half-deleted.
  A process that has the library loaded keeps its mapping (unlinking never truncates the file)."""
  aside = path.with_name(f".discard-{path.name}-{os.getpid()}-{threading.get_ident()}")
  try:
    os.rename(path, aside)
  except OSError:
    return  # already moved or removed by another process
  shutil.rmtree(aside, ignore_errors=True)


def _sweep(root: Path) -> None:
  """Deletes what interrupted builds left: `.discard-*` at once, `.partial-*` (and the temporary files of
  older lacax versions) once they are an hour old."""
  now = time.time()
  for entry in root.iterdir():
    stale = entry.name.startswith(".discard-")
    if entry.name.startswith(".partial-") or (entry.name.startswith("tmp") and entry.suffix == ".so"):
      try:
        stale = now - entry.stat().st_mtime > _STALE_SECONDS
      except OSError:
        continue
    if stale:
      shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _build() -> Path:
  """Compiles cpu_attention.cc (once per source/compiler/CPU) and returns the verified shared library."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  include = jax.ffi.include_dir()
  source = _SOURCE.read_bytes()
  root = _cache_dir()
  root.mkdir(parents=True, exist_ok=True)
  _sweep(root)
  errors = []
  for flags in _FLAG_SETS:
    args = [*flags, "-std=c++17", "-shared", "-fPIC", "-I", include, str(_SOURCE)]
    key = hashlib.sha256(b"\0".join([_CACHE_FORMAT, source, " ".join(args).encode(), version.encode(),
                                     jax.__version__.encode(), _cpu_fingerprint().encode()])).hexdigest()[:16]
    final = root / f"cpu_attention-{key}"
    library = _verify(final)
    if library is not None:
      return library
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{key}-", dir=root))
    os.chmod(partial, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
      cmd = [cxx, *args, "-o", str(partial / _LIBRARY)]
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if result.returncode != 0:
        errors.append(f"{' '.join(cmd)}\n{result.stderr[-2000:]}")
        continue
      built = partial / _LIBRARY
      _fsync(built)
      manifest = {"size": built.stat().st_size, "sha256": _digest(built), "compiler": cxx, "flags": flags}
      (partial / _MANIFEST).write_text(json.dumps(manifest))
      _fsync(partial / _MANIFEST)
      try:
        os.rename(partial, final)  # atomic; fails if a concurrent build got there first
      except OSError:
        pass
      library = _verify(final)
      if library is not None:
        return library
      errors.append(f"the build in {final} did not verify")
    finally:
      shutil.rmtree(partial, ignore_errors=True)  # a no-op once renamed
  raise RuntimeError("compiling the CPU attention kernel failed:\n" + "\n".join(errors))


def available() -> bool:
  """Whether the kernel is enabled, built and registered (builds it on the first call). False unless the
  default backend is the CPU: no build, and no warning, on GPU/TPU hosts."""
  if not _state["enabled"] or jax.default_backend() != "cpu":
    return False
  with _lock:
    if _state["built"] is None:
      try:
        library = ctypes.CDLL(str(_build()))
        for target, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _state["library"] = library  # keep it loaded
        _state["built"] = True
      except Exception as e:  # any failure means: use the pure-JAX path
        logging.warning("lacax: CPU decode-attention kernel unavailable, using the pure-JAX path (%s)", e)
        _state["built"] = False
    return bool(_state["built"])


def supports(T: int, KV: int, G: int, head_dim: int, dtype, cache_dtype, rope_mode: str) -> bool:
  """Static check: can the kernel compute this attention (T new tokens, KV kv heads of G queries each)?"""
  floats = (jnp.float32, jnp.bfloat16)
  return (jnp.dtype(dtype) in floats and jnp.dtype(cache_dtype) in floats and head_dim in HEAD_DIMS
          and G <= MAX_GROUP and rope_mode in ("slot", "stored"))


def _call(q, k_all, v_all, pos_all, query_pos, layer, cos, sin, rotate: bool):
  return jax.ffi.ffi_call("lacax_decode_attention", jax.ShapeDtypeStruct(q.shape, v_all.dtype),
                          vmap_method="sequential")(
      q, k_all, v_all, pos_all, query_pos.astype(jnp.int32), jnp.asarray(layer, jnp.int32), cos, sin,
      rotate=np.int64(rotate))


def decode_attention(q: jax.Array, k_all: jax.Array, v_all: jax.Array, pos_all: jax.Array, query_pos: jax.Array,
                     layer: jax.Array, reference, slot_cos: jax.Array | None = None,
                     slot_sin: jax.Array | None = None) -> jax.Array:
  """Attention of q over layer `layer` of the stacked cache: the kernel on CPU, `reference` elsewhere.

  Args:
    q: [B, T, KV, G, hd] rotated queries (float32 or bfloat16).
    k_all, v_all: [L, B, S, KV, hd] the stacked cache (keys pre-RoPE when slot tables are given); the result
      has their dtype.
    pos_all: [L, B, S, KV] int32 original positions (-1 empty).
    query_pos: [B, T] int32 (-1 padding).
    layer: int32 scalar layer index.
    reference: the pure-JAX equivalent, a function of the same arguments (used on other backends and for
      derivatives).
    slot_cos, slot_sin: [S, hd] rotation tables at the slot indices (rope_mode "slot"), or None.
  """
  rotate = slot_cos is not None
  if not rotate:
    slot_cos = slot_sin = jnp.zeros((1, q.shape[-1]), jnp.float32)

  def _reference(q, k_all, v_all, pos_all, query_pos, layer, cos, sin):
    return reference(q, k_all, v_all, pos_all, query_pos, layer, *((cos, sin) if rotate else (None, None)))

  kernel = lambda *args: _call(*args, rotate=rotate)
  return _on_cpu(kernel, _reference, q, k_all, v_all, pos_all, query_pos, layer, slot_cos, slot_sin)


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
  return _on_cpu(kernel, reference, cache, update.astype(cache.dtype), jnp.asarray(layer, jnp.int32),
                 slots.astype(jnp.int32))


def _on_cpu(kernel, reference, *args):
  """kernel(*args) on XLA:CPU, reference(*args) on other backends; derivatives always from the reference."""
  fn = jax.custom_jvp(kernel)
  fn.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
  return jax.lax.platform_dependent(*args, cpu=fn, default=reference)

"""Building, caching and loading lacax's XLA:CPU custom-call kernels (the `cpu_*.cc` files beside this module).

One mechanism for every kernel source: the decode attention (`cpu_attention.cc`) and the low-bit matmul
(`cpu_quant_matmul.cc`) are each a `KernelLibrary`, compiled at first use and registered as XLA FFI targets.

Building needs a C++17 compiler (`$CXX`, else `c++`/`g++`/`clang++`) and the XLA FFI headers that jaxlib
ships (`jax.ffi.include_dir()`). A source is compiled with `-O3 -march=native` (so the vector code is AVX-512,
AVX2 or whatever the host has; plain `-O3` for compilers that reject it) into `$LACAX_CACHE_DIR` (default
`~/.cache/lacax`)/kernels, keyed by a hash of the source and the headers beside it, the flags, the compiler,
jaxlib and the CPU. Each build is a directory `<source stem>-<key>/` renamed into place whole, with a manifest
of the library's size and SHA-256; the library is checked against it before it is loaded, so a truncated or
corrupt cached kernel is never mapped (no SIGBUS): it is deleted and rebuilt, with the warning
"lacax: cached CPU kernel is corrupt, rebuilding it: <file and what is wrong>". An interrupted build leaves
a `.partial-*` directory that no lookup reads and a later build deletes. Without a compiler, or if the
build fails, the library logs one warning, "lacax: <what> unavailable, using the pure-JAX path (<why>)",
and its callers use their pure-JAX path. `LACAX_CPU_KERNELS=0` turns every kernel off; `set_enabled` turns
one library off from Python (call `jax.clear_caches()` afterwards: the choice is made when a function is
traced).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from pathlib import Path
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Mapping

import jax

_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second for compilers that reject -march=native


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


# The cache holds one directory per build, `<stem>-<key>/` with `lib.so` and `manifest.json` (the library's
# size and SHA-256). A build happens in `.partial-<key>-<random>/` and is renamed into place whole, so an
# interrupted build leaves only a `.partial-*` directory, which no lookup reads and a later build sweeps away
# once it is an hour old (a younger one may belong to a build still running).
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


def build(source: Path, flag_sets=_FLAG_SETS) -> Path:
  """Compiles `source` (once per source/headers/flags/compiler/CPU) and returns the verified shared library.

  The headers beside the source (`*.h`, e.g. `cpu_kernels.h`) are on the include path and in the cache key.
  `flag_sets` are tried in order (tests pass `(["-O3"],)` to check the portable build of the vector code).
  """
  source = Path(source)
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  include = jax.ffi.include_dir()
  text = source.read_bytes() + b"".join(h.name.encode() + h.read_bytes()
                                        for h in sorted(source.parent.glob("*.h")))
  root = _cache_dir()
  root.mkdir(parents=True, exist_ok=True)
  _sweep(root)
  errors = []
  for flags in flag_sets:
    args = [*flags, "-std=c++17", "-shared", "-fPIC", "-I", include, "-I", str(source.parent), str(source)]
    key = hashlib.sha256(b"\0".join([_CACHE_FORMAT, text, " ".join(args).encode(), version.encode(),
                                     jax.__version__.encode(), _cpu_fingerprint().encode()])).hexdigest()[:16]
    final = root / f"{source.stem}-{key}"
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
  raise RuntimeError(f"compiling {source.name} failed:\n" + "\n".join(errors))


class KernelLibrary:
  """One kernel source: built at first use, its FFI handlers registered as XLA:CPU custom-call targets.

  Args:
    source: the C++ file.
    targets: {custom-call target name: exported handler symbol}.
    what: how warnings name it ("CPU decode-attention kernel").
  """

  def __init__(self, source: Path, targets: Mapping[str, str], what: str):
    self.source = Path(source)
    self.targets = dict(targets)
    self.what = what
    self._lock = threading.Lock()
    self._state: dict[str, object] = {"enabled": os.environ.get("LACAX_CPU_KERNELS", "1") != "0", "built": None}

  def set_enabled(self, enabled: bool) -> None:
    """Turns the kernels on or off for functions traced from now on (see the module docstring)."""
    self._state["enabled"] = bool(enabled)

  def build(self) -> Path:
    return build(self.source)

  def available(self) -> bool:
    """Whether the kernels are enabled, built and registered (builds them on the first call). False unless
    the default backend is the CPU: no build, and no warning, on GPU/TPU hosts."""
    if not self._state["enabled"] or jax.default_backend() != "cpu":
      return False
    with self._lock:
      if self._state["built"] is None:
        try:
          library = ctypes.CDLL(str(self.build()))
          for target, symbol in self.targets.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
          self._state["library"] = library  # keep it loaded
          self._state["built"] = True
        except Exception as e:  # any failure means: use the pure-JAX path
          logging.warning("lacax: %s unavailable, using the pure-JAX path (%s)", self.what, e)
          self._state["built"] = False
      return bool(self._state["built"])


  def query(self, symbol: str) -> int | None:
    """What the built library's `extern "C" int symbol(void)` returns (a compile-time property of the build,
    such as which instructions it uses), or None where the library is not available."""
    if not self.available():
      return None
    fn = getattr(self._state["library"], symbol)
    fn.restype, fn.argtypes = ctypes.c_int, []
    return int(fn())


def on_cpu(kernel, reference, *args):
  """kernel(*args) on XLA:CPU, reference(*args) on other backends; derivatives always from the reference."""
  fn = jax.custom_jvp(kernel)
  fn.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
  return jax.lax.platform_dependent(*args, cpu=fn, default=reference)

